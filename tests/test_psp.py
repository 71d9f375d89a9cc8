"""PSP-entropy (issue 17): hand computations, the four model forms, bad input."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lobster_fx
from lobster_fx.analysis import PSPReport, psp_entropy
from lobster_fx.graph.taps import TAP_PREFIX


def _h(p: float) -> float:
    """The paper's clamped binary entropy, written out."""
    p = min(max(p, 1e-4), 0.9999)
    q = min(max(1 - p, 1e-4), 0.9999)
    return -p * math.log2(p) - q * math.log2(q)


class ConvLinear(nn.Module):
    """conv (4 channels: always on, always off, exactly zero, input-dependent) -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 2)
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([1.0, -1.0, 0.0, 0.0]))
            self.conv.weight[3] = torch.tensor([[1.0, -1.0], [0.5, 0.25]])
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([2.0, -2.0, 0.0]))
            self.fc.weight[2, 12:] = torch.tensor([1.0, -1.0, 1.0, 1.0])  # reads channel 3 only

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def _data(n: int = 30, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 3, 3, generator=g) + y.view(-1, 1, 1, 1).float() - 1.0  # class shifts the sign
    return x, y


def _hand(model: ConvLinear, x, y, classes: int):
    """Per-sample loops: z of both layers by plain ops, then counts and entropies by the formula."""
    conv_h = torch.zeros(4, 2, 2, classes, dtype=torch.float64)
    fc_h = torch.zeros(3, classes, dtype=torch.float64)
    conv_n = torch.zeros(4, 2, 2, classes, dtype=torch.long)
    fc_n = torch.zeros(3, classes, dtype=torch.long)
    for i in range(len(y)):
        z1 = F.conv2d(x[i:i + 1], model.conv.weight, model.conv.bias)[0]
        z2 = F.linear(F.relu(z1).flatten(), model.fc.weight, model.fc.bias)
        conv_n[..., int(y[i])] += (z1 > 0).long()
        fc_n[:, int(y[i])] += (z2 > 0).long()
    m = [int((y == c).sum()) for c in range(classes)]
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(2), torch.arange(2)).tolist():
        for c in range(classes):
            conv_h[(*idx, c)] = _h(int(conv_n[(*idx, c)]) / m[c])
    for j in range(3):
        for c in range(classes):
            fc_h[j, c] = _h(int(fc_n[j, c]) / m[c])
    return conv_n, fc_n, conv_h, fc_h


def test_hand_computation_conv_linear():
    model = ConvLinear().eval()
    x, y = _data()
    rep = psp_entropy(model, x, y, batch_size=7)
    conv_n, fc_n, conv_h, fc_h = _hand(model, x, y, 3)
    assert sorted(rep.entropy) == ["conv", "fc"]
    assert rep.counts["conv"].shape == (4, 2, 2, 3) and rep.entropy["conv"].shape == (4, 2, 2)
    assert rep.classwise["fc"].shape == (3, 3) and rep.entropy["fc"].shape == (3,)
    assert torch.equal(rep.counts["conv"], conv_n) and torch.equal(rep.counts["fc"], fc_n)
    assert torch.allclose(rep.classwise["conv"], conv_h, rtol=0, atol=1e-12)
    assert torch.allclose(rep.entropy["fc"], fc_h.sum(-1), rtol=0, atol=1e-12)
    assert rep.class_counts.tolist() == [10, 10, 10]
    floor = 3 * _h(1.0)  # an always-on or always-off unit: every class at the clamp's floor
    assert abs(floor - 3 * 0.0014730335283281598) < 1e-12
    assert torch.allclose(rep.entropy["conv"][:3], torch.full((3, 2, 2), floor, dtype=torch.float64), atol=1e-12)
    # channel 3 depends on the input: its entropy is above the floor somewhere
    assert float(rep.entropy["conv"][3].max()) > floor + 0.1
    # always off (bias -1) and exactly zero (z = 0 is "off") are dead; always on is not
    assert rep.dead_on_data["conv"].flatten(1).all(1).tolist() == [False, True, True, False]
    assert rep.dead_on_data["fc"].tolist() == [False, True, False]
    assert rep.counts["fc"][0].tolist() == [10, 10, 10] and rep.counts["fc"][1].tolist() == [0, 0, 0]
    # constant units are not "class-determined": their state does not depend on the class
    assert not rep.class_determined("conv")[:3].any()


def test_class_determined_and_summary():
    # unit 0 on exactly for class 1; unit 1 on for half of each class
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    rep = psp_entropy(model, x, y)
    assert rep.class_determined("0").tolist() == [True, False]
    assert torch.allclose(rep.classwise["0"][1], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert abs(float(rep.entropy["0"][0]) - 2 * _h(0.0)) < 1e-12
    s = rep.layer_stats("0")
    assert s["units"] == 2 and s["class_determined"] == 0.5 and s["dead_on_data"] == 0
    assert abs(s["mean"] - (2 * _h(0.0) + 2.0) / 2) < 1e-12
    table = rep.table()
    assert "50.0" in table and "4 samples, 2 classes" in table
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["class_counts"] == [2, 2] and d["layers"]["0"]["counts"] == [[0, 2], [1, 1]]
    assert d["layers"]["0"]["entropy"] == rep.entropy["0"].tolist()


def test_batches_and_dataloader_agree():
    model = ConvLinear()
    x, y = _data(41)
    ref = psp_entropy(model, x, y, batch_size=1000)
    for bs in (1, 6):
        rep = psp_entropy(model, x, y, batch_size=bs)
        assert all(torch.equal(rep.counts[k], ref.counts[k]) for k in ref.counts)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    rep = psp_entropy(model, loader)
    assert all(torch.equal(rep.counts[k], ref.counts[k]) for k in ref.counts)
    assert torch.equal(rep.class_counts, ref.class_counts)
    # the largest class first appears in a later batch: counts of earlier batches are padded
    order = torch.argsort(y, stable=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[order], y[order]), batch_size=4)
    rep = psp_entropy(model, loader)
    assert all(torch.equal(rep.counts[k], ref.counts[k]) for k in ref.counts)


class Head(nn.Module):
    """A traced-through layer: F.linear on its own parameter (no nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 32) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.head = Head()

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.head(F.relu(self.fc1(x)))


def test_plain_instrumented_folded_slimmed_agree():
    torch.manual_seed(0)
    model = Net().train()
    x, y = torch.randn(60, 1, 8, 8), torch.arange(60) % 4
    before = copy.deepcopy(model.state_dict())
    plain = psp_entropy(model, x, y, batch_size=16)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(plain.entropy) == ["fc1", "features.0", "features.2", "head"]
    assert plain.kinds == {"features.0": "conv", "features.2": "conv", "fc1": "linear", "head": "linear"}

    gm = lobster_fx.instrument(model)
    unmasked = psp_entropy(gm, x, y, batch_size=16)
    assert all(torch.equal(plain.counts[k], unmasked.counts[k]) for k in plain.counts)
    dead = torch.tensor([0, 5, 6, 20])  # fc1 units pruned whole: slim removes them
    with torch.no_grad():
        masks = lobster_fx.masks(gm)
        masks["fc1.weight"][dead] = 0
        masks["fc1.bias"][dead] = 0
    gm.train()
    inst = psp_entropy(gm, x, y, batch_size=16)
    assert gm.training
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(TAP_PREFIX)]
    folded = lobster_fx.fold(gm)
    fold_rep = psp_entropy(folded, x, y)
    slim = lobster_fx.slim(folded.eval(), x[:4])
    slim_rep = psp_entropy(slim, x, y)

    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    # the masked rows are dead on the data: pruned units have z = 0
    assert inst.dead_on_data["fc1"][dead].all()
    for name in plain.entropy:
        assert torch.equal(inst.counts[name], fold_rep.counts[name]), name
    for name in ("features.0", "features.2"):  # upstream of the pruned units
        assert torch.equal(plain.counts[name], inst.counts[name]), name
    assert torch.equal(plain.counts["fc1"][alive], inst.counts["fc1"][alive])
    # slim: fc1 has 28 units left, the same ones with the same counts; the rest unchanged
    assert sorted(slim_rep.entropy) == sorted(plain.entropy)
    assert slim_rep.counts["fc1"].shape == (28, 4)
    assert torch.equal(slim_rep.counts["fc1"], inst.counts["fc1"][alive])
    assert torch.equal(slim_rep.entropy["fc1"], inst.entropy["fc1"][alive])
    for name in ("features.0", "features.2", "head"):
        assert torch.equal(slim_rep.counts[name], inst.counts[name]), name


def test_frozen_and_wrapped_models():
    torch.manual_seed(1)
    model = Net()
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 2
    ref = psp_entropy(model, x, y)
    model.requires_grad_(False)  # instrument masks trainable weights only; psp_entropy measures all
    frozen = psp_entropy(model, x, y)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(frozen.counts[k], ref.counts[k]) for k in ref.counts)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda m, x, y: psp_entropy(m, x, y[:-1]), ValueError, r"labels do not match inputs: 29 labels for 30"),
        (lambda m, x, y: psp_entropy(m, x, torch.where(y == 1, 2, y)), ValueError,
         r"class\(es\) \[1\] have no sample"),
        (lambda m, x, y: psp_entropy(m, x, y, num_classes=5), ValueError, r"class\(es\) \[3, 4\] have no sample"),
        (lambda m, x, y: psp_entropy(m, x, y, num_classes=2), ValueError, r"label 2 is out of range"),
        (lambda m, x, y: psp_entropy(m, x, y.float()), ValueError, r"1-D integer tensor"),
        (lambda m, x, y: psp_entropy(m, x, y - 1), ValueError, r"negative class index -1"),
        (lambda m, x, y: psp_entropy(m, x, y, batch_size=0), ValueError, r"batch_size must be a positive int"),
        (lambda m, x, y: psp_entropy(m, x[:0], y[:0]), ValueError, r"no data"),
        (lambda m, x, y: psp_entropy(m, [(x, y)], y), TypeError, r"pass labels=None"),
        (lambda m, x, y: psp_entropy(m, [(x, y[:3])]), ValueError, r"batch 0: 3 labels for 30"),
        (lambda m, x, y: psp_entropy(m, [x]), ValueError, r"batch 0 of the data is not an \(x, y\) pair"),
        (lambda m, x, y: psp_entropy(nn.Sequential(nn.ReLU(), nn.Flatten()), x, y), ValueError,
         r"has no Linear / Conv layer"),
        (lambda m, x, y: psp_entropy("model", x, y), TypeError, r"must be a torch.nn.Module"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call, exc, match):
    model = ConvLinear().train()
    before = copy.deepcopy(model.state_dict())
    x, y = _data()
    with pytest.raises(exc, match=match):
        call(model, x, y)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_report_from_counts_and_plots(tmp_path):
    # the report is a pure function of the counts: H of a hand-made count table
    counts = {"a": torch.tensor([[0, 5], [3, 1]])}
    rep = PSPReport(counts, torch.tensor([5, 5]), {"a": "linear"})
    assert torch.allclose(rep.entropy["a"], torch.tensor([2 * _h(0.0), _h(0.6) + _h(0.2)], dtype=torch.float64),
                          rtol=0, atol=1e-12)
    rep = psp_entropy(ConvLinear(), *_data())
    assert rep.channel_summary()["conv"].shape == (4,)
    assert torch.allclose(rep.channel_summary()["conv"][3], rep.entropy["conv"][3].mean())
    rep.plot_histograms(str(tmp_path / "h.png"))
    rep.plot_heatmap("conv", str(tmp_path / "c.png"), max_rows=2)
    with pytest.raises(KeyError, match="no layer 'nope'"):
        rep.plot_heatmap("nope", str(tmp_path / "n.png"))
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.png").stat().st_size > 0
    assert not (tmp_path / "n.png").exists()


def test_import_does_not_load_matplotlib():
    code = ("import sys, lobster_fx, lobster_fx.analysis, lobster_fx.analysis.command; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
