"""Side-by-side methods benchmark (issue 15): SeReNe, LOBSTER, L2, Torch-Pruning and dense, one budget.

Settings: lenet300-mnist, lenet5-mnist, resnet32-fashion (data from ``--data-root``, default
``../shared/datasets`` beside the repository; never downloaded). Methods:

  serene-output  SeReNe, output sensitivity d(sum y)/dz, neuron pruning at plateaus
  serene-loss    SeReNe, loss sensitivity dL/dz, neuron pruning at plateaus
  serene-*-norm  the same, units ranked by their raw weight norm (one scale for all layers) instead of
                 the default norm relative to the layer's mean (session 21's runs)
  serene-*@alone runs made before neuron pruning asked slim (session 24): every unit pruned on its own,
                 residual channels and conv channels slim rounds back to a multiple of 8 included
  lobster        LOBSTER (eq. 6), weight pruning at plateaus
  l2             SGD weight decay 1e-3 + magnitude (weight) pruning at plateaus (reproduce.py's l2)
  torch-pruning  Torch-Pruning (``torch_pruning``): dense pre-training, then ``--tp-steps`` global
                 group-L2 magnitude pruning steps (``MetaPruner`` + ``GroupMagnitudeImportance(p=2)``),
                 each followed by fine-tuning; the same number of epochs as the serene-output run
  dense          no pruning

Our methods share ``lobster_fx.train`` (SGD lr 0.1, batch 100, seed 0, 5k validation split, the
plateau procedure with ``--pwe``, TWT per setting); Torch-Pruning uses the same data, split, seed,
optimizer and batches in its own loop. Every run is resumable (checkpoint in its run folder; wall
time adds up across resumes) and stops after ``--minutes``.

While a run trains, the best-validation model of every distinct sparsity level (every pruning
step) is kept as a snapshot with its live MACs after fold + slim. ``summarize`` then picks, per
(setting, method), the snapshot with the fewest live MACs whose *validation* error is within
``--tolerance`` points (default 0.3) of the dense run's best validation error, exports it
(``export_onnx``: fold, slim, sparse ONNX), and times it against the dense model with
``lobster_fx.benchmark`` (interleaved, one process per model, batch 1 and 64).

Usage:
  python benchmarks/methods.py run --setting lenet300-mnist --method dense --minutes 10
  python benchmarks/methods.py run --setting lenet300-mnist --method serene-output --minutes 20
  python benchmarks/methods.py run --setting lenet300-mnist --method torch-pruning   # after serene-output
  python benchmarks/methods.py run --setting lenet300-mnist --method lobster --twt 0.2 --tag twt0.2
                                             # a variant: folder lenet300-mnist-lobster@twt0.2
  python benchmarks/methods.py summarize     # methods.json, methods.md, methods-<setting>.png

Results: ``benchmarks/results/methods/<setting>-<method>/``: record.json (the run's per-epoch
record), snapshots/index.json (the measured snapshots), selected.pt for the SeReNe runs (the
selected model's state_dict, loadable into ``lobster_fx.models``; written by summarize); the
checkpoint and the snapshots' weights are git-ignored. Then ``benchmarks/results/methods.json``,
``methods.md`` and ``methods-<setting>.png``; ``--results-dir`` writes all of it elsewhere (smoke
tests). Expected time: ``--minutes`` per run (the issue's budgets: 20 for LeNet-300, 45 for
LeNet-5 and ResNet-32), about 2 minutes per setting for summarize.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA_ROOT = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT / "benchmarks"))

from reproduce import VARIANTS  # noqa: E402  (l2 and dense as the reproduction runs them)

SETTINGS = {  # name: model, dataset, twt, default epoch cap
    "lenet300-mnist": ("lenet300", "mnist", 0.05, 1000),
    "lenet5-mnist": ("lenet5", "mnist", 0.05, 1000),
    "resnet32-fashion": ("resnet32", "fashion-mnist", 0.10, 1000),
}
#: TrainConfig fields per method (torch-pruning has its own loop)
METHODS: dict[str, dict[str, Any]] = {
    "serene-output": {"method": "serene", "sensitivity": "output", "lmbda": 1e-4, "weight_decay": 0.0},
    "serene-loss": {"method": "serene", "sensitivity": "loss", "lmbda": 1e-4, "weight_decay": 0.0},
    # session 21's runs: units ranked by their raw weight norm against one threshold (kept conv channels)
    "serene-output-norm": {"method": "serene", "sensitivity": "output", "lmbda": 1e-4, "weight_decay": 0.0,
                           "unit_score": "norm"},
    "serene-loss-norm": {"method": "serene", "sensitivity": "loss", "lmbda": 1e-4, "weight_decay": 0.0,
                         "unit_score": "norm"},
    "lobster": {"method": "lobster", **VARIANTS["lobster"]},
    "l2": {"method": "lobster", **VARIANTS["l2"]},
    "torch-pruning": {},
    "dense": {"method": "lobster", **VARIANTS["dense"]},
}
TOLERANCE = 0.3  # error points over dense (issue 15)
BATCHES = (1, 64)


# --------------------------------------------------------------------------- measuring a model


def macs_per_sample(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of all matmul / conv ops for one sample (as benchmarks/footprint.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *shape))
    model.train(was)
    return int(fc.get_total_flops()) // 2


def slimmed(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """fold + slim (dead units removed) of a copy of ``model``, in eval mode."""
    from lobster_fx import fold, slim

    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    return slim(fold(model).eval(), x).eval()


def units_per_layer(model: nn.Module) -> dict[str, int]:
    """Output units (rows / filters) of every Linear / Conv weight, by parameter name (slim's
    output holds its weights as parameters of a graph module, not as Linear / Conv modules)."""
    return {name.removesuffix(".weight"): int(p.shape[0]) for name, p in model.named_parameters()
            if p.dim() >= 2}


def describe(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """Live MACs, nonzero parameters and units per layer after fold + slim."""
    s = slimmed(model, shape)
    return {
        "macs": macs_per_sample(s, shape),
        "params": int(sum(int((p != 0).sum()) for p in s.parameters())),
        "units": units_per_layer(s),
    }


# --------------------------------------------------------------------------- Torch-Pruning runs


def _resize_like(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the Linear / Conv / BatchNorm modules of a freshly built model the shapes a pruned
    state_dict holds (Torch-Pruning removes channels physically), so that it loads strictly."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            saved = state.get(prefix + key)
            if saved is None or saved.shape == t.shape:
                continue
            new = torch.empty_like(saved)
            if isinstance(t, nn.Parameter):
                setattr(m, key, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                m.register_buffer(key, new)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = m.weight.shape[0] if m.weight is not None else m.running_mean.shape[0]


def _tp_prunable(model: nn.Module, model_name: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers Torch-Pruning may prune, ignored layers). The classifier is never pruned. In
    ResNet-32 only each block's inner conv1: option-A shortcuts zero-pad channels by a fixed
    amount, so channels of the residual stream can not be removed consistently."""
    convs_linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    classifier = convs_linears[-1][1]
    if model_name == "resnet32":
        prunable = [m for n, m in convs_linears if n.endswith(".conv1") and n != "conv1"]
    else:
        prunable = [m for _, m in convs_linears if m is not classifier]
    ignored = [m for _, m in convs_linears if all(m is not p for p in prunable)]
    return prunable, ignored


def _out_units(layers: list[nn.Module]) -> int:
    return sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in layers)


def run_torch_pruning(name: str, config: Any, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dense pre-training, then ``tp_steps`` global pruning steps with fine-tuning, resumable.

    Epochs: ``pre = round(tp_pretrain * epochs)`` dense, the rest split evenly across the
    steps. Step k removes channels so that ``1 - tp_ratio * k / tp_steps`` of the original
    prunable units remain (Torch-Pruning's linear schedule; a fresh ``MetaPruner`` per step on
    the current model, so a resumed run rebuilds its dependency graph from the saved shapes).
    """
    import torch.nn.functional as F
    import torch_pruning as tp

    from lobster_fx.checkpoint import atomic_save
    from lobster_fx.data import batches
    from lobster_fx.train import build_model, evaluate, load_splits

    torch.manual_seed(config.seed)
    splits = load_splits(config)
    shape = tuple(splits.train.x.shape[1:])
    model = build_model(config, splits)
    units0 = _out_units(_tp_prunable(model, config.model)[0])
    epochs = config.epochs
    pre = max(1, round(args.tp_pretrain * epochs))
    per_step = max(1, (epochs - pre) // args.tp_steps)
    prune_at = {pre + k * per_step: k + 1 for k in range(args.tp_steps)}  # epoch index -> step number
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = out / "checkpoint.pt"
    log: list[dict[str, Any]] = []
    epoch0, elapsed0, step = 0, 0.0, 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        _resize_like(model, state["model"])
        model.load_state_dict(state["model"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng_state"])
        log, epoch0, elapsed0, step = state["log"], state["epoch"], state["elapsed"], state["step"]
        if state["schedule"] != [epochs, args.tp_steps, args.tp_ratio, args.tp_pretrain]:
            raise SystemExit(f"{ckpt}: trained with epochs, tp-steps, tp-ratio, tp-pretrain = {state['schedule']}; "
                             "resume with the same values or use a fresh --results-dir")
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    if ckpt.exists():
        opt.load_state_dict(state["optimizer"])
    example = torch.zeros(1, *shape)
    start = time.perf_counter()
    for epoch in range(epoch0, epochs):
        pruned = None
        if epoch in prune_at and prune_at[epoch] > step:
            step = prune_at[epoch]
            prunable, ignored = _tp_prunable(model, config.model)
            now = _out_units(prunable)
            target = units0 * (1 - args.tp_ratio * step / args.tp_steps)
            ratio = min(max(1 - target / now, 0.0), 0.99)
            model.eval()
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
                pruning_ratio=ratio, ignored_layers=ignored)
            pruner.step()
            opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)  # new shapes
            pruned = {"step": step, "ratio": ratio, "units": _out_units(_tp_prunable(model, config.model)[0]),
                      "units_original": units0}
        t0 = time.perf_counter()
        model.train()
        loss_sum, n = 0.0, 0
        for x, y in batches(splits.train, config.batch_size, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss_sum, n = loss_sum + float(loss.detach()) * len(y), n + len(y)
        v_loss, v_err = evaluate(model, splits.val, config.eval_batch_size)
        t_loss, t_err = evaluate(model, splits.test, config.eval_batch_size)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "val_loss": v_loss, "val_error": v_err,
                 "test_loss": t_loss, "test_error": t_err, "tp_step": step, "pruned": pruned,
                 "nonzero": int(sum(p.numel() for p in model.parameters())),
                 "epoch_seconds": time.perf_counter() - t0}
        log.append(entry)
        _keep_snapshot(out, entry, model, shape, level=f"step{step}")
        elapsed = elapsed0 + time.perf_counter() - start
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "torch_rng_state": torch.get_rng_state(), "log": log, "epoch": epoch + 1,
                     "elapsed": elapsed, "step": step,
                     "schedule": [epochs, args.tp_steps, args.tp_ratio, args.tp_pretrain]}, ckpt)
        if entry["pruned"] or (epoch + 1) % 10 == 0:
            print(f"{name} epoch {epoch + 1}: step {step} val {v_err:.2f}% test {t_err:.2f}%", flush=True)
        if args.minutes is not None and elapsed > 60 * args.minutes:
            break
    return log


# --------------------------------------------------------------------------- snapshots


def _keep_snapshot(out: Path, entry: dict[str, Any], model: nn.Module, shape: tuple[int, ...], level: str) -> None:
    """Keep, per sparsity level, the model of the epoch with the lowest validation error
    (folded state_dict plus its measurements) in ``out/snapshots/<level>.pt``."""
    from lobster_fx import fold
    from lobster_fx.checkpoint import atomic_save

    snaps = out / "snapshots"
    snaps.mkdir(exist_ok=True)
    path = snaps / f"{level}.pt"
    index_path = snaps / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    if level in index and index[level]["val_error"] <= entry["val_error"]:
        return
    info = {k: entry[k] for k in ("epoch", "val_loss", "val_error", "test_error") if k in entry}
    info.update(describe(model, shape), level=level)
    atomic_save({"state_dict": {k: v.detach().clone() for k, v in fold(model).state_dict().items()}}, path)
    index[level] = info
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)


def _data_root(rec: dict[str, Any]) -> str:
    """The run's data folder, or the default one when the run was made on another machine."""
    return rec["data_root"] if rec.get("data_root") and Path(rec["data_root"]).is_dir() else str(DATA_ROOT)


def _load_snapshot(rec: dict[str, Any], run_dir: Path, level: str) -> nn.Module:
    """The snapshot's model, as a plain (un-instrumented) module of the run's architecture."""
    from lobster_fx.train import build_model, config_from_dict, load_splits

    config = config_from_dict(rec["config"])
    config.data_root = _data_root(rec)
    model = build_model(config, load_splits(config))
    sd = torch.load(run_dir / "snapshots" / f"{level}.pt", weights_only=True)["state_dict"]
    _resize_like(model, sd)
    model.load_state_dict(sd)
    return model.eval()


# --------------------------------------------------------------------------- run


def _config(setting: str, method: str, args: argparse.Namespace, out: Path, epochs: int) -> Any:
    from lobster_fx.train import TrainConfig

    model, dataset, twt, _ = SETTINGS[setting]
    if getattr(args, "twt", None) is not None:
        twt = args.twt
    fields = dict(METHODS[method]) if method != "torch-pruning" else {"lmbda": 0.0}
    if getattr(args, "lmbda", None) is not None and method not in ("dense", "torch-pruning"):
        fields["lmbda"] = args.lmbda
    pwe = 10**9 if method in ("dense", "torch-pruning") else args.pwe
    return TrainConfig(
        model=model, dataset=args.dataset or dataset, data_root=str(Path(args.data_root).resolve()), epochs=epochs,
        batch_size=100, lr=0.1, twt=twt, pwe=pwe, max_minutes=args.minutes, out_dir=str(out), progress=False,
        threads=args.threads, seed=args.seed, **fields)


def run(setting: str, method: str, args: argparse.Namespace) -> None:
    from lobster_fx.train import train

    torch.set_num_threads(args.threads)
    name = f"{setting}-{method}" + (f"@{args.tag}" if args.tag else "")
    runs = Path(args.results_dir) / "methods"
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or SETTINGS[setting][3]
    if method == "torch-pruning" and not args.epochs:
        ref = runs / f"{setting}-serene-output" / "record.json"
        if not ref.exists():
            raise SystemExit(f"{name}: give --epochs, or run serene-output first (its epoch count is the budget)")
        epochs = json.loads(ref.read_text())["epochs"]
    config = _config(setting, method, args, out, epochs)
    t0 = time.perf_counter()
    if method == "torch-pruning":
        log = run_torch_pruning(name, config, out, args)
        wall = torch.load(out / "checkpoint.pt", weights_only=True)["elapsed"]
    else:
        from lobster_fx.train import load_splits

        input_shape = tuple(load_splits(config).train.x.shape[1:])

        def on_epoch(entry: dict[str, Any], gm: nn.Module) -> None:
            _keep_snapshot(out, entry, gm, input_shape, level=f"nz{entry['nonzero']}")
            if entry["pruned"] or entry["epoch"] % 10 == 0:
                print(f"{name} epoch {entry['epoch']}: val {entry['val_error']:.2f}% test {entry['test_error']:.2f}% "
                      f"compression {entry['compression']:.1f}x", flush=True)

        result = train(config, on_epoch=on_epoch)
        log, wall = result.log, result.wall_seconds
    keys = ("epoch", "val_loss", "val_error", "test_error", "compression", "nonzero", "epoch_seconds", "tp_step")
    record = {
        "setting": setting, "method": method, "config": {**config.to_dict(), "data_root": None},
        "data_root": config.data_root, "epochs": len(log), "wall_seconds": wall,
        "torch_pruning": None if method != "torch-pruning" else {
            "version": __import__("torch_pruning").__version__, "steps": args.tp_steps, "ratio": args.tp_ratio,
            "pretrain_fraction": args.tp_pretrain, "importance": "GroupMagnitudeImportance(p=2)",
            "pruner": "MetaPruner(global_pruning=True)"},
        "trajectory": [{k: e[k] for k in keys if k in e} | {"pruned": bool(e["pruned"])} for e in log],
    }
    (out / "record.json").write_text(json.dumps(record, indent=1))
    print(f"{name}: {len(log)} epochs, done in {time.perf_counter() - t0:.0f} s this session, {wall:.0f} s in all")


# --------------------------------------------------------------------------- summarize


def _run_labels(runs_dir: Path, setting: str) -> list[str]:
    """The finished runs of ``setting``: method names in :data:`METHODS` order, each followed by its
    tagged variants (``serene-output@twt0.2``: a run made with ``--tag twt0.2``)."""
    labels = []
    for method in METHODS:
        tagged = sorted(p.parent.name.removeprefix(f"{setting}-")
                        for p in runs_dir.glob(f"{setting}-{method}@*/record.json"))
        plain = [method] if (runs_dir / f"{setting}-{method}" / "record.json").exists() else []
        labels += plain + tagged
    return labels


def _select(index: dict[str, dict[str, Any]], max_val_error: float | None) -> dict[str, Any] | None:
    ok = [s for s in index.values() if max_val_error is None or s["val_error"] <= max_val_error]
    return min(ok, key=lambda s: (s["macs"], s["val_error"])) if ok else None


def summarize(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lobster_fx import benchmark, export_onnx

    results = Path(args.results_dir)
    runs_dir = results / "methods"
    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "tolerance": args.tolerance,
        "torch": torch.__version__, "loadavg_start": list(os.getloadavg()), "settings": {}}
    lines = ["## Methods side by side (issue 15)", "",
             "Each run: `python benchmarks/methods.py run --setting S --method M --minutes T` (resumable), then "
             "`python benchmarks/methods.py summarize`. Selection (validation only): per run, the snapshot with the "
             f"fewest live MACs (after fold + slim) whose validation error is within {args.tolerance} points of the "
             "dense run's best validation error; its test error is reported. Latency: ONNX Runtime CPU, 1 thread, "
             "interleaved with the dense model, one process per model; speed-up = dense / model.", "",
             "| setting | method | epochs | wall min | epoch | val err % | test err % | params | live MACs | "
             "MAC ratio | ONNX bytes | speed-up b1 | speed-up b64 | b64 / MAC ratio | units per layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    targets: list[str] = []  # after the table: one table for every setting
    workdir = Path(tempfile.mkdtemp(prefix="lobster_methods_"))
    try:
        for setting in SETTINGS:
            recs = {m: json.loads((runs_dir / f"{setting}-{m}" / "record.json").read_text())
                    for m in _run_labels(runs_dir, setting)}
            if not recs:
                continue
            indexes = {m: json.loads((runs_dir / f"{setting}-{m}" / "snapshots" / "index.json").read_text())
                       for m in recs}
            dense_val = min(s["val_error"] for s in indexes["dense"].values()) if "dense" in indexes else None
            max_val = None if dense_val is None else dense_val + args.tolerance
            chosen: dict[str, dict[str, Any]] = {}
            for m, index in indexes.items():
                sel = _select(index, max_val) if m != "dense" else min(index.values(), key=lambda s: s["val_error"])
                if sel is not None:
                    chosen[m] = sel
            paths, shape = {}, None
            for m, sel in chosen.items():
                model = _load_snapshot(recs[m], runs_dir / f"{setting}-{m}", sel["level"])
                if shape is None:
                    from lobster_fx.train import config_from_dict, load_splits

                    cfg = config_from_dict(recs[m]["config"])
                    cfg.data_root = _data_root(recs[m])
                    shape = tuple(load_splits(cfg).train.x.shape[1:])
                x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
                rep = export_onnx(model, x, workdir / f"{setting}-{m}.onnx")
                if m.startswith("serene"):  # the final SeReNe models are committed (issue 15)
                    torch.save(model.state_dict(), runs_dir / f"{setting}-{m}" / "selected.pt")
                sel["onnx_bytes"], sel["parity_max_abs_diff"] = rep.file_bytes, rep.parity_max_abs_diff
                paths[m] = str(workdir / f"{setting}-{m}.onnx")
            bench = None
            if paths:
                baseline = "dense" if "dense" in paths else next(iter(paths))
                bench = benchmark(paths, batch_sizes=BATCHES, rounds=args.rounds, repeats=args.repeats,
                                  warmup=args.warmup, baseline=baseline)
                print(bench.table(), flush=True)
            dense_macs = chosen["dense"]["macs"] if "dense" in chosen else None
            for m, sel in chosen.items():
                sel["latency_ms"] = {str(b): bench.models[m].latency[b].median_ms for b in BATCHES}
                sel["speedup"] = {str(b): bench.speedup(m, b) for b in BATCHES}
                sel["mac_ratio"] = dense_macs / sel["macs"] if dense_macs else None
            out["settings"][setting] = {
                "dense_best_val_error": dense_val, "max_val_error": max_val,
                "runs": {m: {"epochs": r["epochs"], "wall_seconds": r["wall_seconds"], "config": r["config"],
                             "torch_pruning": r["torch_pruning"], "selected": chosen.get(m),
                             "snapshots": sorted(indexes[m].values(), key=lambda s: s["macs"])}
                         for m, r in recs.items()}}
            for m, r in recs.items():
                sel = chosen.get(m)
                if sel is None:
                    lines.append(f"| {setting} | {m} | {r['epochs']} | {r['wall_seconds'] / 60:.1f} | none within "
                                 f"{args.tolerance} points | | | | | | | | | | |")
                    continue
                ratio = sel["mac_ratio"]
                units = ", ".join(f"{k} {v}" for k, v in sel["units"].items())
                if len(units) > 120:  # ResNet-32: the per-layer figures are in methods.json
                    dense_units = chosen["dense"]["units"] if "dense" in chosen else sel["units"]
                    units = (f"{sum(sel['units'].values())} of {sum(dense_units.values())} units in "
                             f"{len(sel['units'])} layers")
                lines.append(
                    f"| {setting} | {m} | {r['epochs']} | {r['wall_seconds'] / 60:.1f} | {sel['epoch']} | "
                    f"{sel['val_error']:.2f} | {sel['test_error']:.2f} | {sel['params']:,} | {sel['macs']:,} | "
                    + (f"{ratio:.2f}x" if ratio else "-") + f" | {sel['onnx_bytes']:,} | "
                    f"{sel['speedup']['1']:.2f}x | {sel['speedup']['64']:.2f}x | "
                    + (f"{sel['speedup']['64'] / ratio:.2f}" if ratio else "-") + f" | {units} |")
            _plot(plt, setting, indexes, chosen, results / f"methods-{setting}.png")
            targets += _targets(setting, chosen, indexes, args.tolerance)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["loadavg_end"] = list(os.getloadavg())
    lines += ["", "Targets (issue 15), from the selected snapshots above:", "", *targets]
    lines += ["", "Plots: `results/methods-<setting>.png` (test error vs live MACs of every snapshot; star: selected)."]
    (results / "methods.json").write_text(json.dumps(out, indent=1) + "\n")
    md = results / "methods.md"
    marker = "<!-- notes (kept by summarize) -->"  # hand-written notes below it survive a new summary
    old = md.read_text() if md.exists() else ""
    notes = old.split(marker, 1)[1] if marker in old else "\n"
    md.write_text("\n".join(lines) + "\n\n" + marker + notes)
    print("\n".join(lines))


def _targets(setting: str, chosen: dict[str, Any], indexes: dict[str, Any], tol: float) -> list[str]:
    """The issue's targets for one setting, each stated with its figures, met or not."""
    out = [""]
    d = chosen.get("dense")
    for m, s in chosen.items():
        method, _, tag = m.partition("@")
        if method not in ("serene-output", "serene-loss"):
            continue
        lob = chosen.get("lobster" + (f"@{tag}" if tag else ""))  # the same procedure (tag) as this run
        if lob:
            r = lob["macs"] / s["macs"]
            out.append(f"- {setting}: {m} has {r:.2f}x fewer live MACs than lobster{'@' + tag if tag else ''} "
                       "(target >= 3x): "
                       f"**{'met' if r >= 3 else 'not met'}**.")
        if d and setting != "resnet32-fashion":
            r = d["macs"] / s["macs"]
            out.append(f"- {setting}: {m} has {r:.2f}x fewer live MACs than dense (target >= 8x): "
                       f"**{'met' if r >= 8 else 'not met'}**.")
        tp_snaps = [t for t in indexes.get("torch-pruning", {}).values() if t["level"] != "step0"]  # pruned only
        near = [t for t in tp_snaps if abs(t["macs"] - s["macs"]) <= 0.1 * s["macs"]]
        if near:
            t = min(near, key=lambda t: t["val_error"])
            out.append(f"- {setting}: {m} vs torch-pruning at equal live MACs (+-10%: {s['macs']:,} vs "
                       f"{t['macs']:,}): test error {s['test_error']:.2f}% vs {t['test_error']:.2f}%: "
                       f"**{'met' if s['test_error'] <= t['test_error'] else 'not met'}**.")
        elif tp_snaps:
            out.append(f"- {setting}: {m} vs torch-pruning: no torch-pruning snapshot within 10% of "
                       f"{s['macs']:,} live MACs.")
    for m, s in chosen.items():
        if m != "dense" and s.get("mac_ratio"):
            q = s["speedup"]["64"] / s["mac_ratio"]
            if q < 0.7:
                out.append(f"- {setting}: {m} batch-64 speed-up {s['speedup']['64']:.2f}x is {q:.2f}x its MAC "
                           f"ratio {s['mac_ratio']:.2f}x (target >= 0.7): **not met**.")
    return out


def _plot(plt: Any, setting: str, indexes: dict[str, Any], chosen: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, index in indexes.items():
        pts = sorted(index.values(), key=lambda s: s["macs"])
        line = ax.plot([s["macs"] for s in pts], [s["test_error"] for s in pts], ".-", ms=4, lw=0.8, label=m)
        if m in chosen:
            ax.plot([chosen[m]["macs"]], [chosen[m]["test_error"]], "*", ms=12, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("live MACs per sample after fold + slim")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{setting}: snapshots of every run (star: selected on validation)")
    ax.legend(fontsize=8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(0.0, lo), min(hi, 15.0) if math.isfinite(hi) else 15.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tag(text: str) -> str:
    if not text or not all(c.isalnum() or c in ".-_" for c in text):
        raise argparse.ArgumentTypeError(f"a tag is letters, digits and . - _ only, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(RESULTS), help="where methods/, methods.json/.md/.png go")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--setting", choices=list(SETTINGS), required=True)
    r.add_argument("--method", choices=list(METHODS), required=True)
    r.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of this run (all resumes together)")
    r.add_argument("--epochs", type=int, default=None,
                   help="epoch cap (default: the setting's; torch-pruning: the serene-output run's epoch count)")
    r.add_argument("--pwe", type=int, default=20, help="plateau waiting epochs (our methods)")
    r.add_argument("--lmbda", type=float, default=None, help="override the method's lambda (recorded in record.json)")
    r.add_argument("--twt", type=float, default=None,
                   help="override the setting's loss tolerance per pruning phase (recorded in record.json)")
    r.add_argument("--tag", default=None, type=_tag,
                   help="a variant's run folder <setting>-<method>@<tag> (e.g. twt0.2 with --twt 0.2); summarize "
                        "lists it beside the untagged run and compares it with lobster@<tag>")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--data-root", default=str(DATA_ROOT))
    r.add_argument("--tp-steps", type=int, default=6, help="torch-pruning: global pruning steps")
    r.add_argument("--tp-ratio", type=float, default=0.9, help="torch-pruning: share of prunable units removed in all")
    r.add_argument("--tp-pretrain", type=float, default=0.25, help="torch-pruning: share of epochs trained dense first")
    r.add_argument("--dataset", default=None, help=argparse.SUPPRESS)  # smoke tests: digits
    s = sub.add_parser("summarize")
    s.add_argument("--tolerance", type=float, default=TOLERANCE)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.setting, args.method, args)
    else:
        summarize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
