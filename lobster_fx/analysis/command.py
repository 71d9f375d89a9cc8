"""``lobster-fx analyze CHECKPOINT``: PSP-entropy of a training checkpoint's model.

Writes into ``--out`` (created; refused if it exists and is not empty): ``psp.txt`` (the
per-layer table), ``psp.json`` (:meth:`PSPReport.to_dict`), ``psp-histograms.png`` and one
``psp-heatmap-LAYER.png`` per chosen layer. Every file is written through a temporary file and a
rename, after the measurement has succeeded: an error leaves no partial output.

``--data`` is ``test`` (default), ``val`` or ``train`` (that split of the checkpoint's own
dataset), or a ``.pt`` file holding ``{"x": inputs, "y": labels}`` or ``(inputs, labels)``
(loaded with ``weights_only=True``).

    >>> parser = build_parser()
    >>> args = parser.parse_args(["analyze", "run/checkpoint.pt", "--out", "psp"])
    >>> args.data, args.func.__name__
    ('test', 'run_analyze')
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["register", "run_analyze", "build_parser", "main", "load_data"]

SPLITS = ("test", "val", "train")
MAX_DEFAULT_HEATMAPS = 16


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``analyze`` subcommand to ``subparsers`` (``parser.add_subparsers()``'s result)."""
    p = subparsers.add_parser("analyze", help="PSP-entropy of a training checkpoint's model: table, JSON, PNGs",
                              description=__doc__.split("\n\n    >>>")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a lobster-fx train checkpoint (checkpoint.pt)")
    p.add_argument("--data", default="test",
                   help="test, val or train (a split of the checkpoint's dataset), or a .pt file of "
                        "{'x': inputs, 'y': labels} (default: test)")
    p.add_argument("--out", required=True, help="output directory (created; must be empty if it exists)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--heatmap", action="append", default=None, metavar="LAYER",
                   help=f"layer to draw the class-wise heat map of (repeatable; default: every layer, up to "
                        f"{MAX_DEFAULT_HEATMAPS})")
    p.set_defaults(func=run_analyze)
    return p


def load_data(spec: str, splits: Any) -> tuple[Any, Any, str]:
    """``(inputs, labels, description)`` for ``--data``: a split name or a ``.pt`` file.

    Raises:
        ValueError, OSError: an unknown split, a missing or unreadable file, or content that is not
            an ``(x, y)`` pair of tensors (each message names ``spec``).
    """
    import torch

    if spec in SPLITS:
        part = getattr(splits, spec)
        if len(part) == 0:
            raise ValueError(f"--data {spec}: the checkpoint's {spec} split is empty")
        return part.x, part.y, f"the checkpoint dataset's {spec} split"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec}: neither a split ({', '.join(SPLITS)}) nor an existing file")
    if path.is_dir():
        raise ValueError(f"--data {spec}: is a directory; give a split ({', '.join(SPLITS)}) or a .pt file")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--data {spec}: not a readable weights-only torch file ({first})") from exc
    if isinstance(obj, dict) and set(obj) >= {"x", "y"}:
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise ValueError(f"--data {spec}: expected {{'x': inputs, 'y': labels}} or (inputs, labels), "
                         f"got {type(obj).__name__}")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError(f"--data {spec}: inputs and labels must be tensors, got {type(x).__name__} and "
                         f"{type(y).__name__}")
    return x, y, str(path)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out}: directory is not empty (analyze writes psp.txt, psp.json and PNGs into a "
                         "new or empty directory; choose another or empty it)")


def _file_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "root"


def run_analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` command: measure, then write table, JSON and PNGs into ``args.out``."""
    import json

    from lobster_fx.analysis.plots import plot_heatmap, plot_histograms
    from lobster_fx.analysis.psp import psp_entropy
    from lobster_fx.checkpoint import _atomic_write, atomic_write_text, prepare_out_dir
    from lobster_fx.cli import _load_checkpoint_model

    out = Path(args.out)
    _check_out(out)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    gm, config, splits, _ = _load_checkpoint_model(args.checkpoint)
    x, y, source = load_data(args.data, splits)
    report = psp_entropy(gm, x, y, batch_size=args.batch_size)
    layers = list(report.entropy)
    chosen = args.heatmap if args.heatmap else layers[:MAX_DEFAULT_HEATMAPS]
    unknown = [name for name in chosen if name not in report.entropy]
    if unknown:
        raise ValueError(f"--heatmap {unknown[0]!r}: no such layer (layers: {', '.join(layers)})")
    # everything rendered before anything is written
    pngs: dict[str, bytes] = {}
    buf = io.BytesIO()
    plot_histograms(report, buf, title=f"PSP-entropy per unit: {config.model} on {source}")
    pngs["psp-histograms.png"] = buf.getvalue()
    for name in chosen:
        buf = io.BytesIO()
        plot_heatmap(report, name, buf)
        pngs[f"psp-heatmap-{_file_name(name)}.png"] = buf.getvalue()
    table = f"{args.checkpoint}: {config.model} on {config.dataset}, data: {source}\n{report.table()}\n"
    doc = {"checkpoint": str(args.checkpoint), "model": config.model, "dataset": config.dataset,
           "data": source, **report.to_dict()}
    _check_out(out)  # again: it may have changed while measuring
    prepare_out_dir(out)
    atomic_write_text(table, out / "psp.txt")
    atomic_write_text(json.dumps(doc), out / "psp.json")
    for fname, data in pngs.items():
        _atomic_write(out / fname, lambda f, d=data: f.write(d))
    print(table, end="")
    print(f"wrote {out / 'psp.txt'}, {out / 'psp.json'}, {', '.join(str(out / f) for f in pngs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A ``lobster-fx``-like parser with only the ``analyze`` subcommand (for :func:`main`)."""
    parser = argparse.ArgumentParser(prog="lobster-fx")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = register(sub)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the traceback instead of one line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lobster-fx analyze ...`` on its own: exit 0, or 1 with one line on stderr
    (``lobster-fx analyze: error: MESSAGE``; ``--debug`` raises instead), 2 on a usage error."""
    from lobster_fx.cli import EXIT_ERROR, _one_line

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if args.debug:
            raise
        print(f"lobster-fx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
