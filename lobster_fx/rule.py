"""Temporary shim: the rule moved to :mod:`lobster_fx.methods` (issue 14)."""
# temporary: removed when imports move (issue 14)
from lobster_fx.methods.lobster import (  # noqa: F401
    FUSE_MIN_NUMEL,
    HALF_CHUNK_NUMEL,
    SCRATCH_MAX_NUMEL,
    Lobster,
    _compile_private,
    _stochastic_round,
    _update_reads_weights,
    lobster_delta,
)

__all__ = ["Lobster", "lobster_delta", "FUSE_MIN_NUMEL"]
