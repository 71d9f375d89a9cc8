"""When to prune: triggers, separate from what a pruning phase removes.

A trigger is told about each epoch (or iteration) with :meth:`observe` and answers
:data:`IMPROVED` (a new best validation loss: a rollback snapshot is due), :data:`WAIT` or
:data:`FIRE` (prune now); after a pruning phase it is told the loss it left with :meth:`pruned`.
Its counters round-trip through :meth:`state_dict` / :meth:`load_state_dict`.

* :class:`PlateauTrigger` fires when the validation loss has not improved for ``pwe`` epochs
  (the paper's procedure).
* :class:`EveryNIterations` fires every ``n`` calls (the paper's ImageNet variant).

What is pruned is the action's business: :class:`lobster_fx.pruning.prune.PruneAction`
(``prune`` with its tolerance, granularity and score). ``PlateauPruner`` combines the two with
rollback and all-or-nothing steps; a loop of one's own can combine them directly.

Example::

    >>> import torch, lobster_fx
    >>> from lobster_fx.pruning.prune import PruneAction
    >>> gm = lobster_fx.instrument(torch.nn.Linear(8, 2))
    >>> x = torch.randn(32, 8)
    >>> evaluate = lambda m: float(m(x).square().mean())
    >>> trigger, action = PlateauTrigger(pwe=2), PruneAction(0.05)
    >>> for val in (1.0, 1.1, 1.2):
    ...     if trigger.observe(val) == FIRE:
    ...         result = action(gm, evaluate)
    ...         trigger.pruned(result.loss_after)
    >>> trigger.bad_epochs
    0
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

from lobster_fx.pruning.checks import _as_real, _got, check_int, check_real

__all__ = ["IMPROVED", "WAIT", "FIRE", "Trigger", "PlateauTrigger", "EveryNIterations"]

#: :meth:`Trigger.observe`: a new best loss (take a rollback snapshot)
IMPROVED = "improved"
#: :meth:`Trigger.observe`: nothing to do
WAIT = "wait"
#: :meth:`Trigger.observe`: prune now
FIRE = "fire"


@runtime_checkable
class Trigger(Protocol):
    """What a schedule needs from a trigger."""

    #: ``observe`` needs the validation loss (and a rollback to the best state makes sense)
    needs_loss: bool

    def observe(self, val_loss: float | None = None) -> str: ...

    def pruned(self, loss_after: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _loss(val_loss: Any, who: str) -> float:
    loss = _as_real(val_loss)
    if loss is None:
        raise TypeError(f"{who}: val_loss must be a finite float, {_got(val_loss)}")
    if not math.isfinite(loss):
        raise ValueError(f"{who}: val_loss is {loss}")
    return loss


class PlateauTrigger:
    """Fire after ``pwe`` epochs without improvement of the validation loss.

    An epoch improves when ``val_loss < best * (1 - threshold)``; it then resets the count and
    is the new ``best``. After a pruning phase, ``best`` is the loss the phase left.

        >>> t = PlateauTrigger(pwe=2)
        >>> [t.observe(v) for v in (3.0, 2.0, 2.5, 2.4)]
        ['improved', 'improved', 'wait', 'fire']
    """

    needs_loss = True

    def __init__(self, pwe: int = 20, threshold: float = 0.0) -> None:
        self.pwe = check_int(pwe, "pwe", "PlateauTrigger", minimum=1)
        self.threshold = check_real(threshold, "threshold", "PlateauTrigger", minimum=0, below=1)
        self.best = math.inf
        self.bad_epochs = 0

    def observe(self, val_loss: float | None = None) -> str:
        loss = _loss(val_loss, "PlateauTrigger.observe")
        if loss < self.best * (1 - self.threshold):  # best starts at inf
            self.best = loss
            self.bad_epochs = 0
            return IMPROVED
        self.bad_epochs += 1
        return FIRE if self.bad_epochs >= self.pwe else WAIT

    def pruned(self, loss_after: float) -> None:
        self.best = float(loss_after)
        self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"pwe": self.pwe, "threshold": self.threshold, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        who = "PlateauTrigger.load_state_dict"
        values = (check_int(state["pwe"], "pwe", who, minimum=1),
                  check_real(state["threshold"], "threshold", who, minimum=0, below=1),
                  float(state["best"]), check_int(state["bad_epochs"], "bad_epochs", who, minimum=0))
        self.pwe, self.threshold, self.best, self.bad_epochs = values

    def __repr__(self) -> str:
        return f"PlateauTrigger(pwe={self.pwe}, threshold={self.threshold:g})"


class EveryNIterations:
    """Fire at every ``n``-th call of :meth:`observe` (call it once per iteration).

    ``best`` holds the loss the last pruning phase left (``inf`` before the first).

        >>> t = EveryNIterations(2)
        >>> [t.observe() for _ in range(4)]
        ['wait', 'fire', 'wait', 'fire']
    """

    needs_loss = False
    bad_epochs = 0

    def __init__(self, n: int) -> None:
        self.n = check_int(n, "every_n_iterations", "EveryNIterations", minimum=1)
        self.calls = 0
        self.best = math.inf

    def observe(self, val_loss: float | None = None) -> str:
        self.calls += 1
        return WAIT if self.calls % self.n else FIRE

    def pruned(self, loss_after: float) -> None:
        self.best = float(loss_after)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_iterations": self.n, "calls": self.calls, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        who = "EveryNIterations.load_state_dict"
        values = (check_int(state["every_n_iterations"], "every_n_iterations", who, minimum=1),
                  check_int(state["calls"], "calls", who, minimum=0), float(state.get("best", math.inf)))
        self.n, self.calls, self.best = values

    def __repr__(self) -> str:
        return f"EveryNIterations({self.n})"
