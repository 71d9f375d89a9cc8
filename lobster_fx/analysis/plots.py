"""PNG plots of a :class:`~lobster_fx.analysis.psp.PSPReport` (matplotlib, imported when called).

* :func:`plot_histograms`: one histogram of ``H_j`` per layer.
* :func:`plot_heatmap`: the class-wise ``H_jc`` of one layer (units by classes; for a conv layer,
  each channel's mean over its positions, which is ours, not the paper's).
* :func:`plot_histograms_side_by_side`: several reports (e.g. gradual vs one-shot pruning) overlaid
  per layer.

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.analysis import psp_entropy
    >>> rep = psp_entropy(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.randn(8, 3), torch.arange(8) % 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "h.png")
    >>> plot_histograms(rep, path)
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Union

if TYPE_CHECKING:
    from lobster_fx.analysis.psp import PSPReport

__all__ = ["plot_histograms", "plot_heatmap", "plot_histograms_side_by_side"]

#: a file name, or a binary file object (written as PNG whatever its name)
Target = Union[str, "os.PathLike[str]", IO[bytes]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_histograms(report: PSPReport, path: Target, *, bins: int = 50, title: str | None = None) -> None:
    """One histogram of ``H_j`` (bits, 0 to C) per layer, in a grid, written to ``path``."""
    plot_histograms_side_by_side({"": report}, path, bins=bins, title=title)


def plot_histograms_side_by_side(reports: Mapping[str, PSPReport], path: Target, *, bins: int = 50,
                                 title: str | None = None) -> None:
    """Per layer, the ``H_j`` histograms of several reports overlaid (layers of the first report;
    the others must have the same class count). Each histogram is normalised to its unit count."""
    if not reports:
        raise ValueError("plot_histograms_side_by_side: no report given")
    first = next(iter(reports.values()))
    c = first.num_classes
    for label, rep in reports.items():
        if rep.num_classes != c:
            raise ValueError(f"plot_histograms_side_by_side: report {label!r} has {rep.num_classes} classes, "
                             f"the first {c}")
    layers = list(first.entropy)
    plt = _plt()
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    edges = [c * i / bins for i in range(bins + 1)]
    for ax, layer in zip(axes.flat, layers):
        for label, rep in reports.items():
            if layer not in rep.entropy:
                continue
            h = rep.entropy[layer].flatten().float().numpy()
            mean = float(h.mean())
            ax.hist(h, bins=edges, weights=[1.0 / len(h)] * len(h), histtype="stepfilled" if len(reports) == 1
                    else "step", linewidth=1.3, alpha=0.8 if len(reports) == 1 else 1.0,
                    label=f"{label + ': ' if label else ''}mean {mean:.2f}")
        ax.set_title(f"{layer} ({first.kinds[layer]}, {first.entropy[layer].numel():,} units)", fontsize=9)
        ax.set_xlim(0, c)
        ax.set_xlabel("H_j (bits)", fontsize=8)
        ax.set_ylabel("share of units", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"PSP-entropy per unit ({first.samples:,} samples, {c} classes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_heatmap(report: PSPReport, name: str, path: Target, *, max_rows: int = 512) -> None:
    """The class-wise ``H_jc`` of layer ``name`` as an image (rows: units, columns: classes).

    Conv layers show each output channel's mean ``H_jc`` over its positions (ours). Rows are
    sorted by ``H_j``; beyond ``max_rows`` rows, evenly spaced ones are shown (the title says so).

    Raises:
        KeyError: ``name`` is not a layer of the report (the message lists them).
    """
    if name not in report.classwise:
        raise KeyError(f"plot_heatmap: no layer {name!r} in the report (layers: {list(report.classwise)})")
    hc = report.classwise[name]
    if report.kinds[name] == "conv" and hc.dim() > 2:
        hc = hc.flatten(1, -2).mean(1)  # (channels, C): per-channel means, ours
        what = "channels (mean over positions, ours)"
    else:
        hc = hc.reshape(-1, hc.shape[-1])
        what = "units"
    order = hc.sum(1).argsort()
    hc = hc[order]
    n = hc.shape[0]
    shown = n
    if n > max_rows:
        idx = [round(i * (n - 1) / (max_rows - 1)) for i in range(max_rows)]
        hc = hc[idx]
        shown = max_rows
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * hc.shape[1], 4.5))
    im = ax.imshow(hc.float().numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("class")
    ax.set_ylabel(f"{what}, sorted by H_j" + (f" ({shown} of {n})" if shown < n else ""), fontsize=8)
    ax.set_xticks(range(hc.shape[1]))
    ax.set_title(f"{name}: H_jc (bits)", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
