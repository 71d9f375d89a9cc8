"""What the half-precision LOBSTER rule (float32 term + stochastic rounding) costs per step.

A 2.9M-parameter MLP (784-1024-1024-1024-10) in float32 and in bfloat16 / float16, a fixed
gradient (|g| ~ 0.05, so the term acts everywhere), and ``optimizer.step()`` timed with no
rule, with the float32 rule (eager and, where inductor compiles, fused) and with the
half-precision rule. Time: ``rounds`` interleaved rounds of ``steps`` steps per config, the
median of the per-round means. Memory: each config in a fresh process: after one step (so
that everything lazy exists) and ``malloc_trim``, the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) over 5 more steps minus the RSS before them: the temporaries at
their peak; and the RSS growth kept after them (the rule's persistent state).

    python benchmarks/half_rule_cost.py [--rounds 15 --steps 10] [--no-fused]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lobster_fx

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(dtype: str, rule: str, opt_kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(DTYPES[dtype])
    gm = lobster_fx.instrument(model)
    wd = 1e-4 if opt_kind == "sgd-wd" else 0.0  # weight decay: the term is kept across the step
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    for p in gm.parameters():
        p.grad = (0.05 * torch.randn(p.shape, generator=g)).to(p.dtype)
    if rule != "none":
        lobster_fx.Lobster(gm, opt, lmbda=1e-4, fused=(rule == "fused"))
    return gm, opt


def time_steps(opt, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        opt.step()
    return (time.perf_counter() - t0) / n


def _child(dtype: str, rule: str, opt_kind: str, steps: int) -> None:
    """In a fresh process: print the peak RSS growth over ``steps`` steps and the RSS kept after."""
    import ctypes

    _gm, opt = build(dtype, rule, opt_kind)  # the model must stay alive
    opt.step()  # lazy state (optimizer, generators) exists from here on
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: growth below is real allocation

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    rss0 = status("VmRSS")
    for _ in range(steps):
        opt.step()
    print(status("VmHWM") - rss0, status("VmRSS") - rss0)


def peak_rss_growth(dtype: str, rule: str, opt_kind: str, steps: int) -> tuple[int, int]:
    """(peak RSS growth over ``steps`` steps, RSS growth kept after them), in a fresh process."""
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import half_rule_cost as h; h._child({dtype!r}, {rule!r}, {opt_kind!r}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, kept = out.stdout.strip().splitlines()[-1].split()
    return int(peak), int(kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-fused", action="store_true", help="skip the compiled float32 rule")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "half_rule_cost.json",
                    help="JSON here, and the table as Markdown beside it (.md)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and in the memory children)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [("fp32", "none", "sgd"), ("fp32", "eager", "sgd"), ("bf16", "none", "sgd"), ("bf16", "eager", "sgd"),
               ("fp16", "none", "sgd"), ("fp16", "eager", "sgd"),
               ("fp32", "none", "sgd-wd"), ("fp32", "eager", "sgd-wd"), ("bf16", "none", "sgd-wd"),
               ("bf16", "eager", "sgd-wd")]
    if not args.no_fused:
        configs.insert(2, ("fp32", "fused", "sgd"))
    built = {c: build(*c) for c in configs}
    for _, opt in built.values():  # warm-up (and the fused rule's compile)
        time_steps(opt, 3)
    per_round: dict = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c, (_, opt) in built.items():
            per_round[c].append(time_steps(opt, args.steps))
    n_params = sum(p.numel() for p in built[configs[0]][0].parameters())
    rows = []
    for c in configs:
        ms = statistics.median(per_round[c]) * 1e3
        plain = statistics.median(per_round[(c[0], "none", c[2])]) * 1e3
        peak, kept = peak_rss_growth(*c, steps=5)
        rows.append({"dtype": c[0], "rule": c[1], "optimizer": c[2], "step_ms": round(ms, 3),
                     "rule_ms": round(ms - plain, 3), "peak_rss_growth_mb": round(peak / 2 ** 20, 1),
                     "rss_kept_mb": round(kept / 2 ** 20, 1)})
    print(f"{n_params} parameters, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds x {args.steps} steps, median")
    print(f"{'dtype':6} {'rule':6} {'optimizer':9} {'step ms':>9} {'rule ms':>9} {'peak RSS +MB':>13} {'kept MB':>8}")
    for r in rows:
        print(f"{r['dtype']:6} {r['rule']:6} {r['optimizer']:9} {r['step_ms']:9.3f} {r['rule_ms']:9.3f} "
              f"{r['peak_rss_growth_mb']:13.1f} {r['rss_kept_mb']:8.1f}")
    measured = time.strftime("%Y-%m-%d %H:%M")
    args.out.write_text(json.dumps({"params": n_params, "measured": measured, "rounds": args.rounds,
                                    "steps": args.steps, "rows": rows}, indent=1))
    md = ["# Half-precision LOBSTER rule: cost per step", "",
          f"{n_params:,} parameters (784-1024-1024-1024-10 MLP), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds x {args.steps} steps, median; "
          f"measured {measured}. 'rule ms' = step time minus the same dtype's step without a rule; memory: "
          "peak RSS growth over 5 steps (temporaries) and RSS kept after them, each config in a fresh process.", "",
          "| dtype | rule | optimizer | step ms | rule ms | peak RSS +MB | kept MB |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['rule']} | {r['optimizer']} | {r['step_ms']} | {r['rule_ms']} | "
           f"{r['peak_rss_growth_mb']} | {r['rss_kept_mb']} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
