"""LOBSTER with DistributedDataParallel, launched by torchrun (CPU, gloo).

Trains LeNet-300 on synthetic data (or MNIST with ``--data-root``) on every
rank, with the LOBSTER rule and a pruning phase every ``--prune-every``
epochs, then rank 0 writes ``gm.state_dict()`` and checks that it loads into a
fresh single-process ``lobster_fx.instrument(LeNet300())``.

Run it::

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --epochs 4 --out /tmp/lobster-ddp
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --data-root ../shared/datasets

What matters, and why it works:

1. ``gm = lobster_fx.instrument(model)`` *before* wrapping: DDP then broadcasts
   and all-reduces the instrumented module's parameters; the masks are buffers,
   which DDP broadcasts from rank 0 at construction (``broadcast_buffers``).
2. ``Lobster(ddp, optimizer, lmbda)`` hooks ``optimizer.step()``, which runs
   after DDP's gradient all-reduce: every rank computes the LOBSTER term from
   the same averaged gradient, so the ranks stay bit-identical.
3. ``lobster_fx.prune`` averages each validation loss over the ranks
   (``sync_distributed=True``, the default), so every rank picks the same
   threshold and clears the same mask entries. Call it on *every* rank.
4. Save ``gm.state_dict()`` (the unwrapped module's, not ``ddp.state_dict()``,
   whose keys gain a ``module.`` prefix): it holds the weights and the masks,
   with the same keys a single-process ``instrument(LeNet300())`` has.

Each rank sees its own shard of every batch (``DistributedSampler``-style
striding), with a mean loss, so DDP's average is the full-batch gradient.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import lobster_fx
from lobster_fx.models import LeNet300


def get_data(data_root: str | None, n_train: int, seed: int):
    """(x_train, y_train, x_val, y_val); identical on every rank."""
    if data_root:
        from lobster_fx.data import load_dataset

        splits = load_dataset("mnist", data_root, val_size=5000, seed=seed)
        return splits.train.x, splits.train.y, splits.val.x, splits.val.y
    # synthetic: a random linear "teacher" labels Gaussian inputs (learnable, so pruning has a cost)
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(784, 10, generator=g)
    x = torch.randn(n_train + 1000, 784, generator=g)
    y = (x @ teacher).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="folder holding MNIST/raw/*.gz (default: synthetic data)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    ap.add_argument("--n-train", type=int, default=4096, help="synthetic training set size")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lmbda", type=float, default=1e-4)
    ap.add_argument("--twt", type=float, default=0.05)
    ap.add_argument("--prune-every", type=int, default=2, help="epochs between pruning phases")
    ap.add_argument("--out", default="lobster-ddp", help="rank 0 writes <out>/checkpoint.pt here")
    args = ap.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    gm = lobster_fx.instrument(LeNet300())
    ddp = DDP(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=args.lr, momentum=0.9)
    rule = lobster_fx.Lobster(ddp, opt, lmbda=args.lmbda)

    x, y, xv, yv = get_data(args.data_root, args.n_train, seed=0)

    @torch.no_grad()
    def evaluate(model) -> float:  # this rank's share of the validation set; prune averages over ranks
        was = model.training
        model.eval()
        loss = float(F.cross_entropy(model(xv[rank::world]), yv[rank::world]))
        model.train(was)
        return loss

    g = torch.Generator().manual_seed(1)  # same shuffle on every rank
    per_rank = args.batch_size // world
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        gm.train()
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[start : start + args.batch_size][rank * per_rank : (rank + 1) * per_rank]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()  # DDP all-reduces the gradients here
            opt.step()  # SGD + LOBSTER term, from the averaged gradient
        msg = f"epoch {epoch}: val loss {evaluate(gm):.4f}"
        if epoch % args.prune_every == 0:
            result = lobster_fx.prune(gm, evaluate, twt=args.twt)  # on every rank: collective
            msg += f", pruned {result.pruned}, remaining {result.remaining}/{result.total}"
        if rank == 0:
            print(msg, flush=True)

    # the ranks must agree exactly (same averaged gradients, same pruning decisions)
    flat = torch.cat([p.detach().flatten() for p in gm.parameters()] + [m.flatten() for m in lobster_fx.masks(gm).values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks diverged"

    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "checkpoint.pt"
        torch.save({"model": gm.state_dict(), "lobster": rule.state_dict()}, path)
        # the checkpoint loads into a fresh single-process instrumented model
        ckpt = torch.load(path, weights_only=True)
        single = lobster_fx.instrument(LeNet300())
        single.load_state_dict(ckpt["model"])
        single.eval()
        gm.eval()
        with torch.no_grad():
            same = torch.equal(single(xv[:256]), gm(xv[:256]))
        report = lobster_fx.sparsity_report(single)
        print(f"rank 0: wrote {path} in {time.perf_counter() - t0:.1f}s; reloads into instrument(LeNet300()) "
              f"with identical outputs: {same}; compression {report.compression_ratio:.2f}x", flush=True)
        assert same
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
