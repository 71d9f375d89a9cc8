"""DDP and the masks: a mask edited on rank 0 only reaches every rank through DDP's buffer
broadcast, which writes into the other ranks' masks without bumping their version counters.
Every rank must then run with the mask it holds (a cached "all ones" on rank 1 ran it
unmasked and unpinned: the ranks drifted apart silently)."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lobster_fx
from lobster_fx.instrument import masked_parameters

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is needed",
)

WORLD, STEPS, JOIN_TIMEOUT_S = 2, 5, 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.manual_seed(0)
        gm = lobster_fx.instrument(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
        ddp = nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        lobster_fx.Lobster(ddp, opt, lmbda=1e-2)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        ddp(x)  # every rank has run (and cached) its all-ones masks
        if rank == 0:
            lobster_fx.masks(gm)["0.weight"][:8] = 0  # edited on rank 0 only
        outputs = []
        for _ in range(STEPS):
            opt.zero_grad()
            out = ddp(x)  # DDP broadcasts rank 0's buffers first
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
        probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            outputs.append(gm(probe))
        torch.save({
            "effective": {info.name: (p * m).detach() for info, p, m in masked_parameters(gm)},
            "raw": {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)},
            "mask": lobster_fx.masks(gm)["0.weight"].clone(),
            "probe": outputs[-1],
        }, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_mask_edited_on_rank0_is_honoured_on_every_rank(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, "DDP workers did not finish in time"
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(WORLD) if (tmp_path / f"rank{r}.err").exists()]
    assert not errors, errors[0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert torch.equal(r1["mask"], r0["mask"]) and (r0["mask"][:8] == 0).all()  # the broadcast arrived
    for name in r0["effective"]:
        assert torch.equal(r0["effective"][name], r1["effective"][name]), name
        assert torch.equal(r0["raw"][name], r1["raw"][name]), name  # rank 1 pinned too
    assert (r1["raw"]["0.weight"][:8] == 0).all()
    assert torch.equal(r0["probe"], r1["probe"])
