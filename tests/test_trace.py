"""Tracing stage: one generated forward per mode, chosen at call time; modules that write
into their own buffers (norm layers, whoever wrote them) stay leaves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lobster_fx


class _Dropout(nn.Module):
    """Reads ``self.training`` in traced code: the train and eval graphs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, training=self.training)


def test_compile_holds_one_graph_per_mode():
    gm = lobster_fx.instrument(_Dropout())
    compiled_graphs = []

    def backend(graph_module, example_inputs):
        compiled_graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(gm, backend=backend)
    x = torch.randn(4, 8)
    for _ in range(8):
        gm.train()
        compiled(x)
        gm.eval()
        out = compiled(x)
    # before: a new forward code object per switch, 16 graphs after 8 switches
    assert len(compiled_graphs) == 2
    assert torch.allclose(out, F.linear(x, gm.get_parameter("fc.weight"), gm.get_parameter("fc.bias")))


def test_mode_switch_generates_no_code_and_follows_training_flag():
    gm = lobster_fx.instrument(_Dropout())
    forward = type(gm).forward
    x = torch.randn(64, 8)
    ref = F.linear(x, gm.get_parameter("fc.weight"), gm.get_parameter("fc.bias"))
    for _ in range(3):
        gm.eval()
        assert torch.equal(gm(x), ref)
        assert "dropout" in gm.code and "training = False" in gm.code
        gm.train()
        assert (gm(x) == 0).any()  # dropout active
        assert "training = True" in gm.code
    assert type(gm).forward is forward  # no regeneration on a switch
    gm.training = False  # set directly, as some training loops do: the eval code runs
    assert torch.equal(gm(x), ref)


class _BatchNormAct(nn.BatchNorm2d):
    """As timm's ``BatchNormAct2d``: a BatchNorm subclass outside torch.nn whose own forward
    writes its running statistics (and traces, unlike torch's own)."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training, factor, self.eps)
        return F.relu(x)


_BatchNormAct.__module__ = "thirdparty.layers"


class _ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _BatchNormAct(4, momentum=None)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_norm_layer_outside_torch_nn_keeps_its_buffer_semantics():
    torch.manual_seed(0)
    model, reference = _ConvBNAct(), _ConvBNAct()
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = lobster_fx.instrument(model)
    # the trace ran the layer's code once: it must not have counted a batch on the original
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "bn.num_batches_tracked" in gm.state_dict()
    assert any(n.op == "call_module" and n.target == "bn" for n in gm.graph.nodes)
    gm.train(), reference.train()
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6)
        gm(x), reference(x)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 3
    # momentum=None: cumulative average, not the trace-time factor 1.0 baked into a graph
    assert torch.allclose(gm.get_buffer("bn.running_mean"), reference.bn.running_mean, atol=1e-6)
    assert torch.allclose(gm.get_buffer("bn.running_var"), reference.bn.running_var, atol=1e-6)
    gm.eval(), reference.eval()
    x = torch.randn(8, 3, 6, 6)
    assert torch.allclose(gm(x), reference(x), atol=1e-6)


def test_a_large_buffer_written_while_tracing_is_a_clear_error(monkeypatch):
    from lobster_fx.graph import trace

    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("cache", torch.zeros(64))

        def forward(self, x):
            self.cache.add_(1)  # writes a (here: "large") buffer every call
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Cache()

        def forward(self, x):
            return self.block(x)

    monkeypatch.setattr(trace, "SNAPSHOT_MAX_NUMEL", 8)
    model = Net()
    with pytest.raises(trace.BufferWriteError, match="block.cache"):
        lobster_fx.instrument(model)
    monkeypatch.setattr(trace, "SNAPSHOT_MAX_NUMEL", 1 << 22)
    gm = lobster_fx.instrument(Net())  # small enough: put back, and the module stays a leaf
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)
