"""Side-by-side inference benchmark: ONNX Runtime files (and torch modules).

The parent side: :func:`benchmark` checks its arguments and the ONNX files,
starts one :class:`_Worker` process per model (:mod:`lobster_fx.bench.worker`,
booted by path), times them interleaved and builds the
:class:`~lobster_fx.bench.report.BenchReport`; :func:`_cli` is
``python -m lobster_fx.bench``. Design notes: :mod:`lobster_fx.bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lobster_fx.bench import worker as _worker_module
from lobster_fx.bench.report import BenchReport, LatencyStats, ModelStats
from lobster_fx.bench.transport import _file_sha256, _save_torch_model
from lobster_fx.bench.worker import _WORKER_BOOT

if TYPE_CHECKING:  # torch is only needed for torch_models
    from torch import nn

__all__ = ["benchmark"]

#: the worker file, run by path (see :mod:`lobster_fx.bench.worker`)
_WORKER_PATH = str(Path(_worker_module.__file__).resolve())


class _Worker:
    """A persistent worker process holding one model."""

    def __init__(self, name: str, cfg: dict[str, Any]) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        # belt and braces: thread pools of numpy/MKL/OpenMP in the worker
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(cfg["intra_op_threads"])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, _WORKER_PATH],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
        )
        try:
            self.hello = self.request(cfg)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            raise

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-2000:]
        except Exception:  # noqa: BLE001
            return ""

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(
                f"benchmark worker for {self.name!r} died (exit code {self.proc.returncode}): {self._stderr_tail()}"
            )
        resp = json.loads(line)
        if not resp.get("ok"):
            raise RuntimeError(f"benchmark worker for {self.name!r}: {resp.get('error')}")
        return resp

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"cmd": "quit"})
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - make sure it is gone
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _onnx_input_specs(path: str) -> list[dict[str, Any]]:
    """Input shapes (without batch) and dtypes from an ONNX file's graph inputs."""
    import onnx
    from onnx import helper

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer} | {s.values.name for s in m.graph.sparse_initializer}
    specs = []
    for gi in m.graph.input:
        if gi.name in inits:
            continue
        tt = gi.type.tensor_type
        dims = list(tt.shape.dim)[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise ValueError(
                f"{path}: input {gi.name!r} has non-batch dimensions that are not fixed; pass input_shape"
            )
        specs.append({
            "shape": [int(d.dim_value) for d in dims],
            "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
        })
    return specs


def _check_onnx_file(name: str, path: str) -> None:
    """Refuse, naming the model and the file, what ONNX Runtime would reject obscurely."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"model {name!r}: {path!r} is a directory, not an ONNX file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {name!r}: no such file {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"model {name!r}: {path!r} is not a regular file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"model {name!r}: {path!r} is empty, not an ONNX model")
    import onnx
    from google.protobuf.message import DecodeError

    try:  # parses the graph only (external weights stay on disk)
        m = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeWarning) as e:
        raise ValueError(f"model {name!r}: {path!r} is not an ONNX model ({type(e).__name__}: {e})") from None
    if not m.graph.node and not m.graph.output:
        # protobuf accepts many short byte strings as an empty message
        raise ValueError(f"model {name!r}: {path!r} is not an ONNX model (no graph in it)")



def _specs_from_args(input_shape: Any, example_input: Any) -> list[dict[str, Any]] | None:
    if example_input is not None:
        items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        specs = []
        for t in items:
            shape = list(t.shape)[1:]
            dtype = str(t.dtype).replace("torch.", "") if type(t).__module__.startswith("torch") else str(t.dtype)
            specs.append({"shape": [int(s) for s in shape], "dtype": dtype})
        return specs
    if input_shape is not None:
        shapes = list(input_shape)
        if shapes and all(isinstance(s, int) for s in shapes):
            shapes = [shapes]
        return [{"shape": [int(d) for d in s], "dtype": "float32"} for s in shapes]
    return None


def benchmark(
    models: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    torch_models: Mapping[str, nn.Module] | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    example_input: Any = None,
    repeats: int = 20,
    warmup: int = 5,
    rounds: int = 5,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 1,
    baseline: str | None = None,
    seed: int = 0,
) -> BenchReport:
    """Time ONNX files (and torch modules) side by side, interleaved.

    ``models`` maps a name to an ONNX file; ``torch_models`` a name to an
    ``nn.Module`` (saved with ``torch.save`` to a temp file and loaded in its
    worker; its class must be importable, so not defined in ``__main__``;
    torch models always run on CPU). Inputs: ``input_shape`` (without the batch
    dimension; a list of shapes for several inputs, float32) or
    ``example_input`` (tensor/array or tuple, with a batch dimension; its
    shape[1:] and dtype are used); if neither is given they are read from the
    first ONNX file. Every worker builds identical random inputs from ``seed``.

    Each (round, batch size) visits the models round-robin, starting one model
    later each round; a visit runs ``warmup`` untimed calls the first time and
    ``repeats`` timed calls. Latency statistics pool all ``rounds * repeats``
    samples. ``baseline`` (default: the first model) anchors the ratios.

    Raises RuntimeError if ``CUDAExecutionProvider`` is asked for and a session
    does not actually run on it.

    Example::

        >>> import os, tempfile, torch
        >>> from lobster_fx.onnx.export import export_onnx
        >>> p = export_onnx(torch.nn.Linear(8, 2), torch.randn(2, 8),
        ...                 os.path.join(tempfile.mkdtemp(), "lin.onnx"), slim=False).path
        >>> r = benchmark({"lin": p}, torch_models={"torch": torch.nn.Linear(8, 2)},
        ...               batch_sizes=(2,), repeats=3, warmup=1, rounds=2)
        >>> sorted(r.models), r.models["lin"].file_bytes == os.path.getsize(p)
        (['lin', 'torch'], True)
    """
    onnx_models = {n: str(p) for n, p in (models or {}).items()}
    torch_models = dict(torch_models or {})
    names = list(onnx_models) + list(torch_models)
    if not names:
        raise ValueError("nothing to benchmark: pass models and/or torch_models")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique across models and torch_models: {names}")
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise ValueError("need rounds >= 1, repeats >= 1, warmup >= 0")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    for n, p in onnx_models.items():
        _check_onnx_file(n, p)
    providers = list(providers)
    wants_cuda = bool(providers) and providers[0] == "CUDAExecutionProvider"
    if onnx_models:
        from lobster_fx.runtime import import_onnxruntime, runtime_conflict

        ort = import_onnxruntime()  # the workers import it too: say which extra is missing here, once
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in ort.get_available_providers():
            # ORT would only warn and run on CPU: fail before timing the wrong thing
            raise RuntimeError(
                "CUDAExecutionProvider was requested but this onnxruntime build has only "
                f"{ort.get_available_providers()}: "
                + (runtime_conflict() or "install lobster_fx[gpu] (onnxruntime-gpu) and CUDA")
            )

    specs = _specs_from_args(input_shape, example_input)
    if specs is None:
        if not onnx_models:
            raise ValueError("torch_models need input_shape or example_input")
        specs = _onnx_input_specs(next(iter(onnx_models.values())))

    from lobster_fx.onnx.large import onnx_file_bytes  # here: importing lobster_fx.bench stays light

    tmpdir = tempfile.mkdtemp(prefix="lobster_bench_")
    workers: dict[str, _Worker] = {}
    stats: dict[str, ModelStats] = {}
    try:
        common = {"intra_op_threads": int(intra_op_threads), "inputs": specs, "seed": int(seed)}
        cfgs: dict[str, dict[str, Any]] = {}
        for n, p in onnx_models.items():
            cfgs[n] = {**common, "kind": "onnx", "path": p, "providers": providers}
        if torch_models:
            for k, (n, m) in enumerate(torch_models.items()):
                tp = os.path.join(tmpdir, f"torch_{k}.pt")
                _save_torch_model(m, tp)
                cfgs[n] = {**common, "kind": "torch", "path": tp, "sha256": _file_sha256(tp),
                           "sys_path": [p for p in sys.path if p]}
        # start (and load) one at a time so loads do not compete for the cores
        for n in names:
            w = _Worker(n, cfgs[n])
            workers[n] = w
            hello = w.hello
            if cfgs[n]["kind"] == "onnx" and wants_cuda and hello["providers"][0] != "CUDAExecutionProvider":
                raise RuntimeError(
                    f"model {n!r}: CUDAExecutionProvider was requested but the session runs on "
                    f"{hello['providers'][0]} (providers: {hello['providers']})"
                )
            path = cfgs[n]["path"] if cfgs[n]["kind"] == "onnx" else None
            stats[n] = ModelStats(
                name=n, kind=cfgs[n]["kind"], path=path,
                file_bytes=onnx_file_bytes(path) if path else os.path.getsize(cfgs[n]["path"]),
                load_s=float(hello["load_s"]), rss_before_load=int(hello["rss_before_load"]),
                rss_after_load=int(hello["rss_after_load"]), peak_rss=0, providers=list(hello["providers"]), pid=int(hello["pid"]),
            )

        samples: dict[str, dict[int, list[int]]] = {n: {b: [] for b in batch_sizes} for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for b in batch_sizes:
                for n in order:
                    resp = workers[n].request(
                        {"cmd": "run", "batch": b, "repeats": repeats, "warmup": warmup if r == 0 else 0}
                    )
                    samples[n][b].extend(int(s) for s in resp["samples_ns"])
        for n in names:
            mem = workers[n].request({"cmd": "mem"})
            stats[n].peak_rss = int(mem["peak"])
            stats[n].latency = {b: LatencyStats.from_samples(b, samples[n][b]) for b in batch_sizes}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmpdir, ignore_errors=True)

    return BenchReport(
        baseline=baseline, batch_sizes=batch_sizes, providers=providers,
        intra_op_threads=int(intra_op_threads), rounds=rounds, repeats=repeats, warmup=warmup,
        models=stats,
    )


def _cli(argv: Sequence[str] | None = None) -> int:
    """``python -m lobster_fx.bench a.onnx b.onnx --batch 1 64``: print the table."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lobster_fx.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", nargs="+", help="ONNX files (name = file stem); the first is the baseline")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--provider", action="append", default=None)
    ap.add_argument("--json", help="also write the report as JSON here")
    a = ap.parse_args(argv)
    models = {Path(p).stem: p for p in a.onnx}
    rep = benchmark(
        models, batch_sizes=a.batch, repeats=a.repeats, warmup=a.warmup, rounds=a.rounds,
        intra_op_threads=a.threads, providers=a.provider or ("CPUExecutionProvider",),
    )
    print(rep.table())
    if a.json:
        Path(a.json).write_text(json.dumps(rep.to_dict(), indent=2))
    return 0


