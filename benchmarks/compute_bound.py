"""How close a LeNet-5 training step runs to this CPU's arithmetic limit (issue 4's cost question).

The reproduction's LeNet-5 runs cost ~17 s per epoch on one thread. This measures, on one
thread: the FLOPs of one training step (batch 100, forward + backward, counted by
``torch.utils.flop_counter``), the step's time for the plain model and for the instrumented
model with ``Lobster`` (NCHW and channels-last), and the best sgemm rate of a large matmul,
the most this thread can do. If the step already runs near that rate, no pipeline or
framework change makes an epoch much cheaper: only fewer FLOPs (fewer epochs) would.

    python benchmarks/compute_bound.py        # writes results/compute_bound.json and .md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lobster_fx  # noqa: E402
from lobster_fx.models import LeNet5  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: measured with this script on 2026-11-22, before ``masked_weight`` kept the weight's strides
HISTORY = (
    "Before 2026-11-22's fix (`lobster_fx.graph.instrument.masked_weight` keeps a channels-last weight's "
    "strides; `w * mask` gave conv1's 20x1x5x5 weight NCHW strides), this script measured 'lobster "
    "channels-last' at 26.8 ms per step (16.1 s per training pass) against 17.0 ms (10.2 s) plain: "
    "every LeNet-5 reproduction run (`--channels-last`) was trained with that ~1.5x step cost."
)


def _median_seconds(fn, repeats: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))

    def make(kind: str):
        model = LeNet5()
        if kind.startswith("lobster"):
            model = lobster_fx.instrument(model)
        xx = x
        if kind.endswith("channels-last"):
            model = model.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind.startswith("lobster"):
            lobster_fx.Lobster(model, opt, lmbda=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xx), y).backward()
            opt.step()
        return model, step

    model, step = make("plain")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    sides = {k: make(k)[1] for k in ("plain", "plain channels-last", "lobster", "lobster channels-last")}
    gemm = []
    step_s: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(5):  # interleaved rounds
        gemm.append(2 * 1024**3 / _median_seconds(lambda: torch.mm(a, b), 3, 10))
        for k, fn in sides.items():
            step_s[k].append(_median_seconds(fn, 3, 20))
    peak = max(gemm)
    rows = {}
    for k, ts in step_s.items():
        s = statistics.median(ts)
        rows[k] = {"step_ms": round(s * 1e3, 3), "gflops": round(flops / s / 1e9, 2),
                   "share_of_sgemm": round(flops / s / peak, 3), "epoch_s_training_only": round(600 * s, 2)}
    out = {"torch": torch.__version__, "threads": 1, "batch": 100, "step_flops": flops,
           "sgemm_1024_gflops": round(peak / 1e9, 2), "steps": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compute_bound.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# LeNet-5 training step vs this CPU's arithmetic limit", "",
        f"One thread, batch 100, SGD; {flops / 1e9:.3f} GFLOP per step (forward + backward, "
        f"`torch.utils.flop_counter`); best 1024x1024 sgemm on the same thread: {peak / 1e9:.1f} GFLOP/s. "
        "Interleaved rounds, median. `python benchmarks/compute_bound.py`.", "",
        "| model | step ms | GFLOP/s | share of sgemm rate | training pass per epoch (600 steps), s |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['step_ms']} | {r['gflops']} | {r['share_of_sgemm']:.0%} | {r['epoch_s_training_only']} |")
    lines += ["", HISTORY]
    (RESULTS / "compute_bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
