"""Reproduce the paper's MNIST / Fashion-MNIST tables with lobster_fx, against baselines.

Settings (paper tables 2-4): lenet300-mnist, lenet5-mnist, lenet5-fashion.
Variants, all with the same prune-at-plateau procedure and the same wall-time budget:
  lobster    the LOBSTER rule, lmbda = 1e-4 (paper)
  magnitude  lmbda = 0: pure magnitude pruning at plateaus
  l2         lmbda = 0 plus SGD weight decay 1e-3 (= LOBSTER's largest per-step shrink
             lmbda / lr at lr = 0.1)
  dense      no pruning (the dense error baseline), a few epochs
  lobster-10x  LOBSTER with lmbda = 1e-3, ten times the paper's: a deviation, to see whether a
             stronger shrink buys compression within a CPU budget (reported as such)

Decisions use the 5k validation split only. The reported point of a run is the most
compressed model whose *validation* error is within the paper's error for that
setting (selected on validation, its test error reported as measured).

Usage (each run resumes from its checkpoint; wall time adds up across resumes):
  python benchmarks/reproduce.py run --setting lenet300-mnist --variant lobster --minutes 15
  python benchmarks/reproduce.py summarize      # tables, plots, RESULTS.md section
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "reproduce"
CKPT = RESULTS / "ckpt"  # git-ignored
DATA_ROOT = ROOT.parent / "shared" / "datasets"

SETTINGS = {
    # name: model, dataset, twt, paper targets [(compression, max test error %)]
    "lenet300-mnist": ("lenet300", "mnist", 0.05, [(50.04, 1.65), (114.92, 1.95)]),
    "lenet5-mnist": ("lenet5", "mnist", 0.05, [(230.0, 0.79)]),
    "lenet5-fashion": ("lenet5", "fashion-mnist", 0.10, [(23.31, 8.47)]),
}
VARIANTS = {
    "lobster": {"lmbda": 1e-4, "weight_decay": 0.0},
    "magnitude": {"lmbda": 0.0, "weight_decay": 0.0},
    "l2": {"lmbda": 0.0, "weight_decay": 1e-3},
    "dense": {"lmbda": 0.0, "weight_decay": 0.0},
    "lobster-10x": {"lmbda": 1e-3, "weight_decay": 0.0},
}


def run(setting: str, variant: str, minutes: float, pwe: int, epochs: int, threads: int,
        channels_last: bool | None = None, search_precision: float = 0.0) -> None:
    from lobster_fx.passes.fold import fold
    from lobster_fx.train import TrainConfig, atomic_save, train

    torch.set_num_threads(threads)
    model, dataset, twt, targets = SETTINGS[setting]
    if channels_last is None:  # NHWC: same arithmetic, but measured 0.86-1.12x here (train_cost.md)
        channels_last = False
    name = f"{setting}-{variant}"
    RUNS.mkdir(parents=True, exist_ok=True)
    CKPT.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        model=model, dataset=dataset, data_root=str(DATA_ROOT), epochs=epochs, batch_size=100, lr=0.1,
        twt=twt, pwe=pwe if variant != "dense" else 10**9, max_minutes=minutes, out_dir=str(CKPT / name),
        progress=False, channels_last=channels_last, search_precision=search_precision, **VARIANTS[variant],
    )
    # the reported model: the most compressed one within the paper's error on *validation*
    max_val_error = max(err for _, err in targets)
    selected_path = CKPT / name / "selected.pt"
    selected = torch.load(selected_path, weights_only=True) if selected_path.exists() else None

    def on_epoch(entry: dict, gm) -> None:
        nonlocal selected
        if entry["val_error"] <= max_val_error and (selected is None or entry["compression"] > selected["compression"]):
            selected = {**entry, "state_dict": {k: v.clone() for k, v in fold(gm).state_dict().items()}}
            atomic_save(selected, selected_path)
        if entry["epoch"] % 10 == 0 or entry["pruned"]:
            print(f"{name} epoch {entry['epoch']}: val {entry['val_loss']:.4f} ({entry['val_error']:.2f}%) "
                  f"test {entry['test_error']:.2f}% compression {entry['compression']:.1f}x", flush=True)

    t0 = time.perf_counter()
    result = train(config, on_epoch=on_epoch)
    record = {
        "setting": setting, "variant": variant, "config": config.to_dict(),
        "wall_seconds": result.wall_seconds, "epochs": len(result.log),
        "paper_targets": targets, "selection": f"max compression with val_error <= {max_val_error}%",
        "selected": None if selected is None else {k: v for k, v in selected.items() if k != "state_dict"},
        "final": result.log[-1] if result.log else None,
        "trajectory": _trajectory(result.log),
    }
    (RUNS / f"{name}.json").write_text(json.dumps(record, indent=1))
    if variant == "lobster":
        export_final_model(setting)
    print(f"{name}: done in {time.perf_counter() - t0:.0f} s this session, {result.wall_seconds:.0f} s in all")


def _trajectory(log: list[dict]) -> list[dict]:
    """The committed per-epoch record of a run (the checkpoint's log has everything)."""
    out = []
    for e in log:
        row = {k: e[k] for k in ("epoch", "compression", "val_loss", "val_error", "test_error", "lr")}
        row["pruned"] = bool(e["pruned"])
        if e["pruned"]:
            row["evaluations"] = e["pruned"]["evaluations"]
        if "epoch_seconds" in e:
            row["epoch_seconds"] = round(e["epoch_seconds"], 3)
        if "layers" in e:
            row["layers"] = e["layers"]
        out.append(row)
    return out


def _refresh_from_log(name: str, rec: dict, path: Path) -> None:
    """Fill in fields added to the trajectory after a run was recorded, from its checkpoint log."""
    log_path = CKPT / name / "log.json"
    if not log_path.exists() or all("epoch_seconds" in e for e in rec["trajectory"]):
        return
    log = json.loads(log_path.read_text())["log"]
    if len(log) == rec["epochs"]:
        rec["trajectory"] = _trajectory(log)
        path.write_text(json.dumps(rec, indent=1))


def export_final_model(setting: str) -> Path:
    """benchmarks/results/<setting>.pt: the LOBSTER run's final model, folded, loadable
    into the matching ``lobster_fx.models`` class."""
    from lobster_fx.graph.instrument import instrument
    from lobster_fx.passes.fold import fold
    from lobster_fx.train import TrainConfig, build_model, load_splits

    state = torch.load(CKPT / f"{setting}-lobster" / "checkpoint.pt", weights_only=True)
    config = TrainConfig(**state["config"])
    gm = instrument(build_model(config, load_splits(config)))
    gm.load_state_dict(state["model"])
    path = RESULTS / f"{setting}.pt"
    torch.save(fold(gm).state_dict(), path)
    return path


PAPER_DENSE_ERROR = {"lenet300-mnist": 1.44, "lenet5-mnist": 0.68, "lenet5-fashion": 8.1}  # paper tables 2-4


def _best_at(trajectory: list[dict], max_error: float, key: str = "val_error") -> dict | None:
    ok = [e for e in trajectory if e[key] <= max_error]
    return max(ok, key=lambda e: (e["compression"], -e[key])) if ok else None


def _final_layers(name: str, rec: dict, path: Path) -> dict | None:
    """Per-layer [nonzero, numel] of a run's final model; computed once from its checkpoint
    and kept in the run's JSON (checkpoints are not committed)."""
    if "final_layers" in rec:
        return rec["final_layers"]
    ckpt = CKPT / name / "checkpoint.pt"
    if not ckpt.exists():
        return None
    from lobster_fx.graph.instrument import instrument
    from lobster_fx.report import sparsity_report
    from lobster_fx.train import TrainConfig, build_model, load_splits

    state = torch.load(ckpt, weights_only=True)
    if state["epoch"] != rec["epochs"]:
        return None  # the checkpoint went on after this JSON was written
    config = TrainConfig(**state["config"])
    gm = instrument(build_model(config, load_splits(config)))
    gm.load_state_dict(state["model"])
    rec["final_layers"] = {layer.name: [layer.nonzero, layer.numel] for layer in sparsity_report(gm).layers}
    path.write_text(json.dumps(rec, indent=1))
    return rec["final_layers"]


def _layers_at(entry: dict, rec: dict) -> dict | None:
    """Per-layer counts at an epoch: logged, or the final model's when no pruning happened
    in between (masks only shrink, so an equal total means equal masks)."""
    if "layers" in entry:
        return entry["layers"]
    final = rec.get("final_layers")
    if final and sum(n for n, _ in final.values()) == rec["final"]["nonzero"] and \
            abs(entry["compression"] - rec["final"]["compression"]) < 1e-9:
        return final
    return None


def _reference_val_error(setting: str, recs: dict[str, dict]) -> float | None:
    """The best validation error of any *unpruned* model of the setting (the dense run and
    every pruning run before its first pruning): the calibration point for selection."""
    vals = []
    for rec in recs.values():
        for e in rec["trajectory"]:
            if e["compression"] > 1.0:
                break
            vals.append(e["val_error"])
    return min(vals) if vals else None


def summarize() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, dict[str, dict]] = {}
    for setting in SETTINGS:
        if (CKPT / f"{setting}-lobster" / "checkpoint.pt").exists():
            export_final_model(setting)
        runs[setting] = {}
        for variant in VARIANTS:
            path = RUNS / f"{setting}-{variant}.json"
            if path.exists():
                rec = json.loads(path.read_text())
                _refresh_from_log(f"{setting}-{variant}", rec, path)
                _final_layers(f"{setting}-{variant}", rec, path)
                runs[setting][variant] = rec

    lines = ["## Paper reproduction (issue 4)", ""]
    lines += [
        "Each run: `python benchmarks/reproduce.py run --setting S --variant V --pwe P --epochs E --minutes M` "
        "(resumable; wall time adds up across resumes), then `python benchmarks/reproduce.py summarize`. "
        "SGD lr 0.1, batch 100, lambda 1e-4 (lobster), TWT 0.05 (0.1 Fashion), validation = 5k images "
        "of the training set. Deviations from the paper: PWE (paper 20) and the epoch budget (paper up to "
        "10,000 epochs), per run below.",
        "",
        "### Runs",
        "",
        "| setting | variant | PWE | epochs | wall min | final compression | final test err % |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, recs in runs.items():
        for variant, rec in recs.items():
            fin = rec["final"]
            lines.append(f"| {setting} | {variant} | {rec['config']['pwe'] if variant != 'dense' else '-'} | "
                         f"{rec['epochs']} | {rec['wall_seconds'] / 60:.1f} | {fin['compression']:.1f}x | "
                         f"{fin['test_error']:.2f} |")

    lines += [
        "",
        "### Selected on validation, in the paper's format",
        "",
        "Selection rule (validation only): the most compressed epoch whose validation error is at most "
        "*r + (paper error - paper dense error)*, where *r* is the best validation error of any unpruned "
        "model in the setting (the dense run and every run before its first pruning). That is the error "
        "increase the paper accepted, measured on our validation split, whose error runs above the test "
        "split's. Top-1 is the test error of the selected epoch; 'meets' = at or above the paper's "
        "compression at or below its test error.",
        "",
        "| setting | paper point | variant | epoch | remaining % per layer | compression | val err % | "
        "Top-1 test err % | meets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, (_, _, _, targets) in SETTINGS.items():
        recs = runs[setting]
        ref = _reference_val_error(setting, recs)
        if ref is None:
            continue
        for comp, err in targets:
            budget = ref + err - PAPER_DENSE_ERROR[setting]
            for variant, rec in recs.items():
                if variant == "dense":
                    continue
                sel = _best_at(rec["trajectory"], budget)
                if sel is None:
                    lines.append(f"| {setting} | {comp}x at {err}% | {variant} | - | - | - | - | - | no |")
                    continue
                layers = _layers_at(sel, rec)
                per_layer = ", ".join(f"{k} {100 * n / t:.2f}" for k, (n, t) in layers.items()) if layers else "(not logged)"
                meets = sel["compression"] >= comp and sel["test_error"] <= err
                lines.append(
                    f"| {setting} | {comp}x at {err}% | {variant} | {sel['epoch']} | {per_layer} | "
                    f"{sel['compression']:.1f}x | {sel['val_error']:.2f} | {sel['test_error']:.2f} | "
                    f"{'yes' if meets else 'no'} |")
        lines.append(f"| {setting} | (r = {ref:.2f}% validation error) | | | | | | | |")

    lines += ["", "### Read off the test curve (comparison only)", "",
              "The highest compression among all epochs whose *test* error is within the paper's figure: how "
              "the paper's tables read, but chosen with the test set.", "",
              "| setting | variant | reading | paper |", "|---|---|---|---|"]
    for setting, (_, _, _, targets) in SETTINGS.items():
        for variant, rec in runs[setting].items():
            readings = [(e, _best_at(rec["trajectory"], e, key="test_error")) for _, e in targets]
            curve = ", ".join(f"{b['compression']:.1f}x at <= {e}% (epoch {b['epoch']})" if b else f"none <= {e}%"
                              for e, b in readings)
            lines.append(f"| {setting} | {variant} | {curve} | {', '.join(f'{c}x at {e}%' for c, e in targets)} |")

    lines += ["", "### Equal-epoch comparison", "",
              "Each pruning variant at the last epoch that lobster, magnitude and l2 all reached (a "
              "deviation variant such as lobster-10x is shown if it got that far).", "",
              "| setting | epoch | variant | compression | test err % | val err % |", "|---|---|---|---|---|---|"]
    for setting, recs in runs.items():
        pruning = {v: r for v, r in recs.items() if v != "dense"}
        main = [r["epochs"] for v, r in pruning.items() if v in ("lobster", "magnitude", "l2")]
        if not main:
            continue
        epoch = min(main)
        for v, r in pruning.items():
            if r["epochs"] < epoch:
                continue
            e = r["trajectory"][epoch - 1]
            lines.append(f"| {setting} | {epoch} | {v} | {e['compression']:.1f}x | {e['test_error']:.2f} | {e['val_error']:.2f} |")

    lines += ["", "### Cost", "",
              "Seconds per epoch = training pass + validation + test evaluation + (at plateaus) the threshold "
              "search, on one thread. The search evaluates the validation loss ~log2(live weights) times per "
              "pruning (exact search, as in the paper); `--search-precision 0.01` needs ~8 "
              "(see train_cost.md).", "",
              "| setting | variant | epochs | s/epoch (median) | prunings | validation passes in searches |",
              "|---|---|---|---|---|---|"]
    for setting, recs in runs.items():
        for v, r in recs.items():
            secs = sorted(e["epoch_seconds"] for e in r["trajectory"] if "epoch_seconds" in e)
            prunings = [e for e in r["trajectory"] if e["pruned"]]
            evals = [e["evaluations"] for e in prunings if "evaluations" in e]
            lines.append(f"| {setting} | {v} | {r['epochs']} | {secs[len(secs) // 2]:.1f} | " if secs else
                         f"| {setting} | {v} | {r['epochs']} | - | ")
            lines[-1] += f"{len(prunings)} | {sum(evals) if evals else '-'} |"

    for setting, (_, _, _, targets) in SETTINGS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, rec in runs[setting].items():
            traj = rec["trajectory"]
            ax.plot([e["compression"] for e in traj], [e["test_error"] for e in traj], ".", ms=2, label=variant)
        for c, e in targets:
            ax.plot([c], [e], "k*", ms=10)
        ax.set_xscale("log")
        ax.set_xlabel("compression |theta|/|theta!=0|")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{setting}: every epoch of every run (star: paper)")
        ax.legend()
        ax.set_ylim(0, min(ax.get_ylim()[1], 15))
        fig.tight_layout()
        fig.savefig(RESULTS / f"reproduce-{setting}.png", dpi=100)
        plt.close(fig)
    lines += ["", "Plots: `results/reproduce-<setting>.png` (test error vs compression, every epoch of every run)."]
    (RESULTS / "reproduce.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--setting", choices=list(SETTINGS), required=True)
    r.add_argument("--variant", choices=list(VARIANTS), required=True)
    r.add_argument("--minutes", type=float, default=60.0)
    r.add_argument("--pwe", type=int, default=20)
    r.add_argument("--epochs", type=int, default=100000)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC training (default off; the session-2 LeNet-5 runs used it)")
    r.add_argument("--search-precision", type=float, default=0.0,
                   help="threshold search stops at this share of candidates (0: exact, the paper)")
    sub.add_parser("summarize")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.setting, args.variant, args.minutes, args.pwe, args.epochs, args.threads, args.channels_last,
            args.search_precision)
    else:
        summarize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
