"""Tests for lobster_fx.passes.csr: CSR linear weights give the dense outputs."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lobster_fx.graph.trace import LobsterGraphModule, trace_model
from lobster_fx.passes.csr import DEFAULT_MIN_SPARSITY, CsrTensor, csr_linear, to_sparse_csr
from lobster_fx.passes.slim import slim

torch.set_num_threads(1)
REL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= REL * float(want.abs().max()), err


def _mask_(w: torch.Tensor, sparsity: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        w.mul_(torch.rand(w.shape, generator=gen) >= sparsity)


def _sparsity(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def _lenet300(gen: torch.Generator) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    for i, sp in ((0, 0.99), (2, 0.95), (4, 0.90)):
        _mask_(m[i].weight, sp, gen)
    with torch.no_grad():
        m[0].weight[:20] = 0  # dead rows are fine for CSR (empty rows)
    return m


def _csr_layers(gm: nn.Module) -> set[str]:
    return {name.rpartition(".")[0] for name, t in gm.named_buffers() if t.layout == torch.sparse_csr}


def test_csr_linear_matches_dense_kernel() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 40, generator=gen)
    _mask_(w, 0.9, gen)
    b = torch.randn(30, generator=gen)
    for shape in ((1, 40), (64, 40), (2, 3, 40), (40,)):
        x = torch.randn(*shape, generator=gen)
        _close(csr_linear(x, w.to_sparse_csr(), b), F.linear(x, w, b))
        _close(csr_linear(x, w.to_sparse_csr(), None), F.linear(x, w))


def test_mlp_all_layers_csr_parity() -> None:
    gen = torch.Generator().manual_seed(1)
    model = _lenet300(gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = to_sparse_csr(model, min_sparsity=0.0)
    assert _csr_layers(gm) == {"0.weight_csr", "2.weight_csr", "4.weight_csr"}
    # the dense weights are gone, not kept next to the CSR copies
    assert not any(name.endswith(".weight") for name, _ in gm.named_parameters())
    csr = gm.get_submodule("0.weight_csr").csr
    assert torch.equal(csr.to_dense(), model[0].weight)
    for batch in (1, 64):
        x = torch.randn(batch, 784, generator=gen)
        with torch.no_grad():
            _close(gm(x), model(x))
    # the input model is untouched
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model[0].weight.layout == torch.strided


def test_default_threshold_and_report() -> None:
    gen = torch.Generator().manual_seed(2)
    model = _lenet300(gen)
    gm = to_sparse_csr(model)
    rep = gm.meta["lobster_sparse"]
    assert rep.min_sparsity == DEFAULT_MIN_SPARSITY == 0.97
    assert set(rep.converted) == {"0.weight"}  # 99%; fc2 95% and fc3 90% stay dense
    assert set(rep.kept_dense) == {"2.weight", "4.weight"}
    assert rep.converted["0.weight"] == pytest.approx(_sparsity(model[0].weight))
    assert gm.get_submodule("2").weight.layout == torch.strided
    x = torch.randn(5, 784, generator=gen)
    with torch.no_grad():
        _close(gm(x), model(x))


def test_nd_input_transformer_like() -> None:
    gen = torch.Generator().manual_seed(3)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(16, 64)
            self.down = nn.Linear(64, 16, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(F.gelu(self.up(x)))

    model = Block().eval()
    _mask_(model.up.weight, 0.98, gen)
    _mask_(model.down.weight, 0.98, gen)
    gm = to_sparse_csr(model)
    assert _csr_layers(gm) == {"up.weight_csr", "down.weight_csr"}
    x = torch.randn(2, 7, 16, generator=gen)
    with torch.no_grad():
        _close(gm(x), model(x))


def test_lenet5_convs_stay_dense() -> None:
    gen = torch.Generator().manual_seed(4)

    class LeNet5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
            self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    model = LeNet5().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _mask_(m.weight, 0.98, gen)
    gm = to_sparse_csr(model)
    assert _csr_layers(gm) == {"fc1.weight_csr", "fc2.weight_csr"}
    assert gm.get_submodule("conv2").weight.layout == torch.strided
    x = torch.randn(3, 1, 28, 28, generator=gen)
    with torch.no_grad():
        _close(gm(x), model(x))


def test_both_mode_graphs_rewritten_and_copyable() -> None:
    gen = torch.Generator().manual_seed(5)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # reads self.training: train and eval trace to different graphs
            return self.b(F.dropout(F.relu(self.a(x)), 0.5, self.training))

    model = Net()
    _mask_(model.a.weight, 0.99, gen)
    traced = trace_model(model).module
    assert isinstance(traced, LobsterGraphModule)
    assert traced.mode_graphs[True] is not traced.mode_graphs[False]
    gm = to_sparse_csr(traced)
    for g in gm.mode_graphs.values():
        assert sum(n.target is csr_linear for n in g.nodes) == 1
    x = torch.randn(4, 32, generator=gen)
    gm.eval()
    model.eval()
    with torch.no_grad():
        _close(gm(x), model(x))
    # torch cannot deep-copy CSR tensors; CsrTensor can
    gm2 = copy.deepcopy(gm)
    assert isinstance(gm2.get_submodule("a.weight_csr"), CsrTensor)
    with torch.no_grad():
        _close(gm2(x), model(x))
    # state_dict round trip
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    gm2.load_state_dict(torch.load(buf))
    gm.train()
    gm(x).sum().backward()  # the train graph runs and backpropagates to the dense params
    assert gm.get_submodule("b").weight.grad is not None


def test_weight_with_other_uses_stays_dense() -> None:
    gen = torch.Generator().manual_seed(6)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x @ self.fc.weight  # the weight is also read as a matrix

    model = Tied().eval()
    _mask_(model.fc.weight, 0.99, gen)
    gm = to_sparse_csr(model, min_sparsity=0.0)
    assert not _csr_layers(gm)
    assert "fc.weight" in gm.meta["lobster_sparse"].reasons
    x = torch.randn(2, 8, generator=gen)
    with torch.no_grad():
        _close(gm(x), model(x))


def test_slim_then_csr() -> None:
    gen = torch.Generator().manual_seed(7)
    model = _lenet300(gen)
    x = torch.randn(3, 784, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = to_sparse_csr(slim(model, x), min_sparsity=0.9)
    assert "0.weight_csr" in _csr_layers(gm)
    assert gm.get_submodule("0.weight_csr").csr.shape[0] <= 280  # the 20 dead rows were removed first
    x2 = torch.randn(9, 784, generator=gen)
    with torch.no_grad():
        _close(gm(x2), model(x2))
