"""A fast sample of the coverage sweep (benchmarks/coverage.py), and a torch.compile smoke test.

Each sampled model goes through every stage: instrument (bit-identical eval
outputs) -> 3 SGD + Lobster steps -> prune (twt=0.05 on an output-fidelity
loss) -> fold (bit-identical to the instrumented model) -> slim (within 1e-5,
with 30% of the units of every masked layer made dead so slim has work) ->
export_onnx(slim=False), which checks ONNX Runtime parity itself. The models
cover what the sweep found to matter: squeeze-excitation and hardswish
(MobileNetV3), concatenated channel groups (SqueezeNet fire modules), MultiheadAttention (a
module-route parametrization), and code that does not trace (subtree fallback).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torchvision
from torch import nn

import lobster_fx
from lobster_fx.passes.slim import slim


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return _tensors(model(x))


class _TinyTransformer(nn.Module):
    """Embedding + one TransformerEncoderLayer (MultiheadAttention) + head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        if y.shape[1] > 100:  # a Python branch on a (static) size: FX cannot trace it, torch.export can
            return y
        return torch.relu(y * self.scale)


class _Fallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _DataDependent()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


def _mobilenet_v3_small_head():
    """MobileNetV3-small cut after its 4th block (depthwise, squeeze-excite, hardswish):
    the whole model takes too long to export on a small CI machine."""
    m = torchvision.models.mobilenet_v3_small(num_classes=10)
    m.features = m.features[:5]
    m.classifier = nn.Sequential(nn.Linear(40, 16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16, 10))
    return m


SAMPLE = {
    "mobilenet_v3_small_head": (_mobilenet_v3_small_head, (2, 3, 32, 32)),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=10), (2, 3, 32, 32)),
    "tiny_transformer": (_TinyTransformer, (2, 6, 8)),
    "untraceable_block": (_Fallback, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", list(SAMPLE))
def test_all_stages(name, tmp_path):
    torch.manual_seed(0)
    build, shape = SAMPLE[name]
    model = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    # instrument: bit-identical
    ref = _eval_out(model, x)
    gm = lobster_fx.instrument(model)
    assert all(torch.equal(a, b) for a, b in zip(ref, _eval_out(gm, x)))

    # train: 3 SGD + Lobster steps
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
    rule = lobster_fx.Lobster(gm, opt, lmbda=1e-3)
    for _ in range(3):
        opt.zero_grad()
        loss = sum(t.pow(2).mean() for t in _tensors(gm(x)))
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach()))
    assert rule.steps == 3

    # prune: output fidelity, twt 0.05
    before = [t.double() for t in _eval_out(gm, x)]

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return 1.0 + sum(float((o.double() - r).pow(2).sum() / r.pow(2).sum()) for o, r in zip(_tensors(m(x)), before))

    result = lobster_fx.prune(gm, evaluate, twt=0.05)
    assert result.pruned > 0 and result.loss_after <= result.bound

    # fold: bit-identical to the instrumented model
    folded = lobster_fx.fold(gm)
    assert all(torch.equal(a, b) for a, b in zip(_eval_out(gm, x), _eval_out(folded, x)))

    # slim, with 30% dead units so that it has something to remove
    forced = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mask in lobster_fx.masks(forced).values():
            if mask.dim() >= 2 and mask.shape[0] > 1:
                mask[torch.rand(mask.shape[0], generator=g) < 0.3] = 0
    for candidate in (folded, lobster_fx.fold(forced)):
        slimmed = slim(candidate, (x,))
        for a, b in zip(_eval_out(candidate, x), _eval_out(slimmed, x)):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= 1e-5 * max(float(a.abs().max()), 1.0)

    # export (ONNX Runtime parity is checked inside, ExportError otherwise)
    report = lobster_fx.export_onnx(gm, x, tmp_path / f"{name}.onnx", slim=False)
    assert report.parity_max_abs_diff <= 1e-4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


BACKENDS = [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        not os.environ.get("LOBSTER_SLOW_TESTS"), reason="inductor compiles C++ (minutes on 2 cores); set LOBSTER_SLOW_TESTS=1")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_smoke(backend):
    """An instrumented MLP + Lobster compiles without graph breaks and trains like eager."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(3))
    runs = {}
    for kind in ("eager", "compiled"):
        gm = lobster_fx.instrument(_mlp())
        lobster_fx.masks(gm)["2.weight"][::2] = 0  # some pruned entries, pinned by the rule
        opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
        rule = lobster_fx.Lobster(gm, opt, lmbda=1e-2)
        model = torch.compile(gm, backend=backend, fullgraph=True) if kind == "compiled" else gm
        gm.train()
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert rule.steps == 2
        gm.eval()
        with torch.no_grad():
            runs[kind] = (model(x), {k: v.detach().clone() for k, v in gm.named_parameters()})
    (out_e, params_e), (out_c, params_c) = runs["eager"], runs["compiled"]
    assert float((out_e - out_c).abs().max()) <= 1e-6
    for k in params_e:
        assert float((params_e[k] - params_c[k]).abs().max()) <= 1e-6, k
    assert torch.all(params_c["2.weight"][::2] == 0)
    explain = torch._dynamo.explain(lobster_fx.instrument(_mlp()))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
