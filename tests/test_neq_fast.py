"""NEq's fast path (issue 16): active units get the full backward's gradients, frozen work is skipped."""

import copy

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.methods.neq import NEq
from lobster_fx.methods.neq_backward import neq_layer


class _Mixed(nn.Module):
    """conv2d (BN after it), conv1d, and a Linear on 3-d inputs (tokens)."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1, dilation=1)
        self.tok = nn.Linear(16, 7)
        self.head = nn.Linear(5 * 7, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.c2(x)))  # (B, 6, 4, 4)
        h = torch.relu(self.c1(h.flatten(2)))  # (B, 5, 16)
        h = torch.relu(self.tok(h))  # (B, 5, 7): a Linear over the last dim
        return self.head(h.flatten(1))


def _pair(rates, seed=0):
    torch.manual_seed(seed)
    model = _Mixed()
    out = []
    for fast in (True, False):
        gm = lobster_fx.instrument(copy.deepcopy(model)).train()
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        neq = NEq(gm, opt, None, random_rate=rates, fast=fast, seed=7)
        neq.step()
        out.append((gm, neq))
    return out


def _grads(gm, x, y):
    for p in gm.parameters():
        p.grad = None
    nn.functional.cross_entropy(gm(x), y).backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in gm.named_parameters()}


_ROWS = {"c2": ["c2.weight", "c2.bias", "bn.weight", "bn.bias"], "c1": ["c1.weight", "c1.bias"],
         "tok": ["tok.weight", "tok.bias"], "head": ["head.weight", "head.bias"]}


@pytest.mark.parametrize("rates", [
    {"c2": 0.5, "c1": 0.4, "tok": 3 / 7, "head": 0.5},  # every layer partly frozen
    {"c2": 1.0, "c1": 0.4, "tok": 3 / 7},  # the lowest layer whole: the backward stops above it
    {"c2": 1.0, "c1": 1.0, "tok": 0.0, "head": 0.25},
])
def test_active_rows_get_the_full_backwards_gradients(rates):
    (fast, neq_fast), (full, neq_full) = _pair(rates)
    assert all(torch.equal(neq_fast.frozen[n], neq_full.frozen[n]) for n in neq_fast.frozen)
    assert "neq_layer" in fast.code and "neq_layer" not in full.code
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    gf, gr = _grads(fast, x, y), _grads(full, x, y)
    for layer, names in _ROWS.items():
        frozen = neq_fast.frozen[layer]
        for n in names:
            assert gr[n] is not None and gr[n][frozen].abs().sum() > 0 or not frozen.any(), n  # work to skip
            if frozen.all():
                assert gf[n] is None, n  # requires_grad off: no dW at all
                continue
            torch.testing.assert_close(gf[n][~frozen], gr[n][~frozen], rtol=1e-5, atol=1e-6, msg=n)
            if not n.startswith("bn."):  # BN's affine gradient is elementwise and cheap: computed, restored
                assert not gf[n][frozen].any(), n  # frozen rows of dW / db: not computed
    # the lowest trainable layer's input gradient is not computed when everything below is frozen
    if neq_fast.frozen["c2"].all():
        assert all(p.grad is None for p in (fast.get_parameter("c2.weight"), fast.get_parameter("bn.weight")))


def test_fast_path_forward_is_unchanged_and_idle_layers_call_the_op():
    (fast, neq), (full, _) = _pair({"c2": 0.5})
    x = torch.randn(4, 2, 8, 8)
    torch.testing.assert_close(fast(x), full(x), rtol=0, atol=0)
    ctls = {layer.name: layer.ctl for layer in neq._layers.values()}
    assert ctls["c2"].active is not None and ctls["c1"].active is None  # c1 has no frozen unit
    assert neq_layer is not None


def test_grad_of_input_matches_with_partial_freezing():
    (fast, _), (full, _) = _pair({"c2": 0.5, "c1": 0.6, "tok": 0.5, "head": 0.5})
    x = torch.randn(3, 2, 8, 8, requires_grad=True)
    fast(x).square().sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    full(x).square().sum().backward()
    torch.testing.assert_close(g_fast, x.grad, rtol=1e-5, atol=1e-6)  # dX is computed in full


def test_row_wise_min_keeps_the_full_backward_for_lightly_frozen_layers_and_freezing_exact():
    torch.manual_seed(0)
    gm = lobster_fx.instrument(_Mixed()).train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    neq = NEq(gm, opt, None, random_rate={"c2": 0.5, "c1": 0.4, "tok": 6 / 7}, seed=7, row_wise_min=0.5)
    neq.step()
    ctls = {name: layer.ctl for name, layer in neq._layers.items()}
    assert ctls["c1"].active is None  # 2 of 5 frozen: below 0.5, the full backward
    assert ctls["c2"].active is not None and ctls["tok"].active is not None  # 3 of 6, 6 of 7
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(gm(x), y).backward()
        assert gm.get_parameter("c1.weight").grad[neq.frozen["c1"]].abs().sum() > 0  # computed in full
        opt.step()
    for name, frozen in neq.frozen.items():
        for n in _ROWS[name]:
            assert torch.equal(gm.get_parameter(n)[frozen], before[n][frozen]), n  # frozen rows did not move
            assert not torch.equal(gm.get_parameter(n)[~frozen], before[n][~frozen]), n


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_bad_row_wise_min_is_refused_before_anything_is_installed(value):
    gm = lobster_fx.instrument(_Mixed())
    code = gm.code
    with pytest.raises(ValueError, match="row_wise_min"):
        NEq(gm, torch.optim.SGD(gm.parameters(), lr=0.1), None, random_rate=0.5, row_wise_min=value)
    assert gm.code == code
