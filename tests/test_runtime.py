"""Packaging: one ONNX Runtime build per install, and clear messages when that is not so."""

from __future__ import annotations

import builtins
import itertools
import re
from pathlib import Path

import pytest

from lobster_fx import runtime

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_no_combination_of_extras_installs_two_runtimes():
    """`pip install lobster_fx[gpu]` (with any other extras) must not also bring the CPU build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    runtimes = set(runtime.RUNTIME_DISTRIBUTIONS)
    assert not core & runtimes, f"core dependencies pin a runtime build: {core & runtimes}"
    for r in range(1, len(extras) + 1):
        for combo in itertools.combinations(extras, r):
            chosen = set().union(*(extras[c] for c in combo)) & runtimes
            assert len(chosen) <= 1 or {"cpu", "gpu"} <= set(combo), (combo, chosen)
    assert extras["cpu"] & runtimes == {"onnxruntime"} and extras["gpu"] & runtimes == {"onnxruntime-gpu"}
    assert not extras["test"] & runtimes  # else [gpu,test] would install both


def test_readme_and_ci_install_a_runtime():
    """The README's two set-up commands and CI pick the CPU build explicitly."""
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[cpu]" && .venv/bin/lobster-fx demo' in readme
    assert 'pip install -e ".[cpu,test]" && .venv/bin/python -m pytest -q' in readme
    assert '".[cpu,test]"' in (ROOT / ".ci" / "run").read_text()


def test_two_builds_installed_is_named_with_the_fix():
    msg = runtime.runtime_conflict(["onnxruntime", "onnxruntime-gpu"])
    assert "onnxruntime, onnxruntime-gpu" in msg and "pip uninstall -y onnxruntime onnxruntime-gpu" in msg
    assert msg.endswith("pip install onnxruntime-gpu")
    assert runtime.runtime_conflict(["onnxruntime"]) is None


def test_missing_runtime_says_which_extra(monkeypatch):
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ImportError, match=r"lobster_fx\[cpu\].*lobster_fx\[gpu\]"):
        runtime.import_onnxruntime()


def test_this_environment_has_exactly_one_build():
    assert len(runtime.installed_runtimes()) == 1, runtime.installed_runtimes()
