"""The command line on bad input: no code runs from a checkpoint, and every error is one line naming the problem."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

from lobster_fx.cli import EXIT_ERROR, _model_names, main
from lobster_fx.train import TrainConfig, train

TRAIN_FLAGS = ["--model", "lenet300", "--dataset", "digits", "--batch-size", "64", "--lr", "0.05", "--lmbda", "1e-3",
               "--pwe", "2", "--threads", "1", "--no-progress"]


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could do with any callable."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A real ``lobster-fx train`` checkpoint (LeNet-300 on digits, 1 epoch)."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(model="lenet300", dataset="digits", epochs=1, batch_size=64, lr=0.05, lmbda=1e-3, pwe=2,
                      threads=1, progress=False, out_dir=str(out)))
    return out / "checkpoint.pt"


def _run(args: list[str]) -> int | BaseException:
    """main(args), or what it raised (so that a test can check the marker first)."""
    try:
        return main(args)
    except Exception as exc:  # noqa: BLE001 -- the code before the fix raised from torch.load or after it
        return exc


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"lobster-fx {command}: error: "), err
    return lines[0]


def _crafted(kind: str, checkpoint: pathlib.Path, path: pathlib.Path, marker: pathlib.Path) -> None:
    if kind == "payload-only":
        torch.save(_Payload(marker), path)
    else:  # an otherwise valid checkpoint that carries the payload in its log
        state = torch.load(checkpoint, weights_only=True)
        state["log"][0]["note"] = _Payload(marker)
        torch.save(state, path)


@pytest.mark.parametrize("kind", ["payload-only", "inside-valid-checkpoint"])
@pytest.mark.parametrize("command", ["export", "report"])
def test_crafted_checkpoint_runs_no_code(tmp_path, capsys, checkpoint, command, kind):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    _crafted(kind, checkpoint, evil, marker)
    args = [command, str(evil), str(tmp_path / "m.onnx")] if command == "export" else \
        [command, str(evil), "--out", str(tmp_path / "rep")]
    result = _run(args)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert result == EXIT_ERROR
    line = _one_error_line(capsys, command)
    assert str(evil) in line and "refusing to load" in line and "Unsupported global" in line


@pytest.mark.parametrize("kind", ["payload-only", "inside-valid-checkpoint"])
def test_resume_from_crafted_checkpoint_runs_no_code(tmp_path, capsys, checkpoint, kind):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    _crafted(kind, checkpoint, out / "checkpoint.pt", marker)
    before = (out / "checkpoint.pt").read_bytes()
    result = _run(["train", *TRAIN_FLAGS, "--epochs", "2", "--out", str(out)])
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert result == EXIT_ERROR
    line = _one_error_line(capsys, "train")
    assert str(out / "checkpoint.pt") in line and "refusing to load" in line
    assert (out / "checkpoint.pt").read_bytes() == before


def _bad_file(kind: str, tmp_path: pathlib.Path, checkpoint: pathlib.Path) -> pathlib.Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "state-dict":
        torch.save({"fc1.weight": torch.zeros(2, 2)}, path)
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(64).replace(b"P", b"Q"))  # never a zip signature
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:-300])
    elif kind == "directory":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path  # "missing": not created


BAD_FILES = {  # kind: what the one error line must say
    "state-dict": "is not a lobster-fx training checkpoint (no 'config', 'model' keys; keys: fc1.weight)",
    "random-bytes": "is not a torch checkpoint",
    "empty": "is empty",
    "truncated": "is a damaged or truncated torch checkpoint",
    "missing": "does not exist",
    "directory": "is a directory",
    "tensor": "is not a lobster-fx training checkpoint (it holds a Tensor",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["export", "report"])
def test_bad_checkpoint_file_is_one_clear_line(tmp_path, capsys, checkpoint, command, kind):
    path = _bad_file(kind, tmp_path, checkpoint)
    args = [command, str(path), str(tmp_path / "m.onnx")] if command == "export" else \
        [command, str(path), "--out", str(tmp_path / "rep")]
    assert main(args) == EXIT_ERROR
    line = _one_error_line(capsys, command)
    assert f"{path} {BAD_FILES[kind]}" in line, line


def test_checkpoint_with_foreign_config_names_the_option(tmp_path, capsys, checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["colour"] = "red"
    path = tmp_path / "foreign.pt"
    torch.save(state, path)
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == EXIT_ERROR
    line = _one_error_line(capsys, "report")
    assert str(path) in line and "colour" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["export", str(tmp_path / "missing.pt"), str(tmp_path / "m.onnx")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        main(args)


def test_usage_errors_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "digits"])  # --out is required
    assert exc.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_lenet5_on_digits_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == EXIT_ERROR
    line = _one_error_line(capsys, "train")
    assert "'lenet5' needs 28 x 28 images" in line and "'digits' has 8 x 8 images" in line
    assert not (out / "checkpoint.pt").exists()


def test_invalid_option_value_names_the_option(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--lr", "-0.1", "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == EXIT_ERROR
    assert "TrainConfig.lr must be a finite number > 0, got -0.1" in _one_error_line(capsys, "train")


def test_bench_checks_its_paths_first(tmp_path, capsys):
    folder, empty = tmp_path / "folder.onnx", tmp_path / "empty.onnx"
    folder.mkdir()
    empty.write_bytes(b"")
    cases = {folder: "is a directory, not an ONNX file", empty: "is empty",
             tmp_path / "missing.onnx": "no such file"}
    for path, message in cases.items():
        assert main(["bench", str(path), "--rounds", "1"]) == EXIT_ERROR
        line = _one_error_line(capsys, "bench")
        assert str(path) in line and message in line, line


def test_bench_on_a_file_that_is_not_onnx_names_it(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("not a model\n" * 10)
    assert main(["bench", str(path), "--rounds", "1"]) == EXIT_ERROR
    assert str(path) in _one_error_line(capsys, "bench")


def test_export_and_report_still_work(tmp_path, capsys, checkpoint):
    copy = tmp_path / "checkpoint.pt"
    shutil.copy(checkpoint, copy)
    assert main(["export", str(copy), str(tmp_path / "m.onnx")]) == 0
    assert main(["report", str(copy), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "sparsity.json").exists()
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]


def test_bench_names_models_apart_when_their_stems_are_the_same():
    assert _model_names(["a/model.onnx", "b/model.onnx", "c/slim.onnx"]) == {
        "a/model.onnx": "a/model.onnx", "b/model.onnx": "b/model.onnx", "slim": "c/slim.onnx"}
