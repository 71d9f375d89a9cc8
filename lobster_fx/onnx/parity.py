"""Parity: does ONNX Runtime reproduce torch on the example?

:func:`_ort_parity` runs the written file in ONNX Runtime's CPU provider and compares
each output with torch's, relative to the output's scale
(``max|ort - torch| <= atol + rtol * max|torch|``): float kernels err in proportion to
the magnitudes they sum, not to each output entry. Where elementwise parity cannot hold
(detectors, whose output count is data-dependent), :class:`DetectionParity` matches
detections instead.

Example::

    >>> import os, tempfile, onnx, torch
    >>> from onnx import helper
    >>> from lobster_fx.onnx.parity import _ort_parity
    >>> x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    >>> y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
    ...                       opset_imports=[helper.make_opsetid("", 17)])
    >>> m.ir_version = 8  # what every supported ONNX Runtime reads
    >>> path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
    >>> onnx.save(m, path)
    >>> _ort_parity(path, [("x", torch.tensor([-1.0, 2.0]))], [torch.tensor([0.0, 2.0])], atol=1e-5, rtol=1e-5)
    0.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lobster_fx.onnx.errors import ExportError, _first_line
from lobster_fx.onnx.inputs import _match_inputs

__all__ = ["DetectionParity"]


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
    float-level differences (the detectors of the coverage sweep in ``benchmarks/RESULTS.md``
    keep different numbers of boxes in ONNX Runtime and torch), so elementwise parity
    cannot hold. This matches detections instead: each torch detection (by descending
    score) to the unmatched ONNX Runtime detection of the same label with the highest
    IoU; a pair matches when IoU >= ``min_iou`` and the scores (and any further
    per-detection outputs) agree within ``atol + rtol * scale``. Passes when matched
    pairs are at least ``min_matched`` of the larger count in every image. Pass it as
    ``export_onnx(..., parity_fn=DetectionParity())``; ``.last`` holds the per-image
    counts of the last check.

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
