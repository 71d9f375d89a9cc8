"""What a DDP training step costs now that masks are honoured on every rank.

Under ``torch.distributed`` every forward multiplies its masks and every step pins them
(``instrument._mask_facts``): DDP broadcasts rank 0's buffers, masks included, into the
other ranks at every forward without bumping their version counters, so the all-ones fast
path of a single process cannot be trusted there. This measures, on 2 gloo ranks (CPU, one
thread each), interleaved, medians over rounds:

* ``plain``: DDP of the original model, SGD;
* ``lobster``: DDP of ``instrument(model)`` + ``Lobster``, as shipped (masks multiplied,
  broadcast with the other buffers);
* ``fast path (unsafe)``: the same, with the single-process all-ones shortcut forced on
  (what ran before: masks skipped while all ones; wrong when a mask changes on one rank);
* ``masks not broadcast``: the shipped path with the masks excluded from DDP's buffer
  broadcast (the cost of broadcasting them).

Forward-only timings (DDP forward under ``no_grad``, which also broadcasts the buffers)
and full steps are reported. Writes ``results/ddp_masks.json`` and ``.md``.

    python benchmarks/ddp_masks.py --models lenet300,resnet18 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
WORLD = 2

MODELS = {
    "lenet300": (lambda: __import__("lobster_fx.models", fromlist=["LeNet300"]).LeNet300(), (784,), 64),
    "resnet18": (lambda: __import__("torchvision").models.resnet18(num_classes=10), (3, 64, 64), 8),
}
SIDES = ("plain", "lobster", "fast path (unsafe)", "masks not broadcast")


def _build(name: str, side: str):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lobster_fx

    builder = MODELS[name][0]
    torch.manual_seed(0)
    model = builder()
    if side == "plain":
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        return ddp, opt
    gm = lobster_fx.instrument(model)
    if side == "masks not broadcast":
        mask_names = [n for n, _ in gm.named_buffers() if n in {e.mask_path for e in gm.meta["lobster"].params.values()}]
        DDP._set_params_and_buffers_to_ignore_for_model(gm, mask_names)
    ddp = DDP(gm)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    lobster_fx.Lobster(ddp, opt, lmbda=1e-4, fused=False)
    return ddp, opt


def _instrument_module():
    import lobster_fx  # noqa: F401  (lobster_fx.graph.instrument is also the function's name)

    return sys.modules["lobster_fx.graph.instrument"]


def _fast_path(on: bool) -> None:
    ins = _instrument_module()
    ins._distributed = (lambda: False) if on else ins._distributed_real


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    ins = _instrument_module()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    ins._distributed_real = ins._distributed
    results = {}
    for name in args.models.split(","):
        _, shape, batch = MODELS[name]
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
        built = {side: _build(name, side) for side in SIDES}
        times = {side: {"forward": [], "step": []} for side in SIDES}
        order = list(SIDES)
        for r in range(args.warmup + args.rounds):
            for side in order if r % 2 == 0 else order[::-1]:
                ddp, opt = built[side]
                _fast_path(side == "fast path (unsafe)")
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    with torch.no_grad():
                        ddp(x)
                t1 = time.perf_counter()
                for _ in range(args.steps):
                    opt.zero_grad()
                    F.cross_entropy(ddp(x), y).backward()
                    opt.step()
                t2 = time.perf_counter()
                _fast_path(False)
                if r >= args.warmup:
                    times[side]["forward"].append((t1 - t0) / args.steps)
                    times[side]["step"].append((t2 - t1) / args.steps)
        results[name] = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet300,resnet18")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "ddp_masks.tmp.json"
    mp.spawn(_worker, args=(port, args, str(tmp)), nprocs=WORLD, join=True)
    results = json.loads(tmp.read_text())
    tmp.unlink()
    meta = {"torch": torch.__version__, "world": WORLD, "backend": "gloo", "threads_per_rank": 1,
            "rounds": args.rounds, "steps_per_round": args.steps, "note": args.note}
    (RESULTS / "ddp_masks.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    lines = ["# DDP step cost with masks honoured on every rank", "",
             (f"2 gloo ranks on this machine's 2 cores, 1 thread each, torch {torch.__version__}; "
              f"medians of {args.rounds} interleaved rounds of {args.steps} steps (rank 0's clock). {args.note}"), "",
             "| model | side | forward ms | vs plain | step ms | vs plain |", "|---|---|---|---|---|---|"]
    for name, sides in results.items():
        base = sides["plain"]
        for side, t in sides.items():
            lines.append(f"| {name} | {side} | {t['forward'] * 1e3:.2f} | {t['forward'] / base['forward']:.3f}x "
                         f"| {t['step'] * 1e3:.2f} | {t['step'] / base['step']:.3f}x |")
    (RESULTS / "ddp_masks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
