"""Resume equals uninterrupted: checkpoint after K epochs, continue in a new process.

The training script is ``tests/_resume_worker.py`` (LeNet300, synthetic data,
SGD momentum, Lobster, PlateauPruner with rollback, seeded shuffling). A fresh
interpreter rebuilds everything from scratch (from a different random init),
loads the checkpoint (model with masks, optimizer, rule, pruner, generator
state, epoch) and trains on to E. Its final parameters and masks must equal
those of the uninterrupted run bit for bit, with prunings both before and after
the checkpoint. Negative controls: resuming without the pruner state or without
the generator state must give different final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_resume_worker.py")
ROOT = Path(__file__).resolve().parent.parent  # the checkout root
# prunings at epochs 5 and 8 (0-based); the pruner state decides epoch 8 and the
# generator state the shuffle of epoch 9, which trains (a pruning epoch with
# rollback discards its own training, so the last epoch must not prune)
EPOCHS, CHECKPOINT_EPOCH = 10, 8
TIMEOUT_S = 120


def _worker_env() -> dict[str, str]:
    # the worker runs as a script (sys.path[0] is tests/): put this checkout first, so that it
    # imports the lobster_fx under test, not another copy the environment may have installed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)


def _start(*args: str) -> subprocess.Popen:
    env = _worker_env()
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_all(procs: dict[str, subprocess.Popen]) -> None:
    failures = []
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            failures.append(f"{name}: timed out after {TIMEOUT_S} s\n{out}")
            continue
        if p.returncode != 0:
            failures.append(f"{name}: exit code {p.returncode}\n{out}")
    if failures:
        pytest.fail("training subprocess failed:\n" + "\n".join(failures))


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("resume")
    ckpt = d / "ckpt.pt"
    # the uninterrupted run and the first part are independent: run them side by side
    _wait_all(
        {
            "uninterrupted": _start(str(d / "full.pt"), "--epochs", str(EPOCHS)),
            "first part": _start(str(d / "first.pt"), "--epochs", str(CHECKPOINT_EPOCH), "--save", str(ckpt)),
        }
    )
    # a new process: the real resume first, then the negative controls
    resumed = d / "resumed.pt"
    controls = ["pruner", "generator"]
    args = ["--epochs", str(EPOCHS), "--resume", str(ckpt)]
    for part in controls:
        args += ["--control", part]
    _wait_all({"resumed": _start(str(resumed), *args)})
    out = {name: _load(d / f"{name}.pt") for name in ("full", "first", "resumed")}
    for part in controls:
        out[f"no_{part}_state"] = _load(f"{resumed}.no_{part}.pt")
    out["ckpt"] = _load(ckpt)
    out["leftovers"] = sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))
    return out


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prunings_before_and_after_checkpoint(runs):
    full, first, resumed = runs["full"], runs["first"], runs["resumed"]
    assert runs["ckpt"]["epoch"] == CHECKPOINT_EPOCH
    assert first["prune_epochs"], "no pruning before the checkpoint: pick other E, K or data"
    assert resumed["prune_epochs"], "no pruning after the checkpoint: pick other E, K or data"
    assert all(e < CHECKPOINT_EPOCH for e in first["prune_epochs"])
    assert all(e >= CHECKPOINT_EPOCH for e in resumed["prune_epochs"])
    assert first["prune_epochs"] + resumed["prune_epochs"] == full["prune_epochs"]
    assert EPOCHS - 1 not in full["prune_epochs"], "the last epoch should train, not roll back and prune"
    # pruning after the checkpoint removed parameters (not just an empty phase)
    after = [h for h in resumed["pruner_history"] if h["call"] > CHECKPOINT_EPOCH]
    assert sum(h["pruned"] for h in after) > 0


def test_resume_equals_uninterrupted(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert _identical(full["state"], resumed["state"])  # parameters and mask buffers
    assert _identical(full["masks"], resumed["masks"])
    assert full["pruner_history"] == resumed["pruner_history"]
    assert full["rule_steps"] == resumed["rule_steps"] == EPOCHS * 8  # 512 / 64 batches per epoch
    zeros = sum(int((m == 0).sum()) for m in full["masks"].values())
    assert zeros > 0


def test_pruned_entries_are_exactly_zero(runs):
    state, masks = runs["resumed"]["state"], runs["resumed"]["masks"]
    for name, mask in masks.items():
        p = state[name]  # LeNet300 traces flat: parameters keep their original names
        assert torch.equal(p[mask == 0], torch.zeros_like(p[mask == 0])), name


def test_no_temporary_files_left_behind(runs):
    assert runs["leftovers"] == []


@pytest.mark.parametrize("variant", ["no_pruner_state", "no_generator_state"])
def test_incomplete_resume_differs(runs, variant):
    """The comparison can fail: leaving out part of the checkpoint changes the outcome."""
    assert not _identical(runs["full"]["state"], runs[variant]["state"])



def test_worker_imports_this_checkout():
    """The workers import the lobster_fx under test (the checkout), whatever else is installed."""
    probe = subprocess.run(
        [sys.executable, "-c", "import lobster_fx, pathlib; print(pathlib.Path(lobster_fx.__file__).resolve())"],
        cwd=WORKER.parent, env=_worker_env(), capture_output=True, text=True, check=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(ROOT)
