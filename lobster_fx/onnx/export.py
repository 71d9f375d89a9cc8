"""Export stage: a (masked, pruned) model to one self-contained, compressed ONNX file.

:func:`export_onnx` is the whole pipeline, each step in its own module:

* the example inputs are checked (:mod:`lobster_fx.onnx.inputs`);
* masks are folded into the weights (:func:`lobster_fx.passes.fold.fold`): an unfolded
  ``weight * mask`` stays in the graph and stores two dense tensors; dead units are
  removed (:func:`lobster_fx.passes.slim.slim`);
* ``torch.onnx`` builds the ONNX model in memory (:mod:`lobster_fx.onnx.capture`);
* weights move to sparse initializers (:mod:`lobster_fx.onnx.sparsify`), last, on plain
  onnx protobuf;
* a model past protobuf's 2 GB limit is written with external data
  (:mod:`lobster_fx.onnx.large`);
* ONNX Runtime must reproduce torch on the example before the file is moved into place
  (:mod:`lobster_fx.onnx.parity`); failures are :class:`~lobster_fx.onnx.errors.ExportError`.

File sizes and runtimes measured on real models are in ``benchmarks/RESULTS.md``.

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.onnx import export_onnx
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

import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from lobster_fx.onnx.capture import _check_dynamic_batch, _torch_export
from lobster_fx.onnx.errors import ExportError, _first_line
from lobster_fx.onnx.inputs import _as_example, _flatten_outputs, _input_names, _run_example
from lobster_fx.onnx.large import _PROTOBUF_LIMIT, _proto_bytes, _write_external
from lobster_fx.onnx.parity import _ort_parity
from lobster_fx.onnx.sparsify import IndexDtype, InitializerInfo, _dense_infos, _iter_subgraphs, sparsify_initializers

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch

__all__ = ["ExportReport", "export_onnx"]


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


def _cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters, buffers and plain tensor attributes (constants a
    graph reads with get_attr) to ``dtype``, in place."""
    import torch

    model.to(dtype)  # parameters and buffers
    for mod in model.modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                setattr(mod, name, value.to(dtype))


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
    into weights (:func:`lobster_fx.passes.fold.fold`, a no-op without masks); remove dead units
    when ``slim`` (:func:`lobster_fx.passes.slim.slim`); export with ``torch.onnx``
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
    wrapper); the single passes :func:`lobster_fx.passes.slim.slim` and
    :func:`lobster_fx.passes.csr.to_sparse_csr` refuse a model with masks instead.
    An instrumented module nested inside another module, which ``fold`` does not
    reach, raises :class:`lobster_fx.passes.fold.MaskedModelError`.

    Precision. ``atol`` / ``rtol`` default to ``None``: both follow the exported
    model's dtype, :func:`lobster_fx.passes.slim.default_rtol` of the coarsest floating
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
        lobster_fx.passes.fold.MaskedModelError: an instrumented submodule that fold cannot reach.
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
    from lobster_fx.passes.slim import coarsest_float_dtype, default_rtol

    if export_dtype is None and any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers())):
        export_dtype = torch.float32  # ONNX Runtime (CPU) runs no bfloat16 Conv / Gemm / MatMul

    # ---- the caller's model is only run (in eval mode, restored after); every
    # transformation below works on a copy (fold and slim both copy)
    saved_modes = [(m, m.training) for m in model.modules()]
    notes: list[str] = []
    try:
        model.eval()
        reference = _flatten_outputs(_run_example(model, inputs))

        from lobster_fx.passes.fold import fold, require_folded

        work = fold(model)  # a copy; a no-op copy for a model without masks
        # fold folds the model itself (through DDP / compile wrappers), not an
        # instrumented module nested inside another: refuse that, as slim would
        require_folded(work, "export_onnx")
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
            from lobster_fx.passes.slim import slim as _slim

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
