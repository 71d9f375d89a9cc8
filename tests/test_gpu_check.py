"""benchmarks/gpu_check.py without a GPU: the no-CUDA exit, and the checks' logic on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[1]
SCRIPT = CHECKOUT / "benchmarks" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_exits_0_and_writes_nothing():
    results = CHECKOUT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu_check.*")}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd="/", check=False,
                         env=_env(CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA" in out.stdout and "cannot run" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("gpu_check.*")} == before


def test_cpu_dry_run_needs_an_out_dir(gc):
    with pytest.raises(SystemExit) as e:
        gc.main(["--device", "cpu"])
    assert e.value.code == 2


def test_eq6_reference_by_hand(gc):
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g = torch.tensor([0.5, -0.25, 2.0, 0.0])
    lr, lmbda = 0.1, 0.01
    expected = torch.tensor([
        1.0 - 0.1 * 0.5 - 0.01 * 1.0 * 0.5,
        -2.0 + 0.1 * 0.25 + 0.01 * 2.0 * 0.75,
        0.5 - 0.1 * 2.0,  # |g| > 1: no LOBSTER term
        3.0 - 0.01 * 3.0,
    ])
    torch.testing.assert_close(gc.eq6_reference(w, g, lr, lmbda), expected)
    # weight decay goes into the SGD part: - lr * wd * w
    torch.testing.assert_close(gc.eq6_reference(w, g, lr, lmbda, 0.5) - gc.eq6_reference(w, g, lr, lmbda),
                               -lr * 0.5 * w)


def test_fused_rule_check_runs_the_eager_path_on_cpu(gc):
    d = gc.check_fused_rule("cpu")
    assert set(d["cases"]) == {"sgd", "sgd_weight_decay"}
    for row in d["cases"].values():
        assert row["eager_path_ran"] and row["eager_vs_eq6_max_abs"] <= 1e-6
        assert row["moved_max_abs"] > 1e-2


def test_fused_rule_comparison_is_not_vacuous(gc):
    """The rule without its term (lmbda=0) is far from eq. (6) with lmbda: the check would see it."""
    import lobster_fx

    def fresh():
        gm = lobster_fx.instrument(gc._mlp((64, 128, 10), seed=0))
        gc.random_masks_(gm, 0.3, seed=2)
        return gm

    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    ref = gc.eq6_trajectory(fresh(), x, y, steps=3, lr=0.1, lmbda=0.05)
    same, _ = gc.rule_trajectory(fresh(), x, y, steps=3, lr=0.1, lmbda=0.05)
    without, _ = gc.rule_trajectory(fresh(), x, y, steps=3, lr=0.1, lmbda=0.0)
    assert gc._max_abs_diff(same, ref) < 1e-6
    assert gc._max_abs_diff(without, ref) > 1e-3


def test_half_precision_verdict_and_failure(gc, monkeypatch):
    assert gc.half_verdict(0.95, 0.95, 0.1) == (pytest.approx(1.0), True)
    rel, ok = gc.half_verdict(1.0, 0.95, 0.1)  # the term rounded away: no shrink at all
    assert rel == 0.0 and not ok
    r32 = gc.lobster_shrink_ratio("cpu", torch.float32, fused=False, steps=20, lmbda=1e-3)
    assert 0.97 < r32 < 0.99  # ~ (1 - 1e-3)^20, gradients are small
    # a half run whose term has no effect is a failure, with the measurements kept
    real = gc.lobster_shrink_ratio
    monkeypatch.setattr(gc, "lobster_shrink_ratio",
                        lambda device, dtype, **kw: real(device, dtype, **kw) if dtype == torch.float32 else 1.0)
    with pytest.raises(gc.CheckFailed, match="bfloat16_eager") as e:
        gc.check_half_precision("cpu", dtypes=(torch.bfloat16,), steps=20, lmbda=1e-3)
    assert e.value.details["runs"]["bfloat16_eager"]["shrink_vs_float32"] == 0.0


def test_distributed_check_with_a_gloo_group_on_cpu(gc):
    before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    d = gc.check_distributed("cpu", backend="gloo")
    assert {k: os.environ.get(k) for k in before} == before  # the rendezvous variables are restored
    assert not torch.distributed.is_initialized()
    assert d["backend_in_use"] == "gloo"
    assert 0 < d["prune"]["pruned"] < d["prune"]["total"]
    assert d["all_reduce_calls"] >= d["prune"]["evaluations"]
    assert d["plateau_pruned_at_step"] == [3]


def test_csr_check_on_cpu(gc):
    d = gc.check_csr("cpu", repeats=2)
    assert len(d["converted"]) == 3 and d["csr_devices"] == ["cpu"] and not d["dense_params_left"]
    assert d["max_abs_diff_3d"] < 1e-5


def test_ort_io_binding_and_profile_on_cpu(gc, tmp_path):
    path = str(tmp_path / "m.onnx")
    ref = gc.export_pruned_mlp(path, sizes=(64, 32, 10))
    sess = gc._ort_session(path, ["CPUExecutionProvider"], str(tmp_path / "prof"))
    x = torch.randn(5, 64)
    expected = ref(x).detach()
    allocated = gc.bind_torch_io(sess, x, None)  # ONNX Runtime allocates the output on x's device
    sess.run_with_iobinding(allocated)
    assert allocated.get_outputs()[0].device_name().lower() == "cpu"
    torch.testing.assert_close(torch.from_numpy(allocated.copy_outputs_to_cpu()[0]), expected)
    y = torch.full((5, 10), float("nan"))
    sess.run_with_iobinding(gc.bind_torch_io(sess, x, y))  # written in place through the pointer
    torch.testing.assert_close(y, expected)
    providers = gc.node_providers(sess.end_profiling())
    assert providers and all(p == {"CPUExecutionProvider": 2} for p in providers.values())
    assert {"Gemm", "FusedGemm"} & set(providers)


def test_ort_check_fails_clearly_without_the_cuda_provider(gc):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is available here")
    with warnings.catch_warnings(), pytest.raises(gc.CheckFailed, match="did not take the CUDA provider") as e:
        warnings.simplefilter("ignore")  # ONNX Runtime warns that the provider is not available
        gc.check_ort_cuda("cpu", sizes=(64, 32, 10))
    assert e.value.details["session_providers"] == ["CPUExecutionProvider"]


def test_step_overhead_on_cpu(gc):
    d = gc.check_step_overhead("cpu", builder=lambda: gc._mlp((64, 32, 10), seed=0), input_shape=(64,),
                               classes=10, batch=8, rounds=3, steps=2, warmup=1)
    assert set(d["median_ms"]) == {"plain", "masks only", "lobster", "lobster eager"}
    assert d["ratio_vs_plain"]["plain"] == 1.0 and all(v > 0 for v in d["median_ms"].values())
    assert all(len(s) == 3 for s in d["samples_ms"].values())
    assert d["default_rule_fused"] is False  # under FUSE_MIN_NUMEL: the eager path, not a fallback


def test_write_results_table_and_merge(gc, tmp_path):
    data = {"when": "2026-01-01T00:00:00+00:00", "seconds": 12.0,
            "environment": {"device": "cuda", "gpu": "Some GPU", "torch": "2.x"},
            "checks": {
                "csr": {"ok": True, "seconds": 1.5, "details": {"summary": "max |diff| 1e-7"}},
                "ort_cuda": {"ok": False, "seconds": 2.0, "details": {}, "error": "CheckFailed: a | b\nmore",
                             "traceback": "Traceback ...\nCheckFailed: a | b"},
            }}
    gc.write_results(data, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["checks"]["csr"]["ok"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Some GPU" in md and "dry run" not in md
    assert "| (d) torch CSR on CUDA vs dense | ok | 1.5 | max \\|diff\\| 1e-7 |" in md
    assert "| (e) ONNX Runtime CUDAExecutionProvider, io_binding timing | FAILED | 2.0 | **CheckFailed: a \\| b** |" in md
    # a later subset run replaces its own checks and keeps the others, in CHECKS order
    later = {**data, "checks": {"fused_rule": {"ok": True, "seconds": 3.0, "details": {}}}}
    merged = gc.write_results(later, tmp_path, merge=True)
    assert list(merged["checks"]) == ["fused_rule", "csr", "ort_cuda"]
    assert list(json.loads((tmp_path / "gpu_check.json").read_text())["checks"]) == ["fused_rule", "csr", "ort_cuda"]
    # without merge, the file holds this run only
    assert list(gc.write_results(later, tmp_path)["checks"]) == ["fused_rule"]


def test_a_failing_check_is_recorded_and_the_others_still_run(gc, monkeypatch, tmp_path, capsys):
    def boom(device):
        raise RuntimeError("kaput")

    def fine(device):
        return {"summary": f"fine on {device}"}

    monkeypatch.setattr(gc, "CHECKS", {"boom": ("boom title", boom, 10), "fine": ("fine title", fine, 10)})
    rc = gc.main(["--device", "cpu", "--out-dir", str(tmp_path), "--no-isolate"])
    assert rc == 1
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert checks["boom"]["ok"] is False and "RuntimeError: kaput" in checks["boom"]["error"]
    assert "Traceback" in checks["boom"]["traceback"]
    assert checks["fine"]["ok"] is True and checks["fine"]["details"] == {"summary": "fine on cpu"}
    out = capsys.readouterr().out
    assert "[FAILED] boom title" in out and "[ok    ] fine title" in out and "failed: boom" in out
    assert "dry run" in (tmp_path / "gpu_check.md").read_text()


def test_isolated_child_run_on_cpu(gc, tmp_path):
    """The default mode: each check in its own process, its record handed back as JSON."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out-dir", str(tmp_path),
                          "--checks", "fused_rule"], capture_output=True, text=True, timeout=300, env=_env(),
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    rec = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]["fused_rule"]
    assert rec["ok"] and rec["details"]["cases"]["sgd"]["eager_path_ran"]


def test_a_hanging_check_is_cut_by_its_time_limit(gc, monkeypatch):
    # the child runs this very script: give it a check that cannot finish in 0.5 s (interpreter start)
    rec = gc.run_check_in_child("fused_rule", "cpu", timeout=0.5)
    assert rec["ok"] is False and "timed out" in rec["error"]
