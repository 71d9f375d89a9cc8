"""The committed SeReNe models (benchmarks/results/methods/<run>/selected.pt) are what methods.json says.

Each selected model loads strictly into its ``lobster_fx.models`` architecture (pruned layers
resized), and its live MACs after fold + slim, its units per layer and its MNIST test error,
recounted here, equal the figures in ``benchmarks/results/methods.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA_ROOT = ROOT.parent / "shared" / "datasets"
SUMMARY = RESULTS / "methods.json"


def _selected_runs() -> list[tuple[str, str]]:
    if not SUMMARY.exists():
        return []
    settings = json.loads(SUMMARY.read_text())["settings"]
    return [(s, m) for s, v in settings.items() for m, r in v["runs"].items()
            if m.startswith("serene") and r.get("selected") and (RESULTS / "methods" / f"{s}-{m}" / "selected.pt").exists()]


RUNS = _selected_runs()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("setting", "method"), RUNS, ids=[f"{s}-{m}" for s, m in RUNS])
def test_committed_serene_model_matches_the_summary(setting, method):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import methods as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from lobster_fx.train import build_model, config_from_dict, evaluate, load_splits

    run = json.loads(SUMMARY.read_text())["settings"][setting]["runs"][method]
    config = config_from_dict(run["config"])
    if not (DATA_ROOT / ("MNIST" if config.dataset == "mnist" else "FashionMNIST")).exists():
        pytest.skip("the datasets are not beside the repository")
    config.data_root = str(DATA_ROOT)
    splits = load_splits(config)
    model = build_model(config, splits)
    state = torch.load(RESULTS / "methods" / f"{setting}-{method}" / "selected.pt", weights_only=True)
    bench._resize_like(model, state)
    model.load_state_dict(state, strict=True)
    model.eval()
    described = bench.describe(model, tuple(splits.test.x.shape[1:]))
    assert described["macs"] == run["selected"]["macs"]
    assert described["units"] == run["selected"]["units"]
    _, error = evaluate(model, splits.test, 5000)
    assert error == pytest.approx(run["selected"]["test_error"], abs=1e-9)
