"""Moved to :mod:`lobster_fx.onnx` (issue 14)."""

# temporary: removed when imports move (issue 14)
from lobster_fx.onnx.export import *  # noqa: F403
from lobster_fx.onnx.export import _ort_parity, _proto_bytes  # noqa: F401
