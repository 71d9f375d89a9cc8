"""``python -m lobster_fx.bench a.onnx b.onnx --batch 1 64``: print the benchmark table."""

import sys

from lobster_fx.bench.run import _cli

if __name__ == "__main__":
    sys.exit(_cli())
