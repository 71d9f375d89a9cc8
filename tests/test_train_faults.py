"""train() under bad input and faults: invalid configs, changed resumes, full disks, stale files, SIGTERM."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lobster_fx.train as train_module
from lobster_fx.cli import EXIT_ERROR, main
from lobster_fx.train import TrainConfig, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent  # the checkout root


def _config(out: Path | None = None, **changes) -> TrainConfig:
    base = {"model": "lenet300", "dataset": "digits", "epochs": 2, "batch_size": 64, "lr": 0.05, "lmbda": 1e-3,
            "pwe": 1, "threads": 1, "progress": False, "out_dir": None if out is None else str(out)}
    return TrainConfig(**{**base, **changes})


def _temporary_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- TrainConfig validation --------------------------------------------------------------------------

BAD_FIELDS = [  # field, value, exception, message
    ("lmbda", "abc", TypeError, "TrainConfig.lmbda must be a number, got 'abc' (str)"),
    ("lmbda", True, TypeError, "TrainConfig.lmbda must be a number, got True (bool)"),
    ("lmbda", -1e-4, ValueError, "TrainConfig.lmbda must be a finite number >= 0, got -0.0001"),
    ("twt", None, TypeError, "TrainConfig.twt must be a number, got None (NoneType)"),
    ("lr", -0.1, ValueError, "TrainConfig.lr must be a finite number > 0, got -0.1"),
    ("lr", 0, ValueError, "TrainConfig.lr must be a finite number > 0, got 0.0"),
    ("lr", float("nan"), ValueError, "TrainConfig.lr must be a finite number > 0, got nan"),
    ("epochs", 0, ValueError, "TrainConfig.epochs must be >= 1, got 0"),
    ("epochs", 2.5, TypeError, "TrainConfig.epochs must be an int, got 2.5 (float)"),
    ("batch_size", False, TypeError, "TrainConfig.batch_size must be an int, got False (bool)"),
    ("pwe", 0, ValueError, "TrainConfig.pwe must be >= 1, got 0"),
    ("threads", 0, ValueError, "TrainConfig.threads must be >= 1, got 0"),
    ("plateau_threshold", 1.0, ValueError, "TrainConfig.plateau_threshold must be in [0, 1), got 1.0"),
    ("max_minutes", "10", TypeError, "TrainConfig.max_minutes must be a number or None, got '10' (str)"),
    ("progress", 1, TypeError, "TrainConfig.progress must be True or False, got 1 (int)"),
    ("fused_rule", "auto", TypeError, "TrainConfig.fused_rule must be True, False or None, got 'auto' (str)"),
    ("model", "lenet", ValueError, "TrainConfig.model: unknown model 'lenet'; valid: lenet300, lenet5, resnet32"),
    ("dataset", "cifar10", ValueError, "TrainConfig.dataset: unknown dataset 'cifar10'"),
    ("out_dir", 3, TypeError, "TrainConfig.out_dir must be a path (str) or None, got 3 (int)"),
]


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_FIELDS, ids=[f"{b[0]}={b[1]!r}" for b in BAD_FIELDS])
def test_invalid_field_names_field_and_value(name, value, error, message):
    with pytest.raises(error) as exc:
        TrainConfig(**{name: value})
    assert message in str(exc.value)


def test_valid_values_are_normalised():
    config = TrainConfig(model="LeNet300", dataset="Digits", lr=1, out_dir=Path("x"), max_minutes=None)
    assert (config.model, config.dataset, config.out_dir) == ("lenet300", "digits", "x")
    assert isinstance(config.lr, float)  # checkpoints hold plain data: str, not Path; float, not int


def test_lenet5_on_digits_is_refused_up_front():
    with pytest.raises(ValueError, match=r"'lenet5' needs 28 x 28 images .* 'digits' has 8 x 8 images"):
        TrainConfig(model="lenet5", dataset="digits")


# -- resuming with other options ----------------------------------------------------------------------

CHANGES = {  # option: (value in the checkpoint, value now)
    "lr": (0.05, 0.1), "lmbda": (1e-3, 1e-2), "seed": (0, 1), "batch_size": (64, 32), "model": ("lenet300", "resnet32"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The out_dir of a finished 2-epoch run."""
    out = tmp_path_factory.mktemp("finished")
    train(_config(out))
    return out


@pytest.mark.parametrize("option", sorted(CHANGES))
def test_resume_with_changed_option_is_refused(finished, option):
    old, new = CHANGES[option]
    before = {name: _digest(finished / name) for name in ("checkpoint.pt", "log.json")}
    with pytest.raises(ValueError) as exc:
        train(_config(finished, epochs=3, **{option: new}))
    message = str(exc.value)
    assert str(finished / "checkpoint.pt") in message and f"{option} {old!r} -> {new!r}" in message, message
    assert "--restart" in message and "resume=False" in message
    assert {name: _digest(finished / name) for name in before} == before  # the checkpoint is untouched


def test_resume_names_every_changed_option(finished):
    with pytest.raises(ValueError) as exc:
        train(_config(finished, lr=0.1, seed=3, twt=0.1))
    assert all(part in str(exc.value) for part in ("lr 0.05 -> 0.1", "seed 0 -> 3", "twt 0.05 -> 0.1"))


def test_cli_resume_with_changed_lr_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["train", "--model", "lenet300", "--dataset", "digits", "--batch-size", "64", "--lmbda", "1e-3",
             "--pwe", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main([*flags, "--lr", "0.05", "--epochs", "1"]) == 0
    before = _digest(out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*flags, "--lr", "0.1", "--epochs", "2"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lobster-fx train: error: cannot resume"), err
    assert "lr 0.05 -> 0.1" in err and "--restart" in err
    assert _digest(out / "checkpoint.pt") == before
    assert main([*flags, "--lr", "0.1", "--epochs", "1", "--restart"]) == 0  # the way forward works
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["lr"] == 0.1


def test_resume_may_change_epochs_threads_and_progress(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    result = train(_config(out, epochs=3, threads=2, max_minutes=30.0, checkpoint_every=5))
    assert [e["epoch"] for e in result.log] == [1, 2, 3]


# -- write faults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["enospc", "short-write"])
def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    out = tmp_path / "run"
    train(_config(out, epochs=1))
    before = _digest(out / "checkpoint.pt")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(100)}, f)  # some bytes reach the file, then the disk is full
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4182")

    monkeypatch.setattr(train_module.torch, "save", full_disk)
    with pytest.raises(OSError) as exc:
        train(_config(out, epochs=2))
    message = str(exc.value)
    assert f"cannot write {out / 'checkpoint.pt'}" in message, message
    assert ("no space left on device" if fault == "enospc" else "is the disk full?") in message
    monkeypatch.undo()
    assert _digest(out / "checkpoint.pt") == before  # the previous checkpoint is intact
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert _temporary_files(out) == []


def test_failed_log_write_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == "log.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as exc:
        train(_config(out, epochs=1))
    assert _temporary_files(out) == []
    assert f"cannot write {out / 'log.json'}: no space left on device" in str(exc.value)
    assert not (out / "log.json").exists()


def test_stale_temporary_files_are_swept_on_start(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    ours = [".checkpoint.pt.k2x9_q0a.tmp", ".log.json.abcdefgh.tmp"]  # what a killed atomic write leaves
    others = ["notes.tmp", ".checkpoint.pt.tmp", "checkpoint.pt.abcdefgh.tmp", "keep.txt"]
    for name in ours + others:
        (out / name).write_bytes(b"x" * 10)
    train(_config(out, epochs=3))
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.pt", "log.json", *others])


def test_unwritable_out_dir_fails_before_the_first_epoch(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    epochs = []
    with pytest.raises(OSError) as exc:
        train(_config(tmp_path / "run", epochs=1), on_epoch=lambda entry, gm: epochs.append(entry["epoch"]))
    assert epochs == [], "the directory was found unwritable only after training"
    assert f"{tmp_path / 'run'} is not writable: Permission denied" in str(exc.value)


# -- SIGTERM --------------------------------------------------------------------------------------------

@pytest.fixture
def previous_handler():
    """A SIGTERM handler of the caller's: train() must restore it (and without the fix, it keeps pytest alive)."""
    received = []

    def handler(signum: int, frame) -> None:
        received.append(signum)

    old = signal.signal(signal.SIGTERM, handler)
    yield handler, received
    signal.signal(signal.SIGTERM, old)


def _sigterm_at(monkeypatch, epoch: int, batch: int) -> None:
    """SIGTERM to this process before batch ``batch`` of epoch ``epoch`` (0-based) of the next train()."""
    real_batches = train_module.batches
    calls = []

    def batches(data, batch_size, **kwargs):
        training = kwargs.get("shuffle", False)  # evaluate() iterates too, without shuffling
        if training:
            calls.append(None)
        for i, item in enumerate(real_batches(data, batch_size, **kwargs)):
            if training and len(calls) - 1 == epoch and i == batch:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    monkeypatch.setattr(train_module, "batches", batches)


def _comparable(log):
    return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in log]


def _assert_same_run(a, b):
    assert _comparable(a.log) == _comparable(b.log)
    sa, sb = a.gm.state_dict(), b.gm.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("checkpoint_every", "stop_epoch", "saved"), [(1, 2, 2), (3, 1, 2)],
                         ids=["abandon-epoch", "finish-epoch"])
def test_sigterm_stops_with_a_resumable_checkpoint(tmp_path, monkeypatch, previous_handler, checkpoint_every,
                                                   stop_epoch, saved):
    """Checkpoint from the epoch's start on disk: the epoch is abandoned. Otherwise it is finished and saved."""
    epochs, out = 4, tmp_path / "run"
    full = train(_config(tmp_path / "full", epochs=epochs, checkpoint_every=checkpoint_every))
    _sigterm_at(monkeypatch, epoch=stop_epoch, batch=3)
    with pytest.raises(TrainingInterrupted) as exc:
        train(_config(out, epochs=epochs, checkpoint_every=checkpoint_every))
    handler, received = previous_handler
    assert signal.getsignal(signal.SIGTERM) is handler and received == []  # restored; the signal was train()'s
    assert exc.value.signum == signal.SIGTERM and exc.value.epoch == saved
    assert exc.value.checkpoint == out / "checkpoint.pt"
    assert f"stopped by SIGTERM in epoch {stop_epoch + 1} of {epochs}" in str(exc.value)
    assert f"{out / 'checkpoint.pt'} holds the first {saved} epochs" in str(exc.value)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == saved
    assert _temporary_files(out) == []
    monkeypatch.undo()
    resumed = train(_config(out, epochs=epochs, checkpoint_every=checkpoint_every))
    _assert_same_run(resumed, full)  # bit for bit
    assert _temporary_files(out) == []


def test_cli_sigterm_exits_143_with_one_message_and_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ["train", "--model", "lenet300", "--dataset", "digits", "--batch-size", "64", "--lr", "0.05",
             "--lmbda", "1e-3", "--pwe", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "lobster_fx.cli", *flags, "--epochs", "100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lobster-fx train: stopped by SIGTERM"), err
    assert f"{out / 'checkpoint.pt'} holds the first" in lines[0] and "run the same command (or train() call) again" in lines[0]
    assert _temporary_files(out) == []
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    # resume in this process up to one epoch past the checkpoint; extending or shortening --epochs is allowed
    assert main([*flags, "--epochs", str(saved + 1)]) == 0
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    full = train(_config(tmp_path / "full", epochs=saved + 1))
    assert _comparable(resumed["log"]) == _comparable(full.log)
    state = full.gm.state_dict()
    assert all(torch.equal(resumed["model"][k], v) for k, v in state.items())
