"""Schedule stage: when to prune (section 4 of the paper).

:class:`PlateauPruner` runs the paper's procedure: train with the LOBSTER rule
until the validation loss has not improved for ``pwe`` epochs (plateau waiting
epochs), optionally roll back to the best weights since the last pruning, then
run a pruning phase (:func:`lobster_fx.prune`) with tolerance ``twt``. With
``every_n_iterations`` it instead prunes every N calls to ``step()`` (the
paper's ImageNet variant).

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

import math
from typing import Any

import torch
from torch import nn

from lobster_fx.instrument import unwrap
from lobster_fx.prune import Evaluate, PruneResult, prune

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
    ) -> None:
        if not callable(evaluate):
            raise TypeError("PlateauPruner: evaluate must be a callable model -> float")
        if not math.isfinite(float(twt)) or twt < 0:
            raise ValueError(f"PlateauPruner: twt must be a finite number >= 0, got {twt}")
        if int(pwe) < 1:
            raise ValueError(f"PlateauPruner: pwe must be >= 1, got {pwe}")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"PlateauPruner: threshold must be in [0, 1), got {threshold}")
        if every_n_iterations is not None and int(every_n_iterations) < 1:
            raise ValueError(f"PlateauPruner: every_n_iterations must be >= 1, got {every_n_iterations}")
        self.gm = unwrap(gm)
        self.evaluate = evaluate
        self.twt = float(twt)
        self.pwe = int(pwe)
        self.rollback = bool(rollback)
        self.every_n_iterations = every_n_iterations
        self.threshold = float(threshold)
        self.reuse_val_loss = reuse_val_loss
        if not 0.0 <= float(search_precision) < 1.0:
            raise ValueError(f"PlateauPruner: search_precision must be in [0, 1), got {search_precision}")
        self.search_precision = float(search_precision)
        self.best: float = math.inf
        self.bad_epochs = 0
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self._best_state: dict[str, torch.Tensor] | None = None

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.gm.state_dict().items()}

    def step(self, val_loss: float | None = None) -> PruneResult | None:
        """Call once per epoch with the validation loss (or once per iteration
        in ``every_n_iterations`` mode). Returns the prune result when it pruned."""
        self.calls += 1
        if self.every_n_iterations is not None:
            if self.calls % self.every_n_iterations:
                return None
            return self._prune(loss_before=None)
        if val_loss is None:
            raise ValueError("PlateauPruner.step(val_loss): val_loss is required in plateau mode")
        val_loss = float(val_loss)
        if not math.isfinite(val_loss):
            raise ValueError(f"PlateauPruner.step: val_loss is {val_loss}")
        if val_loss < self.best * (1 - self.threshold):  # best starts at inf
            self.best = val_loss
            self.bad_epochs = 0
            if self.rollback:
                self._best_state = self._snapshot()
            return None
        self.bad_epochs += 1
        if self.bad_epochs < self.pwe:
            return None
        loss_before = None
        if self.rollback and self._best_state is not None:
            self.gm.load_state_dict(self._best_state)
            if self.reuse_val_loss:
                loss_before = self.best
        return self._prune(loss_before)

    def _prune(self, loss_before: float | None) -> PruneResult:
        result = prune(self.gm, self.evaluate, self.twt, loss_before=loss_before,
                       precision=self.search_precision)
        self.history.append({"call": self.calls, **result.to_dict()})
        self.best = result.loss_after
        self.bad_epochs = 0
        self._best_state = self._snapshot() if self.rollback else None
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "twt": self.twt,
            "pwe": self.pwe,
            "rollback": self.rollback,
            "every_n_iterations": self.every_n_iterations,
            "threshold": self.threshold,
            "reuse_val_loss": self.reuse_val_loss,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "calls": self.calls,
            "history": [dict(h) for h in self.history],
            "best_state": self._best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("twt", "pwe", "rollback", "every_n_iterations", "threshold", "best", "bad_epochs", "calls"):
            setattr(self, key, state[key])
        self.reuse_val_loss = state.get("reuse_val_loss", self.reuse_val_loss)
        self.history = [dict(h) for h in state["history"]]
        best = state["best_state"]
        self._best_state = None if best is None else {k: v.clone() for k, v in best.items()}
