"""Report stage: per-layer sparsity and the compression ratio, as in the paper's tables.

Works on an instrumented module (counts the *effective* weights ``w * mask``)
and on any plain or folded module (counts the parameters that
:func:`lobster_fx.default_filter` calls prunable).

Example::

    >>> import torch, lobster_fx
    >>> gm = lobster_fx.instrument(torch.nn.Linear(10, 10))
    >>> with torch.no_grad():
    ...     _ = lobster_fx.masks(gm)["weight"].zero_()
    >>> rep = lobster_fx.sparsity_report(gm)
    >>> rep.nonzero, rep.total
    (10, 110)
    >>> round(rep.compression_ratio, 1)
    11.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lobster_fx.graph.instrument import default_filter, lobster_info, masked_parameters, unwrap

__all__ = ["sparsity_report", "SparsityReport", "LayerSparsity"]


@dataclass
class LayerSparsity:
    name: str  #: the layer (owning module) name in the original model
    numel: int
    nonzero: int

    @property
    def remaining_pct(self) -> float:
        return 100.0 * self.nonzero / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(layer.nonzero for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """``|theta| / |theta != 0|`` over the prunable parameters (inf if all zero)."""
        return self.total / self.nonzero if self.nonzero else float("inf")

    def to_dict(self) -> dict:
        return {
            "layers": [{**asdict(layer), "remaining_pct": layer.remaining_pct} for layer in self.layers],
            "total": self.total,
            "nonzero": self.nonzero,
            "compression_ratio": self.compression_ratio,
        }

    def table(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        rows = [f"{'layer':{width}s} {'params':>10s} {'non-zero':>10s} {'remaining %':>12s}"]
        for layer in self.layers:
            rows.append(f"{layer.name:{width}s} {layer.numel:10d} {layer.nonzero:10d} {layer.remaining_pct:12.2f}")
        rows.append(
            f"{'total':{width}s} {self.total:10d} {self.nonzero:10d} {100.0 * self.nonzero / max(self.total, 1):12.2f}"
        )
        rows.append(f"compression ratio |theta|/|theta!=0| = {self.compression_ratio:.2f}x")
        return "\n".join(rows)

    __str__ = table


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer parameter counts, non-zeros and remaining %, and the compression ratio."""
    model = unwrap(model)
    counts: dict[str, list[int]] = {}
    try:
        lobster_info(model)
        instrumented = True
    except TypeError:
        instrumented = False
    if instrumented:
        for info, p, mask in masked_parameters(model):
            c = counts.setdefault(info.owner or "<root>", [0, 0])
            c[0] += p.numel()
            c[1] += int(torch.count_nonzero(p * mask))
    else:
        modules = dict(model.named_modules())
        # a folded (or slimmed) model knows which of its parameters were prunable; a
        # GraphModule's weight holders are plain Modules, which default_filter cannot tell
        folded = getattr(model, "meta", None) or {}
        folded_paths = set(folded.get("lobster_folded", {}).get("param_paths", {}).values()) or None
        for fqn, p in model.named_parameters():
            owner = fqn.rpartition(".")[0]
            if folded_paths is not None:
                if fqn not in folded_paths:
                    continue
            elif not default_filter(modules[owner], fqn):
                continue
            c = counts.setdefault(owner or "<root>", [0, 0])
            c[0] += p.numel()
            c[1] += int(torch.count_nonzero(p))
    return SparsityReport([LayerSparsity(name, n, nz) for name, (n, nz) in counts.items()])


def plot_layers(report: SparsityReport, path: str, title: str = "remaining parameters per layer") -> None:
    """PNG bar chart of each layer's remaining percentage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(report.layers) + 2), 3.5))
    ax.bar([layer.name for layer in report.layers], [layer.remaining_pct for layer in report.layers])
    ax.set_ylabel("remaining %")
    ax.set_title(f"{title} ({report.compression_ratio:.1f}x)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(log: list[dict], path: str, title: str = "LOBSTER training") -> None:
    """PNG of compression ratio and test error over epochs, from a training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in log]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, [e["compression"] for e in log], color="tab:blue")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("compression (x)", color="tab:blue")
    ax1.set_yscale("log")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [e["test_error"] for e in log], color="tab:red")
    ax2.set_ylabel("test error (%)", color="tab:red")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
