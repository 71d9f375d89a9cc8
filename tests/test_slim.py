"""Tests for lobster_fx.passes.slim: parity with the dense model and exact unit removal.

Sparse "folded" models are built by tracing with ``trace_model`` and zeroing
weights (random 90-99% unstructured sparsity plus designed dead units). Every
expected count is computed here, independently of the pass."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lobster_fx.graph.trace import LobsterGraphModule, trace_model
from lobster_fx.passes.slim import DEFAULT_CHANNEL_MULTIPLE, META_KEY, SlimError, slim

torch.set_num_threads(1)
REL = 1e-5


# --------------------------------------------------------------------------- helpers


def _sparsify(model: nn.Module, sparsity: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= sparsity)


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1.0, 0.3, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)


def _snapshot(model: nn.Module) -> tuple:
    code = model.code if hasattr(model, "code") else None
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        code,
    )


def _assert_unchanged(model: nn.Module, snap: tuple) -> None:
    sd, flags, code = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert now[k].shape == sd[k].shape and torch.equal(now[k], sd[k]), k
    assert [m.training for m in model.modules()] == flags
    if code is not None:
        assert model.code == code


def _assert_parity(slimmed: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Max abs error within REL of the output scale, on inputs the pass never saw."""
    with torch.no_grad():
        want = ref(x)
        got = slimmed(x)
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= REL * float(want.abs().max()), err


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _lenet300() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


# --------------------------------------------------------------------------- MLP


def _lenet300_known_dead(gen: torch.Generator) -> nn.Sequential:
    """LeNet-300 at 95% sparsity with designed dead units (see the test)."""
    m = _lenet300().eval()
    _sparsify(m, 0.95, gen)
    w1, w2, w3 = m[0].weight, m[2].weight, m[4].weight
    A1, B1, C1, L1 = range(0, 100), range(100, 150), range(150, 155), range(155, 300)
    A2, B2, C2, L2 = range(0, 20), range(20, 30), range(30, 35), range(35, 100)
    with torch.no_grad():
        # layer 1: A1 rows zero (constant relu(b)); B1 columns zero in fc2 (feed nothing);
        # C1 feeds only B2 units, which feed nothing: dead after round 1
        w1[list(A1)] = 0
        for i in [*B1, *C1, *L1]:
            w1[i, i % 784] = 0.5
        w2[:, list(B1) + list(C1)] = 0
        for i in C1:
            w2[B2[0], i] = 0.5
        # layer 2: A2 rows zero; B2 columns zero in fc3; C2 reads only A1 (constant after round 1)
        w2[list(A2)] = 0
        c2 = w2[list(C2)]
        c2[:, 100:] = 0
        c2[:, 0] = 0.7
        w2[list(C2)] = c2
        for j in [*B2, *L2]:
            w2[j, 155 + j % 145] = 0.5
        for i in L1:
            w2[35 + i % 65, i] = 0.5
        w3[:, list(B2)] = 0
        w3[7] = 0  # a dead *output* row: outputs are never removed
        rows = [0, 1, 2, 3, 4, 5, 6, 8, 9]
        for j in L2:
            w3[rows[j % 9], j] = 0.5
        m[0].bias.uniform_(-0.5, 0.5, generator=gen)  # constants both 0 and > 0 after the ReLU
    return m


def test_mlp_exact_param_count_with_known_dead_units() -> None:
    gen = torch.Generator().manual_seed(0)
    model = _lenet300_known_dead(gen)
    snap = _snapshot(model)
    x = torch.randn(4, 784, generator=gen)
    gm = slim(model, (x,))
    rep = gm.meta[META_KEY]

    live1, live2 = 145, 65
    expected = live1 * 784 + live1 + live2 * live1 + live2 + 10 * live2 + 10
    assert _n_params(gm) == expected == rep.params_after == 123_975
    assert rep.params_before == 266_610
    assert tuple(gm.get_submodule("0").weight.shape) == (live1, 784)
    assert tuple(gm.get_submodule("2").weight.shape) == (live2, live1)
    assert tuple(gm.get_submodule("4").weight.shape) == (10, live2)
    assert rep.layers["0"].units_removed == 155 and rep.layers["2"].units_removed == 35
    assert rep.layers["4"].units_removed == 0 and rep.layers["4"].inputs_removed == 35
    assert rep.rounds == 2  # C1 / C2 only become dead once A1 / B2 are gone
    assert gm.meta["lobster_slim"] is rep
    _assert_parity(gm, model, torch.randn(7, 784, generator=gen))
    _assert_parity(gm, model, torch.randn(1, 784, generator=gen))
    _assert_unchanged(model, snap)


def _constant_units_mlp(seed: int = 0) -> nn.Sequential:
    """32-64-64-10 MLP whose hidden layers each have 32 constant units (zero rows, relu(bias) > 0)
    that slim folds into the next bias: a rounding of the folded bias in any dtype."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for layer in (m[0], m[2]):
            layer.weight[:32] = 0
            layer.bias[:32].uniform_(0.5, 1.0, generator=g)
    return m.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_is_slimmed_at_tolerances_that_follow_the_dtype(dtype: torch.dtype) -> None:
    # regression: the default rtol was 1e-5 whatever the dtype, below one bf16 / fp16 rounding,
    # so folding the constant units raised SlimError
    gen = torch.Generator().manual_seed(100)
    model = _constant_units_mlp().to(dtype)
    x = torch.randn(16, 32, generator=gen).to(dtype)
    res = slim(model, (x,))
    rep = res.meta[META_KEY]
    assert [tuple(res.get_submodule(k).weight.shape) for k in ("0", "2", "4")] == [(32, 32), (32, 32), (10, 32)]
    assert 1e-5 < rep.max_rel_err <= rep.rtol  # above the old default, within the new one
    from lobster_fx.passes.slim import default_rtol

    assert rep.rtol == default_rtol(dtype) == 8 * torch.finfo(dtype).eps and rep.atol == 0.0
    with torch.no_grad():
        xs = torch.randn(7, 32, generator=gen).to(dtype)
        want, got = model(xs).double(), res(xs).double()
    assert float((got - want).abs().max()) <= rep.rtol * float(want.abs().max())
    # explicit tolerances are used as given
    assert slim(model, (x,), rtol=0.5).meta[META_KEY].rtol == 0.5
    with pytest.raises(SlimError, match="changed the outputs"):
        slim(model, (x,), rtol=1e-5)


def _reference_live_units(ws: list[np.ndarray]) -> list[int]:
    """Independent fixpoint: a hidden unit dies when its row (over live inputs)
    or its column in the next layer (over live outputs) is all zero."""
    alive = [np.ones(w.shape[0], bool) for w in ws[:-1]]
    changed = True
    while changed:
        changed = False
        for layer in range(len(alive)):
            w_in = ws[layer] if layer == 0 else ws[layer][:, alive[layer - 1]]
            nxt = ws[layer + 1]
            w_out = nxt[alive[layer + 1]] if layer + 1 < len(alive) else nxt
            dead = (w_in == 0).all(1) | (w_out == 0).all(0)
            new = alive[layer] & ~dead
            if (new != alive[layer]).any():
                alive[layer], changed = new, True
    return [int(a.sum()) for a in alive]


@pytest.mark.parametrize("sparsity,seed", [(0.97, 1), (0.99, 2)])
def test_mlp_random_sparsity_matches_reference(sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = _lenet300().eval()
    _sparsify(model, sparsity, gen)
    with torch.no_grad():
        model[0].weight[:30] = 0
    ws = [model[i].weight.detach().numpy().copy() for i in (0, 2, 4)]
    h1, h2 = _reference_live_units(ws)
    assert 0 < h1 < 300 and 0 < h2 < 100
    gm = slim(model, torch.randn(3, 784, generator=gen))
    assert tuple(gm.get_submodule("0").weight.shape) == (h1, 784)
    assert tuple(gm.get_submodule("2").weight.shape) == (h2, h1)
    assert tuple(gm.get_submodule("4").weight.shape) == (10, h2)
    assert _n_params(gm) == h1 * 785 + h2 * (h1 + 1) + 10 * (h2 + 1)
    _assert_parity(gm, model, torch.randn(16, 784, generator=gen))


def test_accepts_lobster_graph_module_and_leaves_it_alone() -> None:
    gen = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    _sparsify(m, 0.9, gen)
    with torch.no_grad():
        m[0].weight[:5] = 0
    gm_in = trace_model(m).module
    gm_in.train()  # the input's mode must survive
    snap = _snapshot(gm_in)
    out = slim(gm_in, torch.randn(2, 20, generator=gen))
    assert isinstance(out, LobsterGraphModule) and not out.training
    assert out.get_submodule("0").weight.shape[0] <= 11
    assert all(n.op != "call_module" or "lobster_slim" in n.meta for n in out.graph.nodes)
    _assert_unchanged(gm_in, snap)
    _assert_parity(out, m.eval(), torch.randn(5, 20, generator=gen))


# --------------------------------------------------------------------------- LeNet-5


def test_lenet5_exact_units() -> None:
    gen = torch.Generator().manual_seed(4)
    model = LeNet5().eval()
    _sparsify(model, 0.95, gen)
    d1, d2, o2, d3 = [0, 1, 2], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], list(range(50))
    with torch.no_grad():
        model.conv1.weight[d1] = 0  # constant relu(b): folded into conv2 (no padding)
        model.conv2.weight[d2] = 0  # constant: folded into fc1 through flatten (16 columns each)
        for k in o2:
            model.conv2.bias[k] = 1.0
            model.fc1.weight[:, k * 16:(k + 1) * 16] = 0  # feeds nothing
        model.fc1.weight[d3] = 0
    snap = _snapshot(model)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    gm = slim(model, x, channel_multiple=1)
    rep = gm.meta[META_KEY]

    # fc1 units whose fc2 column is zero (95% of 10 entries: common) die too
    zero_cols = set(torch.nonzero((model.fc2.weight == 0).all(0)).flatten().tolist())
    f = 500 - len(set(d3) | zero_cols)
    # a 25-weight conv1 filter is all zero at 95% sparsity with p = 0.28: constant, foldable
    c1 = 20 - int((model.conv1.weight.flatten(1) == 0).all(1).sum())
    assert c1 <= 20 - len(d1)
    c2 = 50 - len(d2) - len(o2)
    assert tuple(gm.get_submodule("conv1").weight.shape) == (c1, 1, 5, 5)
    assert tuple(gm.get_submodule("conv2").weight.shape) == (c2, c1, 5, 5)
    assert tuple(gm.get_submodule("fc1").weight.shape) == (f, c2 * 16)
    assert tuple(gm.get_submodule("fc2").weight.shape) == (10, f)
    assert _n_params(gm) == rep.params_after == c1 * 26 + c2 * (c1 * 25 + 1) + f * (c2 * 16 + 1) + 10 * (f + 1)
    _assert_parity(gm, model, torch.randn(5, 1, 28, 28, generator=gen))
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- ResNet


def test_resnet18_residual_groups() -> None:
    gen = torch.Generator().manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomise_bn(model, gen)
    _sparsify(model, 0.9, gen)
    with torch.no_grad():
        # residual channels 3 and 7 of stage 1: dead in *every* producer of the group
        # (stem conv and both conv2), BN biases make every constant 0 after the ReLUs,
        # so the padded 3x3 consumers can drop them exactly
        k = [3, 7]
        model.conv1.weight[k] = 0
        model.bn1.bias[k] = -10
        for blk in model.layer1:
            blk.conv2.weight[k] = 0
            blk.bn2.bias[k] = -10
        # stem channel 9 is dead in the stem only: the residual adds make it live, keep it
        model.conv1.weight[9] = 0
        model.bn1.bias[9] = -10
        # stage 4 channels 1, 2, 5 feed nothing: zero in fc and layer4.1.conv1
        k4 = [1, 2, 5]
        model.fc.weight[:, k4] = 0
        model.layer4[1].conv1.weight[:, k4] = 0
        # inside a block: filters 0..4 dead, 0..2 -> constant 0 (removable through the padded
        # conv2), 3..4 -> positive constant (not removable: padding); columns 10..13 unused
        blk = model.layer2[1]
        blk.conv1.weight[:5] = 0
        blk.bn1.bias[:3] = -5
        blk.bn1.bias[3:5] = 5
        blk.conv2.weight[:, 10:14] = 0
    snap = _snapshot(model)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    gm = slim(model, x, channel_multiple=1)
    rep = gm.meta[META_KEY]
    w = lambda name: tuple(gm.get_submodule(name).weight.shape)  # noqa: E731

    assert w("conv1")[0] == 62  # 3, 7 gone; 9 kept
    assert gm.get_submodule("bn1").running_mean.shape == (62,)
    for i in (0, 1):
        assert w(f"layer1.{i}.conv2")[0] == 62 and w(f"layer1.{i}.conv1")[1] == 62
        assert gm.get_submodule(f"layer1.{i}.bn2").num_features == 62
    assert w("layer2.0.conv1")[1] == 62 and w("layer2.0.downsample.0")[1] == 62
    assert w("layer4.0.conv2")[0] == w("layer4.0.downsample.0")[0] == w("layer4.1.conv2")[0] == 509
    assert w("fc") == (10, 509)
    assert w("layer2.1.conv1")[0] == 128 - 3 - 4 and w("layer2.1.conv2")[1] == 121
    # units that must stay (no dead units designed there)
    assert w("layer3.0.conv1") == (256, 128, 3, 3)
    assert _n_params(gm) == rep.params_after < rep.params_before == _n_params(model)
    _assert_parity(gm, model, torch.randn(2, 3, 32, 32, generator=gen))
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- concat


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.bn(self.b(x)))], dim=1)
        y = F.adaptive_avg_pool2d(F.relu(self.c(y)), 1)
        return self.fc(torch.flatten(y, 1))


def test_cat_of_two_branches() -> None:
    gen = torch.Generator().manual_seed(6)
    model = CatNet().eval()
    _randomise_bn(model, gen)
    _sparsify(model, 0.5, gen)
    with torch.no_grad():
        model.a.weight[2] = 0  # constant relu(b) -> folded into c (1x1, no padding)
        model.a.bias[2] = 0.8
        model.c.weight[:, 8 + 3] = 0  # channel 3 of branch b (offset 8 in the cat) unused
        model.c.weight[4] = 0  # constant, reaches fc through pool + flatten
    snap = _snapshot(model)
    gm = slim(model, torch.randn(2, 3, 9, 9, generator=gen), channel_multiple=1)
    assert tuple(gm.get_submodule("a").weight.shape) == (7, 3, 3, 3)
    assert tuple(gm.get_submodule("b").weight.shape) == (5, 3, 1, 1)
    assert gm.get_submodule("bn").running_var.shape == (5,)
    # c units: 4 is constant; any whose fc column is zero (50% sparsity) feeds nothing
    dead_c = {4} | set(torch.nonzero((model.fc.weight == 0).all(0)).flatten().tolist())
    assert tuple(gm.get_submodule("c").weight.shape) == (10 - len(dead_c), 12, 1, 1)
    assert tuple(gm.get_submodule("fc").weight.shape) == (5, 10 - len(dead_c))
    _assert_parity(gm, model, torch.randn(3, 3, 9, 9, generator=gen))
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- depthwise


class DWNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, groups=24)
        self.g = nn.Conv2d(24, 8, 1, groups=4)
        self.fc = nn.Linear(24 + 8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.c0(x)))
        y = F.relu6(self.bn1(self.dw1(y)))
        y = F.relu(self.pw(y))
        y = self.dw2(y)
        y = torch.cat([y, self.g(y)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_depthwise_and_grouped_convs() -> None:
    gen = torch.Generator().manual_seed(7)
    model = DWNet().eval()
    _randomise_bn(model, gen)
    _sparsify(model, 0.3, gen)
    with torch.no_grad():
        model.pw.weight[:, 4] = 0  # unused: c0 / bn0 / dw1 / bn1 channel 4 go
        model.c0.weight[6] = 0  # constant 0 after bn0 + relu: the padded dw1 keeps it constant
        model.bn0.bias[6] = -10
        model.dw1.weight[10] = 0  # dw1 outputs its bias: constant into the 1x1 pw conv
        model.c0.weight[12] = 0  # constant > 0 into the *padded* dw1: not constant after it, kept
        model.bn0.bias[12] = 10
        model.pw.weight[5] = 0  # constant through dw2 (no padding) ... but the grouped conv g
    snap = _snapshot(model)  # reads channel 5 too, so the pw group is frozen: kept
    gm = slim(model, torch.randn(2, 3, 10, 10, generator=gen), channel_multiple=1)
    rep = gm.meta[META_KEY]
    assert tuple(gm.get_submodule("c0").weight.shape) == (13, 3, 3, 3)
    assert tuple(gm.get_submodule("dw1").weight.shape) == (13, 1, 3, 3)
    assert gm.get_submodule("bn1").num_features == 13
    dw1 = next(n for n in gm.graph.nodes if n.target is torch.conv2d and n.args[1].target == "dw1.weight")
    assert dw1.args[6] == 13  # groups follows the channels
    assert tuple(gm.get_submodule("pw").weight.shape) == (24, 13, 1, 1)
    assert tuple(gm.get_submodule("dw2").weight.shape) == (24, 1, 3, 3)
    assert tuple(gm.get_submodule("g").weight.shape) == (8, 6, 1, 1)
    assert any("grouped conv" in r for r in rep.frozen.values())
    _assert_parity(gm, model, torch.randn(3, 3, 10, 10, generator=gen))
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- conservative paths


class Odd(nn.Module):
    """Dead units behind ops slim must not see through."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 8)
        self.c = nn.Conv2d(2, 4, 1)
        self.d = nn.Linear(4 * 9, 3)
        self.ln = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.softmax(self.a(x), dim=1)  # mixes units: a dead unit still shifts the others
        h = self.ln(self.b(h))
        z = self.c(img).view(-1, 36)  # hard-coded channel count: must not shrink
        return h, self.d(z)


def test_unknown_ops_freeze_their_groups() -> None:
    gen = torch.Generator().manual_seed(8)
    model = Odd().eval()
    with torch.no_grad():
        model.a.weight[:3] = 0
        model.b.weight[:2] = 0
        model.c.weight[1] = 0
        model.d.weight[:, :9] = 0
    x, img = torch.randn(2, 12, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)
    gm = slim(model, (x, img))
    rep = gm.meta[META_KEY]
    for name, shape in {"a": (10, 12), "b": (8, 10), "c": (4, 2, 1, 1), "d": (3, 36)}.items():
        assert tuple(gm.get_submodule(name).weight.shape) == shape
    assert rep.params_after == rep.params_before
    assert "softmax" in rep.frozen and "view" in rep.frozen
    assert "frozen" in next(n for n in gm.graph.nodes if n.name == "view").meta["lobster_slim"]["role"]
    x2, img2 = torch.randn(5, 12, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    with torch.no_grad():
        for got, want in zip(gm(x2, img2[:5]), model(x2, img2[:5])):
            assert float((got - want).abs().max()) <= REL * float(want.abs().max())


def test_example_input_errors_name_the_node() -> None:
    model = _lenet300().eval()
    with pytest.raises(SlimError, match=r"failed at node %linear"):
        slim(model, torch.randn(2, 100))


def test_plain_module_in_train_mode_is_copied() -> None:
    gen = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2))
    _randomise_bn(model, gen)
    with torch.no_grad():
        model[0].weight[1] = 0
        model[4].weight[:, 3] = 0
    model.train()
    snap = _snapshot(model)
    gm = slim(model, torch.randn(4, 8, generator=gen))
    _assert_unchanged(model, snap)
    assert model.training and not gm.training
    assert tuple(gm.get_submodule("0").weight.shape) == (4, 8)
    assert gm.get_submodule("1").running_mean.shape == (4,)
    ref = copy.deepcopy(model).eval()
    _assert_parity(gm, ref, torch.randn(3, 8, generator=gen))


# --------------------------------------------------------------------------- channel_multiple


class AlignNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3)  # no padding
        self.b = nn.Conv2d(24, 20, 1)
        self.fc1 = nn.Linear(20, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b(F.relu(self.a(x))))
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.fc2(F.relu(self.fc1(y)))


def _align_net() -> AlignNet:
    """Dense weights (no accidental dead units) plus designed ones:
    a: units 0-4 constant relu(0.5) (folded into b's bias), 5-9 feed nothing -> 14 live of 24;
    b: units 0, 7, 19 feed nothing -> 17 live of 20; fc1 (Linear only): units 0-4 feed nothing -> 7 of 12."""
    torch.manual_seed(10)
    model = AlignNet().eval()
    with torch.no_grad():
        model.a.weight[:5] = 0
        model.a.bias[:5] = 0.5
        model.b.weight[:, 5:10] = 0
        model.fc1.weight[:, [0, 7, 19]] = 0
        model.fc2.weight[:, :5] = 0
    return model


def _params(a: int, b: int, f: int) -> int:
    """AlignNet parameter count with a / b / fc1 keeping a, b, f units."""
    return (a * 3 * 9 + a) + (b * a + b) + (f * b + f) + (5 * f + 5)


@pytest.mark.parametrize("multiple,a,b,f,aligned", [
    (1, 14, 17, 7, 0),  # exact: every removable unit goes
    (8, 16, 20, 7, 5),  # a: 14 -> 16 (units 0, 1 kept); b: 17 -> 24 > 20, all kept; fc1 is Linear only
    (16, 16, 20, 7, 5),
    (32, 24, 20, 7, 13),  # a: 14 -> 32 > 24, all kept: nothing changes in the convs
])
def test_channel_multiple_hand_counted(multiple: int, a: int, b: int, f: int, aligned: int) -> None:
    model = _align_net()
    snap = _snapshot(model)
    gen = torch.Generator().manual_seed(11)
    gm = slim(model, torch.randn(2, 3, 8, 8, generator=gen), channel_multiple=multiple)
    rep = gm.meta[META_KEY]
    assert rep.params_before == _params(24, 20, 12) == 1489
    assert _n_params(gm) == rep.params_after == _params(a, b, f)
    assert tuple(gm.get_submodule("a").weight.shape) == (a, 3, 3, 3)
    assert tuple(gm.get_submodule("b").weight.shape) == (b, a, 1, 1)
    assert tuple(gm.get_submodule("fc1").weight.shape) == (f, b)
    assert rep.channel_multiple == multiple and rep.units_kept_for_alignment == aligned
    if multiple in (8, 16):
        # the first removable units by index are kept: constants 0 and 1 stay, are not folded
        kept_a = [0, 1, *range(10, 24)]
        assert torch.equal(gm.get_submodule("a").weight, model.a.weight[kept_a])
        assert torch.equal(gm.get_submodule("b").weight, model.b.weight[:, kept_a])
        folded = model.b.weight[:, 2:5].sum((2, 3)) @ torch.full((3,), 0.5)
        assert torch.allclose(gm.get_submodule("b").bias, model.b.bias + folded, atol=1e-6)
    _assert_parity(gm, model, torch.randn(5, 3, 8, 8, generator=gen))
    _assert_unchanged(model, snap)


def test_channel_multiple_default_and_validation() -> None:
    model = _align_net()
    x = torch.randn(2, 3, 8, 8)
    rep = slim(model, x).meta[META_KEY]
    assert rep.channel_multiple == DEFAULT_CHANNEL_MULTIPLE
    gm = slim(model, x, channel_multiple=None)
    assert gm.meta["lobster_slim"].params_after == rep.params_after
    assert gm.get_submodule("a").weight.shape[0] % DEFAULT_CHANNEL_MULTIPLE == 0
    for bad in (0, -8, True, 2.0, "8"):
        with pytest.raises(ValueError, match="channel_multiple"):
            slim(model, x, channel_multiple=bad)  # type: ignore[arg-type]


def _resnet18_with_dead_filters(gen: torch.Generator) -> tuple[nn.Module, dict[str, int], int]:
    """ResNet-18 at 90% sparsity; in every block 30% of conv1's filters die (constant 0 after
    bn1 + ReLU, removable through the padded conv2); 13 stage-4 residual channels feed nothing.
    Returns the model, the live conv1 filters per block and the live stage-4 channels."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomise_bn(model, gen)
    _sparsify(model, 0.9, gen)
    live: dict[str, int] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torchvision.models.resnet.BasicBlock):
                c = mod.conv1.out_channels
                dead = torch.randperm(c, generator=gen)[: int(0.3 * c)]
                mod.conv1.weight[dead] = 0
                mod.bn1.bias[dead] = -10
                live[f"{name}.conv1"] = c - dead.numel()
        k4 = torch.randperm(512, generator=gen)[:13]
        model.fc.weight[:, k4] = 0
        model.layer4[1].conv1.weight[:, k4] = 0
    return model, live, 512 - 13


def test_channel_multiple_resnet18() -> None:
    gen = torch.Generator().manual_seed(12)
    model, live, stage4 = _resnet18_with_dead_filters(gen)
    snap = _snapshot(model)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    exact = slim(model, x, channel_multiple=1)
    gm = slim(model, x, channel_multiple=8)
    rep = gm.meta[META_KEY]
    w1 = lambda name: tuple(exact.get_submodule(name).weight.shape)  # noqa: E731
    w8 = lambda name: tuple(gm.get_submodule(name).weight.shape)  # noqa: E731

    # exact slim removes every designed dead unit; multiple 8 rounds those counts up
    assert w1("fc") == (10, stage4) and w8("fc") == (10, 504)
    for name, n in live.items():
        assert w1(name)[0] == n
        assert w8(name)[0] == -(-n // 8) * 8
        blk = name.rsplit(".", 1)[0]
        assert w8(f"{blk}.conv2")[1] == w8(name)[0]
        assert gm.get_submodule(f"{blk}.bn1").num_features == w8(name)[0]
    n_conv = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            n_conv += 1
            out, inp = w8(name)[:2]
            assert out % 8 == 0 or out == mod.out_channels, (name, out)
            assert inp % 8 == 0 or inp == mod.in_channels, (name, inp)
    assert n_conv == 20
    assert rep.units_kept_for_alignment > 0 and rep.channel_multiple == 8
    assert exact.meta[META_KEY].params_after < rep.params_after < rep.params_before
    _assert_parity(gm, model, torch.randn(2, 3, 32, 32, generator=gen))
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- norm layers of other libraries


class _BatchNormReLU2d(nn.BatchNorm2d):
    """BatchNorm2d and then a ReLU in one forward, as timm's BatchNormAct2d: the tracer keeps
    it a leaf module (it updates its own buffers in train mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or not self.track_running_stats, self.momentum, self.eps)
        return F.relu(y)


class _BatchNormGate2d(_BatchNormReLU2d):
    """... followed by a gate over the channels (their mean): not channelwise any more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * torch.sigmoid(y.mean(1, keepdim=True))


def _conv_norm_net(norm: nn.Module) -> nn.Sequential:
    gen = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm, nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    _randomise_bn(m, gen)
    with torch.no_grad():
        m[0].weight[:4] = 0  # filters 0-3 are constant: norm(0) ...
        m[0].bias[:4] = 0
        m[1].running_mean[:4] = 0
        m[1].bias[:2] = -1.0  # ... -1 for 0, 1 (0 after a ReLU: removable before a padded conv)
        m[1].bias[2:4] = 1.0
        m[2].weight[:, 4:8] = 0  # channels 4-7 feed nothing
        m[2].weight[:8] = 0  # conv 2's filters 0-7 are constant: plain BatchNorm, folded into the Linear
        m[2].bias[:8] = 0
    return m


@pytest.mark.parametrize("norm_cls", [_BatchNormReLU2d, _BatchNormGate2d], ids=["bn-relu", "bn-gate"])
def test_batchnorm_subclass_with_its_own_forward_is_an_unknown_module(norm_cls: type) -> None:
    # slim recognised BatchNorm by isinstance: a subclass computing more than BatchNorm had its
    # channels removed as if it were one (bn-relu: removed, right only by luck; bn-gate: the
    # removal changed the gate, SlimError). Now it is an unknown module: its channels are kept
    model = _conv_norm_net(norm_cls(16))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    snap = _snapshot(model)
    gm = slim(model, x, channel_multiple=1)
    _assert_unchanged(model, snap)
    assert any(n.op == "call_module" and n.target == "1" for n in gm.graph.nodes)  # a leaf, as in the issue
    w0, w2 = gm.get_submodule("0").weight, gm.get_submodule("2").weight
    assert gm.get_submodule("1").num_features == 16 and w0.shape[0] == 16 and w2.shape[1] == 16
    frozen = gm.meta[META_KEY].frozen
    assert any(norm_cls.__name__ in reason for reason in frozen.values()), frozen
    # the plain BatchNorm after it is still slimmed: conv 2's constant filters 0-7 are gone
    assert w2.shape[0] == 8 and gm.get_submodule("3").num_features == 8
    _assert_parity(gm, model, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)))


def test_torch_batchnorm_classes_with_their_own_forward_are_still_batchnorm() -> None:
    # SyncBatchNorm has a forward of its own, in torch.nn: slimmed like BatchNorm2d
    model = _conv_norm_net(nn.SyncBatchNorm(16))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    gm = slim(model, x, channel_multiple=1)
    # 4-7 feed nothing: removed; 0-3 are constant (-1, 1) before a padded conv: kept
    assert gm.get_submodule("1").num_features == 12 and gm.get_submodule("0").weight.shape[0] == 12
    assert tuple(gm.get_submodule("2").weight.shape[:2]) == (8, 12)
    _assert_parity(gm, model, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
