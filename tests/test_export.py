"""Tests for lobster_fx.onnx: parity, file size, checker, dynamic batch, atomicity, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import lobster_fx
from lobster_fx.onnx import ExportError, export_onnx, sparsify_initializers


def _sparsify_(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero a random ``sparsity`` share of every weight/bias in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand(p.shape, generator=g) >= sparsity).to(p.dtype))
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)  # 12 -> 6
        x = torch.relu(self.bn2(self.conv2(x)))  # 6 -> 4
        return self.fc(x.flatten(1))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    m = SmallCNN()
    # non-trivial running statistics so BatchNorm folding is really exercised
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return _sparsify_(m, 0.95)


def _ort_run(path: str | Path, *arrays: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), arrays)})


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """The 95%-sparse 784-300-100-10 MLP exported dense, int64 and compact."""
    d = tmp_path_factory.mktemp("mlp")
    model = _sparsify_(_mlp(), 0.95)
    x = torch.randn(3, 784)
    reports = {
        kind: export_onnx(model, x, d / f"{kind}.onnx", slim=False, sparse=(kind != "dense"),
                          index_dtype="compact" if kind == "compact" else "int64")
        for kind in ("dense", "int64", "compact")
    }
    return model, x, d, reports


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", ["dense", "int64", "compact"])
def test_mlp_parity(mlp_files, kind):
    model, x, d, reports = mlp_files
    (out,) = _ort_run(d / f"{kind}.onnx", x.numpy())
    ref = model.eval()(x).detach().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert 0.0 <= reports[kind].parity_max_abs_diff <= 1e-5


def test_parity_tolerance_is_relative_to_output_scale(tmp_path):
    # float error grows with the magnitudes summed, so the bound is atol + rtol * max|output|:
    # here 1e-5 + 1e-5 * ~1e4 = ~0.1 for every entry, including the one near zero
    from lobster_fx.onnx.parity import _ort_parity

    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e4, 0.0, 0.0, 0.0], [0.0, 1e-3, 0.0, 0.0]]))
        model.bias.zero_()
    x = torch.ones(1, 4)
    path = str(tmp_path / "big.onnx")
    export_onnx(model, x, path, slim=False, sparse=False)
    out = _ort_run(path, x.numpy())[0]
    assert abs(out[0, 0]) > 9e3 and abs(out[0, 1]) < 1e-2

    def check(delta_small_entry: float) -> float:
        ref = out.copy()
        ref[0, 1] += delta_small_entry
        return _ort_parity(path, (x,), [torch.from_numpy(ref)], atol=1e-5, rtol=1e-5)

    assert check(0.0) == 0.0
    assert check(0.05) == pytest.approx(0.05, rel=1e-3)  # elementwise allclose would reject this
    with pytest.raises(ExportError, match="output 0: ONNX Runtime differs from torch by up to 5.000e-01"):
        check(0.5)
    with pytest.raises(ExportError, match="NaN"):
        check(float("nan"))


def test_cnn_with_batchnorm_parity(tmp_path):
    model = _cnn()
    x = torch.randn(2, 1, 12, 12)
    rep = export_onnx(model, x, tmp_path / "cnn.onnx", slim=False)
    model.eval()
    for batch in (2, 5):
        xb = torch.randn(batch, 1, 12, 12)
        (out,) = _ort_run(rep.path, xb.numpy())
        np.testing.assert_allclose(out, model(xb).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert rep.parity_max_abs_diff <= 1e-5
    assert rep.sparse_initializers, "95%-sparse conv/fc weights should be stored sparse"
    # BatchNorm is folded into Conv by the exporter: no BatchNormalization node left
    ops = {n.op_type for n in onnx.load(rep.path).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_export_leaves_model_mode_and_weights_alone(tmp_path):
    model = _cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, torch.randn(2, 1, 12, 12), tmp_path / "m.onnx", slim=False)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ size


def test_file_size_ratios(mlp_files):
    _, _, d, reports = mlp_files
    dense = os.path.getsize(d / "dense.onnx")
    int64 = os.path.getsize(d / "int64.onnx")
    compact = os.path.getsize(d / "compact.onnx")
    assert int64 <= 0.2 * dense, int64 / dense
    assert compact <= 0.12 * dense, compact / dense
    # the report's dense size is that of the same graph stored dense
    assert reports["int64"].dense_bytes == pytest.approx(dense, rel=0.01)
    for r in reports.values():
        assert r.file_bytes == os.path.getsize(r.path)
    assert reports["int64"].ratio == pytest.approx(int64 / reports["int64"].dense_bytes)


def test_initializer_info(mlp_files):
    _, _, _, reports = mlp_files
    infos = {i.name: i for i in reports["int64"].initializers}
    w = next(i for i in infos.values() if i.shape == (300, 784))
    assert w.storage == "sparse" and w.index_dtype == "int64"
    assert 0.93 < w.sparsity < 0.97 and w.bytes < 0.2 * w.dense_bytes
    compact = {i.shape: i.index_dtype for i in reports["compact"].initializers}
    assert compact[(300, 784)] == "int32"  # 235,200 elements: needs 32-bit indices
    assert compact[(100, 300)] == "int16"  # 30,000 fit in int16
    assert all(i.storage == "dense" for i in reports["dense"].initializers)
    d = json.loads(json.dumps(reports["compact"].to_dict()))
    assert d["file_bytes"] == reports["compact"].file_bytes and d["initializers"][0]["storage"] in ("sparse", "dense")


# ------------------------------------------------------------------ checker


def test_checker_accepts_int64_file(mlp_files):
    _, _, d, reports = mlp_files
    m = onnx.load(d / "int64.onnx")
    assert len(m.graph.sparse_initializer) >= 3
    onnx.checker.check_model(m, full_check=False)
    for sp in m.graph.sparse_initializer:
        assert sp.indices.data_type == onnx.TensorProto.INT64
        assert list(sp.indices.dims) == list(sp.values.dims)  # linearised 1-D indices


def test_compact_file_is_only_for_onnxruntime(mlp_files):
    _, _, d, _ = mlp_files
    m = onnx.load(d / "compact.onnx")
    assert any(sp.indices.data_type != onnx.TensorProto.INT64 for sp in m.graph.sparse_initializer)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m, full_check=False)


def test_single_file_no_external_data(mlp_files):
    _, _, d, _ = mlp_files
    assert _leftovers(d, {"dense.onnx", "int64.onnx", "compact.onnx"}) == []
    for f in ("dense.onnx", "int64.onnx"):
        m = onnx.load(d / f, load_external_data=False)
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


# ------------------------------------------------------------------ dynamic batch


def test_dynamic_batch(mlp_files):
    model, _, d, _ = mlp_files
    for batch in (1, 7):
        x = torch.randn(batch, 784)
        (out,) = _ort_run(d / "int64.onnx", x.numpy())
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_static_batch_when_asked(tmp_path):
    m = nn.Sequential(nn.Linear(8, 4))
    rep = export_onnx(m, torch.randn(3, 8), tmp_path / "s.onnx", slim=False, dynamic_batch=False)
    dim0 = onnx.load(rep.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 3


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).reshape(16)  # literal size: pins the batch to 4


def test_specialised_batch_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="batch dimension"):
        export_onnx(_FixedBatch(), torch.randn(4, 8), tmp_path / "f.onnx", slim=False)
    assert _leftovers(tmp_path, set()) == []


# ------------------------------------------------------------------ atomicity and errors


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(self.lin(x), 2, dim=1).values  # no ONNX translation


def test_unexportable_op_is_named(tmp_path):
    with pytest.raises(ExportError, match="kthvalue") as info:
        export_onnx(_Unexportable(), torch.randn(3, 6), tmp_path / "u.onnx", slim=False)
    assert info.value.op is not None and "kthvalue" in info.value.op
    assert _leftovers(tmp_path, set()) == []


def test_failed_export_keeps_existing_file(tmp_path):
    target = tmp_path / "model.onnx"
    good = export_onnx(nn.Sequential(nn.Linear(6, 6)), torch.randn(2, 6), target, slim=False)
    before = target.read_bytes()
    with pytest.raises(ExportError):
        export_onnx(_Unexportable(), torch.randn(3, 6), target, slim=False)
    assert target.read_bytes() == before and good.file_bytes == len(before)
    assert _leftovers(tmp_path, {"model.onnx"}) == []


def test_failure_after_temp_file_written_cleans_up(tmp_path, monkeypatch):
    """A failure in the last check (ORT parity) must not replace the good file."""
    import lobster_fx.onnx.export as ex  # where export_onnx looks these names up

    target = tmp_path / "model.onnx"
    export_onnx(nn.Sequential(nn.Linear(6, 6)), torch.randn(2, 6), target, slim=False)
    before = target.read_bytes()
    seen: list[str] = []

    def boom(path, *a, **k):
        seen.append(path)
        assert os.path.exists(path)  # the temp file exists at this point
        raise ExportError("simulated parity failure")

    monkeypatch.setattr(ex, "_ort_parity", boom)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(nn.Sequential(nn.Linear(6, 3)), torch.randn(2, 6), target, slim=False)
    assert seen and Path(seen[0]).parent == tmp_path
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, {"model.onnx"}) == []


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        export_onnx(nn.Linear(4, 2), torch.randn(1, 4), missing / "m.onnx", slim=False)


def test_wrong_input_shape_names_layer_and_shapes(tmp_path):
    with pytest.raises(ValueError) as info:
        export_onnx(_mlp(), torch.randn(3, 100), tmp_path / "m.onnx", slim=False)
    msg = str(info.value)
    assert "(*, 784)" in msg and "(3, 100)" in msg and "'0'" in msg and "Linear" in msg
    with pytest.raises(ValueError, match=r"conv1.*\(N, 1, \*, \*\).*\(2, 3, 12, 12\)"):
        export_onnx(_cnn(), torch.randn(2, 3, 12, 12), tmp_path / "c.onnx", slim=False)
    assert _leftovers(tmp_path, set()) == []


def test_wrong_shape_in_traced_graph_module(tmp_path):
    """Traced-through Linear: the weight is a get_attr feeding F.linear, so the
    layer comes from the node's nn_module_stack, the expectation from the weight."""
    from lobster_fx.graph.trace import trace_model

    gm = trace_model(_mlp()).module
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) expects input of shape \(\*, 784\) but got \(3, 100\)"):
        export_onnx(gm, torch.randn(3, 100), tmp_path / "g.onnx", slim=False)


class _Broken(nn.Module):
    """Second layer expects 300 features but gets 200."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(784, 200), nn.ReLU())
        self.head = nn.Linear(300, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.seq(x))


def test_wrong_shape_deep_layer(tmp_path):
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\) expects input of shape \(\*, 300\) but got \(3, 200\)"):
        export_onnx(_Broken(), torch.randn(3, 784), tmp_path / "b.onnx", slim=False)


def test_bad_example_inputs_type(tmp_path):
    with pytest.raises(TypeError):
        export_onnx(nn.Linear(4, 2), [1, 2, 3], tmp_path / "m.onnx", slim=False)


def test_traced_graph_module_exports(tmp_path):
    from lobster_fx.graph.trace import trace_model

    model = _sparsify_(_mlp(), 0.9)
    gm = trace_model(model).module
    x = torch.randn(2, 784)
    rep = export_onnx(gm, x, tmp_path / "gm.onnx", slim=False)
    (out,) = _ort_run(rep.path, x.numpy())
    np.testing.assert_allclose(out, model.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert rep.ratio < 0.35


def test_instrumented_model_is_folded(tmp_path):
    """Masks are multiplied into the weights: one tensor per weight, small file,
    and the caller's instrumented module keeps its (train) graph."""
    import lobster_fx

    gm = lobster_fx.instrument(_mlp())
    g = torch.Generator().manual_seed(3)
    for mask in lobster_fx.masks(gm).values():
        mask.copy_((torch.rand(mask.shape, generator=g) >= 0.95).to(mask.dtype))
    train_graph = gm.graph
    x = torch.randn(3, 784)
    rep = export_onnx(gm, x, tmp_path / "masked.onnx", slim=False)
    assert rep.folded and rep.ratio <= 0.2
    assert gm.training and gm.graph is train_graph
    m = onnx.load(rep.path)
    assert "Mul" not in {n.op_type for n in m.graph.node}
    assert len(m.graph.sparse_initializer) + len(m.graph.initializer) <= 6  # no separate mask tensors
    (out,) = _ort_run(rep.path, x.numpy())
    np.testing.assert_allclose(out, gm.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_slim_export_removes_dead_units(tmp_path):
    model = _sparsify_(_mlp(), 0.9)
    with torch.no_grad():
        model[0].weight[100:] = 0  # 200 of 300 hidden units only output relu(bias)
        model[2].weight[:, 150:] = 0  # ... or feed nothing
    x = torch.randn(4, 784)
    fat = export_onnx(model, x, tmp_path / "fat.onnx", slim=False)
    rep = export_onnx(model, x, tmp_path / "slim.onnx", slim=True)
    assert rep.slimmed and not fat.slimmed
    shapes = {i.shape for i in rep.initializers}
    assert not any(300 in s for s in shapes), shapes  # the hidden layer shrank
    assert rep.dense_bytes < fat.dense_bytes
    for batch in (1, 7):
        xb = torch.randn(batch, 784)
        (out,) = _ort_run(rep.path, xb.numpy())
        np.testing.assert_allclose(out, model.eval()(xb).detach().numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sparsify_initializers directly


def _if_model(w_main: np.ndarray, w_sub: np.ndarray) -> onnx.ModelProto:
    """y = If(c, x @ W_main + W_sub, x): one initializer in the main graph used
    inside the branch, one owned by the branch."""
    f = onnx.TensorProto.FLOAT
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_main"], ["t0"]), helper.make_node("Add", ["t0", "W_sub"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", f, [None, w_main.shape[1]])],
        initializer=[numpy_helper.from_array(w_sub, "W_sub")],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_main"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", f, [None, w_main.shape[1]])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", f, [None, w_main.shape[0]]),
         helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f, [None, w_main.shape[1]])],
        initializer=[numpy_helper.from_array(w_main, "W_main")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("index_dtype", ["int64", "compact"])
def test_sparsify_main_and_subgraph_initializers(index_dtype):
    rng = np.random.default_rng(0)
    w_main = (rng.standard_normal((40, 30)) * (rng.random((40, 30)) > 0.9)).astype(np.float32)
    w_sub = (rng.standard_normal((1, 30)) * (rng.random((1, 30)) > 0.5)).astype(np.float32)  # too dense
    m = _if_model(w_main, w_sub)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    before = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
              .run(None, {"x": x, "c": np.array(c)})[0] for c in (True, False)]
    infos = {i.name: i for i in sparsify_initializers(m, index_dtype=index_dtype)}
    assert infos["W_main"].storage == "sparse" and infos["W_main"].nnz == np.count_nonzero(w_main)
    assert infos["W_main"].index_dtype == ("int64" if index_dtype == "int64" else "int16")
    assert infos["W_sub"].storage == "dense"  # 50% sparse: sparse storage would be larger
    assert infos["W_sub"].graph.endswith("then_branch")
    assert [i.name for i in m.graph.initializer] == [] and len(m.graph.sparse_initializer) == 1
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for c, ref in zip((True, False), before):
        np.testing.assert_array_equal(sess.run(None, {"x": x, "c": np.array(c)})[0], ref)
    if index_dtype == "int64":
        onnx.checker.check_model(m, full_check=False)


def test_sparsify_subgraph_keeps_int64_with_compact():
    rng = np.random.default_rng(1)
    w_main = rng.standard_normal((4, 30)).astype(np.float32)  # dense: stays dense
    w_sub = np.zeros((1, 30), np.float32)
    w_sub[0, 3] = 2.0
    m = _if_model(w_main, w_sub)
    infos = {i.name: i for i in sparsify_initializers(m, index_dtype="compact")}
    assert infos["W_main"].storage == "dense"
    # ONNX Runtime runs the ONNX checker on subgraphs, which wants INT64
    assert infos["W_sub"].storage == "sparse" and infos["W_sub"].index_dtype == "int64"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "c": np.array(True)})[0]
    np.testing.assert_allclose(out, x @ w_main + w_sub, rtol=1e-6)


def test_sparsify_respects_min_sparsity_and_bad_args():
    w = np.zeros((50, 50), np.float32)
    w[::2, ::2] = 1.0  # 75% sparse
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 50])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 50])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g)
    (info,) = sparsify_initializers(m, min_sparsity=0.8)
    assert info.storage == "dense" and len(m.graph.initializer) == 1
    (info,) = sparsify_initializers(m, min_sparsity=0.7)
    assert info.storage == "sparse" and info.bytes < info.dense_bytes
    with pytest.raises(ValueError):
        sparsify_initializers(m, index_dtype="int32")


def test_torchscript_exporter_with_dynamic_batch_on_an_instrumented_model(tmp_path):
    # regression: without output_names the legacy exporter mistook the GraphModule's .graph for TorchScript
    import lobster_fx
    from lobster_fx.models import LeNet300

    gm = lobster_fx.instrument(LeNet300())
    report = export_onnx(gm, torch.randn(1, 784), tmp_path / "ts.onnx", exporter="torchscript", slim=False)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 784)
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), gm.eval()(x), rtol=1e-5, atol=1e-5)


# --- parity for outputs whose count is data-dependent (detectors) ---


def _detections(boxes, labels, scores):
    return [np.asarray(boxes, np.float32), np.asarray(labels, np.int64), np.asarray(scores, np.float32)]


def test_detection_parity_matches_detections_not_positions():
    from lobster_fx.onnx import DetectionParity

    torch_out = _detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 8, 9]], [1, 2, 1], [0.9, 0.5, 0.2])
    # same detections in another order, one box off by 2e-3 (IoU ~0.9997)
    ort_out = _detections([[5, 5, 8, 9], [0, 0, 10, 10.002], [20, 20, 40, 40]], [1, 1, 2], [0.2, 0.9, 0.5])
    check = DetectionParity()
    assert check(ort_out, torch_out) == pytest.approx(2e-3, rel=1e-3)
    assert check.last == [{"torch": 3, "ort": 3, "matched": 3}]
    # an elementwise comparison would call this a mismatch; so does it, with a moved box
    moved = _detections([[5, 5, 8, 9], [0, 0, 10, 12], [20, 20, 40, 40]], [1, 1, 2], [0.2, 0.9, 0.5])
    with pytest.raises(ExportError, match="match for 2 of 3"):
        check(moved, torch_out)
    relabelled = _detections([[5, 5, 8, 9], [0, 0, 10, 10], [20, 20, 40, 40]], [1, 3, 2], [0.2, 0.9, 0.5])
    with pytest.raises(ExportError, match="match for 2 of 3"):
        check(relabelled, torch_out)
    rescored = _detections([[5, 5, 8, 9], [0, 0, 10, 10], [20, 20, 40, 40]], [1, 1, 2], [0.2, 0.8, 0.5])
    with pytest.raises(ExportError, match="match for 2 of 3"):
        check(rescored, torch_out)


def test_detection_parity_tolerates_a_few_extra_or_missing_detections():
    from lobster_fx.onnx import DetectionParity

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (40, 2))], axis=1)
    labels, scores = rng.integers(1, 5, 40), rng.uniform(0.05, 1, 40)
    torch_out = _detections(boxes[:39], labels[:39], scores[:39])
    ort_out = _detections(boxes, labels, scores)  # one more (a flipped NMS decision): 39/40 >= 95%
    assert DetectionParity()(ort_out, torch_out) == 0.0
    fewer = _detections(boxes[:37], labels[:37], scores[:37])  # 37/40 < 95%
    with pytest.raises(ExportError, match="match for 37 of 40"):
        DetectionParity()(fewer, ort_out)
    with pytest.raises(ExportError, match="groups of 3"):
        DetectionParity()(ort_out[:2], torch_out[:2])


def test_export_onnx_parity_fn_replaces_the_elementwise_check(tmp_path):
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    seen = []

    def accept(ort_outputs, torch_outputs):
        seen.append((ort_outputs, torch_outputs))
        return 0.125

    report = export_onnx(model, x, tmp_path / "ok.onnx", slim=False, parity_fn=accept)
    assert report.parity_max_abs_diff == 0.125
    (ort_outs, torch_outs), = seen
    np.testing.assert_allclose(ort_outs[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(torch_outs[0], model(x).detach().numpy())

    def reject(ort_outputs, torch_outputs):
        raise ExportError("detections differ")

    with pytest.raises(ExportError, match="detections differ"):
        export_onnx(model, x, tmp_path / "bad.onnx", slim=False, parity_fn=reject)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]  # nothing half-written


# ------------------------------------------------------------------ external data (models over 2 GB)


def _external_tensors(path: Path) -> list[str]:
    m = onnx.load(path, load_external_data=False)
    return [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_external_data_when_asked(tmp_path):
    model, x = _cnn(), torch.randn(2, 1, 12, 12)
    rep = export_onnx(model, x, tmp_path / "cnn.onnx", slim=False, sparse=False, external_data=True)
    assert rep.data_path == str(tmp_path / "cnn.onnx.data")
    assert _leftovers(tmp_path, {"cnn.onnx", "cnn.onnx.data"}) == []
    assert _external_tensors(tmp_path / "cnn.onnx")  # the weights really left the .onnx file
    assert rep.file_bytes == os.path.getsize(tmp_path / "cnn.onnx") + os.path.getsize(tmp_path / "cnn.onnx.data")
    assert rep.checker == "final file"
    onnx.checker.check_model(str(tmp_path / "cnn.onnx"))
    (out,) = _ort_run(tmp_path / "cnn.onnx", x.numpy())
    np.testing.assert_allclose(out, model.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_external_data_is_chosen_past_the_protobuf_limit(tmp_path, monkeypatch):
    """Past the limit one file cannot hold the model: external data by default, a clear error if refused."""
    import lobster_fx.onnx.export as ex  # where export_onnx looks these names up
    from lobster_fx.onnx import onnx_file_bytes

    model, x = _sparsify_(_mlp(), 0.5), torch.randn(3, 784)  # 50%: int64 COO indices do not pay, stays dense
    inline = export_onnx(model, x, tmp_path / "inline.onnx", slim=False)
    monkeypatch.setattr(ex, "_PROTOBUF_LIMIT", inline.file_bytes // 2)
    with pytest.raises(ExportError, match="2 GB limit.*external_data=True"):
        export_onnx(model, x, tmp_path / "refused.onnx", slim=False, external_data=False)
    assert _leftovers(tmp_path, {"inline.onnx"}) == []

    rep = export_onnx(model, x, tmp_path / "big.onnx", slim=False)
    assert rep.data_path == str(tmp_path / "big.onnx.data") and _external_tensors(tmp_path / "big.onnx")
    assert rep.checker == "final file"  # checked from the saved files, not in memory
    assert rep.file_bytes == onnx_file_bytes(rep.path) > os.path.getsize(rep.path)
    assert abs(rep.dense_bytes - inline.dense_bytes) < 64  # the sum of parts leaves out framing bytes only
    (a,) = _ort_run(tmp_path / "big.onnx", x.numpy())
    (b,) = _ort_run(tmp_path / "inline.onnx", x.numpy())
    np.testing.assert_array_equal(a, b)


def test_external_data_failure_leaves_nothing(tmp_path, monkeypatch):
    import lobster_fx.onnx.export as ex  # where export_onnx looks these names up

    target = tmp_path / "model.onnx"
    export_onnx(nn.Sequential(nn.Linear(64, 64)), torch.randn(2, 64), target, slim=False, external_data=True)
    before = (target.read_bytes(), (tmp_path / "model.onnx.data").read_bytes())

    def boom(path, *a, **k):
        assert os.path.exists(path) and os.path.exists(path + ".data")
        raise ExportError("simulated parity failure")

    monkeypatch.setattr(ex, "_ort_parity", boom)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(nn.Sequential(nn.Linear(64, 32)), torch.randn(2, 64), target, slim=False, external_data=True)
    assert (target.read_bytes(), (tmp_path / "model.onnx.data").read_bytes()) == before
    assert _leftovers(tmp_path, {"model.onnx", "model.onnx.data"}) == []


def test_proto_size_past_the_limit_is_the_sum_of_its_parts(mlp_files):
    """``ByteSize()`` raises past 2 GB; the fallback must agree with it where both work."""
    from lobster_fx.onnx.large import _proto_bytes

    _, _, d, _ = mlp_files
    proto = onnx.load(d / "dense.onnx")

    class Over2GB:  # what protobuf does past the limit
        def __getattr__(self, name):
            return getattr(proto, name)

        def ByteSize(self):  # noqa: N802 - protobuf's name
            raise RuntimeError("Failed to serialize proto")

    exact = proto.ByteSize()
    assert _proto_bytes(Over2GB()) == exact


def test_export_keeps_no_copy_of_the_weights_alive(tmp_path, monkeypatch):
    """export_onnx's folded copy must be freed when it returns (onnxscript's rewrite matchers
    held the last exported graph, and with it every weight of the copy, until the next export)."""
    import gc
    import sys
    import weakref

    fold_module = sys.modules["lobster_fx.passes.fold"]
    copies: list[weakref.ref] = []
    real_fold = fold_module.fold

    def spy(model):
        folded = real_fold(model)
        copies.append(weakref.ref(next(folded.parameters())))
        return folded

    monkeypatch.setattr(fold_module, "fold", spy)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    export_onnx(gm, torch.randn(2, 64), tmp_path / "m.onnx", slim=False)
    gc.collect()
    assert len(copies) == 1 and copies[0]() is None


# ------------------------------------------------------------------ half precision (issue 12, item 2)


class _HalfNet(nn.Module):
    """Conv + BatchNorm + Linear with dead channels: conv1 filters 0-7 feed nothing, fc1 units
    0-11 compute a constant relu(bias) (folded into fc2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _half_net(dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = _HalfNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.2, 0.2, generator=g)
        m.conv2.weight[:, :8] = 0
        m.fc1.weight[:12] = 0
    return m.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_folds_slims_and_exports_with_parity(tmp_path, dtype):
    # regression: slim checked bf16 / fp16 outputs at rtol 1e-5 (SlimError: one rounding is
    # 2**-8 / 2**-11), and ONNX Runtime could not load a bf16 file in the parity step
    from lobster_fx.passes.fold import fold
    from lobster_fx.passes.slim import slim

    gm = lobster_fx.instrument(_half_net(dtype))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mask in lobster_fx.masks(gm).values():
            mask.copy_((torch.rand(mask.shape, generator=g) >= 0.3).to(mask.dtype))
    x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    gm.eval()
    want = gm(x).detach()

    folded = fold(gm)
    slimmed = slim(folded, x, channel_multiple=1)  # default tolerances: follow the dtype
    report = slimmed.meta["lobster_slim"]
    from lobster_fx.passes.slim import default_rtol

    rtol = default_rtol(dtype)
    assert report.rtol == rtol > 1e-3 and report.atol == 0.0
    assert 0 < report.max_rel_err <= rtol
    assert report.params_after < report.params_before
    assert slimmed.get_submodule("conv1").weight.shape[0] == 8 and slimmed.get_submodule("fc1").weight.shape[0] == 20
    assert next(slimmed.parameters()).dtype == dtype

    # the slimmed model exports; so does the instrumented one (export folds and slims it itself),
    # also unslimmed (before: ONNX Runtime could not load the bf16 file)
    for name, model, do_slim in (("slimmed", slimmed, True), ("instrumented", gm, True), ("unslimmed", gm, False)):
        rep = export_onnx(model, x, tmp_path / f"{name}.onnx", slim=do_slim)
        assert rep.slimmed == do_slim and (rep.folded or name == "slimmed")
        if dtype == torch.bfloat16:
            # ONNX Runtime's CPU provider has no bf16 Conv / Gemm: a float32 copy, checked at float32's tolerances
            assert rep.dtype == "float32" and rep.parity_atol == rep.parity_rtol == 1e-5
            assert any("bfloat16" in note for note in rep.notes), rep.notes
            feed = x.float().numpy()
        else:
            assert rep.dtype == "float16" and rep.parity_atol == rep.parity_rtol == rtol
            feed = x.numpy()
        assert rep.parity_max_abs_diff <= rep.parity_atol + rep.parity_rtol * float(want.float().abs().max())
        onnx_model = onnx.load(rep.path)
        want_type = onnx.TensorProto.FLOAT if dtype == torch.bfloat16 else onnx.TensorProto.FLOAT16
        assert {i.data_type for i in onnx_model.graph.initializer if i.data_type in (1, 10, 16)} == {want_type}
        # the file against the caller's half model: within the dtype's tolerance of its outputs
        (out,) = _ort_run(rep.path, feed)
        ref = want.double().numpy()
        assert np.abs(out.astype(np.float64) - ref).max() <= rtol * np.abs(ref).max(), name
    assert gm.training is False and next(gm.parameters()).dtype == dtype  # the caller's model is untouched


def test_float32_tolerances_are_unchanged_and_explicit_tolerances_win(tmp_path):
    from lobster_fx.passes.slim import SlimError, slim

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    report = slim(_half_net(torch.float32), x, channel_multiple=1).meta["lobster_slim"]
    assert (report.atol, report.rtol) == (0.0, 1e-5)
    rep = export_onnx(_half_net(torch.float32), x, tmp_path / "f32.onnx")
    assert (rep.parity_atol, rep.parity_rtol, rep.dtype, rep.notes) == (1e-5, 1e-5, "float32", [])
    # an explicit tolerance is used as given, whatever the dtype
    with pytest.raises(SlimError, match="changed the outputs"):
        slim(_half_net(torch.bfloat16), x.bfloat16(), rtol=1e-5, channel_multiple=1)
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(_half_net(torch.float16), x.half(), tmp_path / "strict.onnx", atol=0.0, rtol=1e-6)
    assert not (tmp_path / "strict.onnx").exists()


def test_export_dtype_casts_and_bfloat16_is_refused(tmp_path):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = _half_net(torch.float16)
    rep = export_onnx(model, x.half(), tmp_path / "as32.onnx", export_dtype=torch.float32)
    assert rep.dtype == "float32" and rep.parity_rtol == 1e-5
    assert any("float16 model cast" in note for note in rep.notes), rep.notes
    assert next(model.parameters()).dtype == torch.float16  # a copy was cast
    with pytest.raises(ValueError, match="no bfloat16 kernels"):
        export_onnx(_half_net(torch.float32), x, tmp_path / "bf.onnx", export_dtype=torch.bfloat16)


def test_compact_indices_without_onnxruntime_stay_int64(monkeypatch):
    """ONNX Runtime is an extra: without it no compact index dtype can be probed, and every
    tensor keeps INT64 (valid for the spec and for any runtime) instead of failing."""
    import sys

    from lobster_fx.onnx import sparsify

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    sparsify._ort_accepts_index_dtype.cache_clear()
    try:
        w = np.zeros((100, 50), np.float32)
        w[::10, ::5] = 1.0
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 100])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 50])],
                              initializer=[numpy_helper.from_array(w, "w")])
        (info,) = sparsify_initializers(helper.make_model(g), index_dtype="compact")
        assert info.storage == "sparse" and info.index_dtype == "int64"
    finally:
        sparsify._ort_accepts_index_dtype.cache_clear()  # later tests probe the real runtime again
