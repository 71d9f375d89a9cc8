"""Neuron pruning asks slim: residual channels pruned together, unremovable units left alone."""

import warnings

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.models import ResNet32
from lobster_fx.pruning.neuron import UnitPlan
from lobster_fx.pruning.unit_groups import slim_unit_groups


class _ResBlockNet(nn.Module):
    """A stem, one residual block (identity skip) and a block with a conv shortcut, BatchNorm everywhere:
    channels of ``stem`` and ``b1.c2`` are added; so are those of ``b2.c2`` and ``b2.short``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1c1, self.b1n1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1c2, self.b1n2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b2c1, self.b2n1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b2c2, self.b2n2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.short, self.shortn = nn.Conv2d(8, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.b1n2(self.b1c2(torch.relu(self.b1n1(self.b1c1(h))))))
        h = torch.relu(self.shortn(self.short(h)) + self.b2n2(self.b2c2(torch.relu(self.b2n1(self.b2c1(h))))))
        return self.fc(h.mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    model = _ResBlockNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return lobster_fx.instrument(model.eval())


def _evaluate(x, y, calls=None):
    def evaluate(m):
        if calls is not None:
            calls.append("call")
        m.eval()
        with torch.no_grad():
            out = m(x)
        if calls is not None:
            calls.append("done")
        return 1.0 + float(nn.functional.mse_loss(out, y) / y.var())
    return evaluate


def test_slim_groups_of_a_residual_net():
    gm = _model()
    groups = slim_unit_groups(gm, torch.randn(2, 2, 8, 8))
    assert groups.coupled == [["b1c2.weight", "stem.weight"], ["b2c2.weight", "short.weight"]]
    assert set(groups.blocked) == {"fc.weight"} and "graph output" in groups.blocked["fc.weight"]


def test_coupled_units_share_the_members_mean_score():
    gm = _model()
    plan = UnitPlan(gm, example_inputs=torch.randn(2, 2, 8, 8))
    by_members = {tuple(sorted(m.unit.name for m in c.members)): c for c in plan.clusters}
    assert set(by_members) == {("b1c1",), ("b2c1",), ("b1c2", "stem"), ("b2c2", "short")}
    masks = lobster_fx.masks(gm)
    for names, cluster in by_members.items():
        # by hand: each layer's L2 row norms over their mean, averaged over the coupled layers
        per_layer = []
        for name in names:
            w = (gm.get_parameter(f"{name}.weight") * masks[f"{name}.weight"]).detach().flatten(1).double()
            norms = w.norm(dim=1)
            per_layer.append(norms / norms.mean())
        assert torch.allclose(cluster.scores, torch.stack(per_layer).mean(0))
    assert plan.skipped == {}  # fc feeds the output: never a unit to begin with


@pytest.mark.parametrize("twt", [0.05, 0.3])
def test_residual_channels_are_pruned_together_and_slim_removes_them(twt):
    gm = _model()
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
        # channel 3 of the first stage is cheap in both addends, channel 5 only in the stem
        for name in ("stem", "b1c2"):
            gm.get_parameter(f"{name}.weight")[3] *= 1e-3
        gm.get_parameter("stem.weight")[5] *= 1e-3
    result = lobster_fx.prune(gm, _evaluate(x, y), twt, granularity="neuron", channel_multiple=1)
    assert result.units_pruned > 0 and result.units_skipped == 0
    dead = {n: lobster_fx.masks(gm)[f"{n}.weight"].flatten(1).eq(0).all(1) for n in ("stem", "b1c2", "b2c2", "short")}
    assert torch.equal(dead["stem"], dead["b1c2"]) and torch.equal(dead["b2c2"], dead["short"])
    assert bool(dead["stem"][3])
    # slim deletes every pruned residual channel: the stage's width is the live count, outputs within 1e-5
    slim = lobster_fx.slim(lobster_fx.fold(gm), x, channel_multiple=1)
    live = int((~dead["stem"]).sum())
    assert slim.get_parameter("stem.weight").shape[0] == live
    assert slim.get_parameter("b1c2.weight").shape[0] == live
    assert slim.get_parameter("b1c1.weight").shape[1] == live
    assert slim.get_parameter("short.weight").shape[0] == int((~dead["short"]).sum())
    assert torch.allclose(slim(x), gm(x), atol=1e-5)


def test_without_slim_aware_a_residual_channel_is_pruned_in_one_addend_only():
    gm = _model()
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
        gm.get_parameter("stem.weight")[5] *= 1e-3
    lobster_fx.prune(gm, _evaluate(x, y), 0.02, granularity="neuron", slim_aware=False)
    masks = lobster_fx.masks(gm)
    assert bool(masks["stem.weight"][5].eq(0).all()) and not bool(masks["b1c2.weight"][5].eq(0).all())
    # and slim can remove nothing of it: the channel lives on through the skip
    slim = lobster_fx.slim(lobster_fx.fold(gm), x, channel_multiple=1)
    assert slim.get_parameter("stem.weight").shape[0] == 8


def test_option_a_shortcuts_freeze_the_residual_channels_so_only_inner_units_are_pruned():
    torch.manual_seed(0)
    gm = lobster_fx.instrument(ResNet32(in_channels=1).eval())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        y = gm(x)
    before = {k: v.clone() for k, v in lobster_fx.masks(gm).items()}
    result = lobster_fx.prune(gm, _evaluate(x, y), 0.5, granularity="neuron")
    residual = ["conv1"] + [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(5)]
    assert result.units_skipped == 16 * 6 + 32 * 5 + 64 * 5
    after = lobster_fx.masks(gm)
    for name in residual:  # slim cannot remove them: untouched
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
    inner = [f"layer{s}.{b}.conv1.weight" for s in (1, 2, 3) for b in range(5)]
    assert result.units_pruned == sum(int(after[k].flatten(1).eq(0).all(1).sum()) for k in inner) > 0


def test_the_inputs_come_from_evaluate_and_a_known_loss_costs_one_stopped_call():
    gm = _model()
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
    calls = []
    r = lobster_fx.prune(gm, _evaluate(x, y, calls), 0.05, granularity="neuron")
    assert calls.count("call") == calls.count("done") == r.evaluations  # captured on the way, no extra call
    gm = _model()
    calls = []
    r = lobster_fx.prune(gm, _evaluate(x, y, calls), 0.05, granularity="neuron", loss_before=1.0)
    # one more call, stopped at the model's forward (never "done"), before the search
    assert calls[:2] == ["call", "call"] and calls.count("done") == r.evaluations
    calls = []
    lobster_fx.prune(_model(), _evaluate(x, y, calls), 0.05, granularity="neuron", loss_before=1.0,
                     example_inputs=x)
    assert calls.count("call") == calls.count("done")


def test_analysis_failure_warns_and_every_unit_stands_alone():
    gm = _model()
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
    with pytest.warns(UserWarning, match="slim's analysis failed.*every unit is pruned on its own"):
        plan = UnitPlan(gm, example_inputs=torch.randn(2, 5, 8, 8))  # wrong channel count
    assert all(len(c.members) == 1 for c in plan.clusters) and len(plan.clusters) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = lobster_fx.prune(gm, _evaluate(x, y), 0.05, granularity="neuron", example_inputs=x)
    assert r.units_total == 48


def test_a_custom_score_is_averaged_over_coupled_layers():
    gm = _model()
    plan = UnitPlan(gm, lambda unit, w: torch.arange(unit.count, dtype=torch.float32) + len(unit.name),
                    example_inputs=torch.randn(2, 2, 8, 8))
    pair = next(c for c in plan.clusters if {m.unit.name for m in c.members} == {"b2c2", "short"})
    assert torch.equal(pair.scores, torch.arange(8, dtype=torch.float64) + (4 + 5) / 2)


def test_slim_aware_is_a_setting_of_the_schedule_and_the_sparsifier():
    gm = _model()
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
    off = lobster_fx.PlateauPruner(gm, _evaluate(x, y), granularity="neuron", slim_aware=False)
    on = lobster_fx.PlateauPruner(gm, _evaluate(x, y), granularity="neuron")
    assert on.slim_aware and not off.slim_aware
    on.load_state_dict(off.state_dict())
    assert on.slim_aware is False
    old = off.state_dict()
    del old["slim_aware"]  # a checkpoint from before the setting: the pruner keeps its own
    fresh = lobster_fx.PlateauPruner(gm, _evaluate(x, y), granularity="neuron")
    fresh.load_state_dict(old)
    assert fresh.slim_aware is True
    with pytest.raises(TypeError, match="slim_aware"):
        lobster_fx.PlateauPruner(gm, _evaluate(x, y), slim_aware="yes")
    sparsifier = lobster_fx.Sparsifier(_evaluate(x, y), method="serene", twt=0.02, slim_aware=False)
    sparsifier.prepare(gm)
    sparsifier.attach(torch.optim.SGD(gm.parameters(), lr=0.01))
    assert sparsifier.pruner.slim_aware is False and sparsifier.state_dict()["options"]["slim_aware"] is False
    # and the phase it runs prunes the stem alone when that is what the scores say
    with torch.no_grad():
        gm.get_parameter("stem.weight")[5] *= 1e-3
    sparsifier.pruner.action(gm, _evaluate(x, y))
    masks = lobster_fx.masks(gm)
    assert bool(masks["stem.weight"][5].eq(0).all()) and not bool(masks["b1c2.weight"][5].eq(0).all())


@pytest.mark.parametrize(("size", "live", "threshold", "expected"), [
    (16, 16, 4.5, []),                 # 5 wanted: 11 kept rounds up to 16, none removed
    (16, 16, 8.5, list(range(8))),     # 9 wanted: 7 kept rounds to 8: the 8 lowest
    (16, 16, 99.0, list(range(8))),    # all wanted: slim keeps one, rounded to 8
    (20, 20, 99.0, list(range(12))),   # LeNet-5's 20 channels: 8 kept
    (16, 12, 2.5, []),                 # 4 already dead, 3 more wanted: 9 kept rounds to 16
    (16, 12, 3.5, [0, 1, 2, 3]),       # 4 more: 8 kept
])
def test_conv_groups_prune_only_what_slim_removes_with_its_channel_multiple(size, live, threshold, expected):
    from lobster_fx.pruning.neuron import _Cluster

    alive = torch.zeros(size, dtype=torch.bool)
    alive[:live] = True
    scores = torch.arange(size, dtype=torch.float64)
    scores[:live] = scores[:live].flip(0)  # the live ones scored in reverse: the lowest are the last live
    cluster = _Cluster([], scores, alive, multiple=8)
    lowest_live = scores[:live].argsort()[:len(expected)].tolist()
    assert sorted(cluster.pruned(threshold).nonzero().flatten().tolist()) == sorted(lowest_live)
    assert torch.equal(_Cluster([], scores, alive, multiple=1).pruned(threshold), (scores <= threshold) & alive)


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("slim_aware", [True, False])
def test_with_slims_multiple_every_pruned_conv_channel_is_removed_by_slim(slim_aware):
    torch.manual_seed(0)
    model = _Wide().eval()
    with torch.no_grad():
        model.conv1.weight[:10] *= 1e-3  # 10 cheap channels: slim with multiple 8 can remove 8 of them
        model.bn1.running_mean[:10] = 0
        model.bn1.bias[:10] = 0
    gm = lobster_fx.instrument(model)
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        y = gm(x)
    lobster_fx.prune(gm, _evaluate(x, y), 0.01, granularity="neuron", slim_aware=slim_aware, channel_multiple=None)
    dead = int(lobster_fx.masks(gm)["conv1.weight"].flatten(1).eq(0).all(1).sum())
    slim = lobster_fx.slim(lobster_fx.fold(gm), x)  # slim's default channel_multiple: 8
    width = slim.get_parameter("conv1.weight").shape[0]
    if slim_aware:  # only what slim removes was pruned
        assert dead == 8 and width == 16 - dead
    else:  # 10 pruned, 2 of them zeroed for nothing
        assert dead == 10 and width == 8
    torch.testing.assert_close(slim(x), gm(x), rtol=0, atol=1e-5)


def test_a_bad_channel_multiple_is_named_before_anything_runs():
    gm = _model()
    with pytest.raises(ValueError, match="prune: channel_multiple must be a positive int"):
        lobster_fx.prune(gm, lambda m: pytest.fail("evaluated"), 0.05, granularity="neuron", channel_multiple=0)


def test_channel_multiple_is_a_setting_of_the_schedule():
    gm = _model()
    pruner = lobster_fx.PlateauPruner(gm, lambda m: 1.0, granularity="neuron", channel_multiple=4)
    assert pruner.channel_multiple == 4 and pruner.state_dict()["channel_multiple"] == 4
    other = lobster_fx.PlateauPruner(gm, lambda m: 1.0, granularity="neuron")
    assert other.channel_multiple == 1  # every unit under the threshold, by default
    other.load_state_dict(pruner.state_dict())
    assert other.channel_multiple == 4
    with pytest.raises(ValueError, match="PlateauPruner: channel_multiple must be a positive int"):
        lobster_fx.PlateauPruner(gm, lambda m: 1.0, channel_multiple=-1)


def test_the_analysis_runs_on_two_samples_of_a_large_batch(monkeypatch):
    from lobster_fx.passes.slim import analysis

    seen = []
    original = analysis.Analysis.__init__

    def spy(self, gm, inputs):
        seen.append(inputs[0].shape[0])
        original(self, gm, inputs)

    monkeypatch.setattr(analysis.Analysis, "__init__", spy)
    groups = slim_unit_groups(_model(), torch.randn(500, 2, 8, 8))
    assert seen == [2] and len(groups.coupled) == 2
