"""benchmarks/methods.py end to end on the digits data: runs (plain and tagged), then summarize.

A smoke test of the script's bookkeeping (run folders, tags, selection, the targets' pairing of
a tagged SeReNe run with the LOBSTER run of the same tag), not of its figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import methods
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return methods


@pytest.mark.usefixtures("one_thread")
def test_tagged_runs_are_summarized_beside_the_plain_ones_and_paired_by_tag(bench, tmp_path, capsys):
    common = ["--results-dir", str(tmp_path), "run", "--setting", "lenet300-mnist", "--dataset", "digits",
              "--epochs", "2", "--pwe", "1", "--minutes", "2"]
    for method, extra in [("dense", []), ("serene-output", []), ("serene-output", ["--tag", "twt0.5", "--twt", "0.5"]),
                          ("lobster", ["--tag", "twt0.5", "--twt", "0.5"])]:
        assert bench.main([*common[:3], "--method", method, *common[3:], *extra]) in (0, None)
    runs = tmp_path / "methods"
    assert sorted(p.name for p in runs.iterdir()) == [
        "lenet300-mnist-dense", "lenet300-mnist-lobster@twt0.5", "lenet300-mnist-serene-output",
        "lenet300-mnist-serene-output@twt0.5"]
    record = json.loads((runs / "lenet300-mnist-serene-output@twt0.5" / "record.json").read_text())
    assert record["config"]["twt"] == 0.5
    assert json.loads((runs / "lenet300-mnist-serene-output" / "record.json").read_text())["config"]["twt"] == 0.05

    bench.main(["--results-dir", str(tmp_path), "summarize", "--rounds", "1", "--repeats", "2", "--warmup", "1"])
    summary = json.loads((tmp_path / "methods.json").read_text())["settings"]["lenet300-mnist"]
    assert list(summary["runs"]) == ["serene-output", "serene-output@twt0.5", "lobster@twt0.5", "dense"]
    md = (tmp_path / "methods.md").read_text()
    assert "| lenet300-mnist | serene-output@twt0.5 |" in md
    # the tagged SeReNe run is compared with the LOBSTER run of its tag; the plain one has no LOBSTER run here
    assert "serene-output@twt0.5 has" in md and "than lobster@twt0.5 (target >= 3x)" in md
    assert "- lenet300-mnist: serene-output has" in md and "serene-output has 1.00x fewer live MACs than lobster " \
        not in md

    with pytest.raises(SystemExit):
        bench.main([*common[:3], "--method", "dense", *common[3:], "--tag", "bad/tag"])
    assert "a tag is letters, digits" in capsys.readouterr().err
