"""NEq benchmark (issue 16): does freezing neurons at equilibrium make training really cheaper?

Runs, same seeds, same initial weights, same batches, interleaved inside one process step by
step (batch 1 of ``baseline``, ``neq``, ``random``, ``neq-lobster``, the order rotating at every
batch; then batch 2, ...; NEq's measurement at each epoch's start), so load on the machine hits
all of them alike (interleaving whole epochs was tried first: the same work measured 58-152 ms
per step within one epoch on this shared machine):

  baseline     no NEq
  neq          lobster_fx.NEq (eps 1e-3, mu 0.5, the classifier excluded), the fast path on
  random       random freezing at NEq's per-layer frozen fraction of the same epoch
  neq-lobster  NEq and the LOBSTER rule (lmbda 1e-4, no pruning) on the same optimizer

Per epoch: frozen fraction per layer, the backward MACs saved counted correctly (only the dW
rows of frozen units, plus dX of every layer at or below the lowest layer that still trains),
the median step time, the epoch's training time (steps + NEq's measurement), test error.
The ceiling for a run is its saved MACs over the baseline step's MACs (forward + backward),
epoch by epoch, i.e. the time saving if time were proportional to MACs.

Usage (resumes from benchmarks/results/ckpt/neq/ after each epoch; one CPU thread)::

    nice -n 10 python benchmarks/neq.py run --setting lenet5-mnist --epochs 12 --train-size 20000
    python benchmarks/neq.py run --epochs 30 --train-size 20000 --schedule step   # lr x0.1 at 50% and 75%
    python benchmarks/neq.py probe             # the fast path alone, LeNet-5
    python benchmarks/neq.py summarize     # neq.json, neq.md, neq-*.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CKPT = RESULTS / "ckpt" / "neq"  # git-ignored
DATA_ROOT = ROOT.parent / "shared" / "datasets"
RUNS = ("baseline", "neq", "random", "neq-lobster")
SETTINGS = {  # name: model factory kwargs, dataset, exclude
    "lenet5-mnist": ("lenet5", "mnist", ["fc2"]),
    "resnet32-fashion": ("resnet32", "fashion-mnist", ["linear"]),
}
LR, MOMENTUM, WD, BATCH = 0.05, 0.9, 5e-4, 100
EPS, MU, LMBDA = 1e-3, 0.5, 1e-4
TARGET_ERR, TARGET_TIME, TARGET_CEIL = 0.15, 0.20, 0.60


def _model(name: str) -> nn.Module:
    from lobster_fx.models import LeNet5, ResNet32

    return LeNet5() if name == "lenet5" else ResNet32(in_channels=1)


def layer_macs(gm: nn.Module, taps, x: torch.Tensor) -> dict[str, int]:
    """Forward MACs per sample of every unit layer (= its dW MACs = its dX MACs), in graph order."""
    from lobster_fx.graph.taps import per_unit

    shapes: dict[str, int] = {}
    handles = []
    for name, tap in taps.items():
        def rec(z, t, name=name):
            shapes[name] = per_unit(z.detach(), t.channel_dim).shape[1] // z.shape[0]
        handles.append(tap.on_output(rec))
    was = gm.training
    with torch.no_grad():
        gm.eval()(x[:2])
    gm.train(was)
    for h in handles:
        h.remove()
    out = {}
    for name, tap in taps.items():
        w = gm.get_parameter(_weight_path(gm, tap.unit.weight))
        out[name] = int(shapes[name] * w.numel())
    return out


def _weight_path(gm, name: str) -> str:
    from lobster_fx.graph.instrument import lobster_info

    return lobster_info(gm).params[name].param_path


def saved_macs(macs: dict[str, int], frozen: dict[str, float]) -> int:
    """Backward MACs per sample that freezing makes avoidable: dW rows of frozen units, and dX
    of every layer at or below the lowest layer with an active unit (layer 0 has no dX anyway)."""
    names = list(macs)
    saved = sum(frozen.get(n, 0.0) * macs[n] for n in names)
    lowest = next((i for i, n in enumerate(names) if frozen.get(n, 0.0) < 1.0), len(names))
    saved += sum(macs[n] for n in names[1:lowest + 1])
    return int(saved)


def step_macs(macs: dict[str, int]) -> int:
    """Forward + full backward MACs per sample (dW everywhere, dX for all but the first layer)."""
    vals = list(macs.values())
    return 2 * sum(vals) + sum(vals[1:])


# --------------------------------------------------------------------------- one run

#: learning-rate schedules: cosine to 0 over the run, or step (x0.1 at 50% and 75% of the run, the
#: usual shape of the long CIFAR schedules NEq was published with)
SCHEDULES = ("cosine", "step")


def learning_rate(epoch: int, epochs: int, schedule: str) -> float:
    if schedule == "step":
        return LR * (0.1 ** ((epoch >= epochs // 2) + (epoch >= (3 * epochs) // 4)))
    return LR * 0.5 * (1 + math.cos(math.pi * epoch / epochs))



class Run:
    def __init__(self, name: str, model: nn.Module, val_x: torch.Tensor, exclude: list[str], eps: float) -> None:
        import lobster_fx
        from lobster_fx.methods.lobster import Lobster
        from lobster_fx.methods.neq import NEq

        self.name = name
        self.gm = lobster_fx.instrument(copy.deepcopy(model)).train()
        self.opt = torch.optim.SGD(self.gm.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.lobster = Lobster(self.gm, self.opt, lmbda=LMBDA) if name == "neq-lobster" else None
        self.neq = None
        if name in ("neq", "neq-lobster"):
            self.neq = NEq(self.gm, self.opt, val_x, eps=eps, mu=MU, exclude=exclude, batch_size=250)
        elif name == "random":
            self.neq = NEq(self.gm, self.opt, None, random_rate=0.0, exclude=exclude, seed=1)
        self.records: list[dict] = []

    def state(self) -> dict:
        return {"model": self.gm.state_dict(), "opt": self.opt.state_dict(), "records": self.records,
                "neq": None if self.neq is None else self.neq.state_dict(),
                "lobster": None if self.lobster is None else self.lobster.state_dict()}

    def load(self, state: dict) -> None:
        self.gm.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.records = state["records"]
        if self.neq is not None:
            self.neq.load_state_dict(state["neq"])
        if self.lobster is not None:
            self.lobster.load_state_dict(state["lobster"])

    def begin(self, epoch: int, epochs: int, rate: dict[str, float] | None, schedule: str = "cosine") -> None:
        """The epoch's learning rate, and NEq's measurement and decisions (timed)."""
        lr = learning_rate(epoch, epochs, schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        self.frozen = {}
        if self.neq is not None:
            if rate is not None:
                self.neq.random_rate = rate
            self.frozen = self.neq.step()
        self.measure_s, self.lr, self.steps = time.perf_counter() - t0, lr, []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t = time.perf_counter()
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.gm(x), y).backward()
        self.opt.step()
        self.steps.append(time.perf_counter() - t)

    def end(self, epoch: int, test, macs) -> dict:
        rec = {"epoch": epoch + 1, "lr": self.lr, "frozen": self.frozen, "measure_s": self.measure_s,
               "train_s": sum(self.steps), "step_ms_median": 1e3 * statistics.median(self.steps),
               "steps": len(self.steps), "test_error": test_error(self.gm, test),
               "saved_macs": saved_macs(macs, self.frozen), "step_macs": step_macs(macs)}
        self.records.append(rec)
        return rec


@torch.no_grad()
def test_error(gm: nn.Module, test) -> float:
    gm.eval()
    wrong = 0
    for i in range(0, test.x.shape[0], 1000):
        wrong += int((gm(test.x[i:i + 1000]).argmax(1) != test.y[i:i + 1000]).sum())
    gm.train()
    return 100.0 * wrong / test.x.shape[0]


def run(setting: str, epochs: int, train_size: int, val_size: int, threads: int, seed: int, eps: float,
        schedule: str = "cosine") -> None:
    from lobster_fx.data import TensorData, load_dataset

    torch.set_num_threads(threads)
    model_name, dataset, exclude = SETTINGS[setting]
    splits = load_dataset(dataset, DATA_ROOT, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(splits.train.x.shape[0], generator=g)[:train_size].sort().values
    train = TensorData(splits.train.x[pick], splits.train.y[pick])
    val_x = splits.val.x[torch.randperm(splits.val.x.shape[0], generator=g)[:val_size].sort().values]
    torch.manual_seed(seed)
    model = _model(model_name)
    runs = {name: Run(name, model, val_x, exclude, eps) for name in RUNS}
    macs = layer_macs(runs["neq"].gm, runs["neq"].neq.taps, val_x)
    key = setting if eps == EPS else f"{setting}-eps{eps:g}"
    ckpt = CKPT / f"{key if schedule == 'cosine' else f'{key}-{schedule}{epochs}-{train_size // 1000}k'}.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != [epochs, train_size, val_size, seed]:
            sys.exit(f"{ckpt} was written with another configuration {state['config']}; delete it to start over")
        for name, r in runs.items():
            r.load(state["runs"][name])
        start = state["epoch"]
        print(f"resumed at epoch {start}", flush=True)
    for epoch in range(start, epochs):
        for name in RUNS:  # neq before random: random takes neq's fractions of this epoch
            runs[name].begin(epoch, epochs, runs["neq"].frozen if name == "random" else None, schedule)
        perm = torch.randperm(train.x.shape[0], generator=torch.Generator().manual_seed(1000 + epoch))
        # interleaved step by step (the order rotating): load on the machine hits every run alike
        for k, i in enumerate(range(0, len(perm) - BATCH + 1, BATCH)):
            idx = perm[i:i + BATCH]
            x, y = train.x[idx], train.y[idx]
            for j in range(len(RUNS)):
                runs[RUNS[(k + j) % len(RUNS)]].step(x, y)
        for name in RUNS:
            rec = runs[name].end(epoch, splits.test, macs)
            print(f"[{setting}] epoch {epoch + 1:3d} {name:12s} err {rec['test_error']:.2f}% "
                  f"step {rec['step_ms_median']:.2f} ms train {rec['train_s']:.1f}s measure {rec['measure_s']:.2f}s "
                  f"frozen {{{', '.join(f'{k}: {v:.2f}' for k, v in rec['frozen'].items())}}}", flush=True)
        CKPT.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"config": [epochs, train_size, val_size, seed], "epoch": epoch + 1, "macs": macs,
                    "setting": setting, "eps": eps, "schedule": schedule,
                    "row_wise_min": runs["neq"].neq.row_wise_min,
                    "runs": {n: r.state() for n, r in runs.items()}}, tmp)
        tmp.replace(ckpt)


# --------------------------------------------------------------------------- fast-path probe

PROBE = {  # name: per-layer frozen fractions (random units), LeNet-5
    "nothing (the noise floor)": {},
    "conv1 5%": {"conv1": 0.05},
    "conv1 25%": {"conv1": 0.25},
    "conv2 10%": {"conv2": 0.1},
    "conv2 25%": {"conv2": 0.25},
    "fc1 10%": {"fc1": 0.1},
    "fc1 half": {"fc1": 0.5},
    "conv2 half": {"conv2": 0.5},
    "every layer half": {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5, "fc2": 0.5},
    "conv1 whole": {"conv1": 1.0},
    "conv1 whole, conv2 + fc1 half": {"conv1": 1.0, "conv2": 0.5, "fc1": 0.5},
    "conv1 + conv2 whole": {"conv1": 1.0, "conv2": 1.0},
}


def probe(reps: int, threads: int) -> dict:
    """Step time of LeNet-5 (batch 100) with given frozen fractions, the fast path on vs off
    (off: the optimizer hook alone, full backward), over no freezing; interleaved step by step."""
    import lobster_fx
    from lobster_fx.methods.neq import NEq

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model("lenet5")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    runs = {}
    for name, rates in [("no freezing", None), *PROBE.items()]:
        for fast in ((True,) if rates is None else (True, False)):
            gm = lobster_fx.instrument(copy.deepcopy(model)).train()
            opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
            # row-wise dW at any frozen share: the probe measures where it pays (row_wise_min's default)
            neq = NEq(gm, opt, None, random_rate=rates or 0.0, fast=fast, row_wise_min=0.0)
            neq.step()
            macs = layer_macs(gm, neq.taps, x)
            runs[(name, fast)] = (gm, opt, 1 - saved_macs(macs, rates or {}) / step_macs(macs))
    times: dict = {k: [] for k in runs}
    for rep in range(reps):
        keys = list(runs)
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            gm, opt, _ = runs[k]
            t = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(gm(x), y).backward()
            opt.step()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times[("no freezing", True)])
    out = {"batch": BATCH, "reps": reps, "base_step_ms": 1e3 * base, "rows": []}
    for (name, fast), ts in times.items():
        if name == "no freezing":
            continue
        out["rows"].append({"frozen": name, "fast": fast, "step_ratio": statistics.median(ts) / base,
                            "mac_ratio": runs[(name, fast)][2]})
        print(f"{name:32s} fast={fast!s:5s} step x{statistics.median(ts) / base:.3f} "
              f"(MACs x{runs[(name, fast)][2]:.3f})", flush=True)
    CKPT.mkdir(parents=True, exist_ok=True)
    (CKPT / "probe.json").write_text(json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- summary


def summarize(key: str) -> dict:
    state = torch.load(CKPT / f"{key}.pt", weights_only=False)
    recs = {n: state["runs"][n]["records"] for n in RUNS}
    macs = state["macs"]
    base = recs["baseline"]
    out: dict = {"setting": state.get("setting", key), "eps": state.get("eps", EPS), "epochs": state["epoch"],
                 "schedule": state.get("schedule", "cosine"), "config": state["config"], "layer_macs": macs,
                 "row_wise_min": state.get("row_wise_min", 0.0),  # runs before it: row-wise at any fraction
                 "step_macs": step_macs(macs), "runs": {}}
    base_time = sum(r["train_s"] + r["measure_s"] for r in base)
    base_step = sum(r["step_ms_median"] for r in base)
    for name, rs in recs.items():
        total = sum(r["train_s"] + r["measure_s"] for r in rs)
        # the ceiling: saved MACs over the baseline step's MACs, weighted by each epoch's steps
        ceiling = sum(r["saved_macs"] * r["steps"] for r in rs) / sum(r["step_macs"] * r["steps"] for r in rs)
        ratios = [r["step_ms_median"] / b["step_ms_median"] for r, b in zip(rs, base)]
        layers = list(rs[-1]["frozen"]) if rs[-1]["frozen"] else []
        out["runs"][name] = {
            "final_test_error": rs[-1]["test_error"],
            "best_test_error": min(r["test_error"] for r in rs),
            "train_time_s": total, "measure_time_s": sum(r["measure_s"] for r in rs),
            "time_saving": 1 - total / base_time,
            "step_time_saving_of_medians": 1 - sum(r["step_ms_median"] for r in rs) / base_step,
            "median_step_ratio_per_epoch": ratios,
            "ceiling_saving": ceiling,
            "share_of_ceiling": (1 - total / base_time) / ceiling if ceiling > 0 else None,
            "mean_frozen_fraction": {n: statistics.mean(r["frozen"].get(n, 0.0) for r in rs) for n in layers},
            "per_epoch": rs,
        }
    neq, rnd, b = out["runs"]["neq"], out["runs"]["random"], out["runs"]["baseline"]
    out["targets"] = {
        "error_within_0.15": {"neq": neq["final_test_error"] - b["final_test_error"],
                              "met": neq["final_test_error"] - b["final_test_error"] <= TARGET_ERR},
        "time_saving_20pct": {"neq": neq["time_saving"], "met": neq["time_saving"] >= TARGET_TIME},
        "share_of_ceiling_60pct": {"neq": neq["share_of_ceiling"], "ceiling": neq["ceiling_saving"],
                                   "met": bool(neq["share_of_ceiling"] and neq["share_of_ceiling"] >= TARGET_CEIL)},
        "neq_beats_random": {"neq": neq["final_test_error"], "random": rnd["final_test_error"],
                             "met": neq["final_test_error"] < rnd["final_test_error"]},
    }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, name in zip(axes, ("neq", "neq-lobster")):
        rs = summary["runs"][name]["per_epoch"]
        for layer in rs[-1]["frozen"]:
            ax.plot([r["epoch"] for r in rs], [r["frozen"].get(layer, 0.0) for r in rs], marker="o", ms=3, label=layer)
        ax.set_title(f"{summary['setting']}, eps {summary['eps']:g}: {name}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("frozen fraction of units")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def write_md(summaries: dict, path: Path) -> None:
    """The tables of ``neq.md`` (the notes under them are written by hand, kept below the marker)."""
    marker = "<!-- notes (kept by summarize) -->"
    notes = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    lines = ["## NEq: neurons at equilibrium, measured (`benchmarks/neq.py`, issue 16)", ""]
    for k, sm in summaries.items():
        if "runs" not in sm:
            continue
        epochs, train_size, val_size, seed = sm["config"]
        lines += [f"### {sm['setting']}, eps {sm['eps']:g} (mu {MU}), {sm.get('schedule', 'cosine')} lr schedule: "
                  f"{sm['epochs']} epochs on {train_size} training images, NEq on {val_size} validation images, "
                  f"seed {seed}, 1 CPU thread, row-wise dW from {100 * sm.get('row_wise_min', 0.0):.0f}% of a layer "
                  "frozen", "",
                  f"Step MACs per sample (forward + full backward): {sm['step_macs']:,}; forward per layer: "
                  + ", ".join(f"{n} {m:,}" for n, m in sm["layer_macs"].items()), "",
                  "| run | final test error | best | training time (s) | saving vs baseline | ceiling (MACs) "
                  "| share of ceiling | step-time saving (medians) | its share of ceiling | mean frozen fraction per layer |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sm["runs"].items():
            frozen = ", ".join(f"{n} {v:.2f}" for n, v in r["mean_frozen_fraction"].items()) or "-"
            share = "-" if name == "baseline" or r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:.0f}%"
            med_share = f"{100 * r['step_time_saving_of_medians'] / r['ceiling_saving']:.0f}%" \
                if r["ceiling_saving"] > 0 else "-"
            lines.append(f"| {name} | {r['final_test_error']:.2f}% | {r['best_test_error']:.2f}% | {r['train_time_s']:.0f} "
                         f"| {_pct(r['time_saving']) if name != 'baseline' else '-'} "
                         f"| {_pct(r['ceiling_saving']) if name != 'baseline' else '-'} | {share} "
                         f"| {_pct(r['step_time_saving_of_medians']) if name != 'baseline' else '-'} "
                         f"| {med_share if name != 'baseline' else '-'} | {frozen} |")
        lines += ["", "Per epoch (NEq run): frozen fraction per layer, median step time over the baseline's "
                  "of the same epoch, saved backward MACs over the step's MACs, test error:", "",
                  "| epoch | frozen | step ratio | saved MACs | error (baseline / neq / random / neq-lobster) |",
                  "|---|---|---|---|---|"]
        neq = sm["runs"]["neq"]
        for i, r in enumerate(neq["per_epoch"]):
            errs = " / ".join(f"{sm['runs'][n]['per_epoch'][i]['test_error']:.2f}" for n in RUNS)
            frozen = ", ".join(f"{n} {v:.2f}" for n, v in r["frozen"].items())
            lines.append(f"| {r['epoch']} | {frozen} | {neq['median_step_ratio_per_epoch'][i]:.3f} "
                         f"| {_pct(r['saved_macs'] / r['step_macs'])} | {errs} |")
        t = sm["targets"]
        lines += ["", "Targets (issue 16):", "",
                  f"* test error within 0.15 points of the baseline: NEq {t['error_within_0.15']['neq']:+.2f} points: "
                  f"**{'met' if t['error_within_0.15']['met'] else 'not met'}**",
                  f"* training time at least 20% lower: {_pct(t['time_saving_20pct']['neq'])}: "
                  f"**{'met' if t['time_saving_20pct']['met'] else 'not met'}**",
                  f"* at least 60% of the ceiling: ceiling {_pct(t['share_of_ceiling_60pct']['ceiling'])}, measured "
                  f"share {_pct(t['share_of_ceiling_60pct']['neq'])}: "
                  f"**{'met' if t['share_of_ceiling_60pct']['met'] else 'not met'}**",
                  f"* NEq more accurate than random freezing at the same rate: {t['neq_beats_random']['neq']:.2f}% vs "
                  f"{t['neq_beats_random']['random']:.2f}%: **{'met' if t['neq_beats_random']['met'] else 'not met'}**",
                  "", f"![frozen fractions](neq-{k}.png)", ""]
    pr = summaries.get("fast_path_probe")
    if pr:
        lines += ["### The fast path alone (`benchmarks/neq.py probe`)", "",
                  f"LeNet-5, batch {pr['batch']}, 1 thread, median of {pr['reps']} steps per row, all rows interleaved "
                  f"step by step; step time over the same model with nothing frozen ({pr['base_step_ms']:.1f} ms). "
                  "fast: requires_grad off for whole layers and the row-wise dW backward; off: the optimizer hook "
                  "alone (full backward). MACs: the step's MACs left, counted as above.", "",
                  "| frozen units | MACs left | step time, fast path | step time, hook only |", "|---|---|---|---|"]
        rows: dict = {}
        for r in pr["rows"]:
            rows.setdefault(r["frozen"], {})[r["fast"]] = r
        for name, r in rows.items():
            lines.append(f"| {name} | x{r[True]['mac_ratio']:.3f} | x{r[True]['step_ratio']:.3f} "
                         f"| x{r[False]['step_ratio']:.3f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n" + marker + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--setting", default="lenet5-mnist", choices=sorted(SETTINGS))
    r.add_argument("--epochs", type=int, default=12)
    r.add_argument("--train-size", type=int, default=20000)
    r.add_argument("--val-size", type=int, default=500, help="NEq's validation subset")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eps", type=float, default=EPS, help="NEq's threshold (the paper: 1e-3; 2e-2 for segmentation)")
    r.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="learning rate: cosine to 0, or step (x0.1 at 50%% and 75%% of the epochs)")
    pr = sub.add_parser("probe")
    pr.add_argument("--reps", type=int, default=60)
    pr.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summarize")
    s.add_argument("--setting", action="append")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.setting, args.epochs, args.train_size, args.val_size, args.threads, args.seed, args.eps, args.schedule)
        return
    if args.cmd == "probe":
        probe(args.reps, args.threads)
        return
    settings = args.setting or sorted(p.stem for p in CKPT.glob("*.pt"))
    summaries = {}
    for k in settings:
        summaries[k] = summarize(k)
        plot(summaries[k], RESULTS / f"neq-{k}.png")
    if (CKPT / "probe.json").exists():
        summaries["fast_path_probe"] = json.loads((CKPT / "probe.json").read_text())
    (RESULTS / "neq.json").write_text(json.dumps(summaries, indent=1) + "\n")
    write_md(summaries, RESULTS / "neq.md")
    print(json.dumps({k: v["targets"] for k, v in summaries.items() if "targets" in v}, indent=1))


if __name__ == "__main__":
    main()
