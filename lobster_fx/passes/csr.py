"""CSR pass: store sparse Linear weights as torch CSR tensors (CPU/GPU inference in torch).

:func:`to_sparse_csr` rewrites every eligible ``linear(x, weight, bias)`` call
of a traced model (weight = a ``get_attr`` of a 2-D dense tensor, used only as
linear weights) into :func:`csr_linear`, which runs ``torch.sparse.addmm`` on
the weight stored as a ``torch.sparse_csr`` buffer (the dense parameter is
dropped; the CSR tensor lives in a :class:`CsrTensor` submodule named
``weight_csr`` next to where the weight was). Inputs with more than 2 dims are
flattened to 2-D and back.

Conv layers stay dense: a CSR conv would need im2col (``unfold``), which copies
the input once per kernel tap; not implemented and not measured. CSR tensors
cannot be exported to ONNX, so this is for torch inference only; fold first
(:func:`lobster_fx.passes.fold.fold`: a model with masks is refused), slim
(:func:`lobster_fx.passes.slim.slim`), then convert what is left.

When CSR pays off: the sparse kernel has a fixed overhead per call, so CSR wins at
batch 1 only at very high sparsity (from ~96% with one thread on a 300x784 weight),
at batch 64 from much lower; with two threads at batch 1 it lost at every sparsity
measured. The default ``min_sparsity`` (:data:`DEFAULT_MIN_SPARSITY` = 0.97) converts
only layers that won at batch 1 single-threaded and at batch >= 64. Measurements:
benchmarks/RESULTS.md.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lobster_fx.passes.csr import to_sparse_csr
    >>> m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.mul_(torch.rand(32, 64) > 0.99)
    >>> gm = to_sparse_csr(m)
    >>> gm.get_submodule("0").weight_csr.csr.layout, gm.get_submodule("2").weight.layout
    (torch.sparse_csr, torch.strided)
    >>> x = torch.randn(3, 5, 64)
    >>> bool(torch.allclose(gm(x), m(x), atol=1e-6))
    True
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from lobster_fx.graph.trace import LobsterGraphModule, trace_model
from lobster_fx.passes.fold import require_folded

__all__ = ["to_sparse_csr", "csr_linear", "CsrTensor", "CsrReport", "DEFAULT_MIN_SPARSITY"]

#: see the module docstring for why
DEFAULT_MIN_SPARSITY = 0.97
META_KEY = "lobster_sparse"

_LINEAR_FNS = {torch._C._nn.linear, F.linear}


def csr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a CSR ``weight`` [out, in]; ``x`` is [..., in]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # W @ x^T keeps the sparse operand first, the layout torch has fast kernels for
    if bias is None:
        out = torch.sparse.mm(weight, x2.t())
    else:
        out = torch.sparse.addmm(bias.unsqueeze(1), weight, x2.t())
    return out.t().reshape(*lead, weight.shape[0])


class CsrTensor(nn.Module):
    """Holds one CSR tensor as buffer ``csr``.

    A module of its own because torch 2.14 cannot ``copy.deepcopy`` a CSR
    tensor ("Cannot access storage of SparseCsrTensorImpl"); this one rebuilds
    it from its index and value tensors. ``state_dict`` / ``torch.save`` work."""

    def __init__(self, csr: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("csr", csr)

    def __deepcopy__(self, memo: dict[int, object]) -> CsrTensor:
        c = self.csr
        new = CsrTensor(torch.sparse_csr_tensor(
            copy.deepcopy(c.crow_indices(), memo), copy.deepcopy(c.col_indices(), memo),
            copy.deepcopy(c.values(), memo), c.shape, check_invariants=False))
        new.train(self.training)
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        c = self.csr
        return f"shape={tuple(c.shape)}, nnz={c.values().numel()}, dtype={c.dtype}"


@dataclass
class CsrReport:
    """``converted`` / ``kept_dense`` map a weight's target to its sparsity;
    ``reasons`` says why a linear weight was not converted."""

    min_sparsity: float
    converted: dict[str, float] = field(default_factory=dict)
    kept_dense: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def _get(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _graphs(gm: GraphModule) -> list[torch.fx.Graph]:
    if isinstance(gm, LobsterGraphModule):
        return list({id(g): g for g in gm.mode_graphs.values()}.values())
    return [gm.graph]


def to_sparse_csr(model: nn.Module, *, min_sparsity: float = DEFAULT_MIN_SPARSITY) -> GraphModule:
    """Copy of ``model`` whose Linear weights with ``>= min_sparsity`` zeros are CSR.

    ``model`` may be a :class:`LobsterGraphModule` (both mode graphs are
    rewritten) or any other module, plain ``GraphModule`` included (traced with
    :func:`lobster_fx.graph.trace.trace_model`). ``model`` is
    not modified. A :class:`CsrReport` is attached as ``gm.meta["lobster_sparse"]``.
    Converted weights become buffers (not trainable); ``owner.weight`` is gone
    and ``owner.weight_csr.csr`` holds the CSR tensor.

    ``model`` must not have masks: the sparsity counted is the stored weights',
    so an instrumented model (masks not folded) would convert nothing. Pass
    ``lobster_fx.fold(gm)`` (or its :func:`lobster_fx.passes.slim.slim` result); an
    instrumented model (also inside a DDP / DataParallel / ``torch.compile``
    wrapper, or as a submodule) raises :class:`lobster_fx.passes.fold.MaskedModelError`
    (a ``ValueError``) before anything is copied."""
    require_folded(model, "to_sparse_csr")
    gm = copy.deepcopy(model)
    if not isinstance(gm, LobsterGraphModule):
        # plain GraphModules too: symbolic_trace keeps Linear as a call_module leaf
        gm = trace_model(gm).module
    report = CsrReport(min_sparsity)
    graphs = _graphs(gm)

    # every use of each get_attr target, over all graphs: a weight read elsewhere
    # (shape, another op) must stay a dense tensor
    uses: dict[str, list[tuple[Node, Node]]] = {}
    for g in graphs:
        for n in g.nodes:
            if n.op == "get_attr":
                for u in n.users:
                    uses.setdefault(n.target, []).append((n, u))

    for target, pairs in uses.items():
        linear_weight = [
            u.op == "call_function" and u.target in _LINEAR_FNS and len(u.args) > 1 and u.args[1] is a
            and a not in u.args[2:] and a not in u.kwargs.values() and u.args[0] is not a
            for a, u in pairs
        ]
        if not any(linear_weight):
            continue
        w = _get(gm, target)
        if not all(linear_weight):
            report.reasons[target] = "weight has uses other than as a linear weight"
            continue
        if not isinstance(w, torch.Tensor) or w.layout != torch.strided or w.dim() != 2 or not w.is_floating_point():
            report.reasons[target] = "not a dense 2-D floating-point tensor"
            continue
        sparsity = float((w == 0).sum()) / max(w.numel(), 1)
        if sparsity < min_sparsity:
            report.kept_dense[target] = sparsity
            continue
        prefix, _, name = target.rpartition(".")
        owner = gm.get_submodule(prefix)
        # drop the dense parameter: the point is to not hold both
        owner._parameters.pop(name, None)
        owner._buffers.pop(name, None)
        holder_name = f"{name}_csr"
        while hasattr(owner, holder_name):
            holder_name += "_"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = w.detach().to_sparse_csr()
        owner.add_module(holder_name, CsrTensor(csr))
        new_target = f"{prefix}.{holder_name}.csr" if prefix else f"{holder_name}.csr"
        for a, u in pairs:
            a.target = new_target
            u.target = csr_linear
        report.converted[target] = sparsity

    if isinstance(gm, LobsterGraphModule):
        gm.recompile_all()
    else:
        gm.graph.lint()
        gm.recompile()
    gm.meta[META_KEY] = report
    return gm
