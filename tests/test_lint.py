"""ruff, configured in pyproject.toml, is clean over the whole repository (CI runs it here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert "No module named ruff" not in proc.stderr, "ruff is a test dependency: pip install -e '.[cpu,test]'"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
