"""``lobster-fx`` command line: demo (the main job), train, export, bench, report, analyze.

Run ``lobster-fx demo`` on a fresh install: it needs no network and no download.

``lobster-fx train`` takes the user's model and data: ``--model torchvision:NAME | timm:NAME |
package.module:factory [--model-kwargs JSON]`` and ``--data imagefolder:DIR | package.module:function``
(``package.module`` is imported with the current directory first on ``sys.path``, as ``python -m``
does); every :class:`lobster_fx.train.TrainConfig` field is an option. ``lobster-fx export``
rebuilds the model from the checkpoint's recorded config and input shape, without the data, or
from ``--model SPEC --state-dict FILE --input-shape C,H,W``.

Exit status: 0 on success; 1 on an error, which ends with one line on stderr
(``lobster-fx COMMAND: error: MESSAGE``; ``lobster-fx --debug COMMAND ...`` shows the
traceback instead); 2 on a usage error (argparse's message); 143 (128 + SIGTERM) when
``train`` was stopped by SIGTERM after keeping a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "main", "run_demo"]

EXIT_ERROR = 1  #: an error, reported in one line (``--debug``: with its traceback)
EXIT_USAGE = 2  #: a usage error, reported by argparse


def _load_checkpoint_model(path: str) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """Rebuild the instrumented model of a ``lobster-fx train`` checkpoint.

    The checkpoint is loaded with ``weights_only=True``: no code in it runs.

    Raises:
        OSError, ValueError: ``path`` is missing, not a lobster-fx training checkpoint, or its
            weights do not fit the model its config names (each message names ``path``).
    """
    from lobster_fx.graph.instrument import instrument
    from lobster_fx.train import (
        build_model,
        config_from_dict,
        load_checkpoint,
        load_splits,
    )

    state = load_checkpoint(path)
    config = config_from_dict(state["config"], path)
    splits = load_splits(config)
    gm = instrument(build_model(config, splits))
    try:
        gm.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: its weights do not fit model {config.model!r} on {config.dataset!r} "
                         f"({first})") from exc
    return gm, config, splits, state


def _load_weights(gm: nn.Module, weights: dict[str, Any], path: str, what: str) -> None:
    try:
        gm.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: its weights do not fit {what} ({first})") from exc


def _rebuild_checkpoint_model(path: str, input_shape: tuple[int, ...] | None = None,
                              ) -> tuple[nn.Module, Any, dict[str, Any], tuple[int, ...]]:
    """The instrumented model of a training checkpoint, rebuilt without loading its data.

    Returns ``(gm, config, state, input_shape)`` (``state["data_info"]["input_dtype"]``, where
    recorded, is the inputs' dtype). The input shape and class count come from the
    checkpoint's ``data_info`` (recorded since the user-model command line); ``input_shape``
    overrides the recorded shape. A checkpoint without ``data_info`` falls back to loading the
    data as :func:`_load_checkpoint_model` does (unless ``input_shape`` is given for a model that
    does not need the data to be built).

    Raises:
        OSError, ValueError: as :func:`_load_checkpoint_model` (the file, its config, or weights
            that do not fit the rebuilt model; each message names ``path``).
    """
    from lobster_fx.graph.instrument import instrument
    from lobster_fx.specs import parse_model_spec
    from lobster_fx.train import config_from_dict, load_checkpoint, model_from_config

    state = load_checkpoint(path)
    config = config_from_dict(state["config"], path)
    info = state.get("data_info")
    builtin = parse_model_spec(config.model)[0] == "builtin"
    if not isinstance(info, dict) and (builtin or input_shape is None):  # an older checkpoint: read the data
        gm, config, splits, state = _load_checkpoint_model(path)
        return gm, config, state, input_shape or tuple(splits.train.x.shape[1:])
    shape = input_shape or tuple(int(d) for d in info["input_shape"])
    num_classes = int(info["num_classes"]) if isinstance(info, dict) else 0
    gm = instrument(model_from_config(config, shape, num_classes))
    _load_weights(gm, state["model"], path, f"model {config.model!r}")
    return gm, config, state, shape


def _parse_shape(text: str) -> tuple[int, ...]:
    """``C,H,W`` (or ``CxHxW``) as a tuple of positive ints."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive ints such as 3,32,32, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive ints such as 3,32,32, got {text!r}")
    return shape


def _state_dict_model(spec: str, kwargs: dict[str, Any] | None, path: str) -> nn.Module:
    """``spec``'s model with the weights of ``path``: a plain or an instrumented state dict, or a
    lobster-fx checkpoint (its ``model`` entry); read with ``weights_only=True``."""
    from lobster_fx.checkpoint import _read_checkpoint
    from lobster_fx.graph.instrument import instrument
    from lobster_fx.specs import build_model_from_spec

    weights = _read_checkpoint(Path(path))
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict) and "config" in weights:
        weights = weights["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} is not a state dict (a dict of tensors, as torch.save(model.state_dict()) "
                         f"writes); it holds a {type(weights).__name__}")
    model = build_model_from_spec(spec, kwargs)
    masked = any(key.rsplit(".", 1)[-1].endswith("_mask") for key in weights)
    gm = instrument(model) if masked else model  # export_onnx folds masks; a plain model needs none
    _load_weights(gm, weights, path, f"model {spec!r}" + (" (instrumented)" if masked else ""))
    return gm


def _write_json(obj: Any, path: Path) -> None:
    from lobster_fx.train import atomic_write_text

    atomic_write_text(json.dumps(obj, indent=1), path)


def run_demo(out: Path, *, dataset: str = "digits", data_root: str | None = None, epochs: int | None = None,
             bench_rounds: int = 5, progress: bool = True, method: str = "lobster") -> dict[str, Any]:
    """Train LeNet-300 with LOBSTER (or SeReNe: ``method="serene"``), prune, fold, slim, export,
    benchmark; write report.json."""
    from lobster_fx.bench import benchmark
    from lobster_fx.onnx.export import export_onnx
    from lobster_fx.passes.fold import fold
    from lobster_fx.passes.slim import slim
    from lobster_fx.report import plot_layers, plot_training, sparsity_report
    from lobster_fx.train import TrainConfig, evaluate, train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if dataset == "digits":
        config = TrainConfig(model="lenet300", dataset="digits", epochs=epochs or 800, batch_size=32, lr=0.05,
                             lmbda=5e-4, twt=0.05, pwe=3, out_dir=str(out / "train"), checkpoint_every=50,
                             threads=1, progress=progress, method=method)
    else:
        config = TrainConfig(model="lenet300", dataset=dataset, data_root=data_root, epochs=epochs or 30,
                             batch_size=100, lr=0.1, lmbda=1e-4, twt=0.05, pwe=3, out_dir=str(out / "train"),
                             checkpoint_every=5, threads=1, progress=progress, method=method)
    result = train(config, resume=False)
    gm, splits = result.gm, result.splits
    folded = fold(gm).eval()
    _, test_error = evaluate(folded, splits.test)
    sparsity = sparsity_report(gm)
    example = splits.test.x[:1]

    files = {"dense": out / "dense.onnx", "sparse": out / "sparse.onnx", "slim": out / "slim.onnx"}
    exports = {
        "dense": export_onnx(folded, example, files["dense"], sparse=False, slim=False),
        "sparse": export_onnx(folded, example, files["sparse"], sparse=True, slim=False),
        "slim": export_onnx(folded, example, files["slim"], sparse=True, slim=True),
    }
    slimmed = slim(folded, (example,))
    slim_report = slimmed.meta["lobster_slim"]
    _, slim_test_error = evaluate(slimmed, splits.test)
    bench = benchmark({k: str(v) for k, v in files.items()}, batch_sizes=(1, 64), example_input=example,
                      rounds=bench_rounds, baseline="dense")
    plot_layers(sparsity, str(out / "layers.png"))
    plot_training(result.log, str(out / "training.png"))

    bench_d = bench.to_dict()
    latency = {
        name: {str(b): stats["median_ms"] for b, stats in model["latency"].items()}
        for name, model in bench_d["models"].items()
    }
    report = {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "compression_ratio": sparsity.compression_ratio,
        "test_error": test_error,
        "slim_test_error": slim_test_error,
        "epochs": len(result.log),
        "train_seconds": result.wall_seconds,
        "layers": [{"name": layer.name, "numel": layer.numel, "nonzero": layer.nonzero} for layer in sparsity.layers],
        "slim": {"params_before": slim_report.params_before, "params_after": slim_report.params_after},
        "onnx": {name: e.file_bytes for name, e in exports.items()},
        "onnx_reports": {name: e.to_dict() for name, e in exports.items()},
        "latency_ms": latency,
        "benchmark": bench_d,
        "prunings": [e["pruned"] for e in result.log if e["pruned"]],
        "total_seconds": time.perf_counter() - t0,
    }
    _write_json(report, out / "report.json")
    return report


def _print_demo_summary(report: dict[str, Any], out: Path) -> None:
    dense_bytes = report["onnx"]["dense"]
    lat = report["latency_ms"]
    print()
    method = {"lobster": "LOBSTER", "serene": "SeReNe"}[report.get("method", "lobster")]
    print(f"{method} on {report['model']}/{report['dataset']}: {report['epochs']} epochs in {report['train_seconds']:.0f} s")
    print(f"compression {report['compression_ratio']:.1f}x at {report['test_error']:.2f}% test error "
          f"(slimmed: {report['slim_test_error']:.2f}%); parameters after slim "
          f"{report['slim']['params_after']} of {report['slim']['params_before']}")
    print()
    print(f"{'model':8s} {'file bytes':>11s} {'size':>7s} {'b=1 ms':>9s} {'b=64 ms':>9s} {'speedup b=64':>13s}")
    for name in ("dense", "sparse", "slim"):
        size = report["onnx"][name]
        print(f"{name:8s} {size:11d} {size / dense_bytes:6.3f}x {lat[name]['1']:9.4f} {lat[name]['64']:9.4f} "
              f"{lat['dense']['64'] / lat[name]['64']:12.2f}x")
    print()
    print(f"wrote {out / 'report.json'}, dense/sparse/slim .onnx, layers.png, training.png "
          f"({report['total_seconds']:.0f} s in all)")


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = run_demo(out, dataset=args.dataset, data_root=args.data_root, epochs=args.epochs,
                      progress=not args.no_progress, method=args.method)
    _print_demo_summary(report, out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lobster_fx.config_cli import dataclass_kwargs
    from lobster_fx.report import sparsity_report
    from lobster_fx.train import TrainConfig, train

    config = TrainConfig(**dataclass_kwargs(args, TrainConfig))
    result = train(config, resume=not args.restart)
    print(sparsity_report(result.gm).table())
    last = result.log[-1] if result.log else {}
    ckpt = Path(config.out_dir) / "checkpoint.pt"
    print(f"test error {last.get('test_error', float('nan')):.2f}%  checkpoint: {ckpt}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lobster_fx.onnx.export import export_onnx

    if args.state_dict is not None:
        if args.checkpoint is not None:
            raise ValueError(f"give either a checkpoint ({args.checkpoint}) or --state-dict, not both")
        if args.model is None or args.input_shape is None:
            raise ValueError("--state-dict needs --model SPEC (and --model-kwargs as trained) and --input-shape C,H,W")
        gm, shape = _state_dict_model(args.model, args.model_kwargs, args.state_dict), args.input_shape
        dtype = args.input_dtype
    else:
        if args.checkpoint is None:
            raise ValueError("give a training checkpoint and the output file, or --model SPEC --state-dict FILE "
                             "--input-shape C,H,W and the output file")
        if args.model is not None or args.model_kwargs is not None:
            raise ValueError("--model and --model-kwargs go with --state-dict; a checkpoint records its model")
        gm, _, state, shape = _rebuild_checkpoint_model(args.checkpoint, args.input_shape)
        dtype = (state.get("data_info") or {}).get("input_dtype", "float32")
    # a fixed random example (standardised data is about N(0, 1)), or token ids 0 and 1: no data needed
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 2, (1, *shape), generator=gen) if dtype == "int64" else \
        torch.randn(1, *shape, generator=gen)
    report = export_onnx(gm, example, args.output, sparse=not args.dense, slim=not args.no_slim,
                         index_dtype="compact" if args.compact else "int64")
    print(report)
    return 0


def _model_names(paths: Sequence[str]) -> dict[str, str]:
    """Name each model by its file's stem, or by its path where two stems are the same."""
    stems = [Path(p).stem for p in paths]
    return {(stem if stems.count(stem) == 1 else p): p for stem, p in zip(stems, paths)}


def _cmd_bench(args: argparse.Namespace) -> int:
    from lobster_fx.bench import benchmark

    models = _model_names(args.models)
    providers = ("CUDAExecutionProvider",) if args.cuda else ("CPUExecutionProvider",)
    report = benchmark(models, batch_sizes=tuple(args.batch_sizes), rounds=args.rounds, providers=providers)
    print(report.table())
    if args.json:
        _write_json(report.to_dict(), Path(args.json))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lobster_fx.report import plot_layers, plot_training, sparsity_report

    gm, _, state, _ = _rebuild_checkpoint_model(args.checkpoint)
    rep = sparsity_report(gm)
    print(rep.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_layers(rep, str(out / "layers.png"))
    if state.get("log"):
        plot_training(state["log"], str(out / "training.png"))
    _write_json(rep.to_dict(), out / "sparsity.json")
    print(f"wrote {out / 'layers.png'}, {out / 'training.png'}, {out / 'sparsity.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug_help = "on an error, show the traceback instead of one line"
    parser = argparse.ArgumentParser(prog="lobster-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train, prune, fold, slim, export and benchmark LeNet-300 (no download)")
    p.add_argument("--out", default="lobster-demo")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist"])
    p.add_argument("--data-root", default=None, help="folder holding MNIST/ and FashionMNIST/ (not for digits)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--method", default="lobster", choices=["lobster", "serene"],
                   help="lobster: weights (eq. 6); serene: whole neurons by sensitivity, pruned as units")
    p.set_defaults(func=_cmd_demo)

    from lobster_fx.config_cli import add_dataclass_options
    from lobster_fx.train import CHOICES, TrainConfig

    p = sub.add_parser("train", help="train a model with LOBSTER or SeReNe (resumes from --out/checkpoint.pt)",
                       description="Train --model on --data with LOBSTER (or SeReNe) and plateau pruning; every "
                       "TrainConfig field is an option. package.module:factory and package.module:function are "
                       "imported with the current directory first on sys.path, as python -m does.")
    p.add_argument("--restart", action="store_true",
                   help="start over, ignoring an existing checkpoint (a resume must keep the options that define "
                        "the run: only --epochs, --max-minutes, --out, --checkpoint-every, --threads, --device and "
                        "--no-progress may change)")
    add_dataclass_options(p, TrainConfig, aliases={"out_dir": ["--out", "--out-dir"],
                                                   "dataset": ["--data", "--dataset"]},
                          choices=CHOICES, required=["out_dir"])
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a training checkpoint (or a model and its state dict) to ONNX",
                       usage="lobster-fx export [-h] [CHECKPOINT] OUTPUT [--input-shape C,H,W] "
                             "[--model SPEC [--model-kwargs JSON] --state-dict FILE] [--dense] [--no-slim] [--compact]",
                       description="Export a lobster-fx train checkpoint: the model is rebuilt from its recorded "
                       "config and input shape, without the data. Or export --model SPEC with the weights of "
                       "--state-dict FILE (then --input-shape is needed).")
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a lobster-fx train checkpoint.pt (leave out with --state-dict)")
    p.add_argument("output", metavar="OUTPUT", help="the .onnx file to write")
    p.add_argument("--input-shape", type=_parse_shape, default=None, metavar="C,H,W",
                   help="one input's shape, without the batch dimension (checkpoints that train writes now record "
                        "it; needed with --state-dict)")
    p.add_argument("--input-dtype", default="float32", choices=["float32", "int64"],
                   help="with --state-dict: the inputs' dtype (int64: token ids)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="with --state-dict: lenet300, lenet5, resnet32, torchvision:NAME, timm:NAME or "
                        "package.module:factory (imported with the current directory on sys.path)")
    p.add_argument("--model-kwargs", type=_json_arg, default=None, metavar="JSON",
                   help="with --state-dict: the model's constructor arguments, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--state-dict", default=None, metavar="FILE",
                   help="the weights: torch.save(model.state_dict()) of --model, instrumented or plain, or a "
                        "lobster-fx checkpoint (loaded with weights_only=True)")
    p.add_argument("--dense", action="store_true", help="keep dense initializers")
    p.add_argument("--no-slim", action="store_true")
    p.add_argument("--compact", action="store_true", help="smallest index type ONNX Runtime accepts")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="time ONNX models side by side with ONNX Runtime")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cuda", action="store_true", help="CUDA provider (fails if not really in use)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="per-layer table and PNG plots of a training checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=".")
    p.set_defaults(func=_cmd_report)

    from lobster_fx.analysis.command import register as register_analyze

    register_analyze(sub)  # analyze: PSP-entropy table, JSON and PNGs of a checkpoint
    for p in sub.choices.values():  # --debug after the command too (SUPPRESS: absent, the global value holds)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _json_arg(text: str) -> dict[str, Any]:
    from lobster_fx.config_cli import _json_object

    return _json_object(text)


def _one_line(exc: BaseException) -> str:
    """The exception as one line: its message's first line, with the type where the message is unclear."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " [...] (--debug shows all)"
    if not isinstance(exc, (ValueError, TypeError, OSError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``lobster-fx`` command; return its exit status (see the module docstring).

    Errors end with one line on stderr, ``lobster-fx COMMAND: error: MESSAGE`` (exit 1);
    ``--debug`` lets them raise with their traceback instead. KeyboardInterrupt and SystemExit
    pass through; argparse reports usage errors itself (exit 2).
    """
    from lobster_fx.train import TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"lobster-fx {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if args.debug:
            raise
        print(f"lobster-fx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
