"""When to prune (triggers) apart from what to prune (PruneAction); PlateauPruner built from both."""

import math

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.pruning.prune import PruneAction
from lobster_fx.pruning.triggers import FIRE, IMPROVED, WAIT, EveryNIterations, PlateauTrigger, Trigger


def test_plateau_trigger_counts_epochs_without_improvement():
    t = PlateauTrigger(pwe=3, threshold=0.1)
    # 1.95 is not 10% better than 2.0: a bad epoch
    assert [t.observe(v) for v in (3.0, 2.0, 1.95, 2.5, 1.7, 1.8, 1.8, 1.8)] == [
        IMPROVED, IMPROVED, WAIT, WAIT, IMPROVED, WAIT, WAIT, FIRE]
    t.pruned(2.5)
    assert (t.best, t.bad_epochs) == (2.5, 0)
    assert t.observe(2.0) == IMPROVED
    copy = PlateauTrigger()
    copy.load_state_dict(t.state_dict())
    assert copy.state_dict() == t.state_dict() == {"pwe": 3, "threshold": 0.1, "best": 2.0, "bad_epochs": 0}
    assert isinstance(t, Trigger) and isinstance(EveryNIterations(2), Trigger)


def test_every_n_iterations_fires_on_multiples_and_resumes():
    t = EveryNIterations(3)
    assert [t.observe() for _ in range(7)] == [WAIT, WAIT, FIRE, WAIT, WAIT, FIRE, WAIT]
    resumed = EveryNIterations(1)
    resumed.load_state_dict(t.state_dict())
    assert [resumed.observe() for _ in range(2)] == [WAIT, FIRE] and resumed.n == 3


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: PlateauTrigger(pwe=0), ValueError, "PlateauTrigger: pwe must be an int >= 1, got 0 (int)"),
    (lambda: PlateauTrigger(threshold=1.0), ValueError, "PlateauTrigger: threshold must be a float in [0, 1), got 1.0 (float)"),
    (lambda: EveryNIterations(2.5), TypeError, "EveryNIterations: every_n_iterations must be an int >= 1, got 2.5 (float)"),
    (lambda: PlateauTrigger().observe("1.0"), TypeError, "PlateauTrigger.observe: val_loss must be a finite float, got '1.0' (str)"),
    (lambda: PlateauTrigger().observe(math.nan), ValueError, "PlateauTrigger.observe: val_loss is nan"),
    (lambda: PruneAction(-1), ValueError, "PruneAction: twt must be a finite float >= 0, got -1 (int)"),
    (lambda: PruneAction(granularity="filter"), ValueError, "PruneAction: granularity must be 'weight' or 'neuron'"),
])
def test_bad_settings_are_named(make, error, message):
    with pytest.raises(error) as e:
        make()
    assert str(e.value).startswith(message)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return lobster_fx.instrument(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


def _evaluate():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, 4, generator=g)

    def evaluate(m):
        with torch.no_grad():
            return float(nn.functional.mse_loss(m(x), y))
    return evaluate


LOSSES = [3.0, 2.0, 2.5, 2.6, 1.0, 1.5, 1.6, 1.7]


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_a_loop_of_ones_own_equals_plateau_pruner(granularity):
    """The trigger and the action composed by hand take the same decisions as PlateauPruner (no rollback)."""
    evaluate = _evaluate()
    gm_a = _mlp()
    pruner = lobster_fx.PlateauPruner(gm_a, evaluate, twt=0.1, pwe=2, rollback=False, granularity=granularity)
    fired_a = [pruner.step(v) is not None for v in LOSSES]
    gm_b, trigger, action, fired_b, results = _mlp(), PlateauTrigger(pwe=2), PruneAction(0.1, granularity=granularity), [], []
    for v in LOSSES:
        fire = trigger.observe(v) == FIRE
        if fire:
            results.append(action(gm_b, evaluate))
            trigger.pruned(results[-1].loss_after)
        fired_b.append(fire)
    assert fired_a == fired_b and fired_a.count(True) == 2
    assert [{k: v for k, v in h.items() if k != "call"} for h in pruner.history] == [r.to_dict() for r in results]
    for k, mask in lobster_fx.masks(gm_a).items():
        assert torch.equal(mask, lobster_fx.masks(gm_b)[k])
    assert (pruner.best, pruner.bad_epochs) == (trigger.best, trigger.bad_epochs)


def test_plateau_pruner_is_a_trigger_and_an_action():
    gm = _mlp()
    plateau = lobster_fx.PlateauPruner(gm, lambda m: 1.0, twt=0.2, pwe=4, threshold=0.01, search_precision=0.1)
    assert isinstance(plateau.trigger, PlateauTrigger) and (plateau.trigger.pwe, plateau.trigger.threshold) == (4, 0.01)
    assert (plateau.action.twt, plateau.action.precision, plateau.action.granularity) == (0.2, 0.1, "weight")
    every = lobster_fx.PlateauPruner(gm, lambda m: 1.0, every_n_iterations=5, granularity="neuron")
    assert isinstance(every.trigger, EveryNIterations) and every.trigger.n == 5 == every.every_n_iterations
    assert every.action.granularity == "neuron" and every.pwe == 20  # the plateau settings are still kept
    with pytest.raises(ValueError, match="PlateauPruner: score_fn scores units"):
        lobster_fx.PlateauPruner(gm, lambda m: 1.0, score_fn=lambda u, w: w.norm(dim=1))


def test_neuron_pruner_prunes_whole_units_and_its_state_dict_round_trips():
    evaluate = _evaluate()
    gm = _mlp()
    pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=0.3, pwe=1, granularity="neuron")
    assert pruner.step(2.0) is None
    result = pruner.step(2.5)
    assert result is not None and result.granularity == "neuron" and result.units_pruned > 0
    rows = lobster_fx.masks(gm)["0.weight"]
    assert torch.all(rows.eq(0).all(1) | rows.eq(1).all(1))
    state = pruner.state_dict()
    assert state["granularity"] == "neuron"
    other = lobster_fx.PlateauPruner(_mlp(), evaluate)
    other.load_state_dict(state)
    assert other.granularity == "neuron" and other.history == pruner.history
    assert (other.best, other.bad_epochs, other.calls) == (pruner.best, pruner.bad_epochs, pruner.calls)


def _old_format_state(every=None):
    """A PlateauPruner.state_dict as saved before triggers existed (no "granularity" key)."""
    return {"twt": 0.05, "pwe": 2, "rollback": True, "every_n_iterations": every, "threshold": 0.0,
            "reuse_val_loss": False, "search_precision": 0.0, "best": 1.5, "bad_epochs": 1, "calls": 7,
            "history": [{"call": 3, "threshold": 0.1}], "best_state": None, "best_optimizer_state": None}


def test_an_old_state_dict_loads_in_both_modes():
    pruner = lobster_fx.PlateauPruner(_mlp(), lambda m: 1.0, granularity="neuron")
    pruner.load_state_dict(_old_format_state())
    assert isinstance(pruner.trigger, PlateauTrigger) and pruner.granularity == "neuron"  # kept: not in the file
    assert (pruner.best, pruner.bad_epochs, pruner.calls, pruner.pwe) == (1.5, 1, 7, 2)
    assert pruner.step(2.0) is not None  # the second bad epoch: prunes
    pruner.load_state_dict(_old_format_state(every=4))
    assert isinstance(pruner.trigger, EveryNIterations) and pruner.every_n_iterations == 4
    assert [pruner.step() is not None for _ in range(2)] == [True, False]  # call 8 is a multiple of 4


def test_a_failing_neuron_phase_leaves_the_trigger_and_the_model_as_they_were():
    gm = _mlp()
    pruner = lobster_fx.PlateauPruner(gm, lambda m: 1.0, pwe=1, granularity="neuron")
    pruner.step(1.0)
    state, trigger = {k: v.clone() for k, v in gm.state_dict().items()}, pruner.trigger.state_dict()
    pruner.evaluate = lambda m: float("nan")
    with pytest.raises(ValueError, match="nan"):
        pruner.step(2.0)
    assert pruner.trigger.state_dict() == trigger and pruner.calls == 1
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
