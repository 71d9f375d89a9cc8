"""LOBSTER: the update of eq. (6), applied at every ``optimizer.step()``.

Eq. (6) of the paper, with ``g = dL/dw`` at ``w_{t-1}``::

    w_t = w_{t-1} - eta * g - lmbda * w_{t-1} * relu(1 - |g|)

:class:`Lobster` is that term on the :class:`~lobster_fx.methods.base.StepRule` plumbing
(final gradient, ``GradScaler``, skipped steps, DDP, pinning, bfloat16 / float16 stochastic
rounding, ``state_dict``, one rule per optimizer; see :mod:`lobster_fx.methods.base`): with
plain SGD the step is eq. (6) exactly, with any other optimizer the optimizer's own update
plus the decoupled LOBSTER term.

What stays LOBSTER's own here is speed, not plumbing: the eager batch hooks carry the term as
``w * min(|g| - 1, 0)`` (``-relu(1 - |g|) = min(|g| - 1, 0)``), so it is applied by one
``addcmul`` (in place) or one ``add`` with ``alpha=lmbda`` after the update, with ``|g|`` in
buffers kept across steps (4-6 ``_foreach`` passes in all, as before the base existed), and
its ``torch.compile`` kernels fuse those passes into one or two per parameter, which is what
makes the rule cheap on large models (the rule is memory-bound; ``benchmarks/RESULTS.md``).
A generic fused path built from :meth:`Lobster.term` would have to trace a bound method (its
``lmbda`` a Python float baked into each graph) and is left for when a second method needs it.

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

import torch
from torch import nn

from lobster_fx.methods.base import FusedKernels, StepRule

__all__ = ["Lobster", "lobster_delta"]


def lobster_delta(w: torch.Tensor, grad: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``lmbda * w * relu(1 - |grad|)``: the LOBSTER shrinkage of eq. (6)."""
    return torch.relu(1 - grad.abs()).mul_(w).mul_(lmbda)


# The compiled kernels (FusedKernels): lmbda reaches them as a 0-dim tensor, since a Python float
# would be baked into the graph and a changing lambda would recompile until dynamo's limit (8)


def _fused_deltas(params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    # -w * relu(1 - |g|) = w * min(|g| - 1, 0): the same ops as the eager path, in one pass
    if grad_scale is None:
        return [p * (g.abs() - 1).clamp_max(0) for p, g in zip(params, grads)]
    return [p * (g.abs() / grad_scale - 1).clamp_max(0) for p, g in zip(params, grads)]


def _fused_apply(params: list[torch.Tensor], deltas: list[torch.Tensor], masks: list[torch.Tensor],
                 lmbda: torch.Tensor) -> None:
    # the term after the optimizer's update, and the mask pin, in one pass per parameter. Every
    # mask is applied (x1 is exact): splitting by "has zeros" would recompile as pruning reaches
    # new layers, and the mask is read in the same pass anyway
    for p, d, m in zip(params, deltas, masks):
        p.add_(d * lmbda).mul_(m)


def _fused_shrink(params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                  lmbda: torch.Tensor) -> None:
    # w += lmbda * w * min(|g| - 1, 0), in place, before a weight-free optimizer update
    for p, g in zip(params, grads):
        a = g.abs() if grad_scale is None else g.abs() / grad_scale
        p.add_(p * (a - 1).clamp_max(0) * lmbda)


class Lobster(StepRule):
    """Apply the LOBSTER rule at every ``optimizer.step()`` of ``optimizer``.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument` (or a DDP /
            ``torch.compile`` wrapper of one).
        optimizer: any ``torch.optim.Optimizer`` holding (some of) ``gm``'s
            prunable parameters; the rule touches those only.
        lmbda: the regularisation strength (not scaled by the learning rate).
        fused: ``True`` runs the rule as ``torch.compile``-generated kernels,
            one pass over each parameter (the in-place shrink) or two (the term
            before the optimizer's update, then its addition with the mask pin),
            instead of 4-6 eager ``_foreach`` passes; ``False`` keeps the eager
            passes; ``None`` (default) fuses when the prunable parameters hold
            at least ``FUSE_MIN_NUMEL`` elements. Compiling takes seconds at the first step. If it fails
            (no C++ compiler for inductor on CPU, no triton on GPU) the rule
            warns once and runs eagerly; ``rule.fused`` says which path runs.
            Both compute the same arithmetic, equal to float rounding.
            bfloat16 / float16 parameters always take the eager path.
        seed: seeds the stochastic rounding of bfloat16 / float16 parameters
            (with the step count, at every step; see :mod:`lobster_fx.methods.base`). The
            same on every DDP rank, so the default 0 needs no communication.

    ``remove()`` detaches the hooks; ``state_dict()`` / ``load_state_dict()``
    save and restore ``lmbda``, the step count and the seed.

    One rule per optimizer: a second rule (``Lobster`` or any other
    :class:`~lobster_fx.methods.base.StepRule`) on an optimizer that already has one
    attached over the same parameters would apply a term twice per step, so it is
    refused (ValueError naming the optimizer and the parameters) until the first is
    ``remove()``-d. A rule on *another* optimizer holding the same parameters is
    allowed (each optimizer's step applies its own update and the term) but warns.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, ``gm`` is not instrumented, or
            ``lmbda`` / ``seed`` / ``fused`` has the wrong type (``lmbda="abc"``,
            ``lmbda=True``); the message names the argument.
        ValueError: ``lmbda`` is negative or not finite, the optimizer holds none of
            ``gm``'s prunable parameters, or it already has a rule over them.
    """

    term_name = "LOBSTER"
    fused_kernels = FusedKernels(shrink=_fused_shrink, terms=_fused_deltas, apply=_fused_apply)
    uses_scratch = True

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float = 1e-4, *,
                 fused: bool | None = None, seed: int = 0) -> None:
        super().__init__(gm, optimizer, lmbda, fused=fused, seed=seed)

    def term(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``lmbda * w * relu(1 - |g|)`` (the batch hooks below compute the same, faster)."""
        return lobster_delta(w, g, self.lmbda)

    # the batch hooks carry w * min(|g| - 1, 0) = -delta / lmbda: applied with alpha=lmbda,
    # one pass fewer than carrying delta itself

    def terms(self, params, grads, grad_scale, out, names) -> list[torch.Tensor]:
        pending = self._min_abs_minus_one(grads, grad_scale, out)
        torch._foreach_mul_(pending, params)
        return pending

    def apply_terms_(self, params, pending) -> None:
        torch._foreach_add_(params, pending, alpha=self.lmbda)

    def shrink_(self, params, grads, grad_scale, out, names) -> None:
        torch._foreach_addcmul_(params, params, self._min_abs_minus_one(grads, grad_scale, out), value=self.lmbda)

    @staticmethod
    def _min_abs_minus_one(grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                           out: list[torch.Tensor] | None) -> list[torch.Tensor]:
        # -relu(1 - |g|) = min(|g| - 1, 0), in 3 foreach passes (4 with grad_scale)
        if out is None:
            out = torch._foreach_abs(grads)
        else:
            for g, o in zip(grads, out):
                torch.abs(g, out=o)
        if grad_scale is not None:
            torch._foreach_div_(out, grad_scale)
        torch._foreach_add_(out, -1.0)
        torch._foreach_clamp_max_(out, 0.0)
        return out
