"""What one epoch of the reproduction costs, and what the speed options buy.

Measured side by side in one process (interleaved rounds, median), on one thread:

* a LOBSTER training step of LeNet-5 (batch 100) in NCHW vs ``channels_last``
  (NHWC): same arithmetic, different oneDNN kernels;
* a LeNet-300 step, for scale;
* the threshold search of one pruning phase on a LeNet-5 with a realistic
  magnitude spread: validation passes and seconds for the exact search (the
  paper) vs ``precision=0.01``, and how many fewer weights the coarse one prunes.

Usage::

    python benchmarks/train_cost.py            # writes results/train_cost.json and .md

Synthetic data of MNIST's shape: the kernels do not care what the pixels are.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _sides(model_name: str) -> dict:
    import lobster_fx
    from lobster_fx.models import get_model

    torch.manual_seed(0)
    base = lobster_fx.instrument(get_model(model_name))
    sides = {}
    for fmt in ("nchw", "channels_last") if model_name == "lenet5" else ("default",):
        gm = copy.deepcopy(base)
        if fmt == "channels_last":
            gm.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        lobster_fx.Lobster(gm, opt, lmbda=1e-4)
        sides[fmt] = (gm, opt)
    return sides


def time_steps(model_name: str, rounds: int, steps: int) -> dict:
    sides = _sides(model_name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (100,), generator=g)

    def run(side: str, n: int) -> float:
        gm, opt = sides[side]
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gm(x), y).backward()
            opt.step()
        return (time.perf_counter() - t0) / n

    for side in sides:
        run(side, 3)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            times[side].append(run(side, steps))
    med = {s: statistics.median(v) for s, v in times.items()}
    out = {"model": model_name, "batch": 100, "rounds": rounds, "steps_per_round": steps,
           "step_ms": {s: round(v * 1e3, 3) for s, v in med.items()},
           "epoch_seconds_55k": {s: round(v * 550, 1) for s, v in med.items()}}
    if "channels_last" in med:
        out["speedup_channels_last"] = round(med["nchw"] / med["channels_last"], 3)
    return out


def threshold_search(precisions: list[float]) -> dict:
    import lobster_fx
    from lobster_fx.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():  # LOBSTER leaves a wide spread of magnitudes: mimic it
        for p in model.parameters():
            p.mul_(torch.exp(torch.randn_like(p) * 2))
    g = torch.Generator().manual_seed(2)
    xv = torch.randn(5000, 1, 28, 28, generator=g)
    yv = model(xv).argmax(1)  # a validation set the dense model fits

    @torch.no_grad()
    def evaluate(m) -> float:
        m.eval()
        return float(F.cross_entropy(m(xv), yv))

    out = {}
    for precision in precisions:
        gm = lobster_fx.instrument(copy.deepcopy(model))
        t0 = time.perf_counter()
        res = lobster_fx.prune(gm, evaluate, twt=0.05, precision=precision)
        out[str(precision)] = {"seconds": round(time.perf_counter() - t0, 2), "evaluations": res.evaluations,
                               "pruned": res.pruned, "total": res.total}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--note", default="", help="what else ran on the machine")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = {
        "meta": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                 "threads": 1, "note": args.note},
        "steps": [time_steps("lenet5", args.rounds, args.steps), time_steps("lenet300", args.rounds, args.steps * 4)],
        "threshold_search": threshold_search([0.0, 0.01]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_cost.json").write_text(json.dumps(data, indent=1))
    lines = ["# Training cost (issue 4)", "",
             f"One thread, torch {data['meta']['torch']}, {data['meta']['cpus']}-core machine. {args.note}", "",
             "| model | layout | step ms (batch 100) | epoch s (55k images) |", "|---|---|---|---|"]
    for r in data["steps"]:
        for side, ms in r["step_ms"].items():
            lines.append(f"| {r['model']} | {side} | {ms} | {r['epoch_seconds_55k'][side]} |")
        if "speedup_channels_last" in r:
            lines.append(f"| {r['model']} | channels_last speed-up | {r['speedup_channels_last']}x | |")
    lines += ["", "Threshold search of one pruning phase (LeNet-5, 5k validation images, TWT 0.05):", "",
              "| precision | validation passes | seconds | pruned | of |", "|---|---|---|---|---|"]
    for p, r in data["threshold_search"].items():
        lines.append(f"| {p} | {r['evaluations']} | {r['seconds']} | {r['pruned']} | {r['total']} |")
    (RESULTS / "train_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
