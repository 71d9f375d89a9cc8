"""`import lobster_fx` for training stays light, and every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import lobster_fx

HEAVY = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn")


def test_training_does_not_import_the_export_and_plotting_stack():
    code = (
        "import sys, torch, lobster_fx\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
        "gm = lobster_fx.instrument(m)\n"
        "opt = torch.optim.SGD(gm.parameters(), lr=0.1)\n"
        "rule = lobster_fx.Lobster(gm, opt, lmbda=1e-4)\n"
        "gm(torch.randn(2, 4)).sum().backward(); opt.step()\n"
        "lobster_fx.prune(gm, lambda g: 1.0, 0.0); lobster_fx.PlateauPruner(gm, lambda g: 1.0, 0.0)\n"
        "lobster_fx.fold(gm); lobster_fx.sparsity_report(gm)\n"
        "import lobster_fx.train\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_public_name_resolves_to_what_it_names():
    for name in lobster_fx.__all__:
        value = getattr(lobster_fx, name)
        assert getattr(value, "__name__", name) == name, (name, value)
    assert callable(lobster_fx.slim) and callable(lobster_fx.fold) and callable(lobster_fx.prune)
    assert set(lobster_fx.__all__) <= set(dir(lobster_fx))


def test_readme_training_loop_example_runs(tmp_path, monkeypatch):
    """The README's "Use it in your training loop" block, as written, on the current API."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert (tmp_path / "model.onnx").stat().st_size > 0
