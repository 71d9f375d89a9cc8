"""Rule stage: the LOBSTER update, applied at every ``optimizer.step()``.

Eq. (6) of the paper, with ``g = dL/dw`` at ``w_{t-1}``::

    w_t = w_{t-1} - eta * g - lmbda * w_{t-1} * relu(1 - |g|)

The rule needs the *final* gradient of a step (after gradient accumulation,
after the DDP all-reduce, after ``GradScaler`` unscaled it), which exists when
``optimizer.step()`` starts. So :class:`Lobster` registers an optimizer step
pre-hook that computes ``delta = lmbda * w_{t-1} * relu(1 - |g|)`` and a
post-hook that subtracts it from whatever the optimizer produced: with plain SGD
that is eq. (6) exactly, with any other optimizer the optimizer's own update
plus the decoupled LOBSTER term. A step that ``GradScaler`` skips never calls
``optimizer.step()``, so the rule is skipped too. The post-hook also pins pruned
parameters to exactly zero (momentum, weight decay and Adam would move them).

Example::

    >>> import torch, lobster_fx
    >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    >>> rule = lobster_fx.Lobster(gm, opt, lmbda=1e-4)
    >>> gm(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step()  # SGD step + LOBSTER term
    >>> rule.steps
    1
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lobster_fx.instrument import masked_parameters, unwrap

__all__ = ["Lobster", "lobster_delta"]


def lobster_delta(w: torch.Tensor, grad: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``lmbda * w * relu(1 - |grad|)``: the LOBSTER shrinkage of eq. (6)."""
    return torch.relu(1 - grad.abs()).mul_(w).mul_(lmbda)


class Lobster:
    """Apply the LOBSTER rule at every ``optimizer.step()`` of ``optimizer``.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument` (or a DDP /
            ``torch.compile`` wrapper of one).
        optimizer: any ``torch.optim.Optimizer`` holding (some of) ``gm``'s
            prunable parameters; the rule touches those only.
        lmbda: the regularisation strength (not scaled by the learning rate).

    ``remove()`` detaches the hooks; ``state_dict()`` / ``load_state_dict()``
    save and restore ``lmbda`` and the step count.
    """

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float = 1e-4) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lobster expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.gm = unwrap(gm)
        self.lmbda = self._check_lmbda(lmbda)
        in_optimizer = self._optimizer_param_ids(optimizer)
        if not any(id(p) in in_optimizer for _, p, _ in masked_parameters(self.gm)):
            raise ValueError(
                "the optimizer holds none of the instrumented model's prunable parameters; "
                "build it from gm.parameters() of the module returned by lobster_fx.instrument"
            )
        self.optimizer = optimizer
        self.steps = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @staticmethod
    def _check_lmbda(lmbda: float) -> float:
        lmbda = float(lmbda)
        if not math.isfinite(lmbda) or lmbda < 0:
            raise ValueError(f"Lobster: lmbda must be a finite number >= 0, got {lmbda}")
        return lmbda

    @staticmethod
    def _optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        self._pending = []
        # fused optimizers under GradScaler get still-scaled grads plus these two
        found_inf = kwargs.get("found_inf")
        if found_inf is not None and float(found_inf) != 0.0:
            return
        grad_scale = kwargs.get("grad_scale")
        in_optimizer = self._optimizer_param_ids(optimizer)
        for _, p, mask in masked_parameters(self.gm):
            if id(p) not in in_optimizer or p.grad is None:
                continue
            delta = None
            if self.lmbda > 0:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                if grad_scale is not None:
                    g = g / grad_scale
                delta = lobster_delta(p.detach(), g, self.lmbda)
            self._pending.append((p, mask, delta))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._pending:
            return
        for p, mask, delta in self._pending:
            if delta is not None:
                p.sub_(delta)
            p.mul_(mask)  # pruned entries stay exactly zero whatever the optimizer did
        self._pending = []
        self.steps += 1

    def remove(self) -> None:
        """Detach from the optimizer; later steps are plain optimizer steps."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"lmbda": self.lmbda, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lmbda = self._check_lmbda(state["lmbda"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"Lobster(lmbda={self.lmbda}, steps={self.steps}, optimizer={type(self.optimizer).__name__})"
