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
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    Splits,
    TensorData,
    batches,
    load_dataset,
    load_digits,
    splits_from_user,
)
from lobster_fx.graph.instrument import instrument
from lobster_fx.methods.lobster import Lobster
from lobster_fx.methods.serene import SeReNe
from lobster_fx.models import get_model
from lobster_fx.pruning.schedule import PlateauPruner
from lobster_fx.report import sparsity_report
from lobster_fx.specs import build_model_from_spec, call_data_function, parse_data_spec, parse_model_spec
from lobster_fx.train_config import (
    CHOICES,
    METHODS,
    OPTIMIZERS,
    RESUMABLE_CHANGES,
    TrainConfig,
    _check_resume,
    check_device,
    config_from_dict,
)

__all__ = [
    "CHOICES", "RESUMABLE_CHANGES", "TrainConfig", "TrainResult", "TrainingInterrupted", "atomic_save",
    "atomic_write_text", "METHODS", "OPTIMIZERS", "build_model", "check_device", "config_from_dict", "data_info",
    "evaluate", "load_checkpoint", "load_splits", "model_from_config", "train",
]

#: the keys of a checkpoint that ``train`` resumes from
_RESUME_KEYS = ("config", "model", "optimizer", "rule", "pruner", "generator", "log", "epoch", "elapsed",
                "cycle_epoch")


@dataclass
class TrainResult:
    gm: nn.Module
    splits: Splits
    log: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0


def load_splits(config: TrainConfig) -> Splits:
    """The train / validation / test data ``config.dataset`` names, on the CPU.

    Raises:
        ValueError, OSError: the data is missing or malformed (the message names it).
    """
    kind, name = parse_data_spec(config.dataset)
    if kind == "imagefolder":
        from lobster_fx.imagefolder import load_image_folder

        return load_image_folder(name, image_size=config.image_size, val_fraction=config.val_fraction,
                                 test_fraction=config.test_fraction, seed=config.seed)
    if kind == "function":
        return splits_from_user(call_data_function(name, config.data_kwargs), name)
    if name == "digits":
        return load_digits(seed=config.seed)
    if config.data_root is None:
        raise ValueError(f"dataset {config.dataset!r} needs --data-root (the folder holding MNIST/ and FashionMNIST/)")
    return load_dataset(name, config.data_root, val_size=config.val_size, seed=config.seed)


def data_info(splits: Splits) -> dict[str, Any]:
    """What a checkpoint records of its data, so that the model can be rebuilt without it.

    ``input_shape`` (one sample's), ``input_dtype`` ("float32", or "int64" for token ids),
    ``num_classes``, ``classes`` (names or None), ``mean`` and ``std`` (the normalisation
    applied to the inputs).

    Example::

        >>> from lobster_fx.data import load_digits
        >>> info = data_info(load_digits())
        >>> info["input_shape"], info["num_classes"]
        ([1, 8, 8], 10)
    """
    labels = max(int(part.y.max()) for part in (splits.train, splits.val, splits.test)) + 1
    if splits.classes is not None:
        labels = max(labels, len(splits.classes))
    return {"input_shape": [int(d) for d in splits.train.x.shape[1:]],
            "input_dtype": str(splits.train.x.dtype).removeprefix("torch."), "num_classes": labels,
            "classes": None if splits.classes is None else list(splits.classes),
            "mean": float(splits.mean), "std": float(splits.std)}


def model_from_config(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The (plain, un-instrumented) model ``config.model`` names, for inputs of ``input_shape``.

    A reference model gets its input size and ``num_classes`` from these arguments
    (``config.model_kwargs`` override them); any other spec is built from
    ``config.model_kwargs`` alone (:func:`lobster_fx.specs.build_model_from_spec`).

    Example::

        >>> model_from_config(TrainConfig(model="lenet300", dataset="digits"), (1, 8, 8), 10).fc1.in_features
        64
    """
    kind, name = parse_model_spec(config.model)
    if kind != "builtin":
        return build_model_from_spec(config.model, config.model_kwargs)
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    if name == "lenet300":
        kwargs["in_features"] = math.prod(input_shape)
    elif name in ("lenet5", "resnet32"):
        kwargs["in_channels"] = input_shape[0]
    return get_model(name, **{**kwargs, **(config.model_kwargs or {})})


def build_model(config: TrainConfig, splits: Splits) -> nn.Module:
    """:func:`model_from_config` for the input shape and classes (:func:`data_info`) of ``splits``."""
    info = data_info(splits)
    return model_from_config(config, tuple(info["input_shape"]), info["num_classes"])


def _check_model_output(model: nn.Module, config: TrainConfig, splits: Splits, num_classes: int) -> None:
    """One forward of two training inputs (eval mode, no grad), so a model that does not fit the
    data fails here with a message naming both, not in the middle of the first epoch."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(splits.train.x[:2])
    except Exception as exc:
        raise ValueError(f"model {config.model!r} on inputs of shape {tuple(splits.train.x.shape[1:])} from "
                         f"{config.dataset!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {config.model!r} must return N x classes logits (cross-entropy), got {what}")
    if out.shape[1] < num_classes:
        raise ValueError(f"model {config.model!r} returns {out.shape[1]} logits per input, but {config.dataset!r} "
                         f"has {num_classes} classes: pass --model-kwargs '{{\"num_classes\": {num_classes}}}' "
                         "(or what the model calls it)")


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
    device: torch.device
    log: list[dict[str, Any]] = field(default_factory=list)
    epoch0: int = 0
    elapsed0: float = 0.0
    cycle_epoch: int = 0


def _make_optimizer(config: TrainConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":  # decoupled decay; the rule's lmbda term is applied on top, after the step
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _build_run(config: TrainConfig, device: torch.device) -> _Run:
    torch.manual_seed(config.seed)
    splits = load_splits(config)
    model = build_model(config, splits)
    if parse_model_spec(config.model)[0] != "builtin":
        _check_model_output(model, config, splits, data_info(splits)["num_classes"])
    # on the device before instrument: the masks are created beside their weights
    gm = instrument(model.to(device))
    splits = splits.to(device)  # in memory on the device: batches are slices of it
    if config.channels_last:
        gm.to(memory_format=torch.channels_last)
    opt = _make_optimizer(config, gm.parameters())
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
        score_fn=config.unit_score if METHODS[config.method] == "neuron" else None,
    )
    return _Run(splits, gm, opt, rule, pruner, torch.Generator().manual_seed(config.seed), device)


def _restore(run: _Run, state: dict[str, Any]) -> None:
    run.gm.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.rule.load_state_dict(_to_device(state["rule"], run.device))  # checkpoints load onto the CPU
    run.pruner.load_state_dict(state["pruner"])
    run.gen.set_state(state["generator"])
    _set_rng_states(state)  # last: nothing after it draws before the first resumed epoch
    run.log, run.epoch0, run.elapsed0, run.cycle_epoch = state["log"], state["epoch"], state["elapsed"], \
        state["cycle_epoch"]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _set_cycle_lr(run: _Run, config: TrainConfig) -> None:
    """Cosine within a prune cycle, restarted after each pruning (plateau length ~ pwe)."""
    period = max(config.pwe * 2, 1)
    frac = min(run.cycle_epoch / period, 1.0)
    factor = config.lr_min_factor + (1 - config.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    for group in run.opt.param_groups:
        group["lr"] = config.lr * factor


def _train_epoch(run: _Run, config: TrainConfig, stop: _StopRequest | None) -> tuple[float, int] | None:
    """One pass over the training split: (summed loss, samples), or None when ``stop`` was set.

    A final batch of one sample is skipped when the model has batch norm, which cannot train on it.
    """
    train_loss, n = 0.0, 0
    skip_single = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.gm.modules())
    for x, y in batches(run.splits.train, config.batch_size, shuffle=True, generator=run.gen):
        if stop is not None and stop.signum is not None:
            return None
        if skip_single and len(y) == 1:
            continue
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
            "data_info": data_info(run.splits), **_rng_states(),
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
    states, which dropout draws from). The model and data are built first, so that a model
    or data spec that fails writes nothing. Then, before the first epoch, ``out_dir`` is created,
    temporary files a killed write left there are removed, and a probe file is
    written, so that an unwritable directory fails at once.

    Resuming: the checkpoint's config must agree with ``config`` on every option that
    defines the run (model, dataset, data_root, batch_size, lr, momentum, weight_decay,
    lmbda, twt, pwe, rollback, plateau_threshold, search_precision, lr_min_factor,
    val_size, seed, eval_batch_size, channels_last, fused_rule, method, sensitivity, model_kwargs,
    data_kwargs, image_size, val_fraction, test_fraction, optimizer). Only those in
    :data:`RESUMABLE_CHANGES` may differ: ``epochs`` (extending a run is legitimate),
    ``max_minutes``, ``out_dir``, ``progress``, ``checkpoint_every``, ``threads`` and ``device``.

    ``device``: the model (with its masks), the optimizer state and the data splits live
    there; checkpoints are loaded onto the CPU and moved, so a run may resume on another device.
    The checkpoint also records :func:`data_info` (input shape, classes), which
    ``lobster-fx export`` uses to rebuild the model without the data.
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
    device = check_device(config.device)  # before anything is written
    out = Path(config.out_dir) if config.out_dir else None
    ckpt = out / "checkpoint.pt" if out else None
    state = None
    if out is not None and resume and ckpt.exists():
        state = load_checkpoint(ckpt, required=_RESUME_KEYS)  # weights_only: no code runs on load
        _check_resume(state["config"], config, ckpt)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run = _build_run(config, device)  # first: a model or data that fails to build leaves out_dir as it was
    if out is not None:
        prepare_out_dir(out)
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
