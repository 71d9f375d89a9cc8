"""Models past protobuf's 2 GB limit: their size, and external data.

An ONNX file is one protobuf message, and protobuf can neither serialise nor measure a
message over 2 GB. :func:`_proto_bytes` measures a model proto of any size from its parts;
:func:`_write_external` saves a model as the ``.onnx`` file plus one ``.onnx.data`` file
beside it (the layout ONNX Runtime loads); :func:`onnx_file_bytes` counts both on disk.

Example::

    >>> import os, tempfile, numpy as np, onnx
    >>> from onnx import helper, numpy_helper
    >>> from lobster_fx.onnx.large import _proto_bytes, onnx_file_bytes
    >>> w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
    ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])], initializer=[w])
    >>> m = helper.make_model(g)
    >>> _proto_bytes(m) == m.ByteSize()
    True
    >>> path = os.path.join(tempfile.mkdtemp(), "w.onnx")
    >>> onnx.save_model(m, path, save_as_external_data=True, location="w.onnx.data")
    >>> onnx_file_bytes(path) == os.path.getsize(path) + 64 * 64 * 4
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from lobster_fx.onnx.errors import ExportError, _first_line

__all__ = ["onnx_file_bytes"]


#: the largest ONNX proto that fits in one file (protobuf's 2 GB message limit)
_PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF


def _tensor_bytes(t: onnx.TensorProto | onnx.SparseTensorProto) -> int:
    """``t.ByteSize()``, or for a tensor over protobuf's 2 GB limit (where it raises) its
    payload plus a generous allowance for the name and dims."""
    try:
        return t.ByteSize()
    except Exception:  # noqa: BLE001 - google.protobuf EncodeError
        if isinstance(t, onnx.SparseTensorProto):
            return _tensor_bytes(t.values) + _tensor_bytes(t.indices) + 16 * len(t.dims) + 16
        return len(t.raw_data) + 16 * len(t.dims) + len(t.name) + 16


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
        >>> from lobster_fx.onnx import export_onnx
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
