"""Moved to :mod:`lobster_fx.pruning.schedule`."""
# temporary: removed when imports move (issue 14)

from lobster_fx.pruning.schedule import PlateauPruner  # noqa: F401
