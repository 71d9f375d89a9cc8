"""ONNX export: a (masked, pruned) model to one self-contained, compressed ONNX file."""

from __future__ import annotations

from lobster_fx.onnx.export import (
    DetectionParity,
    ExportError,
    ExportReport,
    InitializerInfo,
    export_onnx,
    onnx_file_bytes,
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
