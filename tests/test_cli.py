"""The command line: the main job (demo) and train / export / bench / report."""

import json

import onnx
import pytest
import torch

from lobster_fx.cli import main


def test_demo_writes_report_with_required_fields(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "120", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("compression_ratio", "test_error", "layers", "onnx", "latency_ms"):
        assert key in report, key
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == ["fc1", "fc2", "fc3"]
    assert report["compression_ratio"] == pytest.approx(
        sum(layer["numel"] for layer in layers) / sum(layer["nonzero"] for layer in layers)
    )
    for name in ("dense", "sparse", "slim"):
        assert report["onnx"][name] == (out / f"{name}.onnx").stat().st_size
        assert set(report["latency_ms"][name]) == {"1", "64"}
        assert all(v > 0 for v in report["latency_ms"][name].values())
    assert report["onnx"]["sparse"] < report["onnx"]["dense"]
    assert (out / "layers.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "compression" in printed and "slim" in printed


def test_train_resume_export_report(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", "lenet300", "--dataset", "digits", "--batch-size", "32", "--lr", "0.05",
              "--lmbda", "1e-3", "--pwe", "2", "--out", str(out), "--no-progress"]
    assert main(common + ["--epochs", "3"]) == 0
    first = torch.load(out / "checkpoint.pt", weights_only=True)  # tensors and plain data only
    assert first["epoch"] == 3
    assert main(common + ["--epochs", "5"]) == 0  # resumes at epoch 3
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 5 and [e["epoch"] for e in state["log"]] == [1, 2, 3, 4, 5]
    assert state["log"][:3] == first["log"][:3]
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(out / "checkpoint.pt"), str(onnx_path)]) == 0
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    assert main(["report", str(out / "checkpoint.pt"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "layers.png").exists() and (tmp_path / "rep" / "training.png").exists()
    assert "compression ratio" in capsys.readouterr().out
    assert not [p.name for p in (*out.iterdir(), *(tmp_path / "rep").iterdir()) if p.name.endswith(".tmp")]


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    args = ["train", "--dataset", "mnist", "--out", str(tmp_path / "x"), "--epochs", "1", "--no-progress"]
    assert main(args) == 1  # one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lobster-fx train: error: ") and "--data-root" in err, err
    with pytest.raises(ValueError, match="data-root"):  # --debug: the exception itself, with its traceback
        main(["--debug", *args])
