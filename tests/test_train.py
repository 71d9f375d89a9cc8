"""The reference training loop's options that change speed but not the arithmetic."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from lobster_fx.graph.instrument import instrument
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


def _mlp_with_dropout(config, splits):
    """A model whose training draws from the global torch RNG (dropout masks)."""
    in_features = math.prod(splits.train.x.shape[1:])
    classes = int(splits.train.y.max()) + 1
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, 32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(32, classes))


def test_resume_with_dropout_equals_uninterrupted(tmp_path, monkeypatch):
    """Regression: the global RNG was not checkpointed, so the resumed run drew other dropout masks."""
    import lobster_fx.train as train_module

    monkeypatch.setattr(train_module, "build_model", _mlp_with_dropout)
    epochs, stop = 5, 3

    def config(out: str, n: int) -> TrainConfig:
        # plateaus at epochs 3, 4, 5: prunings on both sides of the checkpoint. No rollback, which would
        # discard a pruning epoch's training and with it the dropout draws this test is about
        # model: a registered name (TrainConfig checks it); build_model above replaces the model it names
        return TrainConfig(model="lenet300", dataset="digits", epochs=n, batch_size=64, lr=0.05, momentum=0.9,
                           lmbda=1e-3, pwe=1, plateau_threshold=0.5, rollback=False, progress=False, threads=1,
                           out_dir=str(tmp_path / out))

    full = train(config("full", epochs))
    train(config("parts", stop))
    checkpoint = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)  # plain types only
    assert checkpoint["epoch"] == stop and checkpoint["torch_rng_state"].dtype == torch.uint8
    resumed = train(config("parts", epochs))
    assert len(resumed.log) == epochs
    assert any(e["pruned"] for e in full.log[:stop]) and any(e["pruned"] for e in full.log[stop:])

    def comparable(log):
        return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in log]

    assert comparable(resumed.log) == comparable(full.log)
    full_state, resumed_state = full.gm.state_dict(), resumed.gm.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for k, v in full_state.items():
        assert torch.equal(resumed_state[k], v), k  # bit for bit
    for out in ("full", "parts"):  # every write went through a temporary file, and none is left
        assert not [p.name for p in (tmp_path / out).iterdir() if p.name.endswith(".tmp")]


def test_method_serene_trains_with_the_serene_rule_and_prunes_whole_units(tmp_path):
    """`TrainConfig(method="serene")` (`lobster-fx train/demo --method serene`): the SeReNe rule,
    neuron pruning phases, and a resume that changes the method is refused."""
    import pytest

    from lobster_fx.methods.serene import SeReNe

    config = TrainConfig(model="lenet300", dataset="digits", epochs=40, batch_size=32, lr=0.05, lmbda=5e-4,
                         twt=0.05, pwe=3, progress=False, out_dir=str(tmp_path), method="serene", threads=1)
    result = train(config, resume=False)
    phases = [e["pruned"] for e in result.log if e["pruned"]]
    assert phases and all(p["granularity"] == "neuron" for p in phases)
    assert sum(p["units_pruned"] for p in phases) > 0
    fc1 = dict(result.gm.named_parameters())["fc1.weight"]
    rows = fc1.detach().abs().sum(1) == 0
    assert 0 < int(rows.sum()) < fc1.shape[0]
    assert bool((fc1.detach()[~rows] != 0).all())  # whole rows died, the live ones have no zero
    assert result.log[-1]["test_error"] < 10.0
    # the rule the run used
    from lobster_fx.methods.base import _attached_rules
    assert any(isinstance(r, SeReNe) and r.optimizer is not None for r in _attached_rules())
    with pytest.raises(ValueError, match="method 'serene' -> 'lobster'"):
        train(TrainConfig(**{**config.to_dict(), "method": "lobster", "epochs": 41}), resume=True)
