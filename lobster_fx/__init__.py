"""lobster_fx: LOBSTER sparse training as a torch.fx pass, and compressed export.

Example::

    >>> import torch, lobster_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> gm = lobster_fx.instrument(model)
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    >>> rule = lobster_fx.Lobster(gm, opt, lmbda=1e-4)
"""

from lobster_fx.bench import BenchReport, benchmark
from lobster_fx.export import DetectionParity, ExportReport, export_onnx, onnx_file_bytes
from lobster_fx.fold import fold
from lobster_fx.instrument import default_filter, instrument, masks
from lobster_fx.prune import PruneResult, prune
from lobster_fx.report import SparsityReport, sparsity_report
from lobster_fx.rule import Lobster
from lobster_fx.schedule import PlateauPruner
from lobster_fx.slim import slim, slim_with_report
from lobster_fx.sparse import to_sparse_csr

__all__ = [
    "instrument",
    "masks",
    "default_filter",
    "Lobster",
    "prune",
    "PruneResult",
    "PlateauPruner",
    "sparsity_report",
    "SparsityReport",
    "fold",
    "slim",
    "slim_with_report",
    "to_sparse_csr",
    "export_onnx",
    "onnx_file_bytes",
    "DetectionParity",
    "ExportReport",
    "benchmark",
    "BenchReport",
]
__version__ = "0.1.0"
