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
