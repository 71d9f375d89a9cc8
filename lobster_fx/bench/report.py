"""What :func:`lobster_fx.bench.benchmark` returns: per-model statistics and the report's tables.

:class:`LatencyStats` is one model at one batch size, :class:`ModelStats` one
model (size on disk, load time, memory, latencies), :class:`BenchReport` the
whole run with its ratios against the baseline, as JSON-ready data
(:meth:`BenchReport.to_dict`) or plain-text tables (:meth:`BenchReport.table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LatencyStats", "ModelStats", "BenchReport"]


@dataclass
class LatencyStats:
    """Latency of one model at one batch size, over all interleaved samples."""

    batch: int
    n: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch / (self.median_ms / 1e3) if self.median_ms > 0 else float("inf")

    @classmethod
    def from_samples(cls, batch: int, samples_ns: Sequence[int]) -> LatencyStats:
        import numpy as np

        a = np.asarray(samples_ns, dtype=np.float64) / 1e6
        return cls(batch, int(a.size), float(np.median(a)), float(np.percentile(a, 90)), float(a.mean()), float(a.min()))


@dataclass
class ModelStats:
    """One model: what was loaded, how long it took, and its memory.

    ``rss_before_load`` is the worker's resident memory after its imports,
    ``rss_after_load`` after the model is loaded, ``peak_rss`` the high-water
    mark (``VmHWM``) at the end of the run; all in bytes. ``file_bytes`` is the
    ONNX model's size on disk, external data included (for torch models: the
    ``torch.save`` pickle's size).
    """

    name: str
    kind: str  # "onnx" or "torch"
    path: str | None
    file_bytes: int
    load_s: float
    rss_before_load: int
    rss_after_load: int
    peak_rss: int
    providers: list[str]
    pid: int = 0  #: the worker process that loaded and ran it
    latency: dict[int, LatencyStats] = field(default_factory=dict)

    @property
    def load_rss_delta(self) -> int:
        """Memory the model itself added when loaded."""
        return self.rss_after_load - self.rss_before_load

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["load_rss_delta"] = self.load_rss_delta
        d["latency"] = {str(b): {**asdict(s), "throughput": s.throughput} for b, s in self.latency.items()}
        return d


@dataclass
class BenchReport:
    """Result of :func:`benchmark`; ratios are relative to ``baseline``."""

    baseline: str
    batch_sizes: list[int]
    providers: list[str]
    intra_op_threads: int
    rounds: int
    repeats: int
    warmup: int
    models: dict[str, ModelStats]

    def speedup(self, name: str, batch: int) -> float:
        """baseline median latency / ``name``'s median latency (>1: faster)."""
        return self.models[self.baseline].latency[batch].median_ms / self.models[name].latency[batch].median_ms

    def size_ratio(self, name: str) -> float:
        base = self.models[self.baseline].file_bytes
        return self.models[name].file_bytes / base if base else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "batch_sizes": list(self.batch_sizes),
            "providers": list(self.providers),
            "intra_op_threads": self.intra_op_threads,
            "rounds": self.rounds,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "models": {n: m.to_dict() for n, m in self.models.items()},
            "ratios": {
                n: {
                    "file_size": self.size_ratio(n),
                    "speedup": {str(b): self.speedup(n, b) for b in self.batch_sizes},
                }
                for n in self.models
            },
        }

    def table(self) -> str:
        """Plain-text tables: per model (size, load, memory), then latency per batch."""
        mib = 1024.0 * 1024.0
        names = list(self.models)
        w = max(8, *(len(n) for n in names))
        lines = [
            f"providers={','.join(self.providers)} threads={self.intra_op_threads} "
            f"rounds={self.rounds} repeats={self.repeats} baseline={self.baseline}",
            f"{'model':<{w}} {'kind':<5} {'file KiB':>10} {'size x':>7} {'load ms':>8} "
            f"{'RSS MiB':>8} {'+load MiB':>9} {'peak MiB':>9}",
        ]
        for n in names:
            m = self.models[n]
            lines.append(
                f"{n:<{w}} {m.kind:<5} {m.file_bytes / 1024:>10.1f} {self.size_ratio(n):>7.3f} "
                f"{m.load_s * 1e3:>8.1f} {m.rss_after_load / mib:>8.1f} {m.load_rss_delta / mib:>9.1f} "
                f"{m.peak_rss / mib:>9.1f}"
            )
        lines.append("")
        lines.append(
            f"{'model':<{w}} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'samples/s':>11} {'speedup':>8}"
        )
        for b in self.batch_sizes:
            for n in names:
                s = self.models[n].latency[b]
                lines.append(
                    f"{n:<{w}} {b:>5} {s.median_ms:>10.4f} {s.p90_ms:>9.4f} {s.throughput:>11.1f} "
                    f"{self.speedup(n, b):>7.2f}x"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

