"""A reference LOBSTER training loop on in-memory data, with resumable checkpoints.

Used by ``lobster-fx train``, the main job (``lobster-fx demo``) and
``benchmarks/reproduce.py``. It is an ordinary PyTorch loop plus the three
lobster_fx lines (``instrument``, ``Lobster``, ``PlateauPruner``): decisions
use the validation split only; the test error is logged, never used.

Example::

    >>> from lobster_fx.train import TrainConfig, train
    >>> result = train(TrainConfig(model="lenet300", dataset="digits", epochs=2, progress=False))
    >>> len(result.log)
    2
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lobster_fx.data import Splits, TensorData, batches, load_dataset, load_digits
from lobster_fx.instrument import instrument
from lobster_fx.models import get_model
from lobster_fx.report import sparsity_report
from lobster_fx.rule import Lobster
from lobster_fx.schedule import PlateauPruner

__all__ = ["TrainConfig", "TrainResult", "atomic_save", "build_model", "evaluate", "load_splits", "train"]


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoint and log)."""

    model: str = "lenet300"
    dataset: str = "mnist"  #: "mnist", "fashion-mnist" or "digits" (bundled with scikit-learn)
    data_root: str | None = None  #: folder holding MNIST/ and FashionMNIST/ (not needed for digits)
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0  #: plain L2 (the weight-decay baseline)
    lmbda: float = 1e-4  #: LOBSTER strength; 0 = pure magnitude pruning at plateaus
    twt: float = 0.05
    pwe: int = 20
    rollback: bool = True
    plateau_threshold: float = 0.0
    search_precision: float = 0.0  #: threshold search stops at this share of candidates (0 = exact, the paper)
    lr_min_factor: float = 1.0  #: cosine decay of lr down to lr*factor within each prune cycle (1 = constant)
    val_size: int = 5000
    seed: int = 0
    max_minutes: float | None = None  #: stop (with a checkpoint) after this much wall time
    out_dir: str | None = None  #: checkpoint.pt and log.json go here
    progress: bool = True
    checkpoint_every: int = 1  #: epochs between checkpoints (the last epoch is always saved)
    threads: int | None = None  #: torch intra-op threads (None: torch's default); 1 suits small models on a busy machine
    eval_batch_size: int = 5000
    #: store conv weights and activations NHWC (oneDNN's NHWC kernels); same arithmetic. Its speed
    #: effect on LeNet-5 is within this machine's noise: benchmarks/results/train_cost.md
    channels_last: bool = False
    #: ``Lobster(fused=...)``: None = compiled kernels from 2**20 prunable weights up; True pays a
    #: ~2 s compile once for a cheaper step on smaller models (LeNet-300: 1.23x vs 1.31x of plain)
    fused_rule: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    gm: nn.Module
    splits: Splits
    log: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0


def load_splits(config: TrainConfig) -> Splits:
    name = config.dataset.lower()
    if name == "digits":
        return load_digits(seed=config.seed)
    if config.data_root is None:
        raise ValueError(f"dataset {config.dataset!r} needs --data-root (the folder holding MNIST/ and FashionMNIST/)")
    return load_dataset(name, config.data_root, val_size=config.val_size, seed=config.seed)


def build_model(config: TrainConfig, splits: Splits) -> nn.Module:
    in_shape = tuple(splits.train.x.shape[1:])
    kwargs: dict[str, Any] = {"num_classes": int(splits.train.y.max()) + 1}
    if config.model == "lenet300":
        kwargs["in_features"] = math.prod(in_shape)
    elif config.model in ("lenet5", "resnet32"):
        kwargs["in_channels"] = in_shape[0]
    return get_model(config.model, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, batch_size: int = 5000) -> tuple[float, float]:
    """Mean cross-entropy and top-1 error (%) of ``model`` on ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    for x, y in batches(data, batch_size, shuffle=False):
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        wrong += int((out.argmax(1) != y).sum())
    model.train(was_training)
    return loss_sum / len(data), 100.0 * wrong / len(data)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _rng_states() -> dict[str, Any]:
    """The global generators training draws from (dropout, random augmentations), as plain tensors.

    CUDA's are saved only once CUDA is initialized: reading them would otherwise start a CUDA
    context in a CPU run, and until then they still hold the seed the resumed run sets as well.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_states": torch.cuda.get_rng_state_all() if cuda else [],
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    if "torch_rng_state" not in state:  # a checkpoint from before the RNG was saved
        warnings.warn("checkpoint has no torch RNG state: dropout and other random layers will not "
                      "resume exactly as the uninterrupted run", stacklevel=3)
        return
    torch.set_rng_state(state["torch_rng_state"])
    cuda_states = state.get("cuda_rng_states") or []
    if not cuda_states:
        return
    if not torch.cuda.is_available() or len(cuda_states) != torch.cuda.device_count():
        warnings.warn(f"checkpoint holds {len(cuda_states)} CUDA RNG states but this machine has "
                      f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA devices: "
                      "their random draws will not resume exactly", stacklevel=3)
        return
    torch.cuda.set_rng_state_all(cuda_states)


def train(
    config: TrainConfig,
    *,
    resume: bool = True,
    on_epoch: Callable[[dict[str, Any], nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` with LOBSTER and plateau pruning; see :class:`TrainConfig`.

    With ``out_dir`` set, a checkpoint is written atomically after every epoch
    and, with ``resume``, an existing one is continued from (the trajectory is
    the same as an uninterrupted run: the checkpoint holds the shuffling
    generator and the global torch and CUDA RNG states, which dropout draws from).
    """
    start = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    splits = load_splits(config)
    model = build_model(config, splits)
    gm = instrument(model)
    if config.channels_last:
        gm.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(gm.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    rule = Lobster(gm, opt, lmbda=config.lmbda, fused=config.fused_rule)

    def val_loss(m: nn.Module) -> float:
        return evaluate(m, splits.val, config.eval_batch_size)[0]

    pruner = PlateauPruner(
        gm, val_loss, twt=config.twt, pwe=config.pwe, rollback=config.rollback,
        threshold=config.plateau_threshold, reuse_val_loss=True, search_precision=config.search_precision,
        optimizer=opt,  # rollback also discards the momentum of the discarded epochs
    )
    gen = torch.Generator().manual_seed(config.seed)
    log: list[dict[str, Any]] = []
    epoch0, elapsed0, cycle_epoch = 0, 0.0, 0
    out = Path(config.out_dir) if config.out_dir else None
    ckpt = out / "checkpoint.pt" if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors, numbers, strings: no code runs on load
        gm.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rule.load_state_dict(state["rule"])
        pruner.load_state_dict(state["pruner"])
        gen.set_state(state["generator"])
        _set_rng_states(state)  # last: nothing after it draws before the first resumed epoch
        log, epoch0, elapsed0, cycle_epoch = state["log"], state["epoch"], state["elapsed"], state["cycle_epoch"]

    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.epochs, initial=epoch0, desc=f"{config.model}/{config.dataset}", unit="epoch", mininterval=1.0)
    gm.train()
    for epoch in range(epoch0, config.epochs):
        if config.lr_min_factor < 1.0:
            # cosine within a prune cycle, restarted after each pruning (plateau length ~ pwe)
            period = max(config.pwe * 2, 1)
            frac = min(cycle_epoch / period, 1.0)
            factor = config.lr_min_factor + (1 - config.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = config.lr * factor
        t0 = time.perf_counter()
        train_loss, n = 0.0, 0
        for x, y in batches(splits.train, config.batch_size, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(gm(x), y)
            loss.backward()
            opt.step()
            train_loss += float(loss.detach()) * len(y)
            n += len(y)
        v_loss, v_err = evaluate(gm, splits.val, config.eval_batch_size)
        result = pruner.step(v_loss)
        cycle_epoch = 0 if result is not None else cycle_epoch + 1
        t_loss, t_err = evaluate(gm, splits.test, config.eval_batch_size)
        rep = sparsity_report(gm)
        entry = {
            "epoch": epoch + 1,
            "train_loss": train_loss / max(n, 1),
            "val_loss": v_loss,
            "val_error": v_err,
            "test_loss": t_loss,
            "test_error": t_err,
            "compression": rep.compression_ratio,
            "nonzero": rep.nonzero,
            "layers": {layer.name: [layer.nonzero, layer.numel] for layer in rep.layers},  # paper's per-layer table
            "lr": opt.param_groups[0]["lr"],
            "pruned": None if result is None else result.to_dict(),
            "epoch_seconds": time.perf_counter() - t0,
        }
        log.append(entry)
        if on_epoch is not None:
            on_epoch(entry, gm)
        elapsed = elapsed0 + time.perf_counter() - start
        if bar is not None:
            bar.set_postfix(val=f"{v_loss:.3f}", test_err=f"{t_err:.2f}%", comp=f"{rep.compression_ratio:.1f}x")
            bar.update(1)
        stopping = config.max_minutes is not None and elapsed > 60 * config.max_minutes
        last = stopping or epoch + 1 == config.epochs
        if ckpt is not None and ((epoch + 1) % config.checkpoint_every == 0 or last):
            atomic_save(
                {
                    "config": config.to_dict(), "model": gm.state_dict(), "optimizer": opt.state_dict(),
                    "rule": rule.state_dict(), "pruner": pruner.state_dict(), "generator": gen.get_state(),
                    "log": log, "epoch": epoch + 1, "elapsed": elapsed, "cycle_epoch": cycle_epoch,
                    **_rng_states(),
                },
                ckpt,
            )
            _atomic_write_text(json.dumps({"config": config.to_dict(), "log": log}, indent=1), out / "log.json")
        if stopping:
            break
    if bar is not None:
        bar.close()
    return TrainResult(gm, splits, log, wall_seconds=elapsed0 + time.perf_counter() - start)
