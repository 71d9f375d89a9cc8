"""The reference training loop's options that change speed but not the arithmetic."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from lobster_fx.instrument import instrument
from lobster_fx.models import ResNet32
from lobster_fx.train import TrainConfig, train


def test_channels_last_training_runs_nhwc():
    config = TrainConfig(model="resnet32", dataset="digits", epochs=1, batch_size=64, pwe=1, progress=False,
                         threads=1, channels_last=True)
    result = train(config)
    conv_weights = [p for p in result.gm.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not all(p.is_contiguous() for p in conv_weights)  # really NHWC, not a no-op
    masks = [b for n, b in result.gm.named_buffers() if n.endswith("_mask") and b.dim() == 4]
    assert masks and all(m.is_contiguous(memory_format=torch.channels_last) for m in masks)
    assert math.isfinite(result.log[-1]["val_loss"])


def test_channels_last_gradients_match_in_float64():
    # In float32 a random-init ResNet amplifies the kernels' different summation order
    # within a few steps, so the arithmetic is compared where rounding cannot hide a bug.
    torch.manual_seed(0)
    base = instrument(ResNet32(in_channels=1)).double()
    plain, nhwc = copy.deepcopy(base), copy.deepcopy(base).to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    for m in (plain, nhwc):
        F.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_rule_option_reaches_lobster_and_trains_like_the_eager_rule(monkeypatch):
    import lobster_fx.train as train_module

    made = []
    real = train_module.Lobster

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_module, "Lobster", recording)
    logs = {}
    for fused in (False, True):
        config = TrainConfig(model="lenet300", dataset="digits", epochs=1, batch_size=32, lr=0.05, lmbda=1e-3,
                             pwe=100, progress=False, threads=1, fused_rule=fused)
        logs[fused] = train(config).log
        assert made[-1].fused is fused and made[-1].steps > 0
    for eager, fused in zip(logs[False], logs[True]):  # same arithmetic, to float rounding
        assert math.isclose(eager["val_loss"], fused["val_loss"], rel_tol=1e-5)
