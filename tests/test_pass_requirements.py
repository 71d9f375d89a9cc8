"""Passes state what they need (issue 13): ``slim`` / ``to_sparse_csr``
refuse a model that still has masks (it would be slimmed / converted as if unmasked: nothing
removed, nothing converted, masks kept), name the masked parameters and leave the model alone;
``export_onnx`` is the whole pipeline and folds by itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.onnx.export import export_onnx
from lobster_fx.passes.csr import to_sparse_csr
from lobster_fx.passes.fold import MaskedModelError, masked_parameter_names, require_folded
from lobster_fx.passes.slim import slim


def _masked() -> tuple[nn.Module, torch.Tensor]:
    """An instrumented MLP whose masks kill units 0-3 of fc1 and 99% of fc2."""
    torch.manual_seed(0)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)))
    ms = lobster_fx.masks(gm)
    ms["0.weight"][:4] = 0
    ms["0.bias"][:4] = 0
    ms["2.weight"].zero_()
    ms["2.weight"][0, 5] = 1
    return gm, torch.randn(3, 16)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(m: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = m.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())


PASSES = {
    "slim": lambda m, x: slim(m, (x,)),
    "to_sparse_csr": lambda m, x: to_sparse_csr(m, min_sparsity=0.5),
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_passes_refuse_a_model_that_still_has_masks(name):
    gm, x = _masked()
    snap, graph, training = _snapshot(gm), gm.graph, gm.training
    with pytest.raises(MaskedModelError) as info:
        PASSES[name](gm, x)
    msg = str(info.value)
    pass_name = "to_sparse_csr" if name == "to_sparse_csr" else "slim"
    assert msg.startswith(f"{pass_name}: this model still has masks (4 masked parameters, e.g. '0.weight')")
    assert "lobster_fx.fold(gm) first" in msg
    assert isinstance(info.value, ValueError) and info.value.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # the refused call changed nothing
    assert _same(gm, snap) and gm.graph is graph and gm.training == training
    # and what it asks for works: the folded model is slimmed / converted
    folded = lobster_fx.fold(gm)
    out = PASSES[name](folded, x)
    if name == "to_sparse_csr":
        assert list(out.meta["lobster_sparse"].converted) == ["2.weight"]
    else:
        assert out.get_submodule("0").weight.shape[0] < 12
    torch.testing.assert_close(out.eval()(x), gm.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["compile", "dataparallel", "submodule"])
def test_masks_are_found_through_wrappers_and_in_submodules(wrap):
    gm, x = _masked()
    wrapped = {
        "compile": lambda: torch.compile(gm),  # not run: compiling is lazy
        "dataparallel": lambda: nn.DataParallel(gm),  # CPU-only: a plain pass-through wrapper
        "submodule": lambda: nn.Sequential(nn.Identity(), gm),
    }[wrap]()
    snap = _snapshot(gm)
    for run in PASSES.values():
        with pytest.raises(MaskedModelError, match="still has masks"):
            run(wrapped, x)
    assert _same(gm, snap)
    if wrap == "submodule":
        assert masked_parameter_names(wrapped)[0] == "1.0.weight"
        with pytest.raises(MaskedModelError, match=r"submodule '1' was not folded"):
            require_folded(wrapped, "slim")
    else:
        assert masked_parameter_names(wrapped) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_plain_and_folded_models_pass_the_check():
    gm, _ = _masked()
    require_folded(nn.Linear(2, 2), "slim")
    require_folded(lobster_fx.fold(gm), "slim")
    assert masked_parameter_names(lobster_fx.fold(gm)) == []


def test_export_onnx_folds_an_instrumented_model_but_refuses_a_nested_one(tmp_path):
    """export_onnx folds (it is the whole pipeline), through a wrapper too; an instrumented
    module nested in another is not folded by fold, so export refuses it instead of writing
    the raw weights with their masks, and writes no file."""
    gm, x = _masked()
    rep = export_onnx(nn.DataParallel(gm), x, tmp_path / "dp.onnx")
    assert rep.folded and rep.slimmed
    snap = _snapshot(gm)
    with pytest.raises(MaskedModelError, match=r"export_onnx: this model still has masks \(4 masked parameters, e.g. '1.0.weight'\)"):
        export_onnx(nn.Sequential(nn.Identity(), gm), x, tmp_path / "nested.onnx", slim=False)
    assert _same(gm, snap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.onnx"]
