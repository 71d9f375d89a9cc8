"""The model to an ONNX proto in memory, through ``torch.onnx``.

``torch.onnx.export(dynamo=True)`` (torch's default exporter) is called
with ``f=None``: the ONNX model is built in memory, so no ``.onnx.data`` side file is ever
written, and its optimiser folds BatchNorm into Conv. Traced GraphModules export fine
through it. ``exporter="torchscript"`` (deprecated in torch) traces instead, for code
``torch.export`` cannot capture. Failures come back as an
:class:`~lobster_fx.onnx.errors.ExportError` that names the cause.

Example::

    >>> import torch
    >>> from lobster_fx.onnx.capture import _torch_export
    >>> from lobster_fx.onnx.inputs import _as_example
    >>> proto = _torch_export(torch.nn.Linear(4, 2), _as_example(torch.zeros(3, 4), None),
    ...                       dynamic_batch=True, opset=None, exporter="dynamo")
    >>> [(i.name, i.type.tensor_type.shape.dim[0].dim_param) for i in proto.graph.input]
    [('input', 'batch')]
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from typing import Any

import onnx

from lobster_fx.onnx.errors import ExportError, _explain_export_failure
from lobster_fx.onnx.inputs import _batched, _Example, _flatten_outputs, _input_names, _match_inputs


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
    except ImportError:  # kept: private modules of onnxscript, which a release may rename or drop
        return
    try:
        for obj in gc.get_objects():
            if isinstance(obj, _matcher.SimplePatternMatcher) and getattr(obj, "_graph", None) is not None:
                obj._graph = None
                obj._current_node = None
                obj._match = _basics.MatchResult()  # what the matcher sets before every match
    except Exception:  # noqa: BLE001 - best effort: a memory optimisation only
        return


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
