"""Side-by-side inference benchmark: ONNX Runtime files (and torch modules).

Design (each point answers a pitfall measured on this kind of machine):

* **One fresh process per model.** Each model is loaded by its own persistent
  worker process, so load time, resident memory after load (``VmRSS``) and
  peak memory (``VmHWM``) belong to that model alone. ONNX workers never import
  torch (the worker runs this file by path, not through the ``lobster_fx``
  package, whose ``__init__`` imports torch).
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

Example::

    >>> import os, tempfile, torch
    >>> from lobster_fx.bench import benchmark
    >>> from lobster_fx.export import export_onnx
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

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # torch is only needed for torch_models
    from torch import nn

__all__ = ["LatencyStats", "ModelStats", "BenchReport", "benchmark"]

_WORKER_RUN_NAME = "__lobster_bench_worker__"
#: boots a worker: run this file by path so that the package (and torch) is not imported
_WORKER_BOOT = (
    "import runpy, sys; p = sys.argv[1]; sys.argv = sys.argv[1:]; "
    f"runpy.run_path(p, run_name={_WORKER_RUN_NAME!r})"
)


# --------------------------------------------------------------------------- report


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
    def from_samples(cls, batch: int, samples_ns: Sequence[int]) -> "LatencyStats":
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


# --------------------------------------------------------------------------- worker side


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux ``/proc/self/status``)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:  # not Linux: fall back to getrusage (peak only)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        out = {"VmRSS": peak, "VmHWM": peak}
    return out


def _make_feeds(specs: list[dict[str, Any]], batch: int, seed: int) -> list[Any]:
    """The same inputs in every worker: same seed, same order."""
    import numpy as np

    rng = np.random.default_rng(seed + batch)
    arrays = []
    for s in specs:
        shape = (batch, *s["shape"])
        dt = np.dtype(s["dtype"])
        if dt.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dt))
        elif dt.kind == "b":
            arrays.append(rng.integers(0, 2, shape).astype(dt))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dt))
    return arrays


class _OrtRunner:
    def __init__(self, cfg: dict[str, Any]) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(cfg["intra_op_threads"])
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # spinning threads burn a shared core while the other process measures
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.status_before = _proc_status()
        t0 = time.perf_counter()
        self.sess = ort.InferenceSession(cfg["path"], so, providers=list(cfg["providers"]))
        self.load_s = time.perf_counter() - t0
        self.providers = list(self.sess.get_providers())
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def feeds(self, arrays: list[Any]) -> Any:
        if len(arrays) != len(self.input_names):
            raise ValueError(f"model has inputs {self.input_names}, benchmark gives {len(arrays)} arrays")
        return dict(zip(self.input_names, arrays))

    def run(self, feeds: Any) -> None:
        self.sess.run(None, feeds)


class _TorchRunner:
    def __init__(self, cfg: dict[str, Any]) -> None:
        for p in reversed(cfg.get("sys_path", [])):
            if p not in sys.path:
                sys.path.insert(0, p)  # so pickled classes from the parent's modules import
        import torch

        torch.set_num_threads(int(cfg["intra_op_threads"]))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (cannot change after first parallel work)
            pass
        self.torch = torch
        self.status_before = _proc_status()
        t0 = time.perf_counter()
        model = self._load_own_file(torch, cfg["path"], cfg["sha256"])
        model.eval()
        self.load_s = time.perf_counter() - t0
        self.model = model
        self.providers = ["torch-cpu"]

    @staticmethod
    def _load_own_file(torch: Any, path: str, sha256: str) -> Any:
        """Unpickle the module the parent just wrote, and nothing else.

        A whole ``nn.Module`` (its class, its generated code) cannot come
        through ``weights_only=True``; the file is therefore only ever one the
        parent wrote moments ago into its private (0700) temp folder, and it
        is read once into memory and checked against the parent's SHA-256
        before unpickling, so a file swapped in meanwhile is refused, not run.
        """
        import hashlib
        import io

        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{path}: not the file the parent process wrote (SHA-256 differs); not loading it")
        return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")

    def feeds(self, arrays: list[Any]) -> Any:
        return [self.torch.from_numpy(a) for a in arrays]

    def run(self, feeds: Any) -> None:
        with self.torch.inference_mode():
            self.model(*feeds)


def _worker_main() -> None:
    """Serve JSON-line requests on stdin; answers go to the original stdout."""
    proto: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours, ORT's, torch's) must not corrupt the protocol

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    cfg = json.loads(sys.stdin.readline())
    try:
        runner: Any = _OrtRunner(cfg) if cfg["kind"] == "onnx" else _TorchRunner(cfg)
        after = _proc_status()
        reply({
            "ok": True, "load_s": runner.load_s, "providers": runner.providers, "pid": os.getpid(),
            "rss_before_load": runner.status_before["VmRSS"], "rss_after_load": after["VmRSS"],
        })
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    cache: dict[int, Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "run":
                b = int(req["batch"])
                if b not in cache:
                    cache[b] = runner.feeds(_make_feeds(cfg["inputs"], b, int(cfg["seed"])))
                feeds = cache[b]
                for _ in range(int(req["warmup"])):
                    runner.run(feeds)
                samples = []
                clock = time.perf_counter_ns
                for _ in range(int(req["repeats"])):
                    t0 = clock()
                    runner.run(feeds)
                    samples.append(clock() - t0)
                reply({"ok": True, "samples_ns": samples})
            elif cmd == "mem":
                st = _proc_status()
                reply({"ok": True, "rss": st["VmRSS"], "peak": st["VmHWM"]})
            elif cmd == "quit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except BaseException as e:  # noqa: BLE001
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


# --------------------------------------------------------------------------- torch model transport


def _rebuild_code_module(body: dict[str, Any], import_block: str) -> Any:
    """Unpickle a GraphModule as a plain module running its generated code.

    ``torch.load`` of a GraphModule normally *re-traces* that code, which fails
    for functions that run but do not trace (e.g. ``csr_linear`` of
    :func:`lobster_fx.sparse.to_sparse_csr`); for timing we only need to run it.
    """
    import types

    import torch

    namespace: dict[str, Any] = {}
    code = body.get("_code") or body["code"]
    exec(compile(import_block + code, "<lobster_fx.bench GraphModule>", "exec"), namespace)  # noqa: S102
    m = torch.nn.Module()
    m.__dict__.update(body)
    m.forward = types.MethodType(namespace["forward"], m)
    return m


def _save_torch_model(model: Any, path: str) -> None:
    """``torch.save`` with GraphModules stored as code (see :func:`_rebuild_code_module`)."""
    import copy
    import pickle
    import types

    import torch

    def is_graphs(v: Any) -> bool:
        if isinstance(v, torch.fx.Graph):
            return True
        return isinstance(v, dict) and bool(v) and all(isinstance(g, torch.fx.Graph) for g in v.values())

    class _Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.fx.GraphModule):
                from lobster_fx.trace import LobsterGraphModule

                if isinstance(obj, LobsterGraphModule):
                    # timing needs the current mode only: reduce it as a plain GraphModule
                    obj = torch.fx.GraphModule(obj, copy.deepcopy(obj.graph), class_name=type(obj).__name__)
                reduced = torch.fx.GraphModule.__reduce__(obj)
                if isinstance(reduced, tuple) and len(reduced) == 2 and len(reduced[1]) == 2:
                    body, import_block = reduced[1]
                    if isinstance(body, dict) and isinstance(import_block, str) and ("_code" in body or "code" in body):
                        # graphs are not needed to run the code (and may not pickle)
                        body = {k: v for k, v in body.items() if not is_graphs(v)}
                        return _rebuild_code_module, (body, import_block)
            return NotImplemented

    pickle_module = types.ModuleType("lobster_fx_bench_pickle")
    pickle_module.Pickler = _Pickler  # type: ignore[attr-defined]
    pickle_module.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    pickle_module.load = pickle.load  # type: ignore[attr-defined]
    pickle_module.dump = pickle.dump  # type: ignore[attr-defined]
    torch.save(model, path, pickle_module=pickle_module)


# --------------------------------------------------------------------------- parent side


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
            [sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).resolve())],
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


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    torch_models: Mapping[str, "nn.Module"] | None = None,
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
        >>> from lobster_fx.export import export_onnx
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

    from lobster_fx.export import onnx_file_bytes  # here: the worker runs this file without the package

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


if __name__ == _WORKER_RUN_NAME:
    _worker_main()
elif __name__ == "__main__":
    sys.exit(_cli())
