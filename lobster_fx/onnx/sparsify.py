"""Sparse initializers: weights stored as COO (values + linear indices) in the ONNX file.

ONNX has no CSR; the file shrinks only when weights are moved to
``graph.sparse_initializer`` (COO: the non-zero values and their linearised 1-D indices).
onnx_ir / onnxscript passes drop sparse initializers, so :func:`sparsify_initializers` is
the very last step of the export and works on plain onnx protobuf. ONNX Runtime densifies
sparse initializers when it loads the file: the file is smaller, the runtime cost is the
dense model's (slimming is what removes FLOPs). Sizes measured on real models are in
``benchmarks/RESULTS.md`` (Footprint).

Example::

    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper
    >>> from lobster_fx.onnx.sparsify import sparsify_initializers
    >>> w = np.zeros((64, 64), np.float32); w[0] = 1.0
    >>> g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
    ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])],
    ...     initializer=[numpy_helper.from_array(w, "w")])
    >>> (info,) = sparsify_initializers(helper.make_model(g))
    >>> info.storage, info.nnz, info.index_dtype, info.bytes < info.dense_bytes / 10
    ('sparse', 64, 'int64', True)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from lobster_fx.onnx.large import _tensor_bytes

__all__ = ["IndexDtype", "InitializerInfo", "sparsify_initializers"]

IndexDtype = Literal["int64", "compact"]


#: initializer types moved to sparse storage. Integer initializers are mostly
#: shape / axis constants that shape inference wants to read as dense values.
_SPARSIFIABLE = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


#: candidate index types for ``index_dtype="compact"``, smallest first
_COMPACT_CANDIDATES = (np.int8, np.int16, np.int32, np.int64)


@dataclass
class InitializerInfo:
    """How one initializer is stored in the exported file.

    ``bytes`` is the serialised size of what is stored (``TensorProto`` or
    ``SparseTensorProto``); ``dense_bytes`` the size it has stored dense.
    ``graph`` is ``""`` for the main graph, else the path of the subgraph
    (``"node_name/then_branch"``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    storage: str  # "dense" or "sparse"
    bytes: int
    dense_bytes: int
    index_dtype: str | None = None
    graph: str = ""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sparsity"] = self.sparsity
        return d


def _dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


@functools.cache
def _ort_accepts_index_dtype(index_dtype: str) -> bool:
    """Does ONNX Runtime load (and densify correctly) a sparse initializer with
    ``index_dtype`` linear indices? Probed once per dtype on a tiny model, since
    the ONNX spec only allows INT64 and ORT's extra support is not documented."""
    if index_dtype == "int64":
        return True
    try:
        import onnxruntime as ort
    except ImportError:
        # kept: ONNX Runtime is an extra ([cpu] / [gpu]) and may be missing. Then no compact
        # dtype can be probed and every tensor keeps INT64, which is always valid;
        # export_onnx itself needs ONNX Runtime for parity and names the extra to install
        return False
    from onnx import helper

    dense = np.zeros((4, 5), np.float32)
    dense.flat[[1, 7, 19]] = [1.5, -2.0, 3.25]
    nz = np.flatnonzero(dense)
    sp = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[nz], "W"),
        numpy_helper.from_array(nz.astype(index_dtype), ""),
        [4, 5],
    )
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 5])
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "probe", [x], [y], sparse_initializer=[sp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.zeros((4, 5), np.float32)})[0]
    except Exception:  # noqa: BLE001 - any failure means "not accepted"
        return False
    return bool(np.array_equal(out, dense))


def _index_dtype_for(numel: int, mode: str, in_subgraph: bool) -> np.dtype:
    if mode == "int64" or in_subgraph:
        # ORT runs the ONNX checker on subgraphs, which wants INT64 (measured)
        return np.dtype(np.int64)
    for cand in _COMPACT_CANDIDATES:
        if numel - 1 <= np.iinfo(cand).max and _ort_accepts_index_dtype(np.dtype(cand).name):
            return np.dtype(cand)
    return np.dtype(np.int64)


def _iter_subgraphs(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            label = f"{node.name or node.op_type + str(i)}/{attr.name}"
            if attr.type == onnx.AttributeProto.GRAPH:
                yield label, attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for k, g in enumerate(attr.graphs):
                    yield f"{label}[{k}]", g


def _sparsify_graph(
    graph: onnx.GraphProto,
    label: str,
    in_subgraph: bool,
    min_sparsity: float,
    index_dtype: str,
    out: list[InitializerInfo],
) -> None:
    # an initializer that is also a graph input is an overridable default:
    # leave it where the runtime expects it
    input_names = {i.name for i in graph.input}
    keep: list[onnx.TensorProto] = []
    new_sparse: list[onnx.SparseTensorProto] = []
    for init in graph.initializer:
        dense_bytes = _tensor_bytes(init)
        shape = tuple(int(d) for d in init.dims)
        info = InitializerInfo(init.name, shape, _dtype_name(init.data_type), -1, "dense", dense_bytes, dense_bytes, None, label)
        eligible = (
            init.data_type in _SPARSIFIABLE
            and init.data_location != onnx.TensorProto.EXTERNAL
            and init.name not in input_names
            and len(shape) > 0
        )
        arr = numpy_helper.to_array(init) if init.data_location != onnx.TensorProto.EXTERNAL else None
        if arr is not None:
            info.nnz = int(np.count_nonzero(arr))
        if eligible and arr is not None and arr.size > 0 and info.sparsity >= min_sparsity:
            idx_dt = _index_dtype_for(arr.size, index_dtype, in_subgraph)
            if info.nnz * (arr.itemsize + np.dtype(idx_dt).itemsize) >= dense_bytes:
                keep.append(init)  # the payload alone would not be smaller: skip building it
                out.append(info)
                continue
            flat = arr.reshape(-1)
            nz = np.flatnonzero(flat)
            values = numpy_helper.from_array(np.ascontiguousarray(flat[nz]), init.name)
            indices = numpy_helper.from_array(nz.astype(idx_dt), "")
            sp = onnx.SparseTensorProto()
            sp.values.CopyFrom(values)
            sp.indices.CopyFrom(indices)
            sp.dims.extend(init.dims)
            # keep dense unless sparse storage is strictly smaller
            sparse_bytes = _tensor_bytes(sp)
            if values.data_type == init.data_type and sparse_bytes < dense_bytes:
                new_sparse.append(sp)
                info.storage, info.bytes, info.index_dtype = "sparse", sparse_bytes, idx_dt.name
                out.append(info)
                continue
        keep.append(init)
        out.append(info)
    n_existing = len(graph.sparse_initializer)
    if new_sparse:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        graph.sparse_initializer.extend(new_sparse)
    for sp in list(graph.sparse_initializer)[:n_existing]:
        # already sparse in the input proto: report it as is
        shape = tuple(int(d) for d in sp.dims)
        out.append(
            InitializerInfo(
                sp.values.name, shape, _dtype_name(sp.values.data_type), int(np.prod(sp.values.dims, dtype=np.int64)),
                "sparse", _tensor_bytes(sp), -1, _dtype_name(sp.indices.data_type), label,
            )
        )
    for sub_label, sub in _iter_subgraphs(graph):
        _sparsify_graph(sub, f"{label}/{sub_label}" if label else sub_label, True, min_sparsity, index_dtype, out)


def sparsify_initializers(
    model_proto: onnx.ModelProto,
    *,
    min_sparsity: float = 0.0,
    index_dtype: IndexDtype = "int64",
) -> list[InitializerInfo]:
    """Move sparse-enough initializers into ``graph.sparse_initializer`` (in place).

    Each floating-point initializer with sparsity ``>= min_sparsity`` is stored
    as a COO ``SparseTensorProto`` (values + linearised 1-D indices) when that is
    strictly smaller than its dense ``TensorProto``; otherwise it stays dense.
    Initializers of subgraphs (``If`` / ``Loop`` / ``Scan`` bodies) are handled
    too; main-graph initializers used from inside subgraphs keep working.

    ``index_dtype="int64"`` is what the ONNX spec (and ``onnx.checker``) allows.
    ``"compact"`` picks, per tensor, the smallest of int8/int16/int32 that holds
    its largest linear index and that ONNX Runtime accepts (probed once); the
    file is then smaller but ``onnx.checker`` rejects it. Subgraph tensors always
    use INT64 because ONNX Runtime checks subgraphs with the ONNX checker.

    Call this last: onnx_ir / onnxscript passes drop sparse initializers.

    Returns one :class:`InitializerInfo` per initializer (dense ones included).

    Example::

        >>> import numpy as np, onnx
        >>> from onnx import helper, numpy_helper
        >>> w = np.zeros((100, 50), np.float32); w[::10, ::5] = 1.0
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 100])],
        ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 50])],
        ...     initializer=[numpy_helper.from_array(w, "w")])
        >>> m = helper.make_model(g)
        >>> [(i.name, i.storage, i.nnz) for i in sparsify_initializers(m)]
        [('w', 'sparse', 100)]
        >>> onnx.checker.check_model(m, full_check=False)
    """
    if index_dtype not in ("int64", "compact"):
        raise ValueError(f"index_dtype must be 'int64' or 'compact', got {index_dtype!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    infos: list[InitializerInfo] = []
    _sparsify_graph(model_proto.graph, "", False, min_sparsity, index_dtype, infos)
    return infos


def _dense_infos(model_proto: onnx.ModelProto) -> list[InitializerInfo]:
    out: list[InitializerInfo] = []

    def visit(graph: onnx.GraphProto, label: str) -> None:
        for init in graph.initializer:
            nnz = -1
            if init.data_location != onnx.TensorProto.EXTERNAL:
                nnz = int(np.count_nonzero(numpy_helper.to_array(init)))
            b = _tensor_bytes(init)
            out.append(InitializerInfo(init.name, tuple(init.dims), _dtype_name(init.data_type), nnz, "dense", b, b, None, label))
        for sub_label, sub in _iter_subgraphs(graph):
            visit(sub, f"{label}/{sub_label}" if label else sub_label)

    visit(model_proto.graph, "")
    return out
