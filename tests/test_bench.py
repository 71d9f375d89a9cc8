"""Tests for lobster_fx.bench: a small interleaved run, memory, providers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from lobster_fx.bench import BenchReport, benchmark
from lobster_fx.onnx.export import export_onnx

# benchmark() runs each model in a fresh `sys.executable` worker that unpickles lobster_fx objects:
# it must import this checkout's lobster_fx, not another installed copy
CHECKOUT = Path(__file__).resolve().parents[1]  # PYTHONPATH: conftest.py


def test_children_import_this_checkout():
    out = subprocess.run([sys.executable, "-c", "import lobster_fx; print(lobster_fx.__file__)"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert Path(out.stdout.strip()).resolve().is_relative_to(CHECKOUT)


def _export(model: nn.Module, path: str, in_features: int) -> str:
    export_onnx(model, torch.randn(2, in_features), path, slim=False, sparse=False)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 8))
    small = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    return {
        "big": _export(big, str(d / "big.onnx"), 32),
        "small": _export(small, str(d / "small.onnx"), 32),
    }


@pytest.fixture(scope="module")
def report(tiny_models) -> BenchReport:
    return benchmark(tiny_models, batch_sizes=(1, 4), repeats=4, warmup=2, rounds=3)


def test_small_run_is_sane(report, tiny_models):
    assert list(report.models) == ["big", "small"] and report.baseline == "big"
    for name, stats in report.models.items():
        assert stats.kind == "onnx" and stats.providers[0] == "CPUExecutionProvider"
        assert stats.file_bytes == os.path.getsize(tiny_models[name]) > 0
        assert stats.load_s > 0
        assert stats.rss_after_load > 0 and stats.rss_before_load > 0
        assert stats.peak_rss >= stats.rss_after_load
        for b in (1, 4):
            lat = stats.latency[b]
            assert lat.n == 3 * 4  # rounds * repeats, warm-up excluded
            assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
            assert lat.median_ms < 1000  # a 32-256-8 MLP: far below a second
    assert report.speedup("big", 4) == pytest.approx(1.0)
    assert report.size_ratio("small") < 1.0


def test_each_model_in_its_own_fresh_process(report):
    pids = {s.pid for s in report.models.values()}
    assert len(pids) == 2 and os.getpid() not in pids and 0 not in pids


def test_report_serialisation(report):
    d = report.to_dict()
    json.dumps(d)  # plain data only
    assert d["ratios"]["big"]["speedup"]["1"] == pytest.approx(1.0)
    assert d["models"]["small"]["latency"]["4"]["median_ms"] > 0
    table = report.table()
    assert "big" in table and "small" in table and "median ms" in table and "peak MiB" in table


def test_torch_model_in_same_run(tiny_models):
    torch.manual_seed(1)
    tm = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    rep = benchmark({"small": tiny_models["small"]}, torch_models={"torch": tm},
                    batch_sizes=(2,), repeats=3, warmup=1, rounds=2)
    t = rep.models["torch"]
    assert t.kind == "torch" and t.latency[2].median_ms > 0 and t.rss_after_load > 0
    # torch is imported in the torch worker only: the ONNX worker stays lean
    assert rep.models["small"].rss_before_load < t.rss_before_load


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_fails(tiny_models):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        benchmark(tiny_models, providers=("CUDAExecutionProvider",), batch_sizes=(1,), repeats=1, rounds=1)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_silent_cpu_fallback_is_caught(tiny_models, monkeypatch):
    """Even if CUDA looks available, a session that lands on CPU is an error."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="runs on CPUExecutionProvider"):
        benchmark({"small": tiny_models["small"]}, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                  batch_sizes=(1,), repeats=1, rounds=1)


def test_bad_arguments(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError):
        benchmark({"x": str(tmp_path / "missing.onnx")})
    with pytest.raises(ValueError, match="baseline"):
        benchmark(tiny_models, baseline="nope")
    with pytest.raises(ValueError):
        benchmark({})


@pytest.mark.parametrize("content", [b"", os.urandom(512), b"hello, I am a text file\n", None],
                         ids=["empty", "random-bytes", "text", "directory"])
def test_a_file_that_is_not_onnx_is_named(tmp_path, content):
    """Not 'Wire format was corrupt' nor 'no such file' for a folder that exists:
    the error names the model and the path and says what is wrong."""
    path = tmp_path / "model.onnx"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    expected = "is a directory" if content is None else ("is empty" if content == b"" else "is not an ONNX model")
    with pytest.raises((ValueError, OSError), match=expected) as info:
        benchmark({"m": str(path)}, batch_sizes=(1,), repeats=1, rounds=1)
    assert str(path) in str(info.value) and "'m'" in str(info.value)


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_torch_worker_refuses_a_file_it_did_not_write(tmp_path):
    """The torch worker unpickles only the file the parent wrote (SHA-256 check first):
    a file swapped in with a code payload is refused and its code never runs."""
    from lobster_fx.bench.transport import _file_sha256, _save_torch_model
    from lobster_fx.bench.worker import _TorchRunner

    own = tmp_path / "own.pt"
    _save_torch_model(nn.Linear(2, 2), str(own))
    digest = _file_sha256(str(own))
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, own)  # swapped in after the parent hashed its file
    with pytest.raises(RuntimeError, match="SHA-256"):
        _TorchRunner._load_own_file(torch, str(own), digest)
    assert not marker.exists()
    # the check is what stops it: the same file does run its payload under a plain pickle load
    torch.load(own, weights_only=False)
    assert marker.exists()


def test_worker_error_is_reported(tiny_models):
    """A wrong input shape fails inside the worker and surfaces in the parent."""
    with pytest.raises(RuntimeError, match="small"):
        benchmark({"small": tiny_models["small"]}, input_shape=(5,), batch_sizes=(1,), repeats=1, rounds=1)


def test_csr_graph_module_in_same_run(tiny_models):
    """A GraphModule whose code runs but does not re-trace (CSR linear) still
    travels to its worker (plain torch.load would re-trace it and fail)."""
    from lobster_fx.passes.csr import to_sparse_csr

    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        m[0].weight.mul_((torch.rand_like(m[0].weight) > 0.98).float())
    csr = to_sparse_csr(m)
    rep = benchmark({"small": tiny_models["small"]}, torch_models={"csr": csr}, batch_sizes=(1, 4),
                    repeats=2, warmup=1, rounds=2)
    assert rep.models["csr"].latency[4].median_ms > 0 and rep.models["csr"].kind == "torch"


def test_slim_and_csr_outputs_of_the_pipeline_can_be_benchmarked():
    # regression: LobsterGraphModules (slim / to_sparse_csr results) failed to load in the torch worker
    import lobster_fx
    from lobster_fx.models import LeNet300

    gm = lobster_fx.instrument(LeNet300())
    with torch.no_grad():
        for m in lobster_fx.masks(gm).values():
            m.bernoulli_(0.02, generator=torch.Generator().manual_seed(0))
    slimmed = lobster_fx.slim(lobster_fx.fold(gm).eval(), torch.randn(1, 784))
    csr = lobster_fx.to_sparse_csr(slimmed)
    report = lobster_fx.benchmark(
        torch_models={"slim": slimmed, "csr": csr}, example_input=torch.randn(1, 784), rounds=1, repeats=2, batch_sizes=(1,)
    )
    assert all(report.models[n].latency[1].median_ms > 0 for n in ("slim", "csr"))


def test_worker_file_runs_without_the_package():
    """The worker is booted by path (bench/worker.py): it must not import lobster_fx nor torch."""
    from lobster_fx.bench.run import _WORKER_PATH
    from lobster_fx.bench.worker import _WORKER_RUN_NAME

    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_the_worker'); "
            "print(sorted(m for m in ('lobster_fx', 'torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, _WORKER_PATH], capture_output=True, text=True, check=True,
                         cwd="/", env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "[]"
    assert Path(_WORKER_PATH).name == "worker.py" and _WORKER_RUN_NAME in Path(_WORKER_PATH).read_text()
