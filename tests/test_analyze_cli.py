"""``lobster-fx analyze`` (issue 17): outputs, the data it measures, refusals."""

import argparse
import json

import pytest
import torch

from lobster_fx.analysis import psp_entropy
from lobster_fx.analysis.command import main, register
from lobster_fx.cli import _load_checkpoint_model
from lobster_fx.train import TrainConfig, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(model="lenet300", dataset="digits", epochs=1, batch_size=64, lr=0.05, out_dir=str(out),
                      progress=False, threads=1))
    return out / "checkpoint.pt"


def test_writes_table_json_pngs(checkpoint, tmp_path, capsys):
    out = tmp_path / "psp"
    assert main(["analyze", str(checkpoint), "--out", str(out), "--batch-size", "100"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["psp-heatmap-fc1.png", "psp-heatmap-fc2.png", "psp-heatmap-fc3.png", "psp-histograms.png",
                     "psp.json", "psp.txt"]
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    doc = json.loads((out / "psp.json").read_text())
    # the default data is the checkpoint dataset's test split; the numbers are psp_entropy's on it
    gm, _, splits, _ = _load_checkpoint_model(str(checkpoint))
    ref = psp_entropy(gm, splits.test.x, splits.test.y)
    assert doc["samples"] == len(splits.test) and doc["data"] == "the checkpoint dataset's test split"
    assert doc["class_counts"] == ref.class_counts.tolist()
    for name in ("fc1", "fc2", "fc3"):
        assert doc["layers"][name]["counts"] == ref.counts[name].tolist()
        assert doc["layers"][name]["mean"] == pytest.approx(float(ref.entropy[name].mean()), abs=1e-12)
    table = (out / "psp.txt").read_text()
    assert "fc1" in table and "mean H" in table and table in capsys.readouterr().out


def test_data_file_and_chosen_heatmap(checkpoint, tmp_path):
    _, _, splits, _ = _load_checkpoint_model(str(checkpoint))
    data = tmp_path / "data.pt"
    torch.save({"x": splits.val.x[:50], "y": splits.val.y[:50] % 3}, data)  # 3 classes, 50 samples
    out = tmp_path / "psp"
    assert main(["analyze", str(checkpoint), "--data", str(data), "--out", str(out), "--heatmap", "fc2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["psp-heatmap-fc2.png", "psp-histograms.png", "psp.json",
                                                     "psp.txt"]
    doc = json.loads((out / "psp.json").read_text())
    assert doc["samples"] == 50 and doc["num_classes"] == 3


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--data", "nowhere.pt"], "--data nowhere.pt: neither a split"),
        (["--heatmap", "fc9"], "--heatmap 'fc9': no such layer"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_errors_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys, extra, match):
    out = tmp_path / "psp"
    assert main(["analyze", str(checkpoint), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lobster-fx analyze: error: ") and err.count("\n") == 1 and match in err, err
    assert not out.exists() or not list(out.iterdir())


def test_refusals(checkpoint, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["analyze", str(checkpoint), "--out", str(full)]) == 1
    assert "is not empty" in capsys.readouterr().err and [p.name for p in full.iterdir()] == ["keep.txt"]
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(4, 64), "y": torch.zeros(3, dtype=torch.long)}, bad)
    assert main(["analyze", str(checkpoint), "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "labels do not match inputs: 3 labels for 4" in capsys.readouterr().err
    missing_class = tmp_path / "mc.pt"
    torch.save((torch.zeros(4, 64), torch.tensor([0, 0, 2, 2])), missing_class)
    assert main(["analyze", str(checkpoint), "--data", str(missing_class), "--out", str(tmp_path / "o")]) == 1
    assert "class(es) [1] have no sample" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]) == 1
    assert "none.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    with pytest.raises(ValueError, match="is not empty"):  # --debug: the exception itself
        main(["--debug", "analyze", str(checkpoint), "--out", str(full)])


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser(prog="lobster-fx")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["analyze", "c.pt", "--out", "d", "--data", "val", "--heatmap", "fc1"])
    assert (args.command, args.checkpoint, args.out, args.data, args.heatmap, args.batch_size) == (
        "analyze", "c.pt", "d", "val", ["fc1"], 1000)
    assert args.func.__name__ == "run_analyze"


def test_lobster_fx_main_runs_analyze(checkpoint, tmp_path):
    """The installed ``lobster-fx`` entry point has the subcommand, with its one-line errors."""
    from lobster_fx.cli import main as lobster_fx_main

    out = tmp_path / "psp"
    assert lobster_fx_main(["analyze", str(checkpoint), "--out", str(out), "--heatmap", "fc2"]) == 0
    assert json.loads((out / "psp.json").read_text())
    assert lobster_fx_main(["analyze", str(checkpoint), "--out", str(out)]) == 1  # not empty: refused
