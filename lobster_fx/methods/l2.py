"""Decoupled L2 weight decay as a per-step rule: ``w <- w - lmbda * w`` at every step.

The baseline the reproduction compares LOBSTER with, written through the
:class:`~lobster_fx.methods.base.StepRule` seam: the term is all there is; the final
gradient, ``GradScaler`` skipped steps, pinning of pruned weights, stochastic rounding of
bfloat16 / float16 parameters, ``state_dict`` and the one-rule-per-optimizer check come from
the base. Unlike an optimizer's ``weight_decay`` it is not scaled by the learning rate and it
leaves pruned weights at exactly zero.

Example::

    >>> import torch, lobster_fx
    >>> from lobster_fx.methods.l2 import L2
    >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    >>> rule = L2(gm, opt, lmbda=0.25)
    >>> w0 = gm.get_parameter("weight").detach().clone()
    >>> gm(torch.randn(8, 4)).sum().backward()
    >>> opt.step()
    >>> torch.allclose(gm.get_parameter("weight"), 0.75 * w0)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from lobster_fx.methods.base import StepRule

__all__ = ["L2"]


class L2(StepRule):
    """Decoupled weight decay ``w <- w - lmbda * w`` at every ``optimizer.step()``.

    Args: ``gm``, ``optimizer``, ``lmbda`` and ``seed`` as for :class:`lobster_fx.Lobster`
    (no fused kernels: the eager path is one ``_foreach`` pass).
    """

    term_name = "L2 weight decay"

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float = 1e-4, *,
                 seed: int = 0) -> None:
        super().__init__(gm, optimizer, lmbda, fused=False, seed=seed)

    def term(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return w * self.lmbda
