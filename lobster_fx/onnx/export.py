"""Export stage: a (masked, pruned) model to one self-contained, compressed ONNX file.

Why it looks the way it does (measured, see ``shared/docs/lobster-notes.md`` s.5):

* Masks are folded into the weights first (:func:`lobster_fx.fold.fold`):
  an unfolded ``weight * mask`` stays in the graph and stores two dense tensors.
* ``torch.onnx.export(dynamo=True)`` (the default exporter of torch 2.14) is
  called with ``f=None``: the ONNX model is built in memory, so no
  ``.onnx.data`` side file is ever written, and its optimiser folds BatchNorm
  into Conv. Traced GraphModules export fine through it.
* ONNX has no CSR; the file shrinks only when weights are moved to
  ``graph.sparse_initializer`` (COO: values + linear indices). onnx_ir /
  onnxscript drop sparse initializers, so :func:`sparsify_initializers` is the
  very last step and works on plain onnx protobuf.
* ONNX Runtime densifies sparse initializers when it loads the file: the file
  is smaller, the runtime cost is the dense model's (slimming removes FLOPs).

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.export import export_onnx
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    >>> with torch.no_grad():
    ...     for p in model.parameters():
    ...         _ = p.mul_((torch.rand_like(p) > 0.95).float())
    >>> path = os.path.join(tempfile.mkdtemp(), "mlp.onnx")
    >>> report = export_onnx(model, torch.randn(2, 256), path, slim=False)
    >>> report.ratio < 0.25
    True
    >>> report.parity_max_abs_diff < 1e-5
    True
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch

__all__ = [
    "ExportError",
    "InitializerInfo",
    "ExportReport",
    "sparsify_initializers",
    "export_onnx",
    "onnx_file_bytes",
    "DetectionParity",
]

IndexDtype = Literal["int64", "compact"]

#: the largest ONNX proto that fits in one file (protobuf's 2 GB message limit)
_PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF

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


class ExportError(RuntimeError):
    """``torch.onnx`` could not export the model, or the result failed a check.

    ``op`` names the operator that has no ONNX translation when that is the
    cause (e.g. ``"aten.kthvalue.default"``), else ``None``.
    """

    def __init__(self, message: str, *, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


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


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    ``dense_bytes`` is the size of the same ONNX graph with every initializer
    stored dense (the serialised proto before :func:`sparsify_initializers`);
    ``file_bytes`` the size on disk: the ``.onnx`` file plus, for a model saved
    with external data, its ``data_path`` file.
    """

    path: str
    dense_bytes: int
    file_bytes: int
    initializers: list[InitializerInfo]
    parity_max_abs_diff: float
    index_dtype: str
    exporter: str
    opset: int
    dynamic_batch: bool
    folded: bool
    slimmed: bool
    checker: str  # what onnx.checker validated
    notes: list[str] = field(default_factory=list)
    data_path: str | None = None  # the external data file (models over protobuf's 2 GB limit)
    parity_atol: float = 1e-5  # the tolerances the parity check used (given, or from the dtype)
    parity_rtol: float = 1e-5
    dtype: str = "float32"  # the coarsest floating dtype of the exported model's weights

    @property
    def ratio(self) -> float:
        """``file_bytes / dense_bytes`` (1.0 = no gain)."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def sparse_initializers(self) -> list[InitializerInfo]:
        return [i for i in self.initializers if i.storage == "sparse"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "initializers"}
        d["ratio"] = self.ratio
        d["initializers"] = [i.to_dict() for i in self.initializers]
        return d

    def __str__(self) -> str:
        n_sp = len(self.sparse_initializers)
        return (
            f"{self.path}: {self.file_bytes:,} bytes ({self.ratio:.3f}x of dense {self.dense_bytes:,}), "
            f"{n_sp}/{len(self.initializers)} initializers sparse ({self.index_dtype} indices), "
            f"ONNX Runtime parity max |diff| {self.parity_max_abs_diff:.2e}"
        )


# --------------------------------------------------------------------------- sparsify


def _dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


@functools.lru_cache(maxsize=None)
def _ort_accepts_index_dtype(index_dtype: str) -> bool:
    """Does ONNX Runtime load (and densify correctly) a sparse initializer with
    ``index_dtype`` linear indices? Probed once per dtype on a tiny model, since
    the ONNX spec only allows INT64 and ORT's extra support is not documented."""
    if index_dtype == "int64":
        return True
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
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


def _tensor_bytes(t: onnx.TensorProto | onnx.SparseTensorProto) -> int:
    """``t.ByteSize()``, or for a tensor over protobuf's 2 GB limit (where it raises) its
    payload plus a generous allowance for the name and dims."""
    try:
        return t.ByteSize()
    except Exception:  # noqa: BLE001 - google.protobuf EncodeError
        if isinstance(t, onnx.SparseTensorProto):
            return _tensor_bytes(t.values) + _tensor_bytes(t.indices) + 16 * len(t.dims) + 16
        return len(t.raw_data) + 16 * len(t.dims) + len(t.name) + 16


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


# --------------------------------------------------------------------------- input validation


@dataclass
class _Example:
    """The example inputs: positional ``args`` and keyword ``kwargs``, each a tensor or
    ``None`` (an unused optional argument: not an input of the ONNX graph)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, model: Any) -> Any:
        return model(*self.args, **self.kwargs)

    def in_signature_order(self, model: Any) -> _Example:
        """The keyword inputs in the order of ``model.forward``'s arguments (the legacy
        exporter orders graph inputs so, and the dynamo exporter names the ONNX inputs of a
        GraphModule wrongly when its keyword inputs come in another order: measured, torch
        2.14, a slimmed model fed by input name disagreed with torch). Wrappers (DDP,
        ``torch.compile``) are looked through."""
        import inspect

        from lobster_fx.instrument import unwrap

        try:
            order = {name: k for k, name in enumerate(inspect.signature(unwrap(model).forward).parameters)}
        except (TypeError, ValueError):
            return self
        keys = sorted(self.kwargs, key=lambda k: order.get(k, len(order)))
        return _Example(self.args, {k: self.kwargs[k] for k in keys})

    def map(self, fn: Callable[[Any], Any]) -> _Example:
        """A copy with ``fn`` applied to every tensor."""
        f = lambda v: None if v is None else fn(v)
        return _Example(tuple(f(v) for v in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def tensors(self) -> list[tuple[str, Any]]:
        """``(label, tensor)`` of every tensor input, in the order ``torch.onnx`` makes them
        graph inputs (positional, then keyword in the order given); labels are
        ``input 0`` / ``input 'attention_mask'``."""
        out = [(f"input {i}", t) for i, t in enumerate(self.args) if t is not None]
        return out + [(f"input {k!r}", t) for k, t in self.kwargs.items() if t is not None]

    def names(self, model: Any) -> list[str | None]:
        """The ``forward`` argument name of each tensor of :meth:`tensors` (``None`` where
        ``model.forward``'s signature does not say)."""
        import inspect

        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        names: list[str | None] = []
        for i, t in enumerate(self.args):
            if t is not None:
                p = params[i] if i < len(params) and params[i].kind in (
                    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else None
                names.append(p.name if p is not None else None)
        return names + [k for k, t in self.kwargs.items() if t is not None]

    def for_slim(self) -> tuple[Any, ...]:
        """The inputs in the form :func:`lobster_fx.slim.slim` takes (a trailing dict = kwargs)."""
        return (*self.args, self.kwargs) if self.kwargs else self.args

    def dynamic_shapes(self, model: Any, batched: Callable[[Any], bool], dim: Any) -> Any:
        """``torch.export`` dynamic shapes: ``{0: dim}`` for each batched tensor, else None;
        a tuple for positional inputs, a dict by argument name once there are keyword ones."""
        spec = lambda v: {0: dim} if v is not None and batched(v) else None
        if not self.kwargs:
            return tuple(spec(v) for v in self.args)
        import inspect

        sig = inspect.signature(model.forward)
        bound = sig.bind(*self.args, **self.kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                out[name] = tuple(spec(v) for v in value)
            elif kind == inspect.Parameter.VAR_KEYWORD:
                out[name] = {k: spec(v) for k, v in value.items()}
            else:
                out[name] = spec(value)
        return out


def _as_example(example_inputs: Any, kwargs: dict[str, Any] | None) -> _Example:
    """Check and split the example inputs as ``torch.onnx.export`` takes them: a tensor,
    a tuple / list (its last item a dict of keyword inputs when ``kwargs`` is not given),
    or a dict of keyword inputs alone; ``None`` marks an unused optional argument."""
    import torch

    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of keyword inputs, got {type(kwargs).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kw: dict[str, Any] = {}
    elif isinstance(example_inputs, dict):
        if kwargs:
            raise TypeError("example_inputs is a dict of keyword inputs and kwargs is given too: pass them once")
        args, kw = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kw = tuple(example_inputs), {}
        if args and isinstance(args[-1], dict) and not kwargs:
            args, kw = args[:-1], dict(args[-1])  # torch.onnx.export's convention
        if not args and not kw and not kwargs:
            raise ValueError("example_inputs is empty: pass a tensor or a tuple of tensors")
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors (None for an unused optional "
            f"argument; a dict as the last item for keyword inputs) or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}"
        )
    if kwargs:
        kw = dict(kwargs)
    for key in kw:
        if not isinstance(key, str):
            raise TypeError(f"keyword input names must be strings, got {key!r}")
    example = _Example(args, kw)
    where = [(f"input {i}", v) for i, v in enumerate(args)] + [(f"input {k!r}", v) for k, v in kw.items()]
    for label, v in where:
        if v is not None and not isinstance(v, torch.Tensor):
            raise TypeError(
                f"example_inputs: {label} is a {type(v).__name__}; each input must be a tensor, "
                "or None for an unused optional argument"
            )
    if not example.tensors():
        raise ValueError("example_inputs has no tensor: pass at least one input tensor")
    return example


def _shape(t: Any) -> str:
    import torch

    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _expected_input(mod: Any, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The input shape a layer wants, from the module or the functional call's weight."""
    import torch
    from torch import nn

    if isinstance(mod, nn.Linear):
        return f"(*, {mod.in_features})"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return f"(N, {mod.in_channels}, {', '.join('*' * len(mod.kernel_size))})"
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        return f"(N, {mod.num_features}, ...)"
    if isinstance(mod, nn.LayerNorm):
        return f"(*, {', '.join(map(str, mod.normalized_shape))})"
    if isinstance(mod, nn.Embedding):
        return f"integer indices < {mod.num_embeddings}"
    fname = getattr(target, "__name__", "")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if not isinstance(weight, torch.Tensor):
        return None
    if fname == "linear" and weight.dim() == 2:
        return f"(*, {weight.shape[1]})"
    if fname.startswith("conv") and not fname.startswith("conv_t") and weight.dim() >= 3:
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        spatial = ", ".join("*" * (weight.dim() - 2))
        return f"(N, {weight.shape[1] * int(groups)}, {spatial})"
    return None


@dataclass
class _Failure:
    layer: str
    kind: str
    got: str
    expected: str | None
    #: the layer's input and weight, where known (to tell a dtype / device clash from a shape one)
    input: Any = None
    weight: Any = None


def _layer_weight(mod: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The weight of a failing layer: the module's, or a functional call's second argument."""
    import torch

    w = getattr(mod, "weight", None) if mod is not None else (args[1] if len(args) > 1 else kwargs.get("weight"))
    return w if isinstance(w, torch.Tensor) else None


def _locate_failure(model: Any, inputs: _Example) -> _Failure | None:
    """Re-run ``model`` instrumented to find the innermost layer that raised.

    Module hooks find failing submodules; for GraphModules an Interpreter also
    catches functional calls (``F.linear`` on a traced-through weight), whose
    layer is taken from ``node.meta["nn_module_stack"]``.
    """
    import torch

    entered: list[tuple[str, Any, tuple[Any, ...]]] = []
    node_failure: dict[str, Any] = {}

    def pre(name: str):
        def hook(mod, args):
            entered.append((name, mod, args))

        return hook

    def post(mod, args, out):
        if entered:
            entered.pop()

    class _Interp(torch.fx.Interpreter):
        def run_node(self, n):  # type: ignore[override]
            try:
                return super().run_node(n)
            except Exception:
                if "node" not in node_failure:
                    try:
                        args, kwargs = self.fetch_args_kwargs_from_env(n)
                    except Exception:  # noqa: BLE001
                        args, kwargs = (), {}
                    node_failure.update(node=n, args=args, kwargs=kwargs)
                raise

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            if isinstance(model, torch.fx.GraphModule):
                from lobster_fx.slim import _positional

                _Interp(model).run(*_positional(model, inputs.args, inputs.kwargs))
            else:
                inputs.call(model)
    except Exception:  # noqa: BLE001 - we only want to know where
        pass
    else:
        return None
    finally:
        for h in handles:
            h.remove()
    if entered:
        name, mod, args = entered[-1]
        got = _shape(args[0]) if args else "no input"
        return _Failure(name, type(mod).__name__, got, _expected_input(mod, None, args, {}),
                        args[0] if args else None, _layer_weight(mod, (), {}))
    if node_failure:
        n = node_failure["node"]
        args, kwargs = node_failure["args"], node_failure["kwargs"]
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            path, typ = list(stack.values())[-1]
            kind = getattr(typ, "__name__", str(typ).rsplit(".", 1)[-1])
            layer = path
        else:
            layer, kind = n.name, str(getattr(n.target, "__name__", n.target))
        mod = None
        if n.op == "call_module":
            mod = model.get_submodule(n.target)
        first = args[0] if args else None
        return _Failure(layer, kind, _shape(first), _expected_input(mod, n.target, args, kwargs),
                        first, _layer_weight(mod, args, kwargs))
    return None


_DTYPE_METHOD = {"float32": "float()", "float16": "half()", "float64": "double()", "bfloat16": "bfloat16()"}


def _dtype_str(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _input_mismatches(model: Any, inputs: _Example) -> list[str]:
    """The example's dtype / device clashes with ``model``, each said in one sentence.

    A floating input must have the floating dtype of the model's parameters (integer
    inputs are indices, for embeddings); every input must be on the model's device.
    Only checked when the model's parameters agree on one dtype / one device."""
    params = list(model.parameters())
    floats = {p.dtype for p in params if p.is_floating_point()}
    devices = {t.device for t in (*params, *model.buffers())}
    out: list[str] = []
    for (label, t), name in zip(inputs.tensors(), inputs.names(model)):
        var = name if label.startswith("input '") else "x"
        if len(devices) == 1:
            (device,) = devices
            if t.device != device:
                to = "cpu()" if device.type == "cpu" else f"to({str(device)!r})"
                out.append(f"{label} is on {t.device} but the model is on {device}: pass {var}.{to}")
                continue
        if t.is_floating_point() and len(floats) == 1:
            (dtype,) = floats
            if t.dtype != dtype:
                method = _DTYPE_METHOD.get(_dtype_str(dtype), f"to({dtype})")
                out.append(f"{label} is {_dtype_str(t.dtype)} but the model's parameters are "
                           f"{_dtype_str(dtype)}: pass {var}.{method}")
    return out


def _layer_mismatch(where: _Failure) -> str | None:
    """The failing layer's input vs weight dtype / device clash, if that is what it is."""
    import torch

    x, w = where.input, where.weight
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return None
    if x.device != w.device:
        return f"its weight is on {w.device} but its input is on {x.device}"
    if x.is_floating_point() and w.is_floating_point() and x.dtype != w.dtype:
        return f"its weight is {_dtype_str(w.dtype)} but its input is {_dtype_str(x.dtype)}"
    return None


def _run_example(model: Any, inputs: _Example) -> Any:
    """Run the example through ``model``; a ValueError naming the cause if it fails: the
    input whose dtype or device does not match the model's, else the layer and the
    shape it expects."""
    import torch

    try:
        with torch.no_grad():
            return inputs.call(model)
    except Exception as e:  # noqa: BLE001 - every failure here means "bad example_inputs"
        where = _locate_failure(model, inputs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        cause = f" [{type(e).__name__}: {first}]"
        mismatches = _input_mismatches(model, inputs)
        layer_mismatch = _layer_mismatch(where) if where is not None else None
        if mismatches or layer_mismatch:
            msg = f"example_inputs do not run through {type(model).__name__}: "
            if mismatches:
                msg += "; ".join(mismatches)
                msg += f" (layer {where.layer!r} ({where.kind}) failed)" if where is not None else ""
            else:  # a model of mixed dtypes / devices: the failing layer says it
                msg += f"layer {where.layer!r} ({where.kind}) failed: {layer_mismatch}"
            raise ValueError(msg + cause) from e
        given = ", ".join(f"{label.removeprefix('input ')}={_shape(t)}" if label.startswith("input '") else _shape(t)
                          for label, t in inputs.tensors())
        msg = f"example_inputs of shape {given} do not run through {type(model).__name__}"
        if where is not None:
            msg += f": layer {where.layer!r} ({where.kind})"
            if where.expected:
                msg += f" expects input of shape {where.expected} but got {where.got}"
            else:
                msg += f" failed on input of shape {where.got}"
        raise ValueError(msg + cause) from e


def _flatten_outputs(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    return []


# --------------------------------------------------------------------------- export errors

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _first_line(e: BaseException) -> str:
    s = _ANSI.sub("", str(e)).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _explain_export_failure(e: BaseException, exporter: str) -> ExportError:
    """Turn what torch.onnx raises into an ExportError that names the op."""
    chain = _chain(e)
    texts = [_ANSI.sub("", str(x)) for x in chain]
    op = None
    node = None
    patterns = (
        r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>",
        r"target=torch\.ops\.([\w.]+)",
        r"[Ee]xporting the operator '([\w:.]+)'",
        r"[Uu]nsupported.*?'((?:aten|prims|prim)::\w+)'",
    )
    for pat in patterns:
        for t in texts:
            m = re.search(pat, t)
            if m:
                op = ".".join(g for g in m.groups() if g)
                break
        if op:
            break
    for t in texts:
        m = re.search(r"Error when translating node (%\w+)", t)
        if m:
            node = m.group(1)
            break
    root = chain[-1]
    reason = f"{type(root).__name__}: {_first_line(root)}"
    capture_failed = any(type(x).__name__ == "TorchExportError" for x in chain)
    if op is not None:
        where = f" (node {node})" if node else ""
        msg = (
            f"torch.onnx ({exporter} exporter) cannot export operator {op!r}{where}: {reason}. "
            f"Replace that op in the model, or pass a custom translation for it to torch.onnx."
        )
    elif capture_failed:
        call = ""
        for t in texts:
            m = re.search(r"The following call raised this error:\n(.*?)(?:\n\n|$)", t, re.S)
            if m:
                call = " at " + " ".join(line.strip() for line in m.group(1).splitlines())
                break
        msg = (
            f"torch.export could not capture the model (step 1 of the dynamo ONNX exporter){call}: {reason}. "
            "Data-dependent Python control flow must be rewritten (e.g. torch.cond); "
            "exporter='torchscript' traces one branch instead."
        )
    else:
        msg = f"torch.onnx ({exporter} exporter) failed: {reason}"
    err = ExportError(msg, op=op)
    return err


# --------------------------------------------------------------------------- export


def _has_masks(model: Any) -> bool:
    return any(n.endswith("mask") for n, _ in model.named_buffers())


def _batched(inputs: _Example) -> Callable[[Any], bool]:
    """Which tensors have the batch dimension: those whose first dim is the first
    tensor's (none if that one is 0-d)."""
    first = inputs.tensors()[0][1]
    if not first.dim():
        return lambda t: False
    return lambda t: t.dim() >= 1 and t.shape[0] == first.shape[0]


def _input_names(model: Any, inputs: _Example, exporter: str) -> list[str | None]:
    """The ONNX graph input name of each tensor of ``inputs.tensors()``: the ``forward``
    argument names for keyword / None inputs (the dynamo exporter names inputs after
    them; the torchscript path passes them); ``input`` / ``input_<i>`` for the
    torchscript exporter's positional tensors, as always; None where unknown (the
    parity check then feeds by position)."""
    n = len(inputs.tensors())
    if exporter == "torchscript" and not inputs.kwargs and None not in inputs.args:
        return [f"input_{i}" for i in range(n)] if n > 1 else ["input"]
    return inputs.names(model)


def _torch_export(
    model: Any, inputs: _Example, *, dynamic_batch: bool, opset: int | None, exporter: str
) -> onnx.ModelProto:
    """Export with torch.onnx into memory (no file, so no stray ``.onnx.data``)."""
    import io

    import torch

    batched = _batched(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation / tracer chatter
        try:
            if exporter == "dynamo":
                dyn = None
                if dynamic_batch:
                    dyn = inputs.dynamic_shapes(model, batched, torch.export.Dim("batch"))
                prog = torch.onnx.export(
                    model, inputs.args, None, kwargs=inputs.kwargs or None, dynamo=True, dynamic_shapes=dyn,
                    opset_version=opset, verbose=False, optimize=True, external_data=False,
                )
                try:
                    return prog.model_proto
                finally:
                    del prog
                    _release_onnxscript_matchers()
            tensors = inputs.tensors()
            given = _input_names(model, inputs, exporter)
            names = [g or f"input_{i}" for i, g in enumerate(given)]
            # output names are required: without them the legacy exporter takes a GraphModule's
            # `.graph` for a TorchScript graph (AttributeError: 'Graph' object has no attribute 'outputs')
            with torch.no_grad():
                n_out = len(_flatten_outputs(inputs.call(model)))
            out_names = [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
            axes = {n: {0: "batch"} for n, (_, t) in zip(names, tensors) if batched(t)} if dynamic_batch else None
            buf = io.BytesIO()
            torch.onnx.export(
                model, inputs.args, buf, kwargs=inputs.kwargs or None, dynamo=False, input_names=names,
                output_names=out_names, dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )
            return onnx.load_from_string(buf.getvalue())
        except Exception as e:  # noqa: BLE001 - explained and re-raised
            raise _explain_export_failure(e, exporter) from e


def _release_onnxscript_matchers() -> None:
    """Drop the graph that onnxscript's rewrite-rule matchers keep from their last match.

    The matchers are long-lived objects (the default rewrite rules); after an export each
    holds the exported ONNX IR graph, whose initializers are the exported model's torch
    tensors, until the next export. Measured: the folded copy of the model, a full set of
    weights, outlived ``export_onnx``. Only memory is at stake, so any surprise in
    onnxscript's internals is ignored.
    """
    try:
        from onnxscript.rewriter import _basics, _matcher
    except ImportError:
        return
    try:
        for obj in gc.get_objects():
            if isinstance(obj, _matcher.SimplePatternMatcher) and getattr(obj, "_graph", None) is not None:
                obj._graph = None
                obj._current_node = None
                obj._match = _basics.MatchResult()  # what the matcher sets before every match
    except Exception:  # noqa: BLE001 - best effort: a memory optimisation only
        return


def _match_inputs(graph_inputs: Sequence[Any], given: Sequence[tuple[str | None, Any]]) -> list[tuple[Any, Any]]:
    """Pair the ONNX graph inputs (objects with ``.name``) with the example tensors: by
    name when the names are the same set, else by position."""
    names = [n for n, _ in given]
    if None not in names and sorted(names) == sorted(g.name for g in graph_inputs):
        by_name = dict(given)
        return [(g, by_name[g.name]) for g in graph_inputs]
    return list(zip(graph_inputs, (t for _, t in given)))


def _check_dynamic_batch(proto: onnx.ModelProto, given: Sequence[tuple[str | None, Any]]) -> None:
    init_names = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in init_names]
    first = given[0][1]
    for gi, t in _match_inputs(graph_inputs, given):
        if first.dim() == 0 or t.dim() == 0 or t.shape[0] != first.shape[0]:
            continue
        dims = gi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"dynamic_batch=True, but the exported model fixes the batch dimension of input "
                f"{gi.name!r} to {dims[0].dim_value} (the model's code specialises it, e.g. a "
                "reshape with a literal size); rewrite it with x.shape[0] / -1, or pass dynamic_batch=False"
            )


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), (a[:, None] == b[None]).all(axis=2))


class DetectionParity:
    """Parity for detectors whose outputs are per-image ``(boxes, labels, scores, ...)``.

    A detector's output *count* is data-dependent: NMS and score thresholds flip on
    float-level differences (a torchvision Faster R-CNN kept 90 boxes in ONNX Runtime where
    torch kept 88), so elementwise parity cannot hold. This matches detections instead:
    each torch detection (by descending score) to the unmatched ONNX Runtime detection of
    the same label with the highest IoU; a pair matches when IoU >= ``min_iou`` and the
    scores (and any further per-detection outputs) agree within ``atol + rtol * scale``.
    Passes when matched pairs are at least ``min_matched`` of the larger count in every
    image. Pass it as ``export_onnx(..., parity_fn=DetectionParity())``; ``.last`` holds the
    per-image counts of the last check.

    Example::

        >>> import numpy as np
        >>> check = DetectionParity()
        >>> b = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
        >>> check([b, np.array([1, 2]), np.array([0.9, 0.1], np.float32)],
        ...       [b, np.array([1, 2]), np.array([0.9, 0.1], np.float32)])
        0.0
        >>> check.last
        [{'torch': 2, 'ort': 2, 'matched': 2}]
    """

    def __init__(self, fields: int = 3, *, min_iou: float = 0.99, min_matched: float = 0.95,
                 atol: float = 1e-4, rtol: float = 1e-4) -> None:
        if fields < 3:
            raise ValueError(f"DetectionParity: fields must be >= 3 (boxes, labels, scores, ...), got {fields}")
        self.fields, self.min_iou, self.min_matched, self.atol, self.rtol = fields, min_iou, min_matched, atol, rtol
        self.last: list[dict[str, int]] = []

    def __call__(self, ort_outputs: list[np.ndarray], torch_outputs: list[np.ndarray]) -> float:
        if len(ort_outputs) % self.fields:
            raise ExportError(f"DetectionParity: {len(ort_outputs)} outputs are not groups of {self.fields} "
                              "(boxes, labels, scores, ...) per image")
        self.last, worst = [], 0.0
        for start in range(0, len(ort_outputs), self.fields):
            o, r = ort_outputs[start:start + self.fields], torch_outputs[start:start + self.fields]
            image = start // self.fields
            for k in range(self.fields):
                if o[k].shape[1:] != r[k].shape[1:]:
                    raise ExportError(f"image {image}, field {k}: ONNX Runtime shape {o[k].shape} vs torch {r[k].shape}")
            scale = [float(np.max(np.abs(x.astype(np.float64)), initial=0.0)) for x in r]
            iou = _iou(r[0].astype(np.float64), o[0].astype(np.float64))
            free = np.ones(len(o[0]), bool)
            matched = 0
            for i in np.argsort(-r[2], kind="stable"):
                cand = np.where(free & (o[1] == r[1][i]))[0]
                if not len(cand):
                    continue
                j = cand[np.argmax(iou[i, cand])]
                if iou[i, j] < self.min_iou:
                    continue
                # labels already agree (the candidate filter); the other fields within tolerance
                diffs = {k: float(np.max(np.abs(o[k][j].astype(np.float64) - r[k][i].astype(np.float64)), initial=0.0))
                         for k in range(self.fields) if k != 1}
                if all(d <= self.atol + self.rtol * scale[k] for k, d in diffs.items()):
                    free[j] = False
                    matched += 1
                    worst = max(worst, *diffs.values())
            counts = {"torch": len(r[0]), "ort": len(o[0]), "matched": matched}
            self.last.append(counts)
            if matched < self.min_matched * max(len(r[0]), len(o[0])):
                raise ExportError(f"image {image}: ONNX Runtime and torch detections match for {matched} of "
                                  f"{len(r[0])} (torch) / {len(o[0])} (ONNX Runtime); need {self.min_matched:.0%}")
        return worst


def _numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16


def _cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters, buffers and plain tensor attributes (constants a
    graph reads with get_attr) to ``dtype``, in place."""
    import torch

    model.to(dtype)  # parameters and buffers
    for mod in model.modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                setattr(mod, name, value.to(dtype))


def _ort_parity(path: str, inputs: Sequence[tuple[str | None, Any]], reference: list[Any], atol: float, rtol: float,
                parity_fn: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None) -> float:
    """Run the written file in ONNX Runtime (CPU); max |ort - torch| or ExportError.

    ``inputs`` are ``(ONNX input name or None, tensor)`` (or bare tensors): fed by name
    when the names match the session's inputs, else in order."""
    inputs = [(None, t) if not isinstance(t, tuple) else t for t in inputs]
    from lobster_fx.runtime import import_onnxruntime

    ort = import_onnxruntime()  # names the [cpu] / [gpu] extra when none is installed

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_first_line(e)}") from e
    ins = sess.get_inputs()
    if len(ins) != len(inputs):
        raise ExportError(f"the ONNX model has {len(ins)} inputs, the example has {len(inputs)}")
    feeds = {i.name: _numpy(t) for i, t in _match_inputs(ins, inputs)}
    outs = sess.run(None, feeds)
    if len(outs) != len(reference):
        raise ExportError(f"the ONNX model returns {len(outs)} outputs, torch returns {len(reference)}")
    if parity_fn is not None:
        return float(parity_fn(outs, [_numpy(r) for r in reference]))
    worst = 0.0
    for k, (o, r) in enumerate(zip(outs, reference)):
        r = _numpy(r)
        if o.shape != r.shape:
            raise ExportError(f"output {k}: ONNX Runtime shape {o.shape} != torch shape {r.shape}")
        if o.size:
            o64, r64 = o.astype(np.float64), r.astype(np.float64)
            if not np.array_equal(np.isnan(o64), np.isnan(r64)):
                raise ExportError(f"output {k}: ONNX Runtime and torch disagree on which entries are NaN")
            finite = ~np.isnan(r64)
            diff = float(np.max(np.abs(o64 - r64)[finite], initial=0.0))
            # relative to the output's scale, as slim checks: float kernels err in proportion to
            # the magnitudes they sum, not to each output entry (a random-init MNASNet's ~1e8
            # logits differ by ~50 from a different summation order)
            scale = float(np.max(np.abs(r64)[finite], initial=0.0))
            worst = max(worst, diff)
            if not diff <= atol + rtol * scale:
                raise ExportError(
                    f"output {k}: ONNX Runtime differs from torch by up to {diff:.3e} at output scale "
                    f"{scale:.3e} (tolerance atol={atol} + rtol={rtol} * scale)"
                )
    return worst


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop per-node debug metadata (torch stack traces with absolute source
    paths, fx node dumps): it can outweigh the weights of a sparse model."""

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        for _, sub in _iter_subgraphs(graph):
            visit(sub)

    visit(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]
            node.doc_string = ""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_GRAPH_PARTS = ("initializer", "sparse_initializer", "node", "input", "output", "value_info")
_MODEL_PARTS = ("graph", "functions", "opset_import", "metadata_props")


def _proto_bytes(proto: onnx.ModelProto) -> int:
    """Serialised size of ``proto``. Past protobuf's 2 GB limit ``ByteSize()`` raises:
    then the sum of its parts, each with its tag and length prefix, and of the
    model's and the graph's own small fields."""
    try:
        return proto.ByteSize()
    except Exception:  # noqa: BLE001 - google.protobuf EncodeError: the message is over 2 GB
        g = proto.graph
        graph = _shell(onnx.GraphProto, g, _GRAPH_PARTS).ByteSize() + sum(_framed(p) for f in _GRAPH_PARTS for p in getattr(g, f))
        model = _shell(onnx.ModelProto, proto, _MODEL_PARTS).ByteSize() + _framed(graph)
        return model + sum(_framed(p) for f in _MODEL_PARTS[1:] for p in getattr(proto, f))


def _shell(cls: Any, msg: Any, skip: Sequence[str]) -> Any:
    """A ``cls`` copy of ``msg`` without the (large) fields in ``skip``."""
    shell = cls()
    for f, value in msg.ListFields():
        if f.name in skip:
            continue
        if hasattr(value, "extend"):
            getattr(shell, f.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(shell, f.name).CopyFrom(value)
        else:
            setattr(shell, f.name, value)
    return shell


def _framed(part: Any) -> int:
    """A submessage's size (or a size already taken) plus its tag and length prefix."""
    if isinstance(part, int):
        n = part
    elif isinstance(part, (onnx.TensorProto, onnx.SparseTensorProto)):
        n = _tensor_bytes(part)
    else:
        n = part.ByteSize()
    return n + 1 + max(1, (n.bit_length() + 6) // 7)


def onnx_file_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of an ONNX model: the file plus the external data files it names.

    Example::

        >>> import os, tempfile, torch
        >>> r = export_onnx(torch.nn.Linear(64, 64), torch.randn(1, 64),
        ...                 os.path.join(tempfile.mkdtemp(), "lin.onnx"), slim=False, external_data=True)
        >>> onnx_file_bytes(r.path) == r.file_bytes > os.path.getsize(r.path)
        True
    """
    m = onnx.load(str(path), load_external_data=False)
    from onnx.external_data_helper import _get_all_tensors

    base = Path(path).parent
    locations = {
        entry.value
        for t in _get_all_tensors(m) if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    }
    return os.path.getsize(path) + sum(os.path.getsize(base / loc) for loc in sorted(locations))


def _write_external(proto: onnx.ModelProto, target: Path, tmpdir: str) -> tuple[str, str]:
    """Save ``proto`` into ``tmpdir`` as ``target.name`` plus ``target.name + ".data"``."""
    tmp = os.path.join(tmpdir, target.name)
    data_name = f"{target.name}.data"
    try:
        onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
    except Exception as e:  # noqa: BLE001 - explained
        # sparse initializers stay in the .onnx file (onnx moves only dense tensors out)
        raise ExportError(
            f"cannot save the model with external data: {_first_line(e)}; if its sparse initializers "
            "alone pass protobuf's 2 GB limit, pass sparse=False or index_dtype='compact'"
        ) from e
    return tmp, os.path.join(tmpdir, data_name)


def export_onnx(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    sparse: bool = True,
    slim: bool = True,
    dynamic_batch: bool = True,
    index_dtype: IndexDtype = "int64",
    opset: int | None = None,
    min_sparsity: float = 0.0,
    exporter: Literal["dynamo", "torchscript"] = "dynamo",
    strip_debug_info: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    parity_fn: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None,
    external_data: bool | None = None,
    export_dtype: torch.dtype | None = None,
    kwargs: dict[str, Any] | None = None,
) -> ExportReport:
    """Fold, (slim), export, sparsify, check and atomically write one ONNX file.

    Steps: validate ``path`` and ``example_inputs`` (see Inputs); copy the
    model and put it in eval mode (``model`` itself is not changed); fold masks
    into weights (:func:`lobster_fx.fold.fold`, a no-op without masks); remove dead units
    when ``slim`` (:func:`lobster_fx.slim.slim`); export with ``torch.onnx``
    into memory; move sparse initializers to ``graph.sparse_initializer``
    (``sparse``); run ``onnx.checker``; write a temp file next to ``path``,
    check ONNX Runtime reproduces torch on the example (per output, max
    ``|ort - torch| <= atol + rtol * max|torch|``: relative to the output's scale),
    then ``os.replace`` it onto ``path``. Any failure leaves no file behind and
    an existing ``path`` untouched.

    Inputs, as ``torch.onnx.export`` takes them: ``example_inputs`` is a tensor,
    a tuple of positional inputs, or a dict of keyword inputs; keyword inputs
    may also be given as ``kwargs={"attention_mask": am}`` or as a dict that is
    the tuple's last item. ``None`` in the tuple (or as a keyword value) stands
    for an unused optional argument: it is passed to ``forward`` as ``None``, is
    no input of the ONNX graph, and slimming traces the model with it fixed to
    ``None``. Every other input must be a tensor; tensors whose first dimension
    is the first tensor's get the dynamic batch dimension. The ONNX inputs are
    named after ``forward``'s arguments (``input_ids``, ``attention_mask``;
    the torchscript exporter keeps ``input`` / ``input_<i>`` for positional
    tensors), and the parity check feeds them by name. E.g. a Hugging Face model::

        export_onnx(model, (input_ids,), path, kwargs={"attention_mask": mask})
        export_onnx(model, {"input_ids": input_ids, "attention_mask": mask}, path)
        export_onnx(model, (input_ids, None, token_type_ids), path)

    Masks. ``export_onnx`` is the whole pipeline, so it folds an instrumented
    model itself (also through a DDP / DataParallel / ``torch.compile``
    wrapper); the single passes :func:`lobster_fx.slim.slim` and
    :func:`lobster_fx.sparse.to_sparse_csr` refuse a model with masks instead.
    An instrumented module nested inside another module, which ``fold`` does not
    reach, raises :class:`lobster_fx.fold.MaskedModelError`.

    Precision. ``atol`` / ``rtol`` default to ``None``: both follow the exported
    model's dtype, :func:`lobster_fx.slim.default_rtol` of the coarsest floating
    dtype among its weights and outputs (``max(1e-5, 8 * eps)``: ``1e-5`` for
    float32, ``2**-7`` for float16); values passed explicitly are used as given.
    ``export_dtype`` (``torch.float16`` / ``float32`` / ``float64``, default None)
    casts the folded model's floating weights and the example inputs before
    slimming and exporting, and parity is then checked against the cast model
    in torch. ``None`` keeps the model's dtype, except that a model with
    bfloat16 weights is exported as a float32 copy (exact: every bfloat16 value
    is a float32 value), because ONNX Runtime's CPU provider has no bfloat16
    Conv / Gemm / MatMul kernels (1.32) and could neither check nor run the
    file; ``report.notes`` says so. float16 models are exported as float16
    (its CPU kernels exist; where one is missing, loading fails with an
    ExportError: pass ``export_dtype=torch.float32``).

    ``exporter="dynamo"`` (default, the maintained exporter) needs
    ``torch.export``-capturable code; ``"torchscript"`` (deprecated in torch)
    traces instead. ``index_dtype="compact"`` writes int8/16/32 indices: smaller,
    accepted by ONNX Runtime, rejected by ``onnx.checker`` (the dense graph is
    checked instead). ``strip_debug_info`` drops the exporter's per-node
    metadata (stack traces with local paths), which can outweigh a sparse
    model's weights; ``dense_bytes`` is measured after it, so the ratio compares
    like with like. ``parity_fn(ort_outputs, torch_outputs)`` replaces the
    elementwise check where it cannot hold (detectors:
    ``parity_fn=DetectionParity()``); it returns the max difference it accepted or
    raises :class:`ExportError`, and the file is only written if it returns.

    ``external_data`` (default ``None``: only when the model is over protobuf's
    2 GB limit, which a single ONNX file cannot hold) stores the dense
    initializers in ``path + ".data"`` beside ``path``, as ONNX Runtime expects;
    both files are written in a temporary directory next to ``path``, checked
    there, and moved into place (data file first) only if every check passes.
    Sparse initializers stay in the ``.onnx`` file.

    Raises:
        FileNotFoundError: the parent directory of ``path`` does not exist.
        TypeError / ValueError: bad ``example_inputs``. When they do not run through
            the model, the ValueError names the input whose dtype or device is not the
            model's ("input 0 is float64 but the model's parameters are float32: pass
            x.float()"), else the layer and the expected vs given shape when known.
        lobster_fx.fold.MaskedModelError: an instrumented submodule that fold cannot reach.
        ExportError: torch.onnx failed (``.op`` names an unsupported operator),
            the batch dimension got fixed, or the ONNX Runtime parity check failed.

    Example::

        >>> import os, tempfile, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                         torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
        >>> r = export_onnx(m, torch.randn(1, 1, 8, 8), os.path.join(tempfile.mkdtemp(), "cnn.onnx"), slim=False)
        >>> r.parity_max_abs_diff < 1e-5 and os.path.getsize(r.path) == r.file_bytes
        True
    """
    import torch

    # ---- validate cheap things first
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: directory {str(parent)!r} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a directory")
    if index_dtype not in ("int64", "compact"):
        raise ValueError(f"index_dtype must be 'int64' or 'compact', got {index_dtype!r}")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if export_dtype not in (None, torch.float16, torch.float32, torch.float64):
        raise ValueError(
            f"export_dtype must be None, torch.float16, torch.float32 or torch.float64, got {export_dtype!r}"
            + (" (ONNX Runtime's CPU provider has no bfloat16 kernels to check the file with)"
               if export_dtype == torch.bfloat16 else "")
        )
    inputs = _as_example(example_inputs, kwargs).map(lambda t: t.detach()).in_signature_order(model)
    from lobster_fx.slim import coarsest_float_dtype, default_rtol

    if export_dtype is None and any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers())):
        export_dtype = torch.float32  # ONNX Runtime (CPU) runs no bfloat16 Conv / Gemm / MatMul

    # ---- the caller's model is only run (in eval mode, restored after); every
    # transformation below works on a copy (fold and slim both copy)
    saved_modes = [(m, m.training) for m in model.modules()]
    notes: list[str] = []
    try:
        model.eval()
        reference = _flatten_outputs(_run_example(model, inputs))

        try:
            from lobster_fx.fold import fold
        except ImportError:
            fold = None  # type: ignore[assignment]
        if fold is not None:
            from lobster_fx.fold import require_folded

            work = fold(model)  # a copy; a no-op copy for a model without masks
            # fold folds the model itself (through DDP / compile wrappers), not an
            # instrumented module nested inside another: refuse that, as slim would
            require_folded(work, "export_onnx")
        else:
            if _has_masks(model):
                warnings.warn("lobster_fx.fold is not importable: exporting unfolded masks (larger file)")
                notes.append("masks not folded (lobster_fx.fold missing)")
            work = copy.deepcopy(model)
        folded = "lobster_folded" in (getattr(work, "meta", None) or {})
        work.eval()
        cast_from = coarsest_float_dtype([*work.parameters(), *work.buffers()])
        if export_dtype is not None and cast_from is not None and cast_from != export_dtype:
            # the file is the cast model: slim it, export it and check parity against it in torch
            _cast_floating(work, export_dtype)
            inputs = inputs.map(lambda t: t.to(export_dtype) if t.is_floating_point() else t)
            reference = _flatten_outputs(_run_example(work, inputs))
            notes.append(f"exported as {str(export_dtype).removeprefix('torch.')}: the "
                         f"{str(cast_from).removeprefix('torch.')} model cast"
                         + (" (ONNX Runtime's CPU provider has no bfloat16 kernels)" if cast_from == torch.bfloat16 else "")
                         + "; parity checked against the cast model in torch")

        slimmed = False
        if slim:
            try:
                from lobster_fx.slim import slim as _slim
            except ImportError as e:
                raise ImportError("export_onnx(slim=True) needs lobster_fx.slim; pass slim=False") from e
            try:
                work = _slim(work, inputs.for_slim())
            except Exception as e:  # noqa: BLE001 - re-raised with a hint
                if hasattr(e, "add_note"):
                    e.add_note("lobster_fx.export_onnx: slimming failed; pass slim=False to export without it")
                raise
            slimmed = True
            work.eval()

        # tolerances that follow the dtype the file computes in (None = not given)
        exported_dtype = coarsest_float_dtype([*work.parameters(), *work.buffers(), *reference]) or torch.float32
        atol = default_rtol(exported_dtype) if atol is None else atol
        rtol = default_rtol(exported_dtype) if rtol is None else rtol

        # ---- export into memory
        proto = _torch_export(work, inputs, dynamic_batch=dynamic_batch, opset=opset, exporter=exporter)
        # (name, tensor) of each ONNX graph input: what the parity check feeds
        graph_inputs = list(zip(_input_names(work, inputs, exporter), (t for _, t in inputs.tensors())))
        del work  # the proto holds the weights now: one copy fewer for the steps below
        gc.collect()  # GraphModules sit in reference cycles: free the copy now, not at some later collection
    finally:
        # call train() (not just set .training): LobsterGraphModule switches its
        # graph there. Pre-order, so each module's own call comes last for it.
        for m, t in saved_modes:
            m.train(t)

    if dynamic_batch:
        _check_dynamic_batch(proto, graph_inputs)
    if strip_debug_info:
        _strip_debug_info(proto)
    dense_bytes = _proto_bytes(proto)
    # onnx.checker takes a proto only under 2 GB; past that it checks the saved files
    in_memory_check = dense_bytes <= _PROTOBUF_LIMIT
    checker = "none"
    if in_memory_check:
        try:
            onnx.checker.check_model(proto, full_check=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker rejects the exported (dense) model: {_first_line(e)}") from e
        checker = "dense graph"

    if sparse:
        infos = sparsify_initializers(proto, min_sparsity=min_sparsity, index_dtype=index_dtype)
    else:
        infos = _dense_infos(proto)
    final_bytes = _proto_bytes(proto)
    external = bool(external_data) if external_data is not None else final_bytes > _PROTOBUF_LIMIT
    # compact indices are valid for ONNX Runtime, not for onnx.checker: it saw the dense graph
    final_checkable = not sparse or index_dtype == "int64"
    if final_checkable and final_bytes <= _PROTOBUF_LIMIT:
        if sparse:  # without it the proto is the one checked above
            try:
                onnx.checker.check_model(proto, full_check=False)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"onnx.checker rejects the sparsified model: {_first_line(e)}") from e
        checker = "final file"
    elif not final_checkable:
        notes.append("compact indices: onnx.checker validated the dense graph, ONNX Runtime the file"
                     if checker == "dense graph" else
                     "compact indices on a model over 2 GB: onnx.checker did not run, ONNX Runtime checked the file")
    checks_saved_files = final_checkable and checker != "final file"
    if not external and final_bytes > _PROTOBUF_LIMIT:
        raise ExportError(
            f"the model is {final_bytes:,} bytes, over protobuf's 2 GB limit for one ONNX file; "
            "pass external_data=True (or leave it None) to write the weights to a .data file beside it"
        )

    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)

    # ---- atomic write: temp file(s) in the target directory, verify, then replace.
    # The proto is dropped once written: ONNX Runtime then loads a copy of the weights of its own
    data_path: str | None = None
    if not external:
        data = proto.SerializeToString()
        del proto
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(parent))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            del data
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give a normal file mode
            max_diff = _ort_parity(tmp, graph_inputs, reference, atol, rtol, parity_fn)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    else:
        tmpdir = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(parent))
        try:
            tmp, tmp_data = _write_external(proto, target, tmpdir)
            del proto
            has_data = os.path.exists(tmp_data)  # not when every initializer is sparse or tiny
            for f in (tmp, tmp_data) if has_data else (tmp,):
                os.chmod(f, 0o666 & ~_umask())
            if checks_saved_files:
                try:
                    onnx.checker.check_model(tmp, full_check=False)  # a path: reads the external data
                except Exception as e:  # noqa: BLE001
                    raise ExportError(f"onnx.checker rejects the saved model: {_first_line(e)}") from e
                checker = "final file"
            max_diff = _ort_parity(tmp, graph_inputs, reference, atol, rtol, parity_fn)
            if has_data:
                data_path = str(parent / Path(tmp_data).name)
                os.replace(tmp_data, data_path)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if data_path:
            notes.append(f"external data: dense initializers in {Path(data_path).name}")

    return ExportReport(
        path=str(target),
        dense_bytes=dense_bytes,
        file_bytes=os.path.getsize(target) + (os.path.getsize(data_path) if data_path else 0),
        initializers=infos,
        parity_max_abs_diff=max_diff,
        index_dtype=index_dtype if sparse else "none",
        exporter=exporter,
        opset=int(opset_used),
        dynamic_batch=dynamic_batch,
        folded=folded,
        slimmed=slimmed,
        checker=checker,
        notes=notes,
        data_path=data_path,
        parity_atol=float(atol),
        parity_rtol=float(rtol),
        dtype=str(exported_dtype).removeprefix("torch."),
    )
