"""PSP-entropy: how much each unit's on/off state depends on the class (Tartaglione et al.).

For every Linear / Conv output ``z`` (the post-synaptic potential, before any activation), every
unit ``j`` (a Linear output feature; every ``(channel, h, w)`` position of a conv output; in
general every element of ``z`` without its batch dimension) and every class ``c`` with ``M_c``
samples::

    p = clamp(#{x in c: z_j(x) > 0} / M_c, 1e-4, 0.9999)
    q = clamp(#{x in c: z_j(x) <= 0} / M_c, 1e-4, 0.9999)
    H_jc = -p log2 p - q log2 q            (0 to 1 bit)
    H_j  = sum_c H_jc                      (0 to C bits)

``H_jc`` at its floor (``H(1e-4)``, about 0.0015 bit) means the unit's state is fixed within
class ``c``. The counts are exact integers per class, gathered in one pass over the data for
all layers at once (the authors' code repeats the pass once per layer), through the unit taps of
:mod:`lobster_fx.graph.taps`; memory is ``O(units x classes)`` besides one batch.

It works on plain models and on instrumented, folded and slimmed ones (all are measured on an
instrumented deep copy; the model given is not modified). Layers are keyed by their name in the
original model (``"conv1"``, ``"features.0"``), the same for all four forms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PSPReport", "psp_entropy", "P_MIN", "P_MAX", "binary_entropy"]

P_MIN, P_MAX = 1e-4, 0.9999  #: the clamp of ``p`` and ``q`` (the paper's)


def binary_entropy(p: Tensor) -> Tensor:
    """``-p log2 p - (1-p) log2 (1-p)`` with ``p`` and ``1-p`` clamped to ``[1e-4, 0.9999]``.

        >>> binary_entropy(torch.tensor([0.5, 0.0, 1.0])).tolist()[0]
        1.0
    """
    q = (1 - p).clamp(P_MIN, P_MAX)
    p = p.clamp(P_MIN, P_MAX)
    return -p * torch.log2(p) - q * torch.log2(q)


#: ``H_jc`` of a unit whose state never changes within a class
H_FLOOR = float(binary_entropy(torch.tensor(0.0, dtype=torch.float64)))


@dataclass
class PSPReport:
    """The result of :func:`psp_entropy`; every tensor is on the CPU, keyed by layer name.

    * ``counts[name]``: int64, ``z``'s shape without the batch dim, plus a trailing class dim:
      how many samples of each class had ``z_j > 0`` (exact).
    * ``class_counts``: int64 ``(C,)``, ``M_c``.
    * ``entropy[name]``: float64, ``H_j`` (bits), ``z``'s shape without the batch dim.
    * ``classwise[name]``: float64, ``H_jc``, the same plus a trailing class dim.
    * ``dead_on_data[name]``: bool, units never active (``z_j <= 0`` for every sample).
    * ``kinds[name]``: ``"linear"`` or ``"conv"``; ``skipped``: layers that never ran, with why.
    """

    counts: dict[str, Tensor]
    class_counts: Tensor
    kinds: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)
    entropy: dict[str, Tensor] = field(init=False)
    classwise: dict[str, Tensor] = field(init=False)
    dead_on_data: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        m = self.class_counts.double()
        self.classwise = {k: binary_entropy(c.double() / m) for k, c in self.counts.items()}
        self.entropy = {k: h.sum(-1) for k, h in self.classwise.items()}
        self.dead_on_data = {k: c.sum(-1) == 0 for k, c in self.counts.items()}

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    @property
    def samples(self) -> int:
        return int(self.class_counts.sum())

    def class_determined(self, name: str) -> Tensor:
        """Bool per unit: its state is fixed within every class (all samples of a class agree)
        and differs between classes, i.e. the class alone decides whether the unit fires."""
        c = self.counts[name]
        fixed = ((c == 0) | (c == self.class_counts)).all(-1)
        constant = (c.sum(-1) == 0) | (c.sum(-1) == self.samples)
        return fixed & ~constant

    def channel_summary(self) -> dict[str, Tensor]:
        """Per conv layer, the mean ``H_j`` over each output channel's positions ``(C_out,)``.

        Ours, not the paper's (which reports per unit): a per-filter view for conv layers."""
        return {k: h.flatten(1).mean(1) if h.dim() > 1 else h.clone()
                for k, h in self.entropy.items() if self.kinds[k] == "conv"}

    def layer_stats(self, name: str) -> dict[str, Any]:
        """Units, mean / quartiles of ``H_j``, class-determined share and dead units of one layer."""
        h = self.entropy[name].flatten()
        q1, med, q3 = torch.quantile(h, torch.tensor([0.25, 0.5, 0.75], dtype=h.dtype)).tolist()
        return {"kind": self.kinds[name], "shape": list(self.entropy[name].shape), "units": h.numel(),
                "mean": float(h.mean()), "q1": q1, "median": med, "q3": q3,
                "class_determined": float(self.class_determined(name).double().mean()),
                "dead_on_data": int(self.dead_on_data[name].sum())}

    def table(self) -> str:
        """A per-layer text table: units, mean and median ``H_j``, share of class-determined units,
        units dead on the data."""
        head = ("layer", "kind", "units", "mean H", "median H", "class-det. %", "dead on data")
        rows = []
        for name in self.entropy:
            s = self.layer_stats(name)
            rows.append((name, s["kind"], f"{s['units']:,}", f"{s['mean']:.3f}", f"{s['median']:.3f}",
                         f"{100 * s['class_determined']:.1f}", f"{s['dead_on_data']:,}"))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [f"PSP-entropy over {self.samples:,} samples, {self.num_classes} classes "
                 f"(H_j in bits, 0 to {self.num_classes})", fmt.format(*head)]
        lines += [fmt.format(*r) for r in rows]
        if self.channel_summary():
            lines.append("per-channel means of conv layers (ours, not in the paper): report.channel_summary()")
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)

    def to_dict(self, *, per_unit: bool = True) -> dict[str, Any]:
        """JSON-ready: per-layer statistics; with ``per_unit``, each unit's ``H_j`` and the exact
        per-class counts (from which ``H_jc`` follows), flattened in ``shape``'s order."""
        layers: dict[str, Any] = {}
        channel = self.channel_summary()
        for name in self.entropy:
            d = self.layer_stats(name)
            if name in channel:
                d["channel_mean_entropy"] = channel[name].tolist()  # ours, not the paper's
            if per_unit:
                d["entropy"] = self.entropy[name].flatten().tolist()
                d["counts"] = self.counts[name].flatten(0, -2).tolist() if self.counts[name].dim() > 1 else []
            layers[name] = d
        return {"samples": self.samples, "num_classes": self.num_classes,
                "class_counts": self.class_counts.tolist(), "clamp": [P_MIN, P_MAX], "layers": layers,
                "skipped": dict(self.skipped),
                "notes": {"channel_mean_entropy": "conv layers: mean H_j over each channel's positions "
                                                  "(ours, not in the paper)",
                          "class_determined": "share of units fixed within every class and not constant",
                          "counts": "per unit (flattened), samples of each class with z > 0"}}

    def plot_histograms(self, path: Any, *, bins: int = 50) -> None:
        """PNG: one histogram of ``H_j`` per layer (matplotlib, imported here)."""
        from lobster_fx.analysis.plots import plot_histograms

        plot_histograms(self, path, bins=bins)

    def plot_heatmap(self, name: str, path: Any, *, max_rows: int = 512) -> None:
        """PNG: the class-wise ``H_jc`` of layer ``name`` (units, or conv channels, by classes)."""
        from lobster_fx.analysis.plots import plot_heatmap

        plot_heatmap(self, name, path, max_rows=max_rows)


# --- the measurement -------------------------------------------------------------------------


def _labels(y: Any, where: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"psp_entropy: {where} must be a tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"psp_entropy: {where} must be a 1-D integer tensor of class indices, "
                         f"got shape {tuple(y.shape)} dtype {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"psp_entropy: {where} holds a negative class index {int(y.min())}")
    return y


def _batches(inputs: Any, labels: Any, batch_size: int) -> Iterable[tuple[Any, Tensor]]:
    if isinstance(inputs, Tensor):
        y = _labels(labels, "labels")
        if inputs.dim() == 0 or inputs.shape[0] != y.shape[0]:
            raise ValueError(f"psp_entropy: labels do not match inputs: {y.shape[0]} labels for "
                             f"{inputs.shape[0] if inputs.dim() else 'a 0-d'} input(s) (shape {tuple(inputs.shape)})")
        return ((inputs[i:i + batch_size], y[i:i + batch_size]) for i in range(0, y.shape[0], batch_size))
    if labels is not None:
        raise TypeError(f"psp_entropy: labels go with a tensor of inputs; with {type(inputs).__name__} "
                        "(an iterable of (x, y) batches, e.g. a DataLoader) pass labels=None")
    if not isinstance(inputs, Iterable):
        raise TypeError(f"psp_entropy: inputs must be a tensor or an iterable of (x, y) batches (a DataLoader), "
                        f"got {type(inputs).__name__}")

    def gen():
        for i, batch in enumerate(inputs):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"psp_entropy: batch {i} of the data is not an (x, y) pair "
                                 f"({type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''})")
            x, y = batch
            y = _labels(y, f"the labels of batch {i}")
            if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != y.shape[0]:
                n = x.shape[0] if isinstance(x, Tensor) and x.dim() else type(x).__name__
                raise ValueError(f"psp_entropy: labels do not match inputs in batch {i}: {y.shape[0]} labels "
                                 f"for {n} input(s)")
            yield x, y
    return gen()


def _tapped_copy(model: nn.Module):
    """An instrumented deep copy of ``model`` (any of its four forms) in eval mode, with unit taps."""
    from lobster_fx.graph.instrument import instrument, unwrap
    from lobster_fx.graph.taps import install_taps

    root = unwrap(model)
    instrumented = isinstance(root, torch.fx.GraphModule) and "lobster" in getattr(root, "meta", {})
    gm = copy.deepcopy(root)
    try:
        if not instrumented:
            for p in gm.parameters():  # instrument masks only trainable weights; a frozen model is measured too
                p.requires_grad_(True)
            gm = instrument(gm)
        gm.eval()
        taps = install_taps(gm)
    except ValueError as exc:
        text = str(exc)
        if "no prunable parameters" in text or "no Linear / Conv layer" in text:
            raise ValueError(f"psp_entropy: the model ({type(root).__name__}) has no Linear / Conv layer in a "
                             f"traced graph: PSP-entropy is measured on their outputs ({text.splitlines()[0]})") from exc
        raise
    return gm, taps


def psp_entropy(model: nn.Module, inputs: Tensor | Iterable, labels: Tensor | None = None, *,
                batch_size: int = 1000, num_classes: int | None = None) -> PSPReport:
    """PSP-entropy of every Linear / Conv unit of ``model`` on labelled data (see the module doc).

    Args:
        model: a plain ``nn.Module``, or one made by :func:`lobster_fx.instrument`, ``fold`` or
            ``slim`` (wrappers looked through). Not modified: it is measured on a deep copy in
            eval mode under ``torch.no_grad()``.
        inputs: a tensor of inputs (first dim = samples), or an iterable of ``(x, y)`` batches
            (a ``DataLoader``) with ``labels=None``.
        labels: class indices ``0..C-1``, one per input (with a tensor of inputs).
        batch_size: samples per forward (a tensor of inputs only).
        num_classes: ``C``; default the largest label + 1. Every class needs a sample.

    Returns:
        A :class:`PSPReport` keyed by the layers' names in the original model.

    Raises:
        ValueError: labels that do not match the inputs, a class with no sample (named), no data,
            a model without Linear / Conv layers, a layer run more than once per forward.
        TypeError: inputs or labels of the wrong type.

    Example (two units: one always on, one on for class 1 only)::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[0.0], [1.0]])), model[0].bias.copy_(torch.tensor([1.0, 0.0]))
        >>> x, y = torch.tensor([[-1.0], [-2.0], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1])
        >>> rep = psp_entropy(model, x, y)
        >>> rep.counts["0"].tolist()  # samples with z > 0, per unit and class
        [[2, 2], [0, 2]]
        >>> [round(h, 4) for h in rep.entropy["0"].tolist()]  # both states fixed by the class
        [0.0029, 0.0029]
        >>> rep.dead_on_data["0"].tolist(), rep.class_determined("0").tolist()
        ([False, False], [False, True])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"psp_entropy: batch_size must be a positive int, got {batch_size!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"psp_entropy: num_classes must be a positive int or None, got {num_classes!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"psp_entropy: model must be a torch.nn.Module, got {type(model).__name__}")
    data = _batches(inputs, labels, batch_size)
    gm, taps = _tapped_copy(model)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    counts: dict[str, Tensor] = {}  # name -> (C, units) int64 on the model's device
    shapes: dict[str, tuple[int, ...]] = {}
    state = {"y": None, "seen": set(), "classes": num_classes or 0}

    def listener(name: str):
        def record(z: Tensor, tap) -> None:
            y = state["y"]
            if name in state["seen"]:
                raise ValueError(f"psp_entropy: layer {name!r} ran twice in one forward: its units have more "
                                 "than one output per sample")
            state["seen"].add(name)
            if z.dim() == 0 or z.shape[0] != y.shape[0]:
                raise ValueError(f"psp_entropy: layer {name!r}'s output {tuple(z.shape)} has no batch dimension "
                                 f"of {y.shape[0]} samples first")
            if shapes.setdefault(name, tuple(z.shape[1:])) != tuple(z.shape[1:]):
                raise ValueError(f"psp_entropy: layer {name!r}'s output shape changed between batches: "
                                 f"{shapes[name]} then {tuple(z.shape[1:])}")
            active = (z.detach().reshape(z.shape[0], -1) > 0)
            # float32 sums of 0/1 are exact below 2**24 terms (one batch's samples)
            dtype = torch.float32 if y.shape[0] < 2 ** 24 else torch.float64
            onehot = torch.nn.functional.one_hot(y, state["classes"]).to(dtype)
            per_class = (onehot.T @ active.to(dtype)).round().long()
            old = counts.get(name)
            if old is not None and old.shape[0] < per_class.shape[0]:  # a larger label appeared
                old = torch.cat([old, old.new_zeros(per_class.shape[0] - old.shape[0], old.shape[1])])
            counts[name] = per_class if old is None else old + per_class
        return record

    handles = [tap.on_output(listener(name)) for name, tap in taps.items()]
    class_counts = torch.zeros(0, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            for x, y in data:
                if y.numel() == 0:
                    continue
                top = int(y.max())
                if num_classes is not None and top >= num_classes:
                    raise ValueError(f"psp_entropy: label {top} is out of range for num_classes={num_classes}")
                state["classes"] = max(state["classes"], top + 1)
                y = y.to(device)
                state["y"], state["seen"] = y, set()
                gm(x.to(device) if isinstance(x, Tensor) else x)
                class_counts = torch.cat([class_counts, class_counts.new_zeros(state["classes"] - len(class_counts))])
                class_counts += torch.bincount(y, minlength=state["classes"])
    finally:
        for h in handles:
            h.remove()
    if class_counts.numel() == 0 or int(class_counts.sum()) == 0:
        raise ValueError("psp_entropy: no data (no labelled sample)")
    empty = (class_counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"psp_entropy: class(es) {empty} have no sample among the {int(class_counts.sum())} given "
                         f"({state['classes']} classes): p = count / M_c is undefined for them; pass data with "
                         "every class, or num_classes / labels renumbered to the classes present")
    c = state["classes"]
    out: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for name in taps:
        if name not in counts:
            skipped[name] = "did not run on this data (a branch not taken)"
            continue
        k = counts[name]
        k = torch.cat([k, k.new_zeros(c - k.shape[0], k.shape[1])]) if k.shape[0] < c else k
        out[name] = k.T.reshape(*shapes[name], c).cpu()
    if not out:
        raise ValueError(f"psp_entropy: no Linear / Conv layer ran on the data (layers: {sorted(taps)})")
    kinds = {name: taps[name].unit.kind for name in out}
    return PSPReport(out, class_counts.cpu(), kinds, skipped)
