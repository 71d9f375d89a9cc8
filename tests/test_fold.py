"""fold: masks multiplied in, masks gone, bit-identical outputs, original names."""

import torch
import torchvision
from torch import nn

import lobster_fx
from lobster_fx.models import LeNet5


def _random_masks(gm, keep=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in lobster_fx.masks(gm).values():
            mask.copy_((torch.rand(mask.shape, generator=g) < keep).to(mask.dtype))


def test_fold_lenet5_bit_identical_and_masks_gone():
    torch.manual_seed(0)
    model = LeNet5()
    gm = lobster_fx.instrument(model)
    _random_masks(gm)
    folded = lobster_fx.fold(gm)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(folded(x), gm(x))
    assert sorted(folded.state_dict()) == sorted(model.state_dict())
    for graph in folded.mode_graphs.values():
        assert not any("lobster_mask" in n.meta or "mask" in str(n.target) for n in graph.nodes)
    assert "lobster" not in folded.meta
    # the instrumented module is untouched and still masks
    assert lobster_fx.masks(gm)["fc1.weight"].sum() < lobster_fx.masks(gm)["fc1.weight"].numel()
    report = lobster_fx.sparsity_report(folded)
    assert report.nonzero == lobster_fx.sparsity_report(gm).nonzero


def test_fold_module_route_and_both_modes():
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_16", weights=None, num_classes=5)
    model.encoder.layers = model.encoder.layers[:1]
    gm = lobster_fx.instrument(model)
    _random_masks(gm, keep=0.5)
    folded = lobster_fx.fold(gm)
    assert not any(hasattr(m, "parametrizations") for m in folded.modules())
    assert sorted(folded.state_dict()) == sorted(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    for mode in (False, True):
        gm.train(mode)
        folded.train(mode)
        with torch.set_grad_enabled(mode):
            torch.manual_seed(5)
            a = gm(x)
            torch.manual_seed(5)
            b = folded(x)
        assert torch.equal(a, b)


def test_fold_of_plain_module_is_a_copy():
    model = nn.Linear(3, 2)
    folded = lobster_fx.fold(model)
    assert folded is not model and torch.equal(folded.weight, model.weight)


class _Update(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.hidden_state_size = 4  # a plain attribute the parent reads

    def forward(self, x):
        return torch.relu(self.fc(x))


class _ReadsChildAttribute(nn.Module):
    """RAFT style: untraceable parent code reads a plain attribute of a traced child."""

    def __init__(self):
        super().__init__()
        self.update_block = _Update()

    def forward(self, x):
        for _ in range(int(x.abs().sum() > 0) + 1):  # data-dependent loop: the root stays opaque
            x = self.update_block(x)[:, : self.update_block.hidden_state_size]
        return x


def test_fold_keeps_plain_attributes_of_traced_submodules():
    """Regression: deepcopy (hence fold and export_onnx) of a traced submodule dropped
    the plain attributes copied from the original child, and the opaque parent then
    failed ('GraphModule' object has no attribute 'hidden_state_size', torchvision RAFT)."""
    import copy

    torch.manual_seed(0)
    model = _ReadsChildAttribute()
    gm = lobster_fx.instrument(model)
    assert "update_block" in gm.meta["lobster"].trace.traced
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert torch.equal(copy.deepcopy(gm)(x), model(x))
    _random_masks(gm, keep=0.5)
    folded = lobster_fx.fold(gm)
    assert torch.equal(folded(x), gm(x))


def test_fold_reads_the_masks_without_copying_or_changing_them():
    """The copy shares gm's masks while folding (memory); gm must come out exactly as it went in."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_16", weights=None, num_classes=5)
    model.encoder.layers = model.encoder.layers[:1]  # graph route and module route (MultiheadAttention)
    gm = lobster_fx.instrument(model)
    _random_masks(gm, keep=0.5)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    folded = lobster_fx.fold(gm)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    mask_ptrs = {m.data_ptr() for m in lobster_fx.masks(gm).values()}
    gm_ptrs = {t.data_ptr() for t in gm.state_dict().values()}
    assert not any(t.data_ptr() in gm_ptrs | mask_ptrs for t in folded.state_dict().values())
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(folded.eval()(x), gm.eval()(x))


def test_fold_removes_unit_taps_so_slim_and_export_see_plain_layers(tmp_path):
    """A model trained with taps (SeReNe installs them) folded with its tap nodes still after
    every layer: slim froze every group at the unknown op and kept all units (the SeReNe demo
    printed 'parameters after slim 50610 of 50610' with 194 of fc1's 300 rows zero)."""
    from lobster_fx.graph.taps import install_taps, tap_point

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = lobster_fx.instrument(model)
    install_taps(gm)
    with torch.no_grad():
        dead = torch.tensor([1, 4, 6])
        lobster_fx.masks(gm)["0.weight"][dead] = 0
        lobster_fx.masks(gm)["0.bias"][dead] = 0
    x = torch.randn(5, 6)
    folded = lobster_fx.fold(gm).eval()
    assert not [n for g in folded.mode_graphs.values() for n in g.nodes if n.target is tap_point]
    torch.testing.assert_close(folded(x), gm.eval()(x), rtol=0, atol=0)
    slimmed = lobster_fx.slim(folded, x)
    assert slimmed.get_submodule("0").weight.shape == (5, 6)
    assert slimmed.get_submodule("2").weight.shape == (3, 5)
    torch.testing.assert_close(slimmed(x), gm(x), rtol=1e-5, atol=1e-6)
    assert [n for g in gm.mode_graphs.values() for n in g.nodes if n.target is tap_point]  # gm keeps its taps
