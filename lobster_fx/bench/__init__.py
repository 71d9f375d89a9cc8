"""Side-by-side inference benchmark: ONNX Runtime files (and torch modules).

Design (each point answers a pitfall measured on this kind of machine):

* **One fresh process per model.** Each model is loaded by its own persistent
  worker process, so load time, resident memory after load (``VmRSS``) and
  peak memory (``VmHWM``) belong to that model alone. ONNX workers never import
  torch (the worker runs ``bench/worker.py`` by path, not through the
  ``lobster_fx`` package).
* **Interleaved timing.** The parent sends one timing request at a time,
  round-robin over the models (rotating the start each round), for several
  rounds; median and p90 are over all samples. Slow drifts of a shared machine
  (thermal, neighbours) then hit every model alike. Idle workers block on their
  pipe and use no CPU.
* **Fair threads.** ``intra_op_num_threads`` (default 1),
  ``inter_op_num_threads=1``, ``ORT_ENABLE_ALL``, no spinning; torch workers
  get ``torch.set_num_threads`` to the same value.
* **Providers are checked.** ONNX Runtime silently falls back to CPU when
  ``CUDAExecutionProvider`` is missing; here that is a RuntimeError.

Modules: :mod:`~lobster_fx.bench.run` (:func:`benchmark`, the parent side, the
``python -m lobster_fx.bench`` command), :mod:`~lobster_fx.bench.worker` (the
worker process), :mod:`~lobster_fx.bench.transport` (torch modules to the
worker), :mod:`~lobster_fx.bench.report` (the result types and tables).

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.bench import benchmark
    >>> from lobster_fx.onnx.export import export_onnx
    >>> d = tempfile.mkdtemp()
    >>> for name, hidden in (("wide", 64), ("slim", 8)):
    ...     m = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    ...     _ = export_onnx(m, torch.randn(2, 16), os.path.join(d, name + ".onnx"), slim=False)
    >>> rep = benchmark({n: os.path.join(d, n + ".onnx") for n in ("wide", "slim")},
    ...                 batch_sizes=(1, 4), repeats=5, warmup=2, rounds=2)
    >>> rep.models["slim"].latency[4].median_ms > 0
    True
    >>> print(rep.table())  # doctest: +SKIP
"""

from __future__ import annotations

from lobster_fx.bench.report import BenchReport, LatencyStats, ModelStats
from lobster_fx.bench.run import benchmark

__all__ = ["LatencyStats", "ModelStats", "BenchReport", "benchmark"]
