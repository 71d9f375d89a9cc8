"""Old path of :mod:`lobster_fx.passes.fold`."""

# temporary: removed when imports move (issue 14)
from lobster_fx.passes.fold import (  # noqa: F401
    MaskedModelError,
    _instrumented_parts,
    _unshare_parametrized_classes,
    fold,
    masked_parameter_names,
    require_folded,
)
