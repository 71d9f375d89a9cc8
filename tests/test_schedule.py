"""PlateauPruner: plateau detection, rollback, interval mode, state_dict."""

import pytest
import torch
from torch import nn

import lobster_fx


def _gm(seed=0):
    torch.manual_seed(seed)
    return lobster_fx.instrument(nn.Linear(8, 4))


def test_prunes_after_pwe_epochs_without_improvement():
    gm = _gm()
    evaluations = []
    pruner = lobster_fx.PlateauPruner(gm, lambda m: evaluations.append(1) or 1.0, twt=0.05, pwe=3, rollback=False)
    results = [pruner.step(v) for v in (5.0, 4.0, 4.5, 4.2, 3.9, 4.0, 4.1)]
    assert results[:6] == [None] * 6  # 3.9 improved at epoch 5: counter reset
    assert results[6] is None
    assert pruner.step(4.0) is not None  # third epoch without improvement
    assert len(pruner.history) == 1 and evaluations


def test_rollback_restores_best_weights_before_pruning():
    gm = _gm()
    w = gm.get_parameter("weight")
    best = w.detach().clone()
    seen = []
    pruner = lobster_fx.PlateauPruner(gm, lambda m: seen.append(m.get_parameter("weight").detach().clone()) or 1.0,
                                      twt=0.0, pwe=1, rollback=True)
    pruner.step(1.0)
    with torch.no_grad():
        w.add_(10.0)  # a worse epoch
    assert pruner.step(2.0) is not None
    assert torch.equal(seen[0], best)  # loss_before was measured on the rolled-back weights


def test_interval_mode():
    gm = _gm()
    pruner = lobster_fx.PlateauPruner(gm, lambda m: 1.0, twt=0.1, every_n_iterations=4)
    results = [pruner.step() for _ in range(8)]
    assert [r is not None for r in results] == [False, False, False, True] * 2


def test_state_dict_roundtrip_continues_identically():
    losses = [3.0, 2.0, 2.5, 2.6, 1.0, 1.5, 1.6, 1.7]
    a = lobster_fx.PlateauPruner(_gm(), lambda m: 1.0, twt=0.05, pwe=2)
    b_gm = _gm()
    b = lobster_fx.PlateauPruner(b_gm, lambda m: 1.0, twt=0.05, pwe=2)
    ra = [a.step(v) is not None for v in losses]
    rb = [b.step(v) is not None for v in losses[:3]]
    c = lobster_fx.PlateauPruner(b_gm, lambda m: 1.0)
    c.load_state_dict(b.state_dict())
    rb += [c.step(v) is not None for v in losses[3:]]
    assert ra == rb and any(ra)


@pytest.mark.parametrize("kw", [{"twt": -1}, {"pwe": 0}, {"every_n_iterations": 0}, {"threshold": 1.0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        lobster_fx.PlateauPruner(_gm(), lambda m: 1.0, **kw)


# --- optimizer state in the rollback, errors during the pruning phase, state_dict round trip ---


def _teacher_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 8, generator=g)
    return x, x @ torch.randn(8, 4, generator=g)


def _setup(seed=0, **kwargs):
    """A model, an SGD-with-momentum optimizer, a model-dependent evaluate and a pruner."""
    gm = _gm(seed)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    x, y = _teacher_data()

    def evaluate(m):
        with torch.no_grad():
            return float(nn.functional.mse_loss(m(x), y))

    kwargs = {"twt": 0.05, "pwe": 2, "optimizer": opt, **kwargs}
    return gm, opt, lobster_fx.PlateauPruner(gm, evaluate, **kwargs)


def _train_step(gm, opt, k):
    """One deterministic SGD step (k varies the batch): moves weights and momentum."""
    x, y = _teacher_data()
    opt.zero_grad()
    nn.functional.mse_loss(gm(x[k % 4 :: 4]), y[k % 4 :: 4]).backward()
    opt.step()


def _clone_state(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _momenta(opt):
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]


def _all_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_all_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_all_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_rollback_restores_the_optimizer_state_of_the_best_epoch():
    gm, opt, pruner = _setup(pwe=1)
    _train_step(gm, opt, 0)
    _train_step(gm, opt, 1)
    assert pruner.step(1.0) is None  # best epoch: snapshot
    best_momenta = _momenta(opt)
    for k in range(2, 5):  # worse epochs: momentum moves on
        _train_step(gm, opt, k)
    assert not _all_equal(_momenta(opt), best_momenta)
    opt.param_groups[0]["lr"] = 0.01  # a scheduler's lr belongs to now, not to the best epoch
    assert pruner.step(2.0) is not None  # rollback, then prune
    assert _all_equal(_momenta(opt), best_momenta)
    assert opt.param_groups[0]["lr"] == 0.01
    _train_step(gm, opt, 5)  # restored buffers are copies: training on does not alter the new snapshot
    assert torch.equal(pruner._best_optimizer_state["state"][0]["momentum_buffer"], best_momenta[0])


class _EvaluateFailed(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [1, 2])  # at loss_before, or within the bisection
def test_error_in_pruning_phase_leaves_everything_as_before_the_call(fail_at):
    gm, opt, pruner = _setup(pwe=1)
    _train_step(gm, opt, 0)
    assert pruner.step(1.0) is None
    for k in range(1, 4):
        _train_step(gm, opt, k)
    model_before, momenta_before = _clone_state(gm), _momenta(opt)
    counters_before = (pruner.calls, pruner.bad_epochs, pruner.best)
    real, calls = pruner.evaluate, []

    def failing(m):
        calls.append(1)
        if len(calls) == fail_at:
            raise _EvaluateFailed("validation data went away")
        return real(m)

    pruner.evaluate = failing
    with pytest.raises(_EvaluateFailed):
        pruner.step(2.0)
    assert _all_equal(_clone_state(gm), model_before)  # not the rolled-back best weights
    assert _all_equal(_momenta(opt), momenta_before)
    assert (pruner.calls, pruner.bad_epochs, pruner.best) == counters_before and pruner.history == []
    pruner.evaluate = real  # the same call again now succeeds, as if the failed one never happened
    assert pruner.step(2.0) is not None


def _run(steps, pruner, gm, opt, losses, start=0):
    results = []
    for i in range(start, start + steps):
        _train_step(gm, opt, i)
        results.append(pruner.step(losses[i]) is not None)
    return results


def test_state_dict_roundtrip_through_torch_save_restores_everything(tmp_path):
    # prunings at epochs 3 (rolls back to epoch 1, before the checkpoint) and 6
    losses = [3.0, 2.0, 2.5, 2.6, 0.01, 1.5, 1.6, 1.7]
    kw = {"search_precision": 0.1}
    gm_a, opt_a, a = _setup(**kw)
    full = _run(len(losses), a, gm_a, opt_a, losses)
    gm_b, opt_b, b = _setup(**kw)
    first = _run(3, b, gm_b, opt_b, losses)
    torch.save({"model": gm_b.state_dict(), "opt": opt_b.state_dict(), "pruner": b.state_dict()}, tmp_path / "c.pt")

    gm_c, opt_c, c = _setup(seed=1)  # other init, default search_precision: all must come from the file
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    gm_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    c.load_state_dict(ckpt["pruner"])
    assert c.search_precision == 0.1
    assert _all_equal(c._best_state, b._best_state) and c._best_state is not None
    assert _all_equal(c._best_optimizer_state, b._best_optimizer_state) and c._best_optimizer_state is not None
    assert (c.best, c.bad_epochs, c.calls) == (b.best, b.bad_epochs, b.calls)

    resumed = first + _run(len(losses) - 3, c, gm_c, opt_c, losses, start=3)
    assert resumed == full and full.count(True) == 2
    assert c.history == a.history  # thresholds, losses, evaluation counts, calls
    assert _all_equal(_clone_state(gm_c), _clone_state(gm_a))  # weights and masks
    assert _all_equal(lobster_fx.masks(gm_c), lobster_fx.masks(gm_a))
    assert _all_equal(c._best_state, a._best_state)
    assert _all_equal(_momenta(opt_c), _momenta(opt_a))


def test_load_state_dict_of_an_older_checkpoint_keeps_defaults():
    pruner = _setup(search_precision=0.2)[2]
    old = pruner.state_dict()
    del old["search_precision"], old["best_optimizer_state"]  # keys added later
    fresh = _setup(search_precision=0.3)[2]
    fresh.load_state_dict(old)
    assert fresh.search_precision == 0.3 and fresh._best_optimizer_state is None
