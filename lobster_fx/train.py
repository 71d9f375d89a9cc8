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

import contextlib
import json
import math
import numbers
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lobster_fx.checkpoint import (
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    prepare_out_dir,
)
from lobster_fx.data import (
    DATASETS,
    Splits,
    TensorData,
    batches,
    load_dataset,
    load_digits,
)
from lobster_fx.graph.instrument import instrument
from lobster_fx.methods.lobster import Lobster
from lobster_fx.methods.serene import SeReNe
from lobster_fx.models import MODELS, get_model
from lobster_fx.pruning.schedule import PlateauPruner
from lobster_fx.report import sparsity_report

__all__ = [
    "RESUMABLE_CHANGES", "TrainConfig", "TrainResult", "TrainingInterrupted", "atomic_save", "atomic_write_text",
    "METHODS", "build_model", "config_from_dict", "evaluate", "load_checkpoint", "load_splits", "train",
]

#: the per-step rule of each ``TrainConfig.method``, and what its pruning phases remove
METHODS = {"lobster": "weight", "serene": "neuron"}
#: TrainConfig fields a resumed run may change: how long, where and how fast it runs, and what it
#: prints. Every other field defines the run (its data, model or arithmetic), and a resume that
#: changes one is refused. ``threads`` can change float rounding in some kernels, like resuming on
#: another machine would; it is allowed so that a resumed run can use the machine it lands on.
RESUMABLE_CHANGES = frozenset({"epochs", "max_minutes", "out_dir", "progress", "checkpoint_every", "threads"})
#: the keys of a checkpoint that ``train`` resumes from
_RESUME_KEYS = ("config", "model", "optimizer", "rule", "pruner", "generator", "log", "epoch", "elapsed",
                "cycle_epoch")


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
    #: compile once for a cheaper step on smaller models (figures: benchmarks/RESULTS.md)
    fused_rule: bool | None = None
    #: "lobster" (eq. 6, weights pruned at plateaus) or "serene" (neuron sensitivity, whole units
    #: pruned at plateaus: ``granularity="neuron"``)
    method: str = "lobster"
    #: SeReNe's sensitivity: "output" (d(sum y)/dz, one extra backward per step) or "loss" (dL/dz)
    sensitivity: str = "output"

    def __post_init__(self) -> None:
        """Check every field's type and range, naming the field and value that are wrong.

        Raises:
            TypeError: a field of the wrong type (``True`` is not a number here).
            ValueError: a value out of range, an unknown model or dataset, or a model the
                dataset's images do not fit (LeNet-5 needs 28 x 28; digits are 8 x 8).
        """
        _validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INT_MIN = {"epochs": 1, "batch_size": 1, "pwe": 1, "checkpoint_every": 1, "eval_batch_size": 1, "val_size": 0,
            "seed": 0}
_FLOAT_RANGE = {  # field: (low, low included, high, high included)
    "lr": (0.0, False, math.inf, False), "momentum": (0.0, True, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False), "lmbda": (0.0, True, math.inf, False),
    "twt": (0.0, True, math.inf, False), "plateau_threshold": (0.0, True, 1.0, False),
    "search_precision": (0.0, True, 1.0, False), "lr_min_factor": (0.0, True, 1.0, True),
    "max_minutes": (0.0, True, math.inf, False),
}
_OPTIONAL = ("max_minutes", "threads")
_BOOLS = ("rollback", "progress", "channels_last")


def _field_error(name: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"TrainConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_int(name: str, value: Any, low: int) -> int | None:
    if value is None and name in _OPTIONAL:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _field_error(name, value, "an int" + (" or None" if name in _OPTIONAL else ""))
    if value < low:
        raise ValueError(f"TrainConfig.{name} must be >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, low_ok: bool, high: float, high_ok: bool) -> float | None:
    if value is None and name in _OPTIONAL:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _field_error(name, value, "a number" + (" or None" if name in _OPTIONAL else ""))
    value = float(value)
    if not (math.isfinite(value) and (low <= value if low_ok else low < value)
            and (value <= high if high_ok else value < high)):
        if math.isinf(high):
            bound = f"a finite number {'>=' if low_ok else '>'} {low:g}"
        else:
            bound = f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise ValueError(f"TrainConfig.{name} must be {bound}, got {value!r}")
    return value


def _check_name(name: str, value: Any, valid: list[str]) -> str:
    if not isinstance(value, str):
        raise _field_error(name, value, "a str")
    if value.lower() not in valid:
        raise ValueError(f"TrainConfig.{name}: unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value.lower()


def _check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _field_error(name, value, "a path (str) or None")
    return os.fspath(value)  # a str: checkpoints hold plain data only


def _validate_config(config: TrainConfig) -> None:
    c = config
    c.model = _check_name("model", c.model, sorted(MODELS))
    c.dataset = _check_name("dataset", c.dataset, ["digits", *DATASETS])
    c.method = _check_name("method", c.method, list(METHODS))
    c.sensitivity = _check_name("sensitivity", c.sensitivity, ["output", "loss"])
    c.data_root, c.out_dir = _check_path("data_root", c.data_root), _check_path("out_dir", c.out_dir)
    for name, low in {**_INT_MIN, "threads": 1}.items():
        setattr(c, name, _check_int(name, getattr(c, name), low))
    for name, bounds in _FLOAT_RANGE.items():
        setattr(c, name, _check_float(name, getattr(c, name), *bounds))
    for name in _BOOLS:
        if not isinstance(getattr(c, name), bool):
            raise _field_error(name, getattr(c, name), "True or False")
    if c.fused_rule is not None and not isinstance(c.fused_rule, bool):
        raise _field_error("fused_rule", c.fused_rule, "True, False or None")
    if c.model == "lenet5" and c.dataset == "digits":
        raise ValueError("TrainConfig: model 'lenet5' needs 28 x 28 images (mnist, fashion-mnist), but dataset "
                         "'digits' has 8 x 8 images: use lenet300 or resnet32 with digits")


def config_from_dict(saved: dict[str, Any], source: str | Path = "the checkpoint") -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint's ``config`` entry describes.

    Raises:
        ValueError: the entry names fields this version does not know, or holds invalid values
            (the message names ``source``).
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{source}: its config has options this version of lobster-fx does not know: "
                         f"{', '.join(unknown)}")
    try:
        return TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid config: {exc}") from exc


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


def _same_option(name: str, old: Any, new: Any, dataset: str) -> bool:
    if name == "data_root":
        if dataset == "digits":  # bundled with scikit-learn: the folder is not used
            return True
        if old is None or new is None:
            return old is new
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    if isinstance(old, str) and isinstance(new, str):
        return old.lower() == new.lower()
    return old == new


def _check_resume(saved: dict[str, Any], config: TrainConfig, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with run-defining options other than those it was trained with."""
    changed = [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in config.to_dict().items()
        if name not in RESUMABLE_CHANGES and name in saved  # older checkpoints may lack newer fields
        and not _same_option(name, saved[name], value, config.dataset)
    ]
    if changed:
        raise ValueError(
            f"cannot resume {ckpt}: options that define the run differ from the checkpoint's "
            f"(checkpoint -> now): {'; '.join(changed)}. Resume with the checkpoint's values, start over "
            "(--restart, or train(..., resume=False)), or write to another output directory"
        )


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


class TrainingInterrupted(Exception):
    """:func:`train` stopped on SIGTERM; ``checkpoint`` (when set) resumes the run.

    Attributes:
        checkpoint: the resumable checkpoint on disk, or None when no epoch was saved yet.
        epoch: the number of epochs that checkpoint holds (0 without one).
        signum: the signal that stopped training (``signal.SIGTERM``).
    """

    def __init__(self, message: str, *, checkpoint: Path | None, epoch: int, signum: int) -> None:
        super().__init__(message)
        self.checkpoint, self.epoch, self.signum = checkpoint, epoch, signum


class _StopRequest:
    """Set by the SIGTERM handler; the training loop looks at it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum


@contextlib.contextmanager
def _stop_on_sigterm(enabled: bool) -> Iterator[_StopRequest]:
    """Catch SIGTERM as a stop request while training, then restore the previous handler."""
    request = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@dataclass
class _Run:
    """The objects a training run is made of, and the state that lives between epochs."""

    splits: Splits
    gm: nn.Module
    opt: torch.optim.Optimizer
    rule: Lobster
    pruner: PlateauPruner
    gen: torch.Generator
    log: list[dict[str, Any]] = field(default_factory=list)
    epoch0: int = 0
    elapsed0: float = 0.0
    cycle_epoch: int = 0


def _build_run(config: TrainConfig) -> _Run:
    torch.manual_seed(config.seed)
    splits = load_splits(config)
    gm = instrument(build_model(config, splits))
    if config.channels_last:
        gm.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(gm.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.method == "serene":
        rule = SeReNe(gm, opt, lmbda=config.lmbda, sensitivity=config.sensitivity)
    else:
        rule = Lobster(gm, opt, lmbda=config.lmbda, fused=config.fused_rule)

    def val_loss(m: nn.Module) -> float:
        return evaluate(m, splits.val, config.eval_batch_size)[0]

    pruner = PlateauPruner(
        gm, val_loss, twt=config.twt, pwe=config.pwe, rollback=config.rollback,
        threshold=config.plateau_threshold, reuse_val_loss=True, search_precision=config.search_precision,
        optimizer=opt,  # rollback also discards the momentum of the discarded epochs
        granularity=METHODS[config.method],
    )
    return _Run(splits, gm, opt, rule, pruner, torch.Generator().manual_seed(config.seed))


def _restore(run: _Run, state: dict[str, Any]) -> None:
    run.gm.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.rule.load_state_dict(state["rule"])
    run.pruner.load_state_dict(state["pruner"])
    run.gen.set_state(state["generator"])
    _set_rng_states(state)  # last: nothing after it draws before the first resumed epoch
    run.log, run.epoch0, run.elapsed0, run.cycle_epoch = state["log"], state["epoch"], state["elapsed"], \
        state["cycle_epoch"]


def _set_cycle_lr(run: _Run, config: TrainConfig) -> None:
    """Cosine within a prune cycle, restarted after each pruning (plateau length ~ pwe)."""
    period = max(config.pwe * 2, 1)
    frac = min(run.cycle_epoch / period, 1.0)
    factor = config.lr_min_factor + (1 - config.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    for group in run.opt.param_groups:
        group["lr"] = config.lr * factor


def _train_epoch(run: _Run, config: TrainConfig, stop: _StopRequest | None) -> tuple[float, int] | None:
    """One pass over the training split: (summed loss, samples), or None when ``stop`` was set."""
    train_loss, n = 0.0, 0
    for x, y in batches(run.splits.train, config.batch_size, shuffle=True, generator=run.gen):
        if stop is not None and stop.signum is not None:
            return None
        run.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(run.gm(x), y)
        loss.backward()
        run.opt.step()
        train_loss += float(loss.detach()) * len(y)
        n += len(y)
    return train_loss, n


def _save(run: _Run, config: TrainConfig, out: Path, epoch: int, elapsed: float) -> None:
    """checkpoint.pt (everything a resume needs), then log.json; both written atomically."""
    atomic_save(
        {
            "config": config.to_dict(), "model": run.gm.state_dict(), "optimizer": run.opt.state_dict(),
            "rule": run.rule.state_dict(), "pruner": run.pruner.state_dict(), "generator": run.gen.get_state(),
            "log": run.log, "epoch": epoch, "elapsed": elapsed, "cycle_epoch": run.cycle_epoch,
            **_rng_states(),
        },
        out / "checkpoint.pt",
    )
    atomic_write_text(json.dumps({"config": config.to_dict(), "log": run.log}, indent=1), out / "log.json")


def _interrupted(signum: int, ckpt: Path | None, saved: int | None, epoch: int, epochs: int) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    if ckpt is None or saved is None:
        where = "no epoch was saved yet; the same call starts the run afresh"
    else:
        where = (f"{ckpt} holds the first {saved} epochs; to continue from there, run the same command "
                 "(or train() call) again")
    return TrainingInterrupted(f"stopped by {name} in epoch {epoch + 1} of {epochs}: {where}",
                               checkpoint=ckpt if saved is not None else None, epoch=saved or 0, signum=signum)


def _epoch_entry(run: _Run, config: TrainConfig, epoch: int, loss_sum: float, n: int, t0: float) -> dict[str, Any]:
    """Validate, step the pruner (which may prune and roll back), test, and describe the epoch."""
    v_loss, v_err = evaluate(run.gm, run.splits.val, config.eval_batch_size)
    result = run.pruner.step(v_loss)
    run.cycle_epoch = 0 if result is not None else run.cycle_epoch + 1
    t_loss, t_err = evaluate(run.gm, run.splits.test, config.eval_batch_size)
    rep = sparsity_report(run.gm)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(n, 1),
        "val_loss": v_loss,
        "val_error": v_err,
        "test_loss": t_loss,
        "test_error": t_err,
        "compression": rep.compression_ratio,
        "nonzero": rep.nonzero,
        "layers": {layer.name: [layer.nonzero, layer.numel] for layer in rep.layers},  # paper's per-layer table
        "lr": run.opt.param_groups[0]["lr"],
        "pruned": None if result is None else result.to_dict(),
        "epoch_seconds": time.perf_counter() - t0,
    }


def train(
    config: TrainConfig,
    *,
    resume: bool = True,
    on_epoch: Callable[[dict[str, Any], nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` with LOBSTER and plateau pruning; see :class:`TrainConfig`.

    With ``out_dir`` set, a checkpoint is written atomically after every
    ``checkpoint_every`` epochs and the last one, and, with ``resume``, an existing one
    is continued from (the trajectory is the same as an uninterrupted run: the
    checkpoint holds the shuffling generator and the global torch and CUDA RNG
    states, which dropout draws from). Before the first epoch ``out_dir`` is created,
    temporary files a killed write left there are removed, and a probe file is
    written, so that an unwritable directory fails at once.

    Resuming: the checkpoint's config must agree with ``config`` on every option that
    defines the run (model, dataset, data_root, batch_size, lr, momentum, weight_decay,
    lmbda, twt, pwe, rollback, plateau_threshold, search_precision, lr_min_factor,
    val_size, seed, eval_batch_size, channels_last, fused_rule, method, sensitivity). Only those in
    :data:`RESUMABLE_CHANGES` may differ: ``epochs`` (extending a run is legitimate),
    ``max_minutes``, ``out_dir``, ``progress``, ``checkpoint_every`` and ``threads``.
    Otherwise a ValueError names each differing option with both values.

    SIGTERM (with ``out_dir`` set, in the main thread): when the checkpoint on disk is
    from the start of the current epoch, the epoch is abandoned at the next step;
    otherwise it is finished and checkpointed. Then :class:`TrainingInterrupted` is
    raised, saying where the checkpoint is; resuming from it ends bit-identical to an
    uninterrupted run. The previous SIGTERM handler is restored on return.

    Raises:
        ValueError: a resume whose run-defining options differ, or a checkpoint that is
            not a lobster-fx training checkpoint (or holds code: it is never unpickled).
        OSError: ``out_dir`` is not writable, or a checkpoint write failed (naming the
            file and the cause; the previous checkpoint is kept).
        TrainingInterrupted: SIGTERM arrived.
    """
    start = time.perf_counter()
    out = Path(config.out_dir) if config.out_dir else None
    ckpt = out / "checkpoint.pt" if out else None
    state = None
    if out is not None:
        prepare_out_dir(out)
        if resume and ckpt.exists():
            state = load_checkpoint(ckpt, required=_RESUME_KEYS)  # weights_only: no code runs on load
            _check_resume(state["config"], config, ckpt)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run = _build_run(config)
    if state is not None:
        _restore(run, state)
    saved = run.epoch0 if state is not None else None  # epochs the checkpoint on disk holds
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.epochs, initial=run.epoch0, desc=f"{config.model}/{config.dataset}", unit="epoch",
                   mininterval=1.0)
    run.gm.train()
    try:
        with _stop_on_sigterm(ckpt is not None) as stop:
            for epoch in range(run.epoch0, config.epochs):
                if config.lr_min_factor < 1.0:
                    _set_cycle_lr(run, config)
                t0 = time.perf_counter()
                # abandon the epoch on SIGTERM only when the checkpoint on disk is from its start
                sums = _train_epoch(run, config, stop if saved == epoch else None)
                if sums is None:
                    raise _interrupted(stop.signum, ckpt, saved, epoch, config.epochs)
                entry = _epoch_entry(run, config, epoch, *sums, t0)
                run.log.append(entry)
                if on_epoch is not None:
                    on_epoch(entry, run.gm)
                elapsed = run.elapsed0 + time.perf_counter() - start
                if bar is not None:
                    bar.set_postfix(val=f"{entry['val_loss']:.3f}", test_err=f"{entry['test_error']:.2f}%",
                                    comp=f"{entry['compression']:.1f}x")
                    bar.update(1)
                stopping = config.max_minutes is not None and elapsed > 60 * config.max_minutes
                last = stopping or epoch + 1 == config.epochs or stop.signum is not None
                if ckpt is not None and ((epoch + 1) % config.checkpoint_every == 0 or last):
                    _save(run, config, out, epoch + 1, elapsed)
                    saved = epoch + 1
                if stop.signum is not None:
                    raise _interrupted(stop.signum, ckpt, saved, epoch, config.epochs)
                if stopping:
                    break
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(run.gm, run.splits, run.log, wall_seconds=run.elapsed0 + time.perf_counter() - start)
