"""Per-step methods: a term applied at every ``optimizer.step()`` on a shared base.

* :class:`StepRule` (:mod:`lobster_fx.methods.base`): the plumbing (final gradient,
  ``GradScaler``, DDP, eager / fused paths, pinning, half precision, ``state_dict``,
  one rule per optimizer); a method supplies its term.
* :class:`Lobster` (:mod:`lobster_fx.methods.lobster`): LOBSTER's eq. (6) term.
* :class:`L2` (:mod:`lobster_fx.methods.l2`): decoupled weight decay, the baseline.
* :class:`SeReNe` (:mod:`lobster_fx.methods.serene`): structured, per-unit shrink gated by
  each unit's sensitivity (output- or loss-based).
* :class:`NEq` (:mod:`lobster_fx.methods.neq`): not a term but a freeze: units whose
  behaviour has settled stop moving for an epoch (:mod:`lobster_fx.methods.neq_backward`
  skips their weight gradients).
"""

from lobster_fx.methods.base import FusedKernels, StepRule
from lobster_fx.methods.l2 import L2
from lobster_fx.methods.lobster import Lobster, lobster_delta
from lobster_fx.methods.neq import NEq
from lobster_fx.methods.serene import SeReNe

__all__ = ["StepRule", "FusedKernels", "Lobster", "L2", "lobster_delta", "SeReNe", "NEq"]
