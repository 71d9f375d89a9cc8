"""Moved to :mod:`lobster_fx.onnx` (issue 14): this module only re-exports its names."""

# temporary: removed when imports move (issue 14)
# ruff: noqa: F401
from lobster_fx.onnx.capture import _check_dynamic_batch, _release_onnxscript_matchers, _torch_export
from lobster_fx.onnx.errors import ExportError, _explain_export_failure, _first_line
from lobster_fx.onnx.export import ExportReport, _cast_floating, _strip_debug_info, export_onnx
from lobster_fx.onnx.inputs import (
    _as_example,
    _batched,
    _Example,
    _flatten_outputs,
    _input_names,
    _locate_failure,
    _match_inputs,
    _run_example,
)
from lobster_fx.onnx.large import _PROTOBUF_LIMIT, _proto_bytes, _tensor_bytes, _write_external, onnx_file_bytes
from lobster_fx.onnx.parity import DetectionParity, _ort_parity
from lobster_fx.onnx.sparsify import (
    IndexDtype,
    InitializerInfo,
    _dense_infos,
    _iter_subgraphs,
    _ort_accepts_index_dtype,
    sparsify_initializers,
)

__all__ = [
    "ExportError",
    "InitializerInfo",
    "ExportReport",
    "sparsify_initializers",
    "export_onnx",
    "onnx_file_bytes",
    "DetectionParity",
]
