"""Schedule stage: a trigger (when) and a pruning action (what), with rollback (section 4 of the paper).

:class:`PlateauPruner` runs the paper's procedure: train with the LOBSTER rule
until the validation loss has not improved for ``pwe`` epochs (plateau waiting
epochs), optionally roll back to the best weights since the last pruning, then
run a pruning phase (:func:`lobster_fx.prune`) with tolerance ``twt``. With
``every_n_iterations`` it instead prunes every N calls to ``step()`` (the
paper's ImageNet variant). The decision is its :attr:`~PlateauPruner.trigger`'s
(:class:`~lobster_fx.pruning.triggers.PlateauTrigger` or
:class:`~lobster_fx.pruning.triggers.EveryNIterations`), the pruning its
:attr:`~PlateauPruner.action`'s (:class:`~lobster_fx.pruning.prune.PruneAction`:
``granularity="weight"`` or ``"neuron"``, ``score_fn``). Under ``torch.distributed``
the validation loss is averaged over the ranks, so every rank prunes at the same call.

Example::

    >>> import torch, lobster_fx
    >>> gm = lobster_fx.instrument(torch.nn.Linear(8, 1))
    >>> x = torch.randn(32, 8)
    >>> evaluate = lambda m: float(m(x).square().mean())
    >>> pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=0.05, pwe=2)
    >>> results = [pruner.step(v) for v in (1.0, 1.1, 1.2)]
    >>> results[-1] is not None  # two epochs without improvement: pruned
    True
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from lobster_fx.graph.instrument import lobster_info, unwrap
from lobster_fx.pruning.checks import _as_real, check_evaluate, check_flag, check_int, check_real
from lobster_fx.pruning.prune import Evaluate, PruneAction, PruneResult, ScoreFn, _all_reduce_mean, check_granularity
from lobster_fx.pruning.triggers import FIRE, IMPROVED, EveryNIterations, PlateauTrigger

__all__ = ["PlateauPruner"]


class PlateauPruner:
    """Prune at validation-loss plateaus (or every N iterations).

    Args:
        gm: a module returned by :func:`lobster_fx.instrument`.
        evaluate: ``evaluate(model) -> float`` validation loss (also used by the
            threshold search).
        twt: tolerance of each pruning phase (``>= 0``).
        pwe: epochs without improvement before pruning (``>= 1``).
        rollback: restore the best state since the last pruning before pruning.
        every_n_iterations: if set, ignore plateaus and prune every N calls to
            ``step()`` (call it once per iteration).
        threshold: relative improvement needed to reset the plateau counter
            (an epoch improves if ``val < best * (1 - threshold)``).
        reuse_val_loss: after a rollback, take the best ``val_loss`` given to
            ``step()`` as the loss before pruning instead of evaluating again
            (only valid if ``val_loss`` is exactly what ``evaluate`` returns).
        search_precision: ``precision`` of each pruning phase's threshold search
            (see :func:`lobster_fx.prune`; ``0``: exact).
        optimizer: the model's optimizer. When given, the rollback snapshot also
            holds a copy of its per-parameter state (momentum buffers, Adam
            moments and step counts) and rollback restores it with the weights,
            so the discarded epochs leave no trace in the optimizer either. Its
            hyper-parameters (``param_groups``: the lr a scheduler set) are left
            as they are now. Costs one more copy of that state per snapshot.
        sync_distributed: when ``torch.distributed`` is initialized, average
            ``val_loss`` over the ranks in :meth:`step` (and every loss of the
            threshold search), so all ranks take the same plateau decision even
            when each passes its own shard's loss; a rank that pruned alone would
            wait forever in the search's all-reduce. Every rank must then call
            ``step`` equally often. ``False``: each rank decides from its own value.
        granularity: what each pruning phase removes: ``"weight"`` (the paper) or
            ``"neuron"`` (whole units; see :func:`lobster_fx.prune`).
        score_fn: the unit score of ``"neuron"`` phases: a name from
            :data:`~lobster_fx.pruning.neuron.UNIT_SCORES` or a callable (default
            ``"relative-norm"``: each unit's weight norm over its layer's mean).
        slim_aware: ``"neuron"`` phases ask slim which units it can remove: residual
            channels pruned together, units slim cannot remove left alone (see
            :func:`lobster_fx.prune`). ``False``: every unit alone.
        channel_multiple: ``"neuron"`` phases prune conv channels only as far as slim with
            this ``channel_multiple`` removes them (default 1: every unit under the
            threshold; see :func:`lobster_fx.prune`).

    ``trigger`` and ``action`` hold the decision and the pruning settings; the
    attributes ``twt``, ``pwe``, ``threshold``, ``every_n_iterations``, ``best``,
    ``bad_epochs`` read them.

    :meth:`step` is all or nothing: if the pruning phase raises (``evaluate``
    fails, a NaN loss, an interrupt), the model, the optimizer state and the
    pruner's counters are put back as they were before the call, not left at
    the rolled-back snapshot, and the error propagates.
    """

    def __init__(
        self,
        gm: nn.Module,
        evaluate: Evaluate,
        twt: float = 0.05,
        pwe: int = 20,
        rollback: bool = True,
        *,
        every_n_iterations: int | None = None,
        threshold: float = 0.0,
        reuse_val_loss: bool = False,
        search_precision: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        sync_distributed: bool = True,
        granularity: str = "weight",
        score_fn: ScoreFn | None = None,
        slim_aware: bool = True,
        channel_multiple: int | None = 1,
    ) -> None:
        who = "PlateauPruner"
        check_evaluate(evaluate, who)
        twt = check_real(twt, "twt", who, minimum=0)
        pwe = check_int(pwe, "pwe", who, minimum=1)
        rollback = check_flag(rollback, "rollback", who)
        if every_n_iterations is not None:
            every_n_iterations = check_int(every_n_iterations, "every_n_iterations", who, minimum=1)
        threshold = check_real(threshold, "threshold", who, minimum=0, below=1)
        reuse_val_loss = check_flag(reuse_val_loss, "reuse_val_loss", who)
        search_precision = check_real(search_precision, "search_precision", who, minimum=0, below=1)
        sync_distributed = check_flag(sync_distributed, "sync_distributed", who)
        check_granularity(granularity, score_fn, who)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PlateauPruner: optimizer must be a torch.optim.Optimizer or None, "
                            f"got {optimizer!r} ({type(optimizer).__name__})")
        self.gm = unwrap(gm)
        lobster_info(self.gm)  # TypeError now, not at the first pruning, if gm is not instrumented
        self.evaluate = evaluate
        self.rollback = rollback
        self.reuse_val_loss = reuse_val_loss
        self.optimizer = optimizer
        self.sync_distributed = sync_distributed
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_optimizer_state: dict[str, Any] | None = None
        #: the plateau rule's settings (and counters, in plateau mode)
        self._plateau = PlateauTrigger(pwe, threshold)
        #: when to prune: the plateau rule, or every N iterations
        self.trigger: PlateauTrigger | EveryNIterations = (
            self._plateau if every_n_iterations is None else EveryNIterations(every_n_iterations))
        #: what to prune
        self.action = PruneAction(twt, granularity=granularity, score_fn=score_fn, precision=search_precision,
                                  sync_distributed=sync_distributed, slim_aware=slim_aware,
                                  channel_multiple=channel_multiple, who=who)

    # settings and counters, read from the trigger and the action
    twt = property(lambda self: self.action.twt)
    search_precision = property(lambda self: self.action.precision)
    granularity = property(lambda self: self.action.granularity)
    score_fn = property(lambda self: self.action.score_fn)
    slim_aware = property(lambda self: self.action.slim_aware)
    channel_multiple = property(lambda self: self.action.channel_multiple)
    pwe = property(lambda self: self._plateau.pwe)
    threshold = property(lambda self: self._plateau.threshold)
    best = property(lambda self: self.trigger.best)
    bad_epochs = property(lambda self: self.trigger.bad_epochs)

    @property
    def every_n_iterations(self) -> int | None:
        return self.trigger.n if isinstance(self.trigger, EveryNIterations) else None

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.gm.state_dict().items()}

    def _optimizer_snapshot(self) -> dict[str, Any] | None:
        if self.optimizer is None:
            return None
        # state_dict() holds the live buffers: without the deep copy the snapshot would train on
        return copy.deepcopy(self.optimizer.state_dict())

    def _take_best(self) -> None:
        self._best_state = self._snapshot()
        self._best_optimizer_state = self._optimizer_snapshot()

    def _restore(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
        self.gm.load_state_dict(model_state)
        if self.optimizer is not None and optimizer_state is not None:
            # the state (moments) of then, the hyper-parameters (lr) of now; a copy again, since
            # load_state_dict may keep the given tensors and training would then alter the snapshot
            self.optimizer.load_state_dict({
                "state": copy.deepcopy(optimizer_state["state"]),
                "param_groups": self.optimizer.state_dict()["param_groups"],
            })

    def step(self, val_loss: float | None = None) -> PruneResult | None:
        """Call once per epoch with the validation loss (or once per iteration
        in ``every_n_iterations`` mode). Returns the prune result when it pruned.

        All or nothing: if anything raises (a bad ``val_loss``, the rollback, the
        pruning phase), the model (weights and masks), the optimizer state and the
        counters are as they were before the call."""
        counters = (self.calls, self.trigger.state_dict())
        try:
            return self._step(val_loss)
        except BaseException:
            self.calls = counters[0]
            self.trigger.load_state_dict(counters[1])
            raise

    def _step(self, val_loss: float | None) -> PruneResult | None:
        self.calls += 1
        loss = None
        if self.trigger.needs_loss:
            if val_loss is None:
                raise ValueError("PlateauPruner.step(val_loss): val_loss is required in plateau mode")
            loss = _as_real(val_loss)
            if loss is None:
                raise TypeError(f"PlateauPruner.step: val_loss must be a finite float, got {val_loss!r} "
                                f"({type(val_loss).__name__})")
            if self.sync_distributed:
                # before the finiteness check: a NaN on one rank reaches all, so all raise together
                loss = _all_reduce_mean(loss)
            if not math.isfinite(loss):
                raise ValueError(f"PlateauPruner.step: val_loss is {loss} (averaged over ranks if distributed)")
        decision = self.trigger.observe(loss)
        if decision == IMPROVED:
            if self.rollback:
                self._take_best()
            return None
        if decision != FIRE:
            return None
        loss_before = None
        before = None
        if self.trigger.needs_loss and self.rollback and self._best_state is not None:
            # rollback overwrites the model in place: keep what to put back if pruning fails
            before = (self._snapshot(), self._optimizer_snapshot())
            if self.reuse_val_loss:
                loss_before = self.best
        return self._prune_or_undo(loss_before, before)

    def _prune_or_undo(
        self,
        loss_before: float | None,
        before: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None,
    ) -> PruneResult:
        """Roll back (when ``before`` is given) and run the pruning phase; on any error,
        the rollback's restore included, the model and optimizer state of ``before`` come back."""
        try:
            if before is not None:
                self._restore(self._best_state, self._best_optimizer_state)
            result = self.action(self.gm, self.evaluate, loss_before=loss_before)
        except BaseException:
            # prune() itself undid its own changes (to the rolled-back state); undo the rollback too
            if before is not None:
                self._restore(*before)
            raise
        # the new snapshot first (it may run out of memory), then every change at once
        best = (self._snapshot(), self._optimizer_snapshot()) if self.rollback else (None, None)
        self._best_state, self._best_optimizer_state = best
        self.history.append({"call": self.calls, **result.to_dict()})
        self.trigger.pruned(result.loss_after)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "twt": self.twt,
            "pwe": self.pwe,
            "rollback": self.rollback,
            "every_n_iterations": self.every_n_iterations,
            "threshold": self.threshold,
            "reuse_val_loss": self.reuse_val_loss,
            "search_precision": self.search_precision,
            "granularity": self.granularity,
            "slim_aware": self.slim_aware,
            "channel_multiple": self.channel_multiple,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "calls": self.calls,
            "history": [dict(h) for h in self.history],
            "best_state": self._best_state,
            "best_optimizer_state": self._best_optimizer_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Every setting is checked first (the
        message names it), so a bad checkpoint leaves this pruner as it was. ``score_fn``
        is not saved: this pruner's own is kept."""
        who = "PlateauPruner.load_state_dict"
        every = state["every_n_iterations"]
        best, best_optimizer = state["best_state"], state.get("best_optimizer_state")
        twt = check_real(state["twt"], "twt", who, minimum=0)
        pwe = check_int(state["pwe"], "pwe", who, minimum=1)
        rollback = check_flag(state["rollback"], "rollback", who)
        if every is not None:
            every = check_int(every, "every_n_iterations", who, minimum=1)
        plateau = PlateauTrigger(pwe, check_real(state["threshold"], "threshold", who, minimum=0, below=1))
        plateau.best = float(state["best"])  # inf until the first epoch
        bad_epochs = check_int(state["bad_epochs"], "bad_epochs", who, minimum=0)
        calls = check_int(state["calls"], "calls", who, minimum=0)
        # keys added later: an older checkpoint keeps this pruner's own settings
        reuse_val_loss = check_flag(state.get("reuse_val_loss", self.reuse_val_loss), "reuse_val_loss", who)
        precision = check_real(state.get("search_precision", self.search_precision), "search_precision", who,
                               minimum=0, below=1)
        slim_aware = check_flag(state.get("slim_aware", self.slim_aware), "slim_aware", who)
        action = PruneAction(twt, granularity=state.get("granularity", self.granularity), score_fn=self.score_fn,
                             precision=precision, sync_distributed=self.sync_distributed, slim_aware=slim_aware,
                             channel_multiple=state.get("channel_multiple", self.channel_multiple), who=who)
        history = [dict(h) for h in state["history"]]
        best_state = None if best is None else {k: v.clone() for k, v in best.items()}
        best_optimizer_state = None if best_optimizer is None else copy.deepcopy(best_optimizer)
        if every is None:
            plateau.bad_epochs = bad_epochs
            trigger: PlateauTrigger | EveryNIterations = plateau
        else:
            trigger = EveryNIterations(every)
            trigger.calls, trigger.best = calls, plateau.best
        # everything checked: take it all at once
        self._plateau, self.trigger, self.action = plateau, trigger, action
        self.rollback, self.reuse_val_loss, self.calls, self.history = rollback, reuse_val_loss, calls, history
        self._best_state, self._best_optimizer_state = best_state, best_optimizer_state
