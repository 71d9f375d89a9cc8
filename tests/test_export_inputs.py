"""export_onnx inputs (issue 13): keyword inputs and None for unused optional arguments, as
torch.onnx.export takes them; inputs of the wrong dtype or device are named as such, not
blamed on their shape."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lobster_fx.onnx import export_onnx


class HFLike(nn.Module):
    """The calling convention of a Hugging Face encoder: optional inputs default to None."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.tt = nn.Embedding(50, 8), nn.Embedding(2, 8)
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.emb(input_ids)
        if token_type_ids is not None:
            h = h + self.tt(token_type_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out(torch.relu(self.fc(h.mean(1))))


def _hf_like() -> nn.Module:
    torch.manual_seed(0)
    m = HFLike().eval()
    with torch.no_grad():  # 5 dead units for slim to remove
        m.fc.weight[:5] = 0
        m.fc.bias[:5] = -1
    return m


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(batch, 6, dtype=torch.long)
    am[0, 3:] = 0  # padding: the mask changes the output
    return {"input_ids": torch.randint(0, 50, (batch, 6), generator=g), "attention_mask": am,
            "token_type_ids": torch.randint(0, 2, (batch, 6), generator=g)}


def _ort(path: str, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})[0]


# (example_inputs, kwargs) for the batch-2 inputs `i`; the names the ONNX graph has
FORMS = {
    "kwargs=": (lambda i: ((i["input_ids"],), {"attention_mask": i["attention_mask"]}), ["input_ids", "attention_mask"]),
    "dict": (lambda i: (dict(i), None), ["input_ids", "attention_mask", "token_type_ids"]),
    "trailing dict": (lambda i: ((i["input_ids"], {"token_type_ids": i["token_type_ids"], "attention_mask": i["attention_mask"]}), None),
                      ["input_ids", "attention_mask", "token_type_ids"]),  # forward's order, not the dict's
    "None in tuple": (lambda i: ((i["input_ids"], None, i["token_type_ids"]), None), ["input_ids", "token_type_ids"]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_keyword_and_none_inputs_export_with_parity(tmp_path, form):
    make, names = FORMS[form]
    m = _hf_like()
    example, kwargs = make(_inputs(2))
    rep = export_onnx(m, example, tmp_path / "m.onnx", kwargs=kwargs)
    assert rep.slimmed and rep.parity_max_abs_diff < 1e-5
    assert m.fc.weight.shape == (16, 8)  # the caller's model is untouched
    assert [i.name for i in onnx.load(rep.path).graph.input] == names
    # the file runs with another batch size, and agrees with torch on the same inputs
    other = _inputs(5, seed=1)
    used = {k: other[k] for k in names}
    np.testing.assert_allclose(_ort(rep.path, used), m(**used).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_none_input_with_the_torchscript_exporter(tmp_path):
    m, i = _hf_like(), _inputs(2)
    rep = export_onnx(m, (i["input_ids"], None, i["token_type_ids"]), tmp_path / "ts.onnx", exporter="torchscript")
    assert [x.name for x in onnx.load(rep.path).graph.input] == ["input_ids", "token_type_ids"]
    used = {k: i[k] for k in ("input_ids", "token_type_ids")}
    np.testing.assert_allclose(_ort(rep.path, used), m(**used).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_bad_keyword_inputs_are_named(tmp_path):
    m, i = _hf_like(), _inputs(2)
    with pytest.raises(TypeError, match=r"input 1 is a str"):
        export_onnx(m, (i["input_ids"], "mask"), tmp_path / "a.onnx")
    with pytest.raises(TypeError, match=r"input 'attention_mask' is a list"):
        export_onnx(m, (i["input_ids"],), tmp_path / "a.onnx", kwargs={"attention_mask": [1, 0]})
    with pytest.raises(TypeError, match="pass them once"):
        export_onnx(m, {"input_ids": i["input_ids"]}, tmp_path / "a.onnx", kwargs={"attention_mask": i["attention_mask"]})
    with pytest.raises(ValueError, match="no tensor"):
        export_onnx(m, (None, None), tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []


def test_tiny_transformers_model_with_an_attention_mask(tmp_path):
    """Bloom took no attention mask through export_onnx before (positional inputs only, and
    its second positional argument is past_key_values)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tf.BloomModel(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2, use_cache=False)).eval()
    ids = torch.randint(0, 100, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[0, 5:] = 0
    rep = export_onnx(m, (ids,), tmp_path / "bloom.onnx", kwargs={"attention_mask": am}, slim=False)
    assert [i.name for i in onnx.load(rep.path).graph.input] == ["input_ids", "attention_mask"]
    assert rep.parity_max_abs_diff < 1e-4
    ref = m(input_ids=ids, attention_mask=am).last_hidden_state.detach().numpy()
    unmasked = m(input_ids=ids).last_hidden_state.detach().numpy()
    assert not np.allclose(ref[0], unmasked[0], atol=1e-4)  # the mask matters
    out = _ort(rep.path, {"input_ids": ids, "attention_mask": am})
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_tiny_bert_slims_and_exports_with_an_attention_mask(tmp_path):
    """BertModel's forward is wrapped by an input-checking decorator that puts ``use_cache``
    into its kwargs: the opaque-root graph called it positionally and slim failed with
    "got multiple values for argument 'use_cache'". It now calls by keyword."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    m = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 4:] = 0
    rep = export_onnx(m, (ids,), tmp_path / "bert.onnx", kwargs={"attention_mask": am}, slim=True)
    assert rep.parity_max_abs_diff < 1e-4
    ref = m(input_ids=ids, attention_mask=am).last_hidden_state.detach().numpy()
    names = [i.name for i in onnx.load(rep.path).graph.input]
    feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": am}.items() if k in names}
    assert "input_ids" in feeds and "attention_mask" in feeds
    np.testing.assert_allclose(_ort(rep.path, feeds), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- dtype and device


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_wrong_input_dtype_is_named_not_blamed_on_the_shape(tmp_path, dtype):
    with pytest.raises(ValueError) as info:
        export_onnx(_mlp(), torch.randn(1, 784, dtype=dtype), tmp_path / "m.onnx", slim=False)
    msg = str(info.value)
    name = str(dtype).removeprefix("torch.")
    assert f"input 0 is {name} but the model's parameters are float32: pass x.float()" in msg
    assert "expects input of shape" not in msg and "layer '0' (Linear)" in msg
    assert os.listdir(tmp_path) == []


def test_wrong_dtype_of_a_keyword_input_is_named(tmp_path):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, scale=None):
            return self.fc(x) if scale is None else self.fc(x * scale)

    with pytest.raises(ValueError, match=r"input 'x' is float64 but the model's parameters are float32: pass x.float\(\)"):
        export_onnx(Scaled(), {"x": torch.randn(2, 4, dtype=torch.float64)}, tmp_path / "s.onnx", slim=False)


def test_integer_inputs_are_not_a_dtype_clash(tmp_path):
    """Token ids are integers on purpose; a wrong shape there is still a shape error."""
    m = _hf_like()
    with pytest.raises(ValueError) as info:
        export_onnx(m, torch.randint(0, 50, (2, 6, 8)).float(), tmp_path / "e.onnx", slim=False)
    assert "is float32 but" not in str(info.value)


def test_input_on_another_device_is_named(tmp_path):
    # "meta" stands in for a second device on machines without a GPU
    with pytest.raises(ValueError, match=r"input 0 is on meta but the model is on cpu: pass x.cpu\(\)") as info:
        export_onnx(_mlp(), torch.randn(1, 784, device="meta"), tmp_path / "m.onnx", slim=False)
    assert "expects input of shape" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_input_on_gpu_for_a_cpu_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"input 0 is on cuda:0 but the model is on cpu: pass x.cpu\(\)"):
        export_onnx(_mlp(), torch.randn(1, 784, device="cuda"), tmp_path / "m.onnx", slim=False)
    with pytest.raises(ValueError, match=r"input 0 is on cpu but the model is on cuda:0: pass x.to\('cuda:0'\)"):
        export_onnx(_mlp().cuda(), torch.randn(1, 784), tmp_path / "m.onnx", slim=False)


def test_mixed_dtype_model_names_the_layer_and_its_dtypes(tmp_path):
    """No single model dtype to compare with: the failing layer's weight vs its input."""
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2).double())
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) failed: its weight is float64 but its input is float32"):
        export_onnx(m, torch.randn(2, 4), tmp_path / "m.onnx", slim=False)


# --------------------------------------------------------------------------- slim takes the same forms


@pytest.mark.parametrize("form", sorted(FORMS))
def test_slim_takes_keyword_and_none_inputs(form):
    """FX traces every argument as a tensor (``if mask is not None`` keeps the tensor branch):
    slim traces the model with the None ones fixed, so the slim model is right for them."""
    from lobster_fx.passes.slim import slim

    make, names = FORMS[form]
    m = _hf_like()
    example, kwargs = make(_inputs(2))
    if kwargs:
        example = (*example, kwargs)
    slimmed = slim(m, example)
    report = slimmed.meta["lobster_slim"]
    assert report.params_after < report.params_before
    used = {k: v for k, v in _inputs(4, seed=2).items() if k in names}
    torch.testing.assert_close(slimmed(**used), m(**used), rtol=1e-5, atol=1e-6)
