"""Two-process DistributedDataParallel (gloo, CPU) against a single-process run.

Each rank trains on its own half of a fixed global batch with a mean loss, so
DDP's gradient average is the full-batch gradient. The LOBSTER rule runs at
``optimizer.step()``, after the all-reduce, so both ranks apply the same update
and match a single-process run on the full batch. A rule that read the local
(pre-all-reduce) gradient would make the ranks drift apart (``relu(1 - |g|)``
differs per rank) and miss the single-process run by far more than the tolerance
(``test_tolerance_is_discriminative`` checks the margin). ``prune`` averages the
validation loss over the ranks, so both ranks also take the same pruning
decision.
"""

from __future__ import annotations

import functools
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is needed",
)

WORLD = 2
GLOBAL_BATCH = 64
STEPS_BEFORE, STEPS_AFTER = 30, 10
LMBDA, TWT, LR, MOMENTUM = 1e-2, 0.2, 0.1, 0.9
JOIN_TIMEOUT_S = 90


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 4, generator=g)  # learnable labels: pruning everything costs loss
    x = torch.randn(GLOBAL_BATCH, 20, generator=g)
    xv = torch.randn(64, 20, generator=g)
    return x, (x @ teacher).argmax(1), xv, (xv @ teacher).argmax(1)


def _evaluate_on(xv, yv):
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        loss = float(nn.functional.cross_entropy(model(xv), yv))
        model.train(was_training)
        return loss

    return evaluate


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _state(gm, result) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in gm.named_parameters()},
        "masks": {k: v.clone() for k, v in lobster_fx.masks(gm).items()},
        "masked_params": {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)},
        "pruned": result.pruned,
        "threshold": result.threshold,
    }


def _feed_rule_local_grads(ddp: nn.Module, opt: torch.optim.Optimizer):
    """Mutant for the negative control: the rule sees this rank's pre-all-reduce gradient.

    A DDP comm hook keeps a copy of the local gradients; an optimizer pre-hook
    registered *before* Lobster's swaps them into ``p.grad``, one registered after
    it swaps the all-reduced ones back, so SGD itself still uses the averaged
    gradient and only the LOBSTER term is computed from the local one.
    """
    local: dict[int, torch.Tensor] = {}
    saved: dict[int, torch.Tensor] = {}

    def comm_hook(state, bucket):
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            local[id(p)] = g.detach().clone()
        buf = bucket.buffer().div_(WORLD)
        return torch.distributed.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, comm_hook)

    def to_local(optimizer, args, kwargs):
        for p in ddp.parameters():
            if p.grad is not None:
                saved[id(p)] = p.grad
                p.grad = local[id(p)]

    def to_global(optimizer, args, kwargs):
        for p in ddp.parameters():
            if id(p) in saved:
                p.grad = saved.pop(id(p))

    opt.register_step_pre_hook(to_local)
    return to_global


def _run(rank: int | None, lmbda: float = LMBDA, half_only: bool = False, mutant: bool = False) -> dict:
    """The training run; ``rank=None`` is the single-process full-batch run."""
    x, y, xv, yv = _data()
    if rank is not None or half_only:
        r = 0 if rank is None else rank
        per = GLOBAL_BATCH // WORLD
        x, y = x[r * per : (r + 1) * per], y[r * per : (r + 1) * per]
    gm = lobster_fx.instrument(_model())
    wrapper = gm
    if rank is not None:
        wrapper = nn.parallel.DistributedDataParallel(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=LR, momentum=MOMENTUM)
    to_global = _feed_rule_local_grads(wrapper, opt) if mutant else None
    rule = lobster_fx.Lobster(wrapper, opt, lmbda=lmbda)
    if to_global is not None:
        opt.register_step_pre_hook(to_global)
    gm.train()
    _train(wrapper, opt, x, y, STEPS_BEFORE)
    result = lobster_fx.prune(gm, _evaluate_on(xv, yv), twt=TWT)
    _train(wrapper, opt, x, y, STEPS_AFTER)
    state = _state(gm, result)
    state["rule_steps"] = rule.steps
    return state


def _worker(rank: int, port: int, out_dir: str, mutant: bool, body=None) -> None:
    """One rank: a gloo group, ``body(rank, mutant=...)``'s state saved, errors written out.
    Spawn targets must be picklable: pass ``functools.partial(_worker, body=<top-level fn>)``."""
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        try:
            state = (body or _run)(rank, mutant=mutant)
            torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(out_dir: str, mutant: bool = False, target=None) -> list[dict]:
    for attempt in range(2):  # the free port may be taken between choosing and binding it
        attempt_dir = os.path.join(out_dir, f"attempt{attempt}")
        os.makedirs(attempt_dir)
        try:
            return _run_ddp_once(attempt_dir, mutant, target or _worker)
        except pytest.fail.Exception as e:
            if attempt or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _run_ddp_once(out_dir: str, mutant: bool, target) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, port, out_dir, mutant), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = ""
    for rank in range(WORLD):
        err = os.path.join(out_dir, f"rank{rank}.err")
        if os.path.exists(err):
            with open(err) as f:
                errors += f"\n--- rank {rank} ---\n{f.read()}"
    if hung:
        pytest.fail(f"DDP ranks {hung} did not finish within {JOIN_TIMEOUT_S} s{errors}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes) or errors:
        pytest.fail(f"DDP workers failed, exit codes {codes}{errors}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    return _run_ddp(str(tmp_path_factory.mktemp("ddp")))


@pytest.fixture(scope="module")
def single_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        yield _run(None)
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ranks_identical(ddp_states):
    r0, r1 = ddp_states
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["masks"].keys() == r1["masks"].keys()
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    assert r0["pruned"] == r1["pruned"] and r0["threshold"] == r1["threshold"]
    assert r0["rule_steps"] == r1["rule_steps"] == STEPS_BEFORE + STEPS_AFTER


def test_ddp_matches_single_process(ddp_states, single_state):
    for rank_state in ddp_states:
        assert rank_state["pruned"] == single_state["pruned"]
        for k, m in single_state["masks"].items():
            assert torch.equal(rank_state["masks"][k], m), k
        assert _max_diff(rank_state["params"], single_state["params"]) <= 1e-6


def test_prune_pruned_and_pruned_entries_are_zero(ddp_states, single_state):
    for state in (*ddp_states, single_state):
        assert state["pruned"] > 0
        masks = state["masks"]
        zeros = sum(int((m == 0).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert zeros == state["pruned"] and 0 < zeros < total
        assert masks.keys() == state["masked_params"].keys()
        for name, mask in masks.items():
            p = state["masked_params"][name]
            # exactly zero after STEPS_AFTER momentum steps following the prune
            assert torch.equal(p[mask == 0], torch.zeros_like(p[mask == 0])), name
        assert set(torch.unique(torch.cat([m.flatten() for m in masks.values()])).tolist()) <= {0.0, 1.0}


def test_rule_on_local_gradient_would_be_caught(single_state, tmp_path):
    """Negative control: a rule fed the pre-all-reduce gradient fails the checks above."""
    r0, r1 = _run_ddp(str(tmp_path), mutant=True)
    assert _max_diff(r0["params"], r1["params"]) > 1e-4  # the ranks drift apart
    assert _max_diff(r0["params"], single_state["params"]) > 1e-4


def test_tolerance_is_discriminative(single_state):
    """The 1e-6 comparison would notice a missing LOBSTER term or a non-averaged gradient."""
    no_rule = _run(None, lmbda=0.0)
    half = _run(None, half_only=True)  # what rank 0 alone would compute (no all-reduce)
    for other in (no_rule, half):
        same_masks = all(torch.equal(other["masks"][k], m) for k, m in single_state["masks"].items())
        assert not same_masks or _max_diff(other["params"], single_state["params"]) > 1e-4


# --- PlateauPruner under DDP: ranks that pass their own shard's loss still prune together ---

# each rank's own validation loss per epoch: rank 0 keeps improving, rank 1 gets worse, so
# deciding from the local value prunes on rank 1 only (at call 2), whose threshold search then
# waits in an all-reduce rank 0 never joins. Their mean 1.0, 1.05, 1.1, 0.2, 0.3 (pwe=2): prune at call 3
RANK_LOSSES = ([1.0, 0.9, 0.8, 0.1, 0.2], [1.0, 1.2, 1.4, 0.3, 0.4])
PLATEAU_PRUNE_CALLS = [3]


def _plateau_ranks(rank: int, mutant: bool) -> dict:
    _, _, xv, yv = _data()
    gm = lobster_fx.instrument(_model())  # same init on both ranks
    # the default (sync_distributed=True); the mutant decides from the local loss
    kwargs = {"sync_distributed": False} if mutant else {}
    pruner = lobster_fx.PlateauPruner(gm, _evaluate_on(xv, yv), twt=TWT, pwe=2, **kwargs)
    pruned_at = [call for call, v in enumerate(RANK_LOSSES[rank], 1) if pruner.step(v) is not None]
    return {
        "pruned_at": pruned_at,
        "best": pruner.best,
        "history": pruner.history,
        "masks": {k: v.clone() for k, v in lobster_fx.masks(gm).items()},
    }


def test_plateau_decisions_agree_across_ranks(tmp_path):
    """Regression: step() decided from each rank's own loss; the rank that pruned hung."""
    r0, r1 = _run_ddp(str(tmp_path), target=functools.partial(_worker, body=_plateau_ranks))
    assert r0["pruned_at"] == r1["pruned_at"] == PLATEAU_PRUNE_CALLS
    assert r0["history"] == r1["history"] and r0["history"][0]["pruned"] > 0
    assert r0["best"] == r1["best"]
    for k, m in r0["masks"].items():
        assert torch.equal(m, r1["masks"][k]), k


def test_plateau_without_sync_decides_per_rank():
    """sync_distributed=False is the old per-rank decision (no process group needed to see it)."""
    decisions = []
    for losses in RANK_LOSSES:
        _, _, xv, yv = _data()
        pruner = lobster_fx.PlateauPruner(lobster_fx.instrument(_model()), _evaluate_on(xv, yv), twt=TWT, pwe=2,
                                          sync_distributed=False)
        decisions.append([call for call, v in enumerate(losses, 1) if pruner.step(v) is not None])
    assert decisions[0] != decisions[1]  # what the ranks would do without the average


def _mask_edit_ranks(rank: int, mutant: bool) -> dict:
    """A mask edited on rank 0 only, after every rank ran (and cached) its all-ones masks."""
    torch.manual_seed(0)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    ddp = nn.parallel.DistributedDataParallel(gm)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    lobster_fx.Lobster(ddp, opt, lmbda=1e-2)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    ddp(x)
    if rank == 0:
        lobster_fx.masks(gm)["0.weight"][:8] = 0
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()  # DDP broadcasts rank 0's buffers first
        opt.step()
    with torch.no_grad():
        probe = gm(torch.randn(4, 8, generator=torch.Generator().manual_seed(7)))
    return {
        "effective": {info.name: (p * m).detach() for info, p, m in masked_parameters(gm)},
        "raw": {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)},
        "mask": lobster_fx.masks(gm)["0.weight"].clone(),
        "probe": probe,
    }


def test_mask_edited_on_rank0_is_honoured_on_every_rank(tmp_path):
    """Regression: DDP's buffer broadcast writes rank 0's masks into rank 1 without bumping
    their versions; rank 1's cached "all ones" ran it unmasked and unpinned."""
    r0, r1 = _run_ddp(str(tmp_path), target=functools.partial(_worker, body=_mask_edit_ranks))
    assert torch.equal(r1["mask"], r0["mask"]) and (r0["mask"][:8] == 0).all()  # the broadcast arrived
    for name in r0["effective"]:
        assert torch.equal(r0["effective"][name], r1["effective"][name]), name
        assert torch.equal(r0["raw"][name], r1["raw"][name]), name  # rank 1 pinned too
    assert (r1["raw"]["0.weight"][:8] == 0).all()
    assert torch.equal(r0["probe"], r1["probe"])
