"""Analysis of trained (pruned) models: PSP-entropy per unit (:mod:`lobster_fx.analysis.psp`).

Plots (:mod:`lobster_fx.analysis.plots`) import matplotlib only when called; the ``analyze``
command line lives in :mod:`lobster_fx.analysis.command`.
"""

from lobster_fx.analysis.psp import PSPReport, binary_entropy, psp_entropy

__all__ = ["PSPReport", "binary_entropy", "psp_entropy"]
