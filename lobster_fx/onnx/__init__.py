"""ONNX export: a (masked, pruned) model to one self-contained, compressed ONNX file.

One module per concern: :mod:`~lobster_fx.onnx.export` (:func:`export_onnx`, the
pipeline, and :class:`ExportReport`), :mod:`~lobster_fx.onnx.inputs` (example inputs
and their checks), :mod:`~lobster_fx.onnx.capture` (``torch.onnx`` into memory),
:mod:`~lobster_fx.onnx.sparsify` (sparse initializers), :mod:`~lobster_fx.onnx.large`
(protobuf's 2 GB limit, external data), :mod:`~lobster_fx.onnx.parity` (ONNX Runtime
vs torch) and :mod:`~lobster_fx.onnx.errors` (:class:`ExportError`).

Importing this package imports ``onnx``; ``import lobster_fx`` alone does not need it.

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.onnx import export_onnx
    >>> r = export_onnx(torch.nn.Linear(8, 2), torch.randn(1, 8), os.path.join(tempfile.mkdtemp(), "l.onnx"))
    >>> r.parity_max_abs_diff < 1e-5
    True
"""

from __future__ import annotations

from lobster_fx.onnx.errors import ExportError
from lobster_fx.onnx.export import ExportReport, export_onnx
from lobster_fx.onnx.large import onnx_file_bytes
from lobster_fx.onnx.parity import DetectionParity
from lobster_fx.onnx.sparsify import IndexDtype, InitializerInfo, sparsify_initializers

__all__ = [
    "ExportError",
    "InitializerInfo",
    "ExportReport",
    "IndexDtype",
    "sparsify_initializers",
    "export_onnx",
    "onnx_file_bytes",
    "DetectionParity",
]
