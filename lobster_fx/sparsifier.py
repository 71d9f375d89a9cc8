"""One object for a whole sparse-training run: masks, per-step rule and plateau schedule.

:class:`Sparsifier` bundles the three lobster_fx lines of the reference loop
(:func:`~lobster_fx.instrument`, a per-step rule, :class:`~lobster_fx.PlateauPruner`) with a
``torch.ao.pruning``-like lifecycle: :meth:`~Sparsifier.prepare` the model (instrument it),
:meth:`~Sparsifier.attach` the optimizer, :meth:`~Sparsifier.step` once per validation,
:meth:`~Sparsifier.fold` (``squash_mask``) at the end. Its :meth:`~Sparsifier.state_dict` holds
everything the run needs to resume besides the weights and the optimizer: the masks, the
rule's and the schedule's state. The Lightning and Hugging Face callbacks
(:mod:`lobster_fx.integrations`) store exactly that in their checkpoints.

Example::

    >>> import torch
    >>> from lobster_fx.sparsifier import Sparsifier
    >>> torch.manual_seed(0) and None
    >>> x, y = torch.randn(64, 8), torch.randn(64, 1)
    >>> loss = lambda m: float(torch.nn.functional.mse_loss(m(x), y))
    >>> sp = Sparsifier(loss, method="lobster", lmbda=1e-4, twt=0.05, pwe=1)
    >>> model = sp.prepare(torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> sp.attach(opt)
    >>> results = []
    >>> for epoch in range(2):
    ...     opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    ...     results.append(sp.step(1.0))  # a flat validation loss: a plateau after pwe=1 epoch
    >>> results[0] is None, results[1].pruned > 0
    (True, True)
    >>> sorted(sp.state_dict())
    ['format', 'masks', 'options', 'pruner', 'rule']
    >>> folded = sp.fold()  # a copy without masks, for inference and export
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lobster_fx.graph.instrument import FilterFn, instrument, lobster_info, masks, unwrap
from lobster_fx.methods.base import StepRule
from lobster_fx.pruning.checks import check_evaluate, check_flag, check_int, check_real
from lobster_fx.pruning.prune import Evaluate, PruneResult, ScoreFn, check_granularity
from lobster_fx.pruning.schedule import PlateauPruner

__all__ = ["Sparsifier", "METHODS", "STATE_FORMAT"]

#: method name -> what its pruning phases remove by default
METHODS = {"lobster": "weight", "serene": "neuron", "l2": "weight"}
#: ``state_dict()["format"]``: what a checkpoint entry must say to be loaded
STATE_FORMAT = "lobster_fx.Sparsifier/1"
#: options that define a run: a state saved with other values is refused
_DEFINING = ("method", "granularity", "sensitivity")


class Sparsifier:
    """Masks, rule and plateau schedule of one model, behind one ``state_dict``.

    Args:
        evaluate: ``evaluate(model) -> float`` validation loss: the pruning phases' threshold
            search calls it, and :meth:`step` without a loss. May be given later to :meth:`attach`.
        method: the per-step rule: ``"lobster"`` (:class:`~lobster_fx.Lobster`), ``"serene"``
            (:class:`~lobster_fx.SeReNe`) or ``"l2"`` (:class:`~lobster_fx.L2`, the baseline).
        lmbda: the rule's strength (>= 0).
        twt: tolerance of each pruning phase (>= 0).
        pwe: validations without improvement before pruning (>= 1).
        rollback: restore the best weights (and optimizer state) since the last pruning first.
        granularity: ``"weight"`` or ``"neuron"``; default: the method's (SeReNe: neuron).
        sensitivity: SeReNe's ``"output"`` or ``"loss"``.
        score_fn: how ``"neuron"`` phases rank units: a name from
            :data:`~lobster_fx.pruning.neuron.UNIT_SCORES` (default ``"relative-norm"``) or a
            callable ``(unit, weight) -> scores`` (a callable is not saved in the state).
        threshold: relative improvement that resets the plateau counter.
        search_precision: the threshold search's ``precision`` (0: exact).
        every_n_iterations: prune every N calls to :meth:`step` instead of at plateaus.
        filter_fn: which parameters :meth:`prepare` makes prunable (see :func:`lobster_fx.instrument`).
        fused: LOBSTER's ``fused`` option (compiled kernels).
        reuse_val_loss: the loss given to :meth:`step` is exactly what ``evaluate`` returns, so
            the search reuses the best one after a rollback (one evaluation fewer).
        slim_aware: ``"neuron"`` phases ask slim which units it can remove (residual channels
            pruned together, units slim cannot remove left alone; see :func:`lobster_fx.prune`).

    Raises:
        ValueError / TypeError: a bad option, naming it (nothing is built).
    """

    def __init__(
        self,
        evaluate: Evaluate | None = None,
        *,
        method: str = "lobster",
        lmbda: float = 1e-4,
        twt: float = 0.05,
        pwe: int = 20,
        rollback: bool = True,
        granularity: str | None = None,
        sensitivity: str = "output",
        score_fn: ScoreFn | None = None,
        threshold: float = 0.0,
        search_precision: float = 0.0,
        every_n_iterations: int | None = None,
        filter_fn: FilterFn | None = None,
        fused: bool | None = None,
        reuse_val_loss: bool = False,
        slim_aware: bool = True,
    ) -> None:
        who = "Sparsifier"
        if evaluate is not None:
            check_evaluate(evaluate, who)
        if not isinstance(method, str) or method.lower() not in METHODS:
            raise ValueError(f"{who}: method must be one of {', '.join(METHODS)}, got {method!r}")
        method = method.lower()
        granularity = METHODS[method] if granularity is None else granularity
        if sensitivity not in ("output", "loss"):
            raise ValueError(f"{who}: sensitivity must be 'output' or 'loss', got {sensitivity!r}")
        check_granularity(granularity, score_fn, who)
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"{who}: filter_fn must be a callable (module, fqn) -> bool, got {filter_fn!r}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"{who}: fused must be True, False or None, got {fused!r}")
        self.options: dict[str, Any] = {
            "method": method,
            "lmbda": check_real(lmbda, "lmbda", who, minimum=0),
            "twt": check_real(twt, "twt", who, minimum=0),
            "pwe": check_int(pwe, "pwe", who, minimum=1),
            "rollback": check_flag(rollback, "rollback", who),
            "granularity": granularity,
            "sensitivity": sensitivity,
            "score_fn": score_fn if isinstance(score_fn, str) else None,
            "threshold": check_real(threshold, "threshold", who, minimum=0, below=1),
            "search_precision": check_real(search_precision, "search_precision", who, minimum=0, below=1),
            "every_n_iterations": None if every_n_iterations is None
            else check_int(every_n_iterations, "every_n_iterations", who, minimum=1),
            "reuse_val_loss": check_flag(reuse_val_loss, "reuse_val_loss", who),
            "slim_aware": check_flag(slim_aware, "slim_aware", who),
        }
        self.evaluate = evaluate
        self.filter_fn = filter_fn
        self.score_fn = score_fn
        self.fused = fused
        #: the instrumented model (set by :meth:`prepare`)
        self.gm: nn.Module | None = None
        #: the per-step rule and the schedule (set by :meth:`attach`)
        self.rule: StepRule | None = None
        self.pruner: PlateauPruner | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # rule / pruner state loaded before attach(): applied there
        self._pending: dict[str, Any] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        """Instrument ``model`` (every prunable weight use becomes ``weight * mask``) and return
        the instrumented module; train that one. A module :func:`lobster_fx.instrument` already
        returned is adopted as it is (its masks kept)."""
        if self.gm is not None:
            raise RuntimeError("Sparsifier.prepare: this Sparsifier already holds a model; make a new one")
        try:
            lobster_info(model)
            gm = model
        except TypeError:
            gm = instrument(model, filter_fn=self.filter_fn)
        self.gm = gm
        return gm

    def attach(self, optimizer: torch.optim.Optimizer, evaluate: Evaluate | None = None) -> None:
        """Hook the rule on ``optimizer`` (built over the prepared model's parameters) and build
        the plateau schedule. State loaded earlier with :meth:`load_state_dict` is applied now.

        Raises:
            RuntimeError: :meth:`prepare` was not called, or a rule is attached already.
            TypeError / ValueError: no ``evaluate`` (here or at construction), or the rule's
                refusals (the optimizer holds none of the prunable parameters, ...).
        """
        who = "Sparsifier.attach"
        if self.gm is None:
            raise RuntimeError(f"{who}: call prepare(model) first")
        if self.rule is not None:
            raise RuntimeError(f"{who}: a rule is attached already (detach() first)")
        evaluate = evaluate if evaluate is not None else self.evaluate
        if evaluate is None:
            raise TypeError(f"{who}: the pruning search needs evaluate(model) -> float validation loss; "
                            "pass Sparsifier(evaluate=...) or attach(optimizer, evaluate=...)")
        check_evaluate(evaluate, who)
        o = self.options
        pruner = PlateauPruner(
            self.gm, evaluate, twt=o["twt"], pwe=o["pwe"], rollback=o["rollback"],
            every_n_iterations=o["every_n_iterations"], threshold=o["threshold"],
            reuse_val_loss=o["reuse_val_loss"], search_precision=o["search_precision"], optimizer=optimizer,
            granularity=o["granularity"], score_fn=self.score_fn, slim_aware=o["slim_aware"],
        )
        rule = self._make_rule(optimizer)
        if self._pending is not None:
            try:
                rule.load_state_dict(self._pending["rule"])
                pruner.load_state_dict(self._pending["pruner"])
            except BaseException:
                rule.remove()
                raise
            self._pending = None
        self.evaluate, self.optimizer, self.rule, self.pruner = evaluate, optimizer, rule, pruner

    def _make_rule(self, optimizer: torch.optim.Optimizer) -> StepRule:
        o = self.options
        if o["method"] == "serene":
            from lobster_fx.methods.serene import SeReNe

            return SeReNe(self.gm, optimizer, lmbda=o["lmbda"], sensitivity=o["sensitivity"])
        if o["method"] == "l2":
            from lobster_fx.methods.l2 import L2

            return L2(self.gm, optimizer, lmbda=o["lmbda"])
        from lobster_fx.methods.lobster import Lobster

        return Lobster(self.gm, optimizer, lmbda=o["lmbda"], fused=self.fused)

    def step(self, val_loss: float | None = None) -> PruneResult | None:
        """Once per validation (or per iteration with ``every_n_iterations``): feed the schedule
        ``val_loss`` (``evaluate(model)`` when None), which may roll back and prune. Returns the
        :class:`~lobster_fx.PruneResult` when it pruned."""
        if self.pruner is None:
            raise RuntimeError("Sparsifier.step: call attach(optimizer) first")
        if val_loss is None and self.pruner.trigger.needs_loss:
            val_loss = self.evaluate(unwrap(self.gm))
        return self.pruner.step(val_loss)

    on_validation = step

    def detach(self) -> None:
        """Take the rule off the optimizer (later steps are plain optimizer steps). The rule's and
        the schedule's state are kept: :meth:`state_dict` still has them, and the next
        :meth:`attach` (a new optimizer) continues from them."""
        if self.rule is not None:
            self._pending = {"rule": self.rule.state_dict(), "pruner": self.pruner.state_dict()}
            self.rule.remove()
        self.rule = self.pruner = self.optimizer = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per pruning phase so far (:attr:`lobster_fx.PlateauPruner.history`)."""
        if self.pruner is not None:
            return self.pruner.history
        return list(self._pending["pruner"]["history"]) if self._pending is not None else []

    def fold(self) -> nn.Module:
        """A copy of the model with the masks multiplied into the weights and removed
        (:func:`lobster_fx.fold`): ``torch.ao.pruning``'s ``squash_mask``."""
        if self.gm is None:
            raise RuntimeError("Sparsifier.fold: call prepare(model) first")
        from lobster_fx.passes.fold import fold

        return fold(self.gm)

    squash_mask = fold

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The live mask of every prunable parameter, by its name in the original model."""
        if self.gm is None:
            raise RuntimeError("Sparsifier.masks: call prepare(model) first")
        return masks(self.gm)

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self, *, include_masks: bool = True) -> dict[str, Any]:
        """``{"format", "options", "rule", "pruner", "masks"}``: plain data and tensors (loads with
        ``torch.load(weights_only=True)``). ``include_masks=False`` leaves the masks out where the
        model's own state dict holds them already (a Lightning checkpoint)."""
        if self.rule is not None:
            rule, pruner = self.rule.state_dict(), self.pruner.state_dict()
        elif self._pending is not None:
            rule, pruner = self._pending["rule"], self._pending["pruner"]
        else:
            rule = pruner = None
        state: dict[str, Any] = {"format": STATE_FORMAT, "options": dict(self.options), "rule": rule,
                                 "pruner": pruner}
        if include_masks:
            state["masks"] = None if self.gm is None else {k: v.detach().clone() for k, v in self.masks.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the masks at once (into the prepared model),
        the rule and the schedule at once if attached, else at :meth:`attach`.

        Everything is checked before anything changes (a bad state leaves this object and the
        model as they were).

        Raises:
            ValueError: not a Sparsifier state, a state of another method / granularity /
                sensitivity, or masks whose names or shapes differ from the model's.
        """
        who = "Sparsifier.load_state_dict"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{who}: not a Sparsifier state (format {got!r}, expected {STATE_FORMAT!r})")
        saved = state["options"]
        changed = [f"{k} {saved.get(k)!r} -> {self.options[k]!r}" for k in _DEFINING if saved.get(k) != self.options[k]]
        if changed:
            raise ValueError(f"{who}: the state is of another run (saved -> this Sparsifier): {'; '.join(changed)}")
        new_masks = state.get("masks")
        if new_masks is not None:
            if self.gm is None:
                raise RuntimeError(f"{who}: the state holds masks: call prepare(model) first")
            live = self.masks
            if set(new_masks) != set(live):
                missing, extra = sorted(set(live) - set(new_masks)), sorted(set(new_masks) - set(live))
                raise ValueError(f"{who}: mask names differ from the model's (missing {missing[:4]}, "
                                 f"unexpected {extra[:4]})")
            for name, m in new_masks.items():
                if tuple(m.shape) != tuple(live[name].shape):
                    raise ValueError(f"{who}: mask {name!r} has shape {tuple(m.shape)}, the model's "
                                     f"{tuple(live[name].shape)}")
        rule_state, pruner_state = state.get("rule"), state.get("pruner")
        if self.rule is not None and rule_state is not None:
            # all or nothing: the pruner checks everything before it changes; the rule last
            old = (self.rule.state_dict(), self.pruner.state_dict())
            self.pruner.load_state_dict(pruner_state)
            try:
                self.rule.load_state_dict(rule_state)
            except BaseException:
                self.pruner.load_state_dict(old[1])
                raise
        elif rule_state is not None:
            self._pending = {"rule": copy.deepcopy(rule_state), "pruner": pruner_state}
        if new_masks is not None:
            with torch.no_grad():
                for name, mask in self.masks.items():
                    mask.copy_(new_masks[name])  # in place: the cached all-ones facts see the write

    def __repr__(self) -> str:
        state = "attached" if self.rule is not None else "prepared" if self.gm is not None else "new"
        return f"Sparsifier({', '.join(f'{k}={v!r}' for k, v in self.options.items())}; {state})"
