"""Instrument stage: rewrite every use of a prunable parameter into ``param * mask``.

Two routes, chosen per parameter:

* **graph**: the parameter is a ``get_attr`` node of a traced graph; a
  :func:`masked_weight` node (``w * mask``) with a mask buffer is inserted after
  it (``node.meta["lobster_mask"]`` names the parameter). Uses that only read
  metadata (``w.shape``, ``w.dtype``) keep the raw parameter.
* **module**: the parameter is used inside a leaf module (``MultiheadAttention``)
  or inside code that did not trace; it gets a ``torch.nn.utils.parametrize``
  parametrization multiplying it by its mask.

The mask is 1.0 everywhere at first and ``w * 1.0 == w`` exactly, so the
instrumented model's outputs equal the original's bit for bit.

Example::

    >>> import torch, lobster_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> gm = lobster_fx.instrument(model)
    >>> sorted(lobster_fx.masks(gm))
    ['0.bias', '0.weight', '2.bias', '2.weight']
    >>> x = torch.randn(5, 4)
    >>> torch.equal(gm(x), model(x))
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
from torch.fx import GraphModule, Node
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lobster_fx.graph.prunable import _is_metadata, default_filter, is_norm, multiplies_inputs
from lobster_fx.graph.state_keys import external_key
from lobster_fx.graph.trace import LobsterGraphModule, TraceSummary, _shallow_copy_module, trace_model

__all__ = [
    "instrument",
    "masks",
    "default_filter",
    "MaskedParam",
    "InstrumentSummary",
    "masked_parameters",
    "lobster_info",
    "unwrap",
    "masked_weight",
    "mask_is_all_ones",
    "mask_has_zeros",
]

FilterFn = Callable[[nn.Module, str], bool]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class MaskedParam:
    """Where one prunable parameter and its mask live in the instrumented module."""

    name: str  #: the parameter's name in the original model (key of :func:`masks`)
    param_path: str  #: path of the raw parameter in the instrumented module
    mask_path: str  #: path of the mask buffer in the instrumented module
    owner: str  #: qualified name of the owning module in the original model
    route: str  #: "graph" (mask node in a traced graph) or "module" (parametrization)
    shape: tuple[int, ...] = ()
    #: other modules (paths in the instrumented module) whose own code uses the parameter
    #: (tied weights): masked there with a parametrization sharing the same mask
    also_masked_in: list[str] = field(default_factory=list)


@dataclass
class InstrumentSummary:
    """What ``instrument`` did where; ``print(summary)`` shows a table."""

    params: dict[str, MaskedParam] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    trace: TraceSummary = field(default_factory=TraceSummary)

    def __str__(self) -> str:
        rows = [f"{'parameter':40s} {'route':6s} {'shape'}"]
        for p in self.params.values():
            tied = f"  (also masked in {', '.join(p.also_masked_in)})" if p.also_masked_in else ""
            rows.append(f"{p.name:40s} {p.route:6s} {tuple(p.shape)}{tied}")
        for name, why in self.skipped.items():
            rows.append(f"{name:40s} {'-':6s} not masked: {why}")
        n_graph = sum(p.route == "graph" for p in self.params.values())
        head = (
            f"lobster_fx.instrument: {len(self.params)} parameters masked "
            f"({n_graph} in traced graphs, {len(self.params) - n_graph} at module level)"
        )
        return "\n".join([head, str(self.trace), *rows])


def unwrap(model: nn.Module) -> nn.Module:
    """The instrumented module inside a DDP / DataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def lobster_info(gm: nn.Module) -> InstrumentSummary:
    """The summary ``instrument`` stored on ``gm``; TypeError if it was not instrumented."""
    gm = unwrap(gm)
    info = getattr(gm, "meta", {}).get("lobster") if isinstance(gm, GraphModule) else None
    if info is None:
        raise TypeError(
            f"{type(gm).__name__} was not produced by lobster_fx.graph.instrument (no masks found); "
            "call gm = lobster_fx.instrument(model) first"
        )
    return info


def masked_parameters(gm: nn.Module) -> Iterator[tuple[MaskedParam, torch.Tensor, torch.Tensor]]:
    """Yield ``(info, raw parameter, mask)`` for every masked parameter of ``gm``.

    Resolved on each call, so ``.to(device)`` and ``load_state_dict`` are safe.
    """
    gm = unwrap(gm)
    for info in lobster_info(gm).params.values():
        yield info, gm.get_parameter(info.param_path), gm.get_buffer(info.mask_path)


def masks(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Mask per prunable parameter, keyed by the parameter's name in the original model.

    The tensors are the live buffers: editing them edits the model's masks.
    """
    return {info.name: mask for info, _, mask in masked_parameters(gm)}


# mask id -> (weakref to the mask, mask._version, data_ptr, (all ones, has a zero)). Keyed by id
# with a weakref check (not a WeakKeyDictionary, whose lookups compare tensors with ==), so a
# hit allocates nothing; entries leave with their mask
_MASK_FACTS: dict[int, tuple[weakref.ref, int, int, tuple[bool, bool]]] = {}


def _forget_mask(key: int, ref: weakref.ref) -> None:
    entry = _MASK_FACTS.get(key)
    if entry is not None and entry[0] is ref:
        del _MASK_FACTS[key]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mask_facts(mask: torch.Tensor) -> tuple[bool, bool] | None:
    """``(every entry is 1, some entry is 0)`` for ``mask``, or None where it cannot be told cheaply.

    Cached per in-place version and storage of the mask: every in-place write (``prune``'s
    ``masked_fill_``, ``mask[i] = 0``, ``load_state_dict``) bumps the version, and
    ``mask.data = t`` moves the storage. A write *into* ``mask.data`` (``mask.data[i] = 0``)
    does neither and is not seen: write masks in place, under ``torch.no_grad()`` if need be.
    Anything that records ops instead of only running them (dynamo / ``torch.export``,
    ``torch.jit.trace``, ``make_fx`` and other dispatch modes, CUDA graph capture) gets None:
    a recording must not depend on the values a mask holds when it is made.
    """
    # first: dynamo must not trace the checks below (is_inference() is a graph break)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return None
    if _distributed():
        # DDP broadcasts rank 0's buffers, masks included, into the other ranks at every
        # forward without bumping their versions: a cached "all ones" would run those ranks
        # unmasked and unpinned while rank 0 masks. Under torch.distributed every forward
        # multiplies and every step pins, so each rank honours the mask it holds
        return None
    if type(mask) is not torch.Tensor or mask.layout is not torch.strided or mask.is_inference():
        return None
    if mask.device.type not in ("cpu", "cuda") or _is_functorch_wrapped(mask):
        return None
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    key = id(mask)
    entry = _MASK_FACTS.get(key)
    if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == mask.data_ptr():
        return entry[3]
    ref = weakref.ref(mask, lambda r, key=key: _forget_mask(key, r))
    facts = (bool((mask == 1).all()), not bool(mask.all()))
    _MASK_FACTS[key] = (ref, mask._version, mask.data_ptr(), facts)
    return facts


def mask_is_all_ones(mask: torch.Tensor) -> bool:
    """True if every entry of ``mask`` is known to be 1 (cached; see ``_mask_facts``), else False."""
    facts = _mask_facts(mask)
    return facts is not None and facts[0]


def mask_has_zeros(mask: torch.Tensor) -> bool:
    """True if some entry of ``mask`` is 0, or if that cannot be told cheaply (cached)."""
    facts = _mask_facts(mask)
    return facts is None or facts[1]


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask``, with ``weight``'s strides where they differ only on size-1 dims.

    While ``mask`` is all ones (before the first pruning) an eager call returns ``weight``
    itself: ``w * 1.0 == w`` bit for bit, and its gradient is the same, so the multiply and
    its backward are skipped (``benchmarks/results/overhead.md``). Under ``torch.compile``,
    tracing and dispatch modes the multiply is always recorded.

    The product's strides follow its own rules on size-1 dims, where any stride is valid:
    a channels-last ``(20, 1, 5, 5)`` or ``(64, 32, 1, 1)`` weight (``model.to(memory_format=
    torch.channels_last)``) came out with NCHW strides, so the convolution ran NCHW and
    converted to and from channels-last (measured in ``benchmarks/compute_bound.py``,
    figures in ``benchmarks/RESULTS.md``). Same values, same memory order.

        >>> w = torch.randn(20, 1, 5, 5).to(memory_format=torch.channels_last)
        >>> mask = torch.ones_like(w)
        >>> masked_weight(w, mask) is w  # all ones: the weight itself
        True
        >>> mask[0] = 0
        >>> masked_weight(w, mask).stride() == w.stride()
        True
    """
    if isinstance(weight, torch.fx.Proxy):
        # symbolic tracing (a pickled GraphModule is re-traced from its code): stay one node
        return weight.tracer.create_proxy("call_function", masked_weight, (weight, mask), {})
    # mask first: it answers False under compile before anything dynamo cannot trace. A mask
    # that requires grad (learned, or swapped in by functional_call) needs the product's backward;
    # a mask of another shape, dtype or device would broadcast, promote or fail in the product
    if mask_is_all_ones(mask) and not mask.requires_grad and type(weight) in (torch.Tensor, nn.Parameter) \
            and mask.shape == weight.shape and mask.dtype == weight.dtype and mask.device == weight.device \
            and not _is_functorch_wrapped(weight):
        return weight
    out = weight * mask
    if out.stride() != weight.stride() and out.shape == weight.shape and all(
        a == b or n == 1 for a, b, n in zip(out.stride(), weight.stride(), weight.shape)
    ):
        out = out.as_strided(weight.shape, weight.stride())
    return out


class _Mask(nn.Module):
    """Parametrization ``w -> w * mask`` for parameters used inside leaf modules."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return masked_weight(w, self.mask)


def _resolve(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def instrument(model: nn.Module, *, filter_fn: FilterFn | None = None) -> LobsterGraphModule:
    """Trace ``model`` and mask every prunable parameter.

    Args:
        model: any ``nn.Module``. It is not modified; the result shares its
            parameters (train the result, the original sees the same weights).
        filter_fn: ``filter_fn(module, fqn) -> bool`` decides which parameters
            are prunable (``module`` owns the parameter, ``fqn`` is the
            parameter's qualified name). Default: :func:`default_filter`.

    Returns:
        A :class:`~lobster_fx.graph.trace.LobsterGraphModule`; its ``meta["lobster"]``
        holds an :class:`InstrumentSummary` (``print(gm.meta["lobster"])``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is one ``instrument`` cannot
            rewrite correctly: a ``DistributedDataParallel`` / ``DataParallel`` /
            ``torch.compile`` wrapper (instrument the module, then wrap the result)
            or a ``torch.jit`` scripted / traced module (instrument the ``nn.Module``
            before scripting), or a model sharded with FSDP (``fully_shard``,
            ``FullyShardedDataParallel``: not supported; train with DDP).
        ValueError: no parameter is prunable, or one cannot be masked (the
            message names the module and the parameter), or a parameter is on the
            ``meta`` device (materialise the model first: its masks would have no data).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lobster_fx.graph.instrument expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(unwrap(model), GraphModule) and "lobster" in getattr(unwrap(model), "meta", {}):
        raise ValueError("model is already instrumented by lobster_fx (call instrument on the original model)")
    _refuse_unsupported(model)
    modules = dict(model.named_modules())
    prunable: dict[int, str] = {}  # id(param) -> original fqn (first name of a tied parameter)
    owners: dict[int, str] = {}
    skipped: dict[str, str] = {}
    undecided: dict[int, str] = {}  # raw parameters: the default decides from the traced graph
    for fqn, p in model.named_parameters():
        owner_name = fqn.rpartition(".")[0]
        owners[id(p)] = owner_name
        if not p.requires_grad:
            skipped[fqn] = "does not require grad"
        elif filter_fn is not None:
            if filter_fn(modules[owner_name], fqn):
                prunable[id(p)] = fqn
            else:
                skipped[fqn] = "rejected by filter_fn"
        elif default_filter(modules[owner_name], fqn):
            prunable[id(p)] = fqn
        elif is_norm(modules[owner_name]):
            skipped[fqn] = "normalisation parameter (its zero is not 'no connection'); filter_fn opts it in"
        else:
            undecided[id(p)] = fqn

    # trace a copy sharing the tensors: FX stores trace-time constants (``_tensor_constant0``)
    # on the module it traces, and code run while tracing may set attributes (EVA-02: 96 new
    # attributes on the original). Buffers written while tracing are put back (trace.py)
    work = _shallow_copy_module(model)
    traced = trace_model(work)
    gm = traced.module
    summary = InstrumentSummary(trace=traced.summary)
    original_ids = {id(m) for m in model.modules()} | {id(m) for m in work.modules()}
    mask_of: dict[int, torch.Tensor] = {}

    # default for raw parameters: prunable iff every traced use multiplies inputs
    uses = _graph_uses(gm, set(undecided))
    for pid, fqn in undecided.items():
        if pid not in uses:
            skipped[fqn] = ("used only by code that does not trace (cannot tell that it multiplies inputs); "
                            "filter_fn opts it in")
        elif multiplies_inputs(uses[pid]):
            prunable[pid] = fqn
        else:
            skipped[fqn] = "not the weight of a linear/conv/matmul op (its zero is not 'no connection'); filter_fn opts it in"
    summary.skipped.update(skipped)
    if not prunable:
        raise ValueError(
            f"{type(model).__name__} has no prunable parameters (of {len(owners)} parameters, none is the weight "
            "of a linear/conv/embedding/matmul op, or filter_fn rejected all, or none requires grad)"
        )

    def new_mask(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in mask_of:
            mask_of[id(p)] = torch.ones_like(p, requires_grad=False)
        return mask_of[id(p)]

    # graph route: every get_attr of a prunable parameter in every traced (sub)graph
    for sub_path, sub in list(gm.named_modules()):
        if not isinstance(sub, LobsterGraphModule):
            continue
        prefix = f"{sub_path}." if sub_path else ""
        for graph in {id(g): g for g in sub.mode_graphs.values()}.values():
            for node in list(graph.nodes):
                if node.op != "get_attr":
                    continue
                p = _resolve(sub, node.target)
                if not isinstance(p, nn.Parameter) or id(p) not in prunable:
                    continue
                container_path, _, attr = node.target.rpartition(".")
                container = sub.get_submodule(container_path)
                if id(container) in original_ids:
                    continue  # a leaf module of the original: masked at module level below
                mask_attr = f"{attr}_mask"
                while hasattr(container, mask_attr) and getattr(container, mask_attr) is not mask_of.get(id(p)):
                    mask_attr = f"{mask_attr}_"
                mask = new_mask(p)
                if not hasattr(container, mask_attr):
                    container.register_buffer(mask_attr, mask)
                name = prunable[id(p)]
                mask_target = f"{container_path}.{mask_attr}" if container_path else mask_attr
                users = [u for u in node.users if not _is_metadata(u)]
                if users:
                    with graph.inserting_after(node):
                        mask_node = graph.get_attr(mask_target)
                    with graph.inserting_after(mask_node):
                        mul = graph.call_function(masked_weight, (node, mask_node))
                    mul.meta["lobster_mask"] = name
                    for u in users:
                        u.replace_input_with(node, mul)
                summary.params.setdefault(
                    name,
                    MaskedParam(name, prefix + node.target, prefix + mask_target, owners[id(p)], "graph", tuple(p.shape)),
                )

    # module route: prunable parameters no traced graph uses directly
    for pid, name in prunable.items():
        if name in summary.params:
            continue
        _mask_at_module_level(gm, work, pid, name, owners[pid], original_ids, new_mask, summary)

    # every other use: a masked parameter also held by a module whose own code runs (a leaf
    # module, code that did not trace), e.g. an embedding tied to a custom head, is masked
    # there too, with the same mask (the head saw the raw weight: a zeroed mask left it whole)
    for pid, uses in _uses_by_running_code(gm).items():
        if pid not in mask_of:
            continue
        name = prunable[pid]
        for mod_path, attr in uses:
            _parametrize_use(gm, mod_path, attr, mask_of[pid], name, original_ids)
            summary.params[name].also_masked_in.append(mod_path or "<root>")

    for sub in gm.modules():
        if isinstance(sub, LobsterGraphModule):
            sub.recompile_all()
    gm.meta["lobster"] = summary
    _use_original_keys(gm, "opaque." if traced.summary.opaque and "" in traced.summary.opaque else "")
    return gm


def is_dtensor(t: object) -> bool:
    """True for a DTensor (the parameter shard FSDP2's ``fully_shard`` installs), or a tensor whose
    ``.data`` is one.

        >>> is_dtensor(torch.zeros(2))
        False
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def _fsdp_module(model: nn.Module) -> str | None:
    """A description of the first FSDP-sharded part of ``model`` (FSDP2 ``fully_shard``, an FSDP1
    wrapper, or a DTensor parameter), else None."""
    if not torch.distributed.is_available():
        return None
    fsdp_types: tuple[type, ...] = ()
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_types = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # an older torch without FSDP2: DTensor parameters still tell
        pass
    for name, mod in model.named_modules():
        if fsdp_types and isinstance(mod, fsdp_types):
            return f"module {name or '(the root)'!r} ({type(mod).__name__})"
    for fqn, p in model.named_parameters():
        if is_dtensor(p):
            return f"parameter {fqn!r} (a DTensor)"
    return None


def _refuse_unsupported(model: nn.Module) -> None:
    """TypeError / ValueError, before anything is traced or changed, for a model that
    ``instrument`` would mask wrongly or fail on with an obscure message."""
    wrappers = {
        nn.parallel.DistributedDataParallel: "DistributedDataParallel",
        nn.DataParallel: "DataParallel",
    }
    for cls, name in wrappers.items():
        if isinstance(model, cls):
            # the user's wrapper would keep running the original, unmasked module
            raise TypeError(
                f"lobster_fx.graph.instrument got a {name} wrapper: instrument the module before wrapping it "
                f"(gm = lobster_fx.instrument(model), then {name}(gm, ...)); unwrapping here would leave "
                f"your {name} running the original, unmasked module"
            )
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            "lobster_fx.graph.instrument got a torch.compile wrapper (OptimizedModule): instrument the module before "
            "compiling it (gm = lobster_fx.instrument(model), then torch.compile(gm)); the compiled wrapper "
            "would keep running the original, unmasked module"
        )
    fsdp = _fsdp_module(model)
    if fsdp is not None:
        # fully_shard swaps each parameter for a DTensor shard; tracing then deep-copies the module,
        # which FSDP refuses with an AssertionError that does not say what to do
        raise TypeError(
            f"lobster_fx.instrument: {fsdp} is sharded with FSDP (fully_shard / FullyShardedDataParallel), "
            "which is not supported: masks and the per-step rules need whole parameters. Instrument the "
            "plain module and train it with DistributedDataParallel (see examples/ddp_torchrun.py)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"lobster_fx.instrument: scripted modules (torch.jit.ScriptModule, here {type(model).__name__} from "
            "torch.jit.script or torch.jit.trace) are not supported: instrument the nn.Module before scripting "
            "or tracing it"
        )
    for fqn, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(
                f"lobster_fx.instrument: parameter {fqn!r} is on the meta device (no data): its mask would be "
                "created there too and hold uninitialised memory once the model is materialised. Materialise "
                "the model first (model.to_empty(device=...), then load its weights with "
                "model.load_state_dict(...)), then call lobster_fx.instrument(model)"
            )


def _use_original_keys(gm: LobsterGraphModule, strip: str) -> None:
    """``gm.state_dict()`` / ``load_state_dict`` speak the original model's key names (no
    ``opaque.`` prefix, no ``parametrizations.<w>.original``), so a checkpoint of the original
    loads strictly into ``gm`` (its masks stay as they are) and ``gm``'s weights load into the
    original with ``strict=False`` (the ``*_mask`` keys are extra). Left as they are, with a
    note in the summary, if two keys would get one name."""
    keys = list(gm.state_dict(keep_vars=True))
    renamed = [external_key(k, strip) for k in keys]
    if len(set(renamed)) != len(renamed):
        gm.meta["lobster"].skipped["<state_dict keys>"] = "kept as they are: renaming them would merge two keys"
        return
    # internal names: load_state_dict reports missing keys in the module's own terms
    masks = {e.mask_path for e in gm.meta["lobster"].params.values()} | {k for k in keys if k.endswith(".0.mask")}
    gm.meta["lobster_keys"] = {"strip": strip, "masks": sorted(masks)}


def _graph_uses(gm: nn.Module, ids: set[int]) -> dict[int, list[tuple[torch.fx.Graph, Node]]]:
    """``id(param) -> [(graph, get_attr node)]`` over every traced (sub)graph, for ``ids``."""
    found: dict[int, list[tuple[torch.fx.Graph, Node]]] = {}
    if not ids:
        return found
    for sub in gm.modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        for graph in {id(g): g for g in sub.mode_graphs.values()}.values():
            for node in graph.nodes:
                if node.op == "get_attr" and id(p := _resolve(sub, node.target)) in ids and isinstance(p, nn.Parameter):
                    found.setdefault(id(p), []).append((graph, node))
    return found


def _find_param_owner(gm: nn.Module, pid: int) -> tuple[str, str] | None:
    for mod_path, mod in gm.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None and id(p) == pid:
                return mod_path, attr
    return None


def _uses_by_running_code(gm: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(param) -> [(module path, attribute)]`` for parameters held directly by a module whose
    own Python code runs: a leaf module a graph calls, code that did not trace, and everything
    below them (opaque code may call any child). A graph's own ``get_attr`` uses are not listed:
    the graph route masks them. Already-parametrized attributes are not listed either."""
    found: dict[int, list[tuple[str, str]]] = {}

    def visit(mod: nn.Module, path: str, runs: bool, targets: set[str], rel: str | None) -> None:
        if isinstance(mod, parametrize.ParametrizationList):
            return  # the mask of a parametrized attribute: applied there
        if rel is not None and any(rel == t or rel.startswith(t + ".") for t in targets):
            runs = True
        if isinstance(mod, LobsterGraphModule):
            if not runs:
                return  # nobody calls it: nothing inside runs
            graphs = {id(g): g for g in mod.mode_graphs.values()}.values()
            called = {n.target for g in graphs for n in g.nodes if n.op == "call_module"}
            # the opaque-root wrapper calls a module it reads with get_attr (call_opaque)
            called |= {n.target for g in graphs for n in g.nodes
                       if n.op == "get_attr" and isinstance(_resolve(mod, n.target), nn.Module)}
            for child_name, child in mod._modules.items():
                if child is not None:
                    visit(child, f"{path}.{child_name}" if path else child_name, False, called, child_name)
            return
        if runs:
            for attr, p in mod._parameters.items():
                if p is not None:
                    found.setdefault(id(p), []).append((path, attr))
        for child_name, child in mod._modules.items():
            if child is not None:
                child_rel = None if rel is None else f"{rel}.{child_name}"
                visit(child, f"{path}.{child_name}" if path else child_name, runs, targets, child_rel)

    visit(gm, "", True, set(), None)
    return found


def _parametrize_use(gm: nn.Module, mod_path: str, attr: str, mask: torch.Tensor, name: str,
                     original_ids: set[int]) -> None:
    """Mask ``mod_path.attr`` of ``gm`` with a parametrization ``w * mask``."""
    # never parametrize a module object of the original model: swap in a copy sharing its tensors
    parent: nn.Module = gm
    for part in mod_path.split(".") if mod_path else []:
        child = getattr(parent, part)
        if id(child) in original_ids:
            setattr(parent, part, _shallow_copy_module(child))
            child = getattr(parent, part)
        parent = child
    owner = gm.get_submodule(mod_path)
    try:
        parametrize.register_parametrization(owner, attr, _Mask(mask))
    except Exception as e:  # noqa: BLE001 - re-raised with the module and parameter named
        raise ValueError(
            f"lobster_fx.instrument: cannot mask parameter {name!r} where module {mod_path or '<root>'!r} "
            f"({type(owner).__name__}) uses it as {attr!r}: {type(e).__name__}: {e}"
        ) from e


def _mask_at_module_level(gm, model, pid, name, owner_name, original_ids, new_mask, summary) -> None:
    found = _find_param_owner(gm, pid)
    if found is None:
        # parameter of a subtree the instrumented module never calls: nothing uses it
        summary.skipped[name] = "not used by the traced forward"
        return
    mod_path, attr = found
    p = gm.get_submodule(mod_path)._parameters[attr]
    _parametrize_use(gm, mod_path, attr, new_mask(p), name, original_ids)
    base = f"{mod_path}.parametrizations.{attr}" if mod_path else f"parametrizations.{attr}"
    summary.params[name] = MaskedParam(
        name, f"{base}.original", f"{base}.0.mask", owner_name, "module", tuple(p.shape)
    )
