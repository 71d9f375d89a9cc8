"""Pruning: what to prune (:mod:`~lobster_fx.pruning.prune`: one phase, by weight or by unit) and
when (:mod:`~lobster_fx.pruning.triggers`; :class:`~lobster_fx.pruning.schedule.PlateauPruner`
combines the two)."""
