"""lobster_fx: LOBSTER sparse training as a torch.fx pass, and compressed export.

The public names load on first use (PEP 562), so ``import lobster_fx`` for training
does not import the export and plotting stack (onnx, ONNX Runtime, onnxscript,
matplotlib, scikit-learn).

Example::

    >>> import torch, lobster_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> gm = lobster_fx.instrument(model)
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    >>> rule = lobster_fx.Lobster(gm, opt, lmbda=1e-4)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it, in pipeline order
_EXPORTS = {
    # capture: trace, instrument, taps
    "instrument": "lobster_fx.graph.instrument",
    "masks": "lobster_fx.graph.instrument",
    "default_filter": "lobster_fx.graph.instrument",
    "install_taps": "lobster_fx.graph.taps",
    # methods: per-step rules
    "StepRule": "lobster_fx.methods.base",
    "Lobster": "lobster_fx.methods.lobster",
    "L2": "lobster_fx.methods.l2",
    "SeReNe": "lobster_fx.methods.serene",
    "NEq": "lobster_fx.methods.neq",
    # pruning: what, when
    "prune": "lobster_fx.pruning.prune",
    "PruneResult": "lobster_fx.pruning.prune",
    "PruneAction": "lobster_fx.pruning.prune",
    "PlateauTrigger": "lobster_fx.pruning.triggers",
    "EveryNIterations": "lobster_fx.pruning.triggers",
    "PlateauPruner": "lobster_fx.pruning.schedule",
    "Sparsifier": "lobster_fx.sparsifier",
    "sparsity_report": "lobster_fx.report",
    "SparsityReport": "lobster_fx.report",
    # analysis: what pruning did to each unit
    "psp_entropy": "lobster_fx.analysis.psp",
    "PSPReport": "lobster_fx.analysis.psp",
    # passes: fold, slim, csr
    "fold": "lobster_fx.passes.fold",
    "slim": "lobster_fx.passes.slim",
    "register_elementwise": "lobster_fx.passes.slim",
    "unregister_elementwise": "lobster_fx.passes.slim",
    "to_sparse_csr": "lobster_fx.passes.csr",
    # onnx: export, and the runtime benchmark
    "export_onnx": "lobster_fx.onnx.export",
    "onnx_file_bytes": "lobster_fx.onnx.large",
    "DetectionParity": "lobster_fx.onnx.parity",
    "ExportReport": "lobster_fx.onnx.export",
    "benchmark": "lobster_fx.bench",
    "BenchReport": "lobster_fx.bench",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lobster_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from lobster_fx.analysis.psp import PSPReport, psp_entropy
    from lobster_fx.bench import BenchReport, benchmark
    from lobster_fx.graph.instrument import default_filter, instrument, masks
    from lobster_fx.graph.taps import install_taps
    from lobster_fx.methods.base import StepRule
    from lobster_fx.methods.l2 import L2
    from lobster_fx.methods.lobster import Lobster
    from lobster_fx.methods.neq import NEq
    from lobster_fx.methods.serene import SeReNe
    from lobster_fx.onnx.export import ExportReport, export_onnx
    from lobster_fx.onnx.large import onnx_file_bytes
    from lobster_fx.onnx.parity import DetectionParity
    from lobster_fx.passes.csr import to_sparse_csr
    from lobster_fx.passes.fold import fold
    from lobster_fx.passes.slim import register_elementwise, slim, unregister_elementwise
    from lobster_fx.pruning.prune import PruneAction, PruneResult, prune
    from lobster_fx.pruning.schedule import PlateauPruner
    from lobster_fx.pruning.triggers import EveryNIterations, PlateauTrigger
    from lobster_fx.report import SparsityReport, sparsity_report
    from lobster_fx.sparsifier import Sparsifier
