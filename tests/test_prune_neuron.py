"""prune(granularity="neuron"): whole units, the bound, evaluated thresholds only, score_fn, slim."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters
from lobster_fx.graph.prunable import default_filter
from lobster_fx.graph.taps import find_units


class _ConvNet(nn.Module):
    """Padded convs with BatchNorm, then an MLP head: the units slim must delete exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _conv_net(seed=0):
    torch.manual_seed(seed)
    model = _ConvNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):  # BN(0) is a non-zero constant: zeroing the conv alone is not enough
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        for layer, bn, weak in ((model.conv1, model.bn1, [1, 4, 6]), (model.conv2, model.bn2, [0, 5]),
                                (model.fc1, None, [2, 3, 9, 12])):
            layer.weight[weak] *= 1e-3  # units that cost little: the ones the search should take
            if bn is not None:  # and whose normalised output is near 0 too
                bn.running_mean[weak] = 0
                bn.bias[weak] = 0
    return model.eval()


def _mse_evaluate(x, y):
    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return 1.0 + float(nn.functional.mse_loss(m(x), y) / y.var())  # 1 + the share of variance lost
    return evaluate


def _dead_rows(mask):
    return mask.flatten(1).eq(0).all(1)


def test_whole_units_only_the_bound_holds_and_slim_removes_exactly_those_units():
    model = _conv_net()
    x = torch.randn(32, 3, 8, 8)
    y = model(x).detach()
    gm = lobster_fx.instrument(model)
    evaluate = _mse_evaluate(x, y)
    result = lobster_fx.prune(gm, evaluate, 0.02, granularity="neuron", channel_multiple=1)

    assert result.granularity == "neuron"
    assert result.loss_after <= result.bound == pytest.approx(1.02 * result.loss_before)
    assert result.loss_after == evaluate(gm)  # the state kept is the one evaluated
    masks = lobster_fx.masks(gm)
    dead = {}
    for layer in ("conv1", "conv2", "fc1"):
        w = masks[f"{layer}.weight"].flatten(1)
        assert torch.all(w.eq(0).all(1) | w.eq(1).all(1)), layer  # whole rows / filters only
        dead[layer] = _dead_rows(masks[f"{layer}.weight"])
        assert torch.equal(masks[f"{layer}.bias"].eq(0), dead[layer]), layer  # the bias goes with its unit
    for layer, bn in (("conv1", "bn1"), ("conv2", "bn2")):  # BatchNorm entries zeroed with the unit
        assert torch.all(gm.get_parameter(f"{bn}.weight")[dead[layer]] == 0)
        assert torch.all(gm.get_parameter(f"{bn}.bias")[dead[layer]] == 0)
        assert torch.all(gm.get_parameter(f"{bn}.weight")[~dead[layer]] != 0)
    assert torch.all(masks["fc2.weight"] == 1)  # the logits are never pruned
    n_dead = {k: int(v.sum()) for k, v in dead.items()}
    assert result.units_pruned == sum(n_dead.values()) and result.units_total == 8 + 8 + 16
    assert all(0 < n < 8 for n in (n_dead["conv1"], n_dead["conv2"])) and 0 < n_dead["fc1"] < 16
    assert result.pruned == sum(int(masks[k].eq(0).sum()) for k in masks)

    slim = lobster_fx.slim(lobster_fx.fold(gm), (x,), channel_multiple=1)
    kept = {k: len(v) - n_dead[k] for k, v in dead.items()}
    shapes = {name: tuple(p.shape) for name, p in slim.named_parameters()}
    assert shapes["conv1.weight"] == (kept["conv1"], 3, 3, 3) and shapes["conv1.bias"] == (kept["conv1"],)
    assert shapes["bn1.weight"] == (kept["conv1"],)
    assert shapes["conv2.weight"] == (kept["conv2"], kept["conv1"], 3, 3)
    assert shapes["bn2.weight"] == (kept["conv2"],)
    assert shapes["fc1.weight"] == (kept["fc1"], kept["conv2"]) and shapes["fc1.bias"] == (kept["fc1"],)
    assert shapes["fc2.weight"] == (4, kept["fc1"])
    # the kept units are the live ones, in order
    assert torch.equal(slim.get_parameter("conv1.weight"), gm.get_parameter("conv1.weight")[~dead["conv1"]])
    assert torch.allclose(slim(x), gm(x), atol=1e-5)


def _known_loss_mlp(seed=0):
    """loss = 1 + sum of squared norms of the units whose weights are all zero: known for any threshold."""
    torch.manual_seed(seed)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                                             nn.Linear(8, 3)))
    norms = {name: gm.get_parameter(f"{name}.weight").detach().norm(dim=1).clone() for name in ("0", "2")}
    seen = []

    def evaluate(m):
        lost = 0.0
        zero_rows = {}
        for name in norms:
            rows = m.get_parameter(f"{name}.weight").eq(0).all(1)
            zero_rows[name] = rows.clone()
            lost += float(norms[name][rows].square().sum())
        seen.append(zero_rows)
        return 1.0 + lost

    return gm, norms, evaluate, seen


@pytest.mark.parametrize("score", ["norm", "relative-norm", None])
@pytest.mark.parametrize("twt", [0.05, 0.5, 2.0])
def test_threshold_is_the_largest_admissible_and_only_evaluated_states_are_kept(twt, score):
    gm, norms, evaluate, seen = _known_loss_mlp()
    result = lobster_fx.prune(gm, evaluate, twt, granularity="neuron", score_fn=score)
    if score == "norm":
        by_hand = {k: v.double() for k, v in norms.items()}
    else:  # the default: each unit's norm over the mean norm of its layer
        by_hand = {k: v.double() / v.double().mean() for k, v in norms.items()}
    scores = torch.cat(list(by_hand.values()))
    lost = torch.cat(list(norms.values())).double().square()
    expected = -math.inf
    for t in torch.unique(scores):  # by hand: every candidate
        if float(lost[scores <= t].sum()) <= twt:
            expected = float(t)
    assert result.threshold == pytest.approx(expected, rel=1e-6)
    assert result.loss_after <= (1 + twt) * result.loss_before
    n = scores.numel()
    assert result.evaluations == len(seen) <= math.ceil(math.log2(n + 1)) + 2
    final = {name: _dead_rows(lobster_fx.masks(gm)[f"{name}.weight"]) for name in norms}
    # the pruned units are one of the evaluated states that met the bound
    evaluated_ok = [s for s in seen if 1.0 + sum(float(norms[k][s[k]].square().sum()) for k in norms) <= 1 + twt]
    assert any(all(torch.equal(s[k], final[k]) for k in norms) for s in evaluated_ok)
    for name in norms:
        assert torch.equal(final[name], by_hand[name] <= result.threshold * (1 + 1e-9))


def test_relative_norm_prunes_conv_channels_that_the_raw_norm_keeps():
    """Filters of 8 x 3 x 3 weights have larger norms than fc rows of 6: with one threshold on the
    raw norm only fc rows go; relative to each layer's mean, the conv's weak half goes first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    conv_scale = torch.tensor([1.0, 1.1, 1.2, 5.0, 5.1, 5.2])  # mean 3.1: relative 0.32, 0.35, 0.39, ...
    fc_scale = torch.tensor([0.4, 0.5, 0.6, 1.4, 1.5, 1.6])  # mean 1.0: relative 0.4, 0.5, ...
    with torch.no_grad():  # +-1 entries: a unit's norm is its scale x sqrt(its weight count)
        model[0].weight.copy_(torch.randn(6, 8, 3, 3).sign() * conv_scale.view(6, 1, 1, 1))
        model[3].weight.copy_(torch.randn(6, 6).sign() * fc_scale.view(6, 1))

    def pruned_per_layer(score):
        gm = lobster_fx.instrument(copy.deepcopy(model))  # pruning zeroes the weights it shares

        def evaluate(m):  # a budget of 3 units: more dead rows break the bound
            dead = sum(int(_dead_rows(m.get_parameter(k)).sum()) for k in ("0.weight", "3.weight"))
            return 1.0 if dead <= 3 else 10.0

        lobster_fx.prune(gm, evaluate, 0.0, granularity="neuron", score_fn=score)
        return {k: int(_dead_rows(lobster_fx.masks(gm)[k]).sum()) for k in ("0.weight", "3.weight")}

    # raw norms: filters >= sqrt(72) = 8.5, fc rows <= sqrt(6) x 1.6 = 3.9: the weakest fc rows go
    assert pruned_per_layer("norm") == {"0.weight": 0, "3.weight": 3}
    # relative to their layer's mean: the three weak filters (0.32 to 0.39) score below every fc row
    assert pruned_per_layer("relative-norm") == pruned_per_layer(None) == {"0.weight": 3, "3.weight": 0}


def test_coarse_search_and_pinning_across_rounds():
    gm, norms, evaluate, _ = _known_loss_mlp()
    exact = lobster_fx.prune(gm, evaluate, 0.5, granularity="neuron", score_fn="norm")
    gm2, _, evaluate2, _ = _known_loss_mlp()
    coarse = lobster_fx.prune(gm2, evaluate2, 0.5, granularity="neuron", score_fn="norm", precision=0.2)
    assert coarse.threshold <= exact.threshold and coarse.evaluations <= exact.evaluations
    first = {k: v.clone() for k, v in lobster_fx.masks(gm).items()}
    with torch.no_grad():  # pruned units would come back if they were not pinned
        for _, p, mask in masked_parameters(gm):
            p.add_(1.0).mul_(mask)
    again = lobster_fx.prune(gm, lambda m: 1.0, 0.0, granularity="neuron")  # flat loss: every live unit goes
    for k, mask in lobster_fx.masks(gm).items():
        assert torch.all(mask[first[k] == 0] == 0)
    assert again.units_remaining == 0 and again.units_pruned == exact.units_remaining
    assert torch.all(lobster_fx.masks(gm)["4.weight"] == 1)


def test_score_fn_decides_the_order_and_sees_each_layers_masked_weight():
    gm, norms, evaluate, _ = _known_loss_mlp()
    calls = []

    def inverse_norm(unit, weight):  # prune the strongest units first
        calls.append((unit.name, unit.count))
        assert torch.equal(weight, gm.get_parameter(unit.weight) * lobster_fx.masks(gm)[unit.weight])
        return -weight.norm(dim=1)

    result = lobster_fx.prune(gm, evaluate, 5.0, granularity="neuron", score_fn=inverse_norm)
    assert sorted(calls) == [("0", 10), ("2", 8)]
    for name in norms:
        dead = _dead_rows(lobster_fx.masks(gm)[f"{name}.weight"])
        assert torch.equal(dead, -norms[name] <= result.threshold)
    assert result.units_pruned > 0 and result.loss_after <= 6.0 * result.loss_before


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"granularity": "row"}, ValueError, "granularity must be 'weight' or 'neuron'"),
    ({"score_fn": lambda u, w: w.norm(dim=1)}, ValueError, "score_fn scores units: it needs granularity='neuron'"),
    ({"granularity": "neuron", "score_fn": 3}, TypeError, "score_fn must be a name from UNIT_SCORES, a callable"),
    ({"granularity": "neuron", "score_fn": "l1"}, ValueError, "unknown unit score 'l1'; known: relative-norm, norm"),
    ({"score_fn": "norm"}, ValueError, "score_fn scores units: it needs granularity='neuron'"),
    ({"granularity": "neuron", "score_fn": lambda u, w: torch.zeros(2)}, ValueError, r"shape \(10,\) for layer '0'"),
    ({"granularity": "neuron", "score_fn": lambda u, w: torch.full((u.count,), math.nan)}, ValueError, "non-finite"),
])
def test_bad_granularity_and_score_fn_are_named_and_the_model_is_untouched(kw, error, match):
    gm, _, evaluate, _ = _known_loss_mlp()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(error, match=match):
        lobster_fx.prune(gm, evaluate, 0.5, **kw)
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


def test_nan_in_the_search_restores_weights_and_batchnorm():
    gm = lobster_fx.instrument(_conv_net())
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    calls = []

    def evaluate(m):
        calls.append(1)
        return 1.0 if len(calls) < 3 else float("nan")

    with pytest.raises(ValueError, match="nan"):
        lobster_fx.prune(gm, evaluate, 0.1, granularity="neuron")
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


def test_masked_batchnorm_entries_are_pinned_by_their_masks():
    model = _conv_net()
    gm = lobster_fx.instrument(model, filter_fn=lambda m, f: default_filter(m, f) or isinstance(m, nn.BatchNorm2d))
    x = torch.randn(16, 3, 8, 8)
    result = lobster_fx.prune(gm, _mse_evaluate(x, model(x).detach()), 0.02, granularity="neuron", channel_multiple=1)
    masks = lobster_fx.masks(gm)
    assert result.units_pruned > 0
    for layer, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        dead = _dead_rows(masks[f"{layer}.weight"])
        assert torch.equal(masks[f"{bn}.weight"].eq(0), dead) and torch.equal(masks[f"{bn}.bias"].eq(0), dead)


def test_units_are_found_in_the_graph_and_named_after_their_modules():
    gm = lobster_fx.instrument(_conv_net())
    units = find_units(gm)
    assert {k: (u.kind, u.count, u.norm, u.feeds_output) for k, u in units.items()} == {
        "conv1": ("conv", 8, "bn1", False), "conv2": ("conv", 8, "bn2", False),
        "fc1": ("linear", 16, None, False), "fc2": ("linear", 4, None, True),
    }
    tagged = [n for n in gm.graph.nodes if "lobster_unit" in n.meta]
    assert [n.meta["lobster_unit"].name for n in tagged] == ["conv1", "conv2", "fc1", "fc2"]
    # a pickled module's graphs are re-traced without node meta: the units are found from the parameters
    assert find_units(pickle.loads(pickle.dumps(gm))) == units
