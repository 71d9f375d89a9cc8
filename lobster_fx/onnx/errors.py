"""Errors of the ONNX export: :class:`ExportError`, and a ``torch.onnx`` failure said in one sentence.

``torch.onnx`` fails deep inside ``torch.export`` or onnxscript, with long, colour-coded
messages wrapped in several exceptions. :func:`_explain_export_failure` reads the whole
exception chain and names the cause: the operator that has no ONNX translation
(``ExportError.op``), or the call ``torch.export`` could not capture.

Example::

    >>> from lobster_fx.onnx.errors import ExportError, _explain_export_failure
    >>> cause = RuntimeError("No ONNX function found for <OpOverload(op='aten.kthvalue', overload='default')>")
    >>> err = _explain_export_failure(cause, "dynamo")
    >>> isinstance(err, ExportError), err.op
    (True, 'aten.kthvalue.default')
"""

from __future__ import annotations

import re

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """``torch.onnx`` could not export the model, or the result failed a check.

    ``op`` names the operator that has no ONNX translation when that is the
    cause (e.g. ``"aten.kthvalue.default"``), else ``None``.
    """

    def __init__(self, message: str, *, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


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
