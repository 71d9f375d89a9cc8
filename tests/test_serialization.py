"""torch.save / torch.load of an instrumented module keeps both modes, masks and meta."""

import io

import torch
import torchvision
from torch import nn

import lobster_fx


def test_pickle_roundtrip_keeps_train_and_eval_graphs_and_folds():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=3)  # stochastic depth: graphs differ by mode
    gm = lobster_fx.instrument(model)
    lobster_fx.masks(gm)["classifier.2.weight"][0].zero_()
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    for mode in (False, True, False):
        gm.train(mode)
        loaded.train(mode)
        with torch.set_grad_enabled(mode):
            torch.manual_seed(1)
            a = gm(x)
            torch.manual_seed(1)
            b = loaded(x)
        assert torch.equal(a, b), mode
    assert lobster_fx.masks(loaded).keys() == lobster_fx.masks(gm).keys()
    assert torch.equal(lobster_fx.masks(loaded)["classifier.2.weight"], lobster_fx.masks(gm)["classifier.2.weight"])
    folded = lobster_fx.fold(loaded).eval()
    loaded.eval()
    assert torch.equal(folded(x), loaded(x))
    assert not any("mask" in k for k in folded.state_dict())


class _OpaqueRoot(nn.Module):
    """Top level does not trace: the instrumented model wraps it (internally ``opaque.``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, x):
        if x.sum() > 0:
            return self.ln(self.b(self.a(x)))
        return self.ln(self.b(x))


def test_state_dict_keys_are_the_original_ones():
    torch.manual_seed(0)
    model = _OpaqueRoot()
    gm = lobster_fx.instrument(model)
    assert "" in gm.meta["lobster"].trace.opaque  # the opaque-root route, where keys had a prefix
    keys = set(gm.state_dict())
    masks = {k for k in keys if k.endswith("_mask")}
    assert keys - masks == set(model.state_dict())  # before: every key was "opaque.<name>"
    # a checkpoint of the original loads strictly; the masks stay as they are
    lobster_fx.masks(gm)["a.weight"][0] = 0
    other = _OpaqueRoot()
    gm.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(gm.get_parameter("opaque.a.weight"), other.a.weight)
    assert lobster_fx.masks(gm)["a.weight"][0].eq(0).all()
    # and the instrumented model's weights load into the original (the masks are the extra keys)
    result = other.load_state_dict(gm.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == masks
    # a round trip through its own state_dict restores the masks too
    fresh = lobster_fx.instrument(_OpaqueRoot())
    fresh.load_state_dict(gm.state_dict(), strict=True)
    assert torch.equal(lobster_fx.masks(fresh)["a.weight"], lobster_fx.masks(gm)["a.weight"])
    # the folded model has exactly the original's keys
    assert set(lobster_fx.fold(gm).state_dict()) == set(model.state_dict())


def test_parametrized_keys_are_the_original_ones():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    gm = lobster_fx.instrument(model)
    assert gm.meta["lobster"].params["self_attn.in_proj_weight"].route == "module"
    keys = set(gm.state_dict())
    assert not any("parametrizations" in k for k in keys)
    assert "self_attn.in_proj_weight" in keys and "self_attn.in_proj_weight_mask" in keys
    gm.load_state_dict(model.state_dict(), strict=True)
