"""Slim's op registry (issue 14): ``register_elementwise`` teaches slim a user's
channel-preserving op, so dead units are removed across it; the built-in ops are entries
of the same table; bad targets are refused with a clear error."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from lobster_fx.passes.slim import (
    SlimError,
    op_rule,
    register_elementwise,
    slim,
    unregister_elementwise,
)
from lobster_fx.passes.slim.registry import REGISTRY


def squared_relu(x):
    return torch.relu(x) ** 2  # ``**`` is not an op slim knows: without registration it freezes


torch.fx.wrap("squared_relu")  # a graph node of its own (FX would trace through it otherwise)


class SquaredReLU(nn.Module):
    """A user's activation: traced through by FX, its ``pow`` node is unknown to slim."""

    def forward(self, x):
        return torch.relu(x) ** 2


class CountingSquaredReLU(nn.Module):
    """Writes into its own buffer while it runs, so the tracer keeps it as a ``call_module`` leaf."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return torch.relu(x) ** 2


class ScaledSquaredReLU(nn.Module):
    """One learnable scalar: still elementwise."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * torch.relu(x) ** 2


class PerChannelAct(nn.Module):
    """A slope per channel: not elementwise in slim's sense (the slope would need slicing)."""

    def __init__(self, c):
        super().__init__()
        self.slope = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return torch.relu(x) ** 2 * self.slope


class Flip(nn.Module):
    """Same shape, no state, but it reverses the channels: a wrong 'elementwise' claim."""

    def forward(self, x):
        return x.flip(-1)


class Mlp(nn.Module):
    """fc1 -> act -> fc2; without ``act`` the activation is the wrapped function ``squared_relu``."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h) if self.act is not None else squared_relu(h)
        return self.fc2(h)


def _dead(model: Mlp) -> Mlp:
    """fc1 units 1 and 4 feed nothing; unit 2 is a constant (act(bias[2]), folded into fc2)."""
    with torch.no_grad():
        model.fc2.weight[:, [1, 4]] = 0
        model.fc1.weight[2] = 0
    return model.eval()


@pytest.fixture
def registered():
    """register_elementwise for one test: the registry is global."""
    added = []

    def reg(target):
        out = register_elementwise(target)
        added.append(target)
        return out

    yield reg
    for target in added:
        unregister_elementwise(target)


def _slim(model, x):
    gm = slim(model, (x,))
    return gm, gm.meta["lobster_slim"]


@pytest.mark.parametrize("make", [lambda: Mlp(SquaredReLU()), lambda: Mlp(CountingSquaredReLU()),
                                  lambda: Mlp(ScaledSquaredReLU()), lambda: Mlp()],
                         ids=["traced-module", "leaf-module", "scalar-parameter", "wrapped-function"])
def test_custom_activation_is_frozen_unless_registered(make, registered):
    torch.manual_seed(0)
    model = _dead(make())
    x = torch.randn(5, 6)
    target = type(model.act) if model.act is not None else squared_relu
    name = getattr(target, "__name__", "")

    # unregistered: the group of fc1's units is kept whole, the report says why
    gm, rep = _slim(model, x)
    assert rep.units_removed == 0
    assert tuple(gm.get_submodule("fc1").weight.shape) == (8, 6)
    assert rep.frozen.pop("output") == "graph output"  # fc2's outputs: always kept
    (reason,) = rep.frozen.values()
    assert "unsupported op" in reason
    if model.act is not None and not isinstance(model.act, CountingSquaredReLU):
        # traced through: the node that froze names the module and the cure
        assert f"register_elementwise({name})" in reason
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)

    # registered: the dead units (1, 4) and the constant one (2) are removed across it
    assert registered(target) is target
    assert op_rule(target).kind == "elementwise" and not op_rule(target).builtin
    gm, rep = _slim(model, x)
    assert list(rep.frozen) == ["output"]
    assert tuple(gm.get_submodule("fc1").weight.shape) == (5, 6)
    assert tuple(gm.get_submodule("fc2").weight.shape) == (3, 5)
    assert rep.layers["fc1"].out_after == 5 and rep.layers["fc2"].in_after == 5
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_registered_module_in_a_conv_net(registered):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), SquaredReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[3].weight[:, [0, 5, 6]] = 0
    x = torch.randn(2, 3, 9, 9)
    assert slim(model, x, channel_multiple=1).meta["lobster_slim"].units_removed == 0
    registered(SquaredReLU)
    gm = slim(model, x, channel_multiple=1)
    assert tuple(gm.get_submodule("0").weight.shape) == (5, 3, 3, 3)
    assert gm.get_submodule("1").num_features == 5
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_registered_tensor_method(registered):
    class M(Mlp):
        def forward(self, x):
            return self.fc2(self.fc1(x).erf())

    torch.manual_seed(0)
    model = _dead(M(nn.Identity()))
    x = torch.randn(5, 6)
    assert _slim(model, x)[1].units_removed == 0
    registered("erf")
    gm, rep = _slim(model, x)
    assert rep.layers["fc1"].out_after == 5
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_registered_module_with_per_channel_state_stays_frozen(registered):
    torch.manual_seed(0)
    registered(PerChannelAct)
    model = _dead(Mlp(PerChannelAct(8)))
    x = torch.randn(5, 6)
    gm, rep = _slim(model, x)
    assert rep.units_removed == 0
    assert any("per-channel state" in r for r in rep.frozen.values()), rep.frozen
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_no_registration_hint_for_a_block_that_is_not_one_op():
    class Block(nn.Module):  # a layer inside: registering it would be wrong, so no hint
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) ** 2

    torch.manual_seed(0)
    model = _dead(Mlp(Block()))
    rep = slim(model, torch.randn(5, 6)).meta["lobster_slim"]
    reasons = [r for name, r in rep.frozen.items() if name != "output"]
    assert reasons and all("unsupported op" in r and "register_elementwise" not in r for r in reasons), reasons


def test_a_wrong_registration_is_caught_by_the_output_check(registered):
    torch.manual_seed(0)
    registered(Flip)
    model = _dead(Mlp(Flip()))
    with pytest.raises(SlimError, match="changed the outputs"):
        slim(model, (torch.randn(5, 6),))


def test_subclass_that_overrides_forward_is_not_covered(registered):
    registered(SquaredReLU)

    class Sub(SquaredReLU):
        pass

    class Other(SquaredReLU):
        def forward(self, x):
            return x.flip(-1)

    assert op_rule(Sub) is op_rule(SquaredReLU)
    assert op_rule(Other) is None


def test_builtins_are_entries_of_the_same_table():
    assert op_rule(nn.ReLU).kind == "elementwise" and op_rule(nn.ReLU).builtin
    assert op_rule(torch.relu) is op_rule("relu") is op_rule(nn.ReLU)
    assert op_rule(nn.BatchNorm2d).kind == "batchnorm"  # through _BatchNorm, by MRO
    assert op_rule(nn.SyncBatchNorm).kind == "batchnorm"
    assert op_rule(nn.MaxPool2d).kind == "pool"
    assert op_rule(torch.cat).kind == "cat"
    assert op_rule(operator.add).kind == "binary" and op_rule("add").kind == "binary"
    assert op_rule("view").kind == "reshape" and op_rule(torch.flatten).kind == "flatten"
    assert op_rule(torch.nn.functional.linear).kind == "linear"
    assert op_rule(torch.conv2d).kind == "conv"
    assert op_rule(nn.LayerNorm) is None and op_rule(torch.softmax) is None
    # registering a built-in elementwise op again changes nothing
    rule = op_rule(nn.GELU)
    assert register_elementwise(nn.GELU) is nn.GELU and op_rule(nn.GELU) is rule and rule.builtin
    n_entries = len(REGISTRY.modules) + len(REGISTRY.functions) + len(REGISTRY.methods)
    assert n_entries > 90


@pytest.mark.parametrize("target,error,match", [
    (nn.ReLU(), TypeError, r"class, not an instance.*register_elementwise\(ReLU\)"),
    (3, TypeError, "nn.Module subclass, a function or a tensor method name"),
    (dict, TypeError, "not an nn.Module subclass"),
    (nn.Linear, ValueError, "is a layer"),
    (nn.Conv2d, ValueError, "is a layer"),
    (torch.cat, ValueError, "built-in 'cat' op"),
    (operator.add, ValueError, "built-in 'binary' op"),
    (nn.BatchNorm2d, ValueError, "built-in 'batchnorm' op"),
    ("view", ValueError, "built-in 'reshape' op"),
    (torch.nn.functional.linear, ValueError, "built-in 'linear' op"),
    ("not a name", ValueError, "not a method name"),
])
def test_bad_targets_are_refused(target, error, match):
    with pytest.raises(error, match=match):
        register_elementwise(target)


def test_unregister_refuses_builtins_and_unknown_targets():
    with pytest.raises(ValueError, match="built-in"):
        unregister_elementwise(nn.ReLU)
    with pytest.raises(ValueError, match="not registered"):
        unregister_elementwise(SquaredReLU)
    assert op_rule(nn.ReLU).builtin
