"""LOBSTER / SeReNe sparse training in a Lightning ``Trainer``: the :class:`LobsterPruning` callback.

What it does, hook by hook:

* ``setup``: replaces ``pl_module.<attribute>`` (default ``model``) by its instrumented module
  (:func:`lobster_fx.instrument`; same parameters, masks as buffers), before Lightning
  builds the optimizers and before it loads a checkpoint, so the masks load with the weights.
* ``on_fit_start``: hooks the rule (LOBSTER, SeReNe or L2) on the optimizer that holds the
  prunable parameters and builds the plateau schedule.
* ``on_validation_end``: steps the schedule with the logged metric ``monitor`` (default
  ``val_loss``), or with ``evaluate(model)`` when given; at a plateau it rolls back and prunes
  (the threshold search evaluates the model: ``evaluate``, or by default the mean of what
  ``validation_step`` returns over the validation loader, with its logging switched off).
  ``pwe`` counts validations, so with ``val_check_interval`` it is not epochs.
* ``state_dict`` / ``load_state_dict``: the rule's and the schedule's state
  (:meth:`lobster_fx.sparsifier.Sparsifier.state_dict` without the masks, which are in the
  module's own state dict): ``trainer.fit(..., ckpt_path=...)`` resumes with masks, rule and
  schedule as they were.
* ``on_fit_end`` with ``fold_on_fit_end=True``: the rule comes off and
  ``pl_module.<attribute>`` becomes the folded model (no masks; :func:`lobster_fx.fold`).

Supported: one device, and DDP (``strategy="ddp"``, a process per device; the schedule
averages the validation loss over the ranks), gradient accumulation, mixed precision
(``"16-mixed"``: a step the scaler skips skips the rule too), half-precision parameters.
Refused at ``setup`` with a message naming the strategy: FSDP, DeepSpeed, model parallel,
XLA, and ``ddp_spawn`` / ``ddp_notebook`` (the spawned processes' instrumented model does not
travel back). SeReNe with more than one process is refused too (its sensitivities would
not be all-reduced).

Example (``pip install 'lobster_fx[lightning]'``)::

    >>> import torch, lightning as L
    >>> from lobster_fx.integrations.lightning import LobsterPruning
    >>> class Net(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    ...     def training_step(self, batch, i):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self.model(x), y)
    ...     def validation_step(self, batch, i):
    ...         x, y = batch
    ...         loss = torch.nn.functional.mse_loss(self.model(x), y)
    ...         self.log("val_loss", loss)
    ...         return loss
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.01)
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=32)
    >>> callback = LobsterPruning(pwe=1)
    >>> trainer = L.Trainer(max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False)
    >>> net = Net()
    >>> trainer.fit(net, loader, loader)
    >>> net.model is callback.sparsifier.gm  # instrumented in place
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("lobster_fx.integrations.lightning needs Lightning: pip install 'lobster_fx[lightning]' "
                      f"(or pip install lightning); {e}") from e

from lobster_fx.graph.instrument import FilterFn, masked_parameters
from lobster_fx.pruning.prune import Evaluate, ScoreFn
from lobster_fx.sparsifier import Sparsifier

__all__ = ["LobsterPruning", "SUPPORTED_STRATEGIES"]

#: Lightning strategy classes the callback runs under (anything else is refused at setup)
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


class LobsterPruning(Callback):
    """Sparse training (LOBSTER / SeReNe / L2 rule + plateau pruning) of ``pl_module.<attribute>``.

    Args:
        evaluate: ``evaluate(model) -> float`` validation loss. When given it decides the
            plateaus (``monitor`` is not read) and drives the pruning search; else the search
            averages what ``validation_step`` returns (a loss tensor, or a dict with ``"loss"``).
        attribute: the ``pl_module`` attribute holding the network to sparsify.
        method: ``"lobster"``, ``"serene"`` or ``"l2"``.
        lmbda, twt, pwe: the rule's strength, the pruning tolerance, validations without
            improvement before pruning (see :class:`lobster_fx.sparsifier.Sparsifier`).
        monitor: the logged metric that decides the plateaus when ``evaluate`` is None.
        fold_on_fit_end: at the end of ``fit`` replace ``pl_module.<attribute>`` by the folded
            model (masks multiplied in and removed); training it further is not sparse training.
        rollback, granularity, sensitivity, score_fn, threshold, search_precision, filter_fn, fused: as
            for :class:`~lobster_fx.sparsifier.Sparsifier`.

    Attributes:
        sparsifier: the :class:`~lobster_fx.sparsifier.Sparsifier` holding masks, rule, schedule
            (``sparsifier.history`` lists the pruning phases).
    """

    def __init__(
        self,
        evaluate: Evaluate | None = None,
        *,
        attribute: str = "model",
        method: str = "lobster",
        lmbda: float = 1e-4,
        twt: float = 0.05,
        pwe: int = 20,
        monitor: str = "val_loss",
        fold_on_fit_end: bool = False,
        rollback: bool = True,
        granularity: str | None = None,
        sensitivity: str = "output",
        score_fn: ScoreFn | None = None,
        threshold: float = 0.0,
        search_precision: float = 0.0,
        filter_fn: FilterFn | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(attribute, str) or not attribute:
            raise TypeError(f"LobsterPruning: attribute must be the name of a pl_module attribute, got {attribute!r}")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"LobsterPruning: monitor must be a logged metric's name, got {monitor!r}")
        if not isinstance(fold_on_fit_end, bool):
            raise TypeError(f"LobsterPruning: fold_on_fit_end must be True or False, got {fold_on_fit_end!r}")
        self.sparsifier = Sparsifier(
            evaluate, method=method, lmbda=lmbda, twt=twt, pwe=pwe, rollback=rollback, granularity=granularity,
            sensitivity=sensitivity, score_fn=score_fn, threshold=threshold, search_precision=search_precision, filter_fn=filter_fn,
            fused=fused, reuse_val_loss=evaluate is not None,  # the loss step() gets is evaluate's own
        )
        self.attribute = attribute
        self.monitor = monitor
        self.fold_on_fit_end = fold_on_fit_end
        self._user_evaluate = evaluate
        self._optimizer: torch.optim.Optimizer | None = None

    # --- set-up -------------------------------------------------------------------------------

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        name = type(strategy).__name__
        if name not in SUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"LobsterPruning does not support the {name} strategy: masks and the per-step rule need "
                "whole (unsharded) parameters; use a single device or strategy='ddp'")
        launcher = getattr(strategy, "launcher", None)
        if launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher":
            raise RuntimeError(
                f"LobsterPruning does not support {name} with start method "
                f"{getattr(strategy, '_start_method', 'spawn')!r} (ddp_spawn / ddp_notebook): the instrumented "
                "model of the spawned processes does not travel back; use strategy='ddp'")
        if self.sparsifier.options["method"] == "serene" and trainer.world_size > 1:
            raise RuntimeError(
                f"LobsterPruning: method='serene' with {trainer.world_size} processes is not supported: each "
                "rank's sensitivities would differ (they are not all-reduced here); use method='lobster' or one device")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Instrument ``pl_module.<attribute>`` in place (once), before the optimizers are built
        and before a checkpoint is loaded."""
        self._check_strategy(trainer)
        sp = self.sparsifier
        if not hasattr(pl_module, self.attribute):
            raise AttributeError(f"LobsterPruning: {type(pl_module).__name__} has no attribute {self.attribute!r} "
                                 "(the network to sparsify); pass LobsterPruning(attribute=...)")
        current = getattr(pl_module, self.attribute)
        if sp.gm is not None:
            if current is not sp.gm:
                raise RuntimeError(f"LobsterPruning: this callback already sparsifies another module; use one "
                                   f"LobsterPruning per LightningModule (pl_module.{self.attribute} is not it)")
            return
        if not isinstance(current, nn.Module):
            raise TypeError(f"LobsterPruning: pl_module.{self.attribute} must be an nn.Module, got "
                            f"{type(current).__name__}")
        setattr(pl_module, self.attribute, sp.prepare(current))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the rule on the optimizer holding the prunable parameters; build the schedule."""
        sp = self.sparsifier
        prunable = {id(p) for _, p, _ in masked_parameters(sp.gm)}
        holders = [o for o in trainer.optimizers
                   if any(id(p) in prunable for g in o.param_groups for p in g["params"])]
        if len(holders) != 1:
            raise RuntimeError(
                f"LobsterPruning: {len(holders)} of the {len(trainer.optimizers)} optimizers from "
                f"configure_optimizers hold pl_module.{self.attribute}'s prunable parameters; exactly one must")
        evaluate = self._user_evaluate or _validation_step_loss(trainer, pl_module)
        optimizer = holders[0]
        if isinstance(optimizer, torch.optim.LBFGS):
            raise RuntimeError("LobsterPruning: LBFGS is not supported (it evaluates its closure several times "
                               "per step; the rule needs the one final gradient of a step)")
        self._release()  # a second fit() builds new optimizers: the state carries over
        # Lightning steps with optimizer.step(closure): the rule computes its term after the
        # closure's backward (StepRule wraps the closure), so the loop needs nothing more here
        sp.attach(optimizer, evaluate)
        self._optimizer = optimizer

    def _release(self) -> None:
        self.sparsifier.detach()
        self._optimizer = None

    # --- schedule -----------------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step the plateau schedule (may roll back and prune)."""
        sp = self.sparsifier
        if trainer.sanity_checking or sp.pruner is None or trainer.state.fn != "fit":
            return
        val_loss = None
        if self._user_evaluate is None:
            metric = trainer.callback_metrics.get(self.monitor)
            if metric is None:
                raise KeyError(
                    f"LobsterPruning: the metric {self.monitor!r} was not logged (logged: "
                    f"{sorted(trainer.callback_metrics)}); self.log({self.monitor!r}, loss) in validation_step, "
                    "or pass monitor= or evaluate=")
            val_loss = float(metric)
        result = sp.step(val_loss)
        if result is not None:
            rank_zero_info(f"LobsterPruning: epoch {trainer.current_epoch}: pruned {result.pruned} parameters, "
                           f"{result.remaining} of {result.total} left (loss {result.loss_before:.4g} -> "
                           f"{result.loss_after:.4g})")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_on_fit_end and self.sparsifier.gm is not None:
            self._release()
            setattr(pl_module, self.attribute, self.sparsifier.fold())

    # --- checkpoints --------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    def state_dict(self) -> dict[str, Any]:
        """The rule's and the schedule's state (the masks are in the module's state dict)."""
        return self.sparsifier.state_dict(include_masks=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the rule is attached (``on_fit_start``)."""
        self.sparsifier.load_state_dict(state_dict)


class _NoLogging:
    """``validation_step`` run outside Lightning's loop: its ``self.log`` calls do nothing."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        for name in ("log", "log_dict"):
            object.__setattr__(self.module, name, _ignore)

    def __exit__(self, *exc: object) -> None:
        for name in ("log", "log_dict"):
            self.module.__dict__.pop(name, None)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _validation_step_loss(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Evaluate:
    """``evaluate(model)``: the mean over the validation batches of what ``validation_step`` returns."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError("LobsterPruning: no validation dataloader to evaluate the pruning on; give "
                               "trainer.fit a val_dataloaders or LobsterPruning(evaluate=...)")
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        was_training = pl_module.training
        pl_module.eval()
        total, n = 0.0, 0
        try:
            with _NoLogging(pl_module):
                for idx, loader in enumerate(loaders):
                    for i, batch in enumerate(loader):
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                        out = pl_module.validation_step(batch, i, idx) if len(loaders) > 1 \
                            else pl_module.validation_step(batch, i)
                        loss = out.get("loss") if isinstance(out, dict) else out
                        if not isinstance(loss, torch.Tensor):
                            raise TypeError(
                                "LobsterPruning: validation_step returned "
                                f"{type(out).__name__}; the pruning search needs the loss (return it, or a dict "
                                "with 'loss'), or pass LobsterPruning(evaluate=...)")
                        total, n = total + float(loss), n + 1
        finally:
            pl_module.train(was_training)
        if n == 0:
            raise RuntimeError("LobsterPruning: the validation dataloader is empty")
        return total / n

    return evaluate
