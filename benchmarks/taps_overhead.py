"""What idle unit taps cost a training step (issue 14: taps must be free when no one listens).

An instrumented model with ``install_taps`` (taps installed, no listener) vs the same model
without taps: SGD steps on one batch, timed in interleaved blocks (A B, B A, ...), medians and
quartiles per side; plus the cost of one idle ``tap_point`` call. One thread.

    python benchmarks/taps_overhead.py [--rounds 30 --block 20]

Writes benchmarks/results/taps_overhead.json and taps_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import lobster_fx  # noqa: E402 (this checkout's, after the sys.path line above)
from lobster_fx.graph.taps import UnitTap, find_units, install_taps, tap_point  # noqa: E402
from lobster_fx.models import LeNet5, LeNet300  # noqa: E402


def _make(model_cls: type, taps: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    gm = lobster_fx.instrument(model_cls())
    if taps:
        install_taps(gm)
    return gm, torch.optim.SGD(gm.parameters(), lr=0.01)


def _step(gm: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(gm(x), t).backward()
    opt.step()


def _row(model_cls: type, rounds: int, block: int) -> dict:
    x, t = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    runs = {False: _make(model_cls, False), True: _make(model_cls, True)}
    for run in runs.values():
        for _ in range(10):
            _step(*run, x, t)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for taps in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            for _ in range(block):
                _step(*runs[taps], x, t)
            times[taps].append((time.perf_counter() - t0) / block * 1e3)
    q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    plain, idle = statistics.median(times[False]), statistics.median(times[True])
    return {"model": model_cls.__name__, "taps": len(find_units(runs[True][0])), "no_taps_ms": round(plain, 4),
            "idle_taps_ms": round(idle, 4), "ratio": round(idle / plain, 4),
            "no_taps_iqr_ms": [round(q[False][0], 4), round(q[False][2], 4)],
            "idle_taps_iqr_ms": [round(q[True][0], 4), round(q[True][2], 4)]}


def _tap_call_ns(n: int = 200_000) -> float:
    gm = lobster_fx.instrument(LeNet300())
    tap = UnitTap(next(iter(find_units(gm).values())))
    z = torch.randn(100, 300)
    t0 = time.perf_counter()
    for _ in range(n):
        tap_point(z, tap)
    return (time.perf_counter() - t0) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    call_ns = _tap_call_ns()
    rows = [_row(m, args.rounds, args.block) for m in (LeNet300, LeNet5)]
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
           "measured": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "block": args.block,
           "tap_point_call_ns": round(call_ns), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "taps_overhead.json").write_text(json.dumps(out, indent=1))
    md = ["# Idle unit taps: training-step cost", "",
          f"{out['machine']}; {args.rounds} interleaved rounds of {args.block} steps per side, batch 100, "
          f"SGD; measured {out['measured']}. One idle `tap_point` call: {out['tap_point_call_ns']} ns.", "",
          "| model | taps | no taps ms | idle taps ms | ratio | IQR no taps | IQR idle |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['taps']} | {r['no_taps_ms']} | {r['idle_taps_ms']} | {r['ratio']}x | "
                  f"{r['no_taps_iqr_ms'][0]}-{r['no_taps_iqr_ms'][1]} | {r['idle_taps_iqr_ms'][0]}-{r['idle_taps_iqr_ms'][1]} |")
    (RESULTS / "taps_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
