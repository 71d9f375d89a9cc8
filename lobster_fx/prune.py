"""Moved to :mod:`lobster_fx.pruning.prune` and :mod:`lobster_fx.pruning.checks`."""
# temporary: removed when imports move (issue 14)

from lobster_fx.pruning.checks import _as_real, _got, check_evaluate, check_flag, check_int, check_real  # noqa: F401
from lobster_fx.pruning.prune import (  # noqa: F401
    Evaluate,
    PruneResult,
    _all_reduce_mean,
    _checked_loss,
    _reduction_device,
    distinct_magnitudes,
    prune,
)
