"""The benchmark's worker process: load one model, then time it on request.

Self-contained on purpose (stdlib and numpy at import; onnxruntime or torch
inside its runner): the parent (:mod:`lobster_fx.bench.run`) starts
``sys.executable -c _WORKER_BOOT <this file>``, which runs this file *by path*
under the name ``_WORKER_RUN_NAME``, so that an ONNX worker never imports the
``lobster_fx`` package nor torch, and its memory is the model's alone. Do not
import from ``lobster_fx`` here.

Protocol: JSON lines. The first line on stdin is the config (``kind``
``"onnx"`` or ``"torch"``, ``path``, ``inputs``, ``seed``,
``intra_op_threads``, ...); the worker answers with its load time and memory,
then serves ``run`` / ``mem`` / ``quit`` requests, one answer line each, on
the original stdout (stray prints go to stderr).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

_WORKER_RUN_NAME = "__lobster_bench_worker__"
#: boots a worker: run this file by path so that the package (and torch) is not imported
_WORKER_BOOT = (
    "import runpy, sys; p = sys.argv[1]; sys.argv = sys.argv[1:]; "
    f"runpy.run_path(p, run_name={_WORKER_RUN_NAME!r})"
)


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


if __name__ == _WORKER_RUN_NAME:
    _worker_main()
