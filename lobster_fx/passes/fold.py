"""Fold pass: multiply the masks into the weights and remove them.

The result has no mask buffers, no mask nodes and no parametrizations: each
weight is stored once (so an ONNX export stores it once too), with the original
parameter names, and its outputs are bit-identical to the instrumented
module's (``w * mask`` is computed once here instead of at every forward).

Example::

    >>> import torch, lobster_fx
    >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
    >>> folded = lobster_fx.fold(gm)
    >>> sorted(folded.state_dict())
    ['bias', 'weight']
    >>> x = torch.randn(3, 4)
    >>> torch.equal(folded(x), gm(x))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import parametrize

from lobster_fx.graph.instrument import (
    _Mask,
    _resolve,
    lobster_info,
    masked_parameters,
    unwrap,
)
from lobster_fx.graph.taps import remove_taps
from lobster_fx.graph.trace import LobsterGraphModule

__all__ = ["MaskedModelError", "fold", "masked_parameter_names", "require_folded"]


class MaskedModelError(ValueError):
    """A pass that works on folded weights got a model that still has masks.

    ``names`` lists the masked parameters (names in the original model, prefixed
    with the submodule's path when the instrumented module sits inside another).
    """

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def _instrumented_parts(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(path, masked parameter names)`` of every instrumented module in ``model``
    (DDP / DataParallel / torch.compile wrappers looked through), outermost first."""
    root = unwrap(model)
    out: list[tuple[str, list[str]]] = []
    seen: set[int] = set()
    for path, sub in root.named_modules():
        sub = unwrap(sub)  # a nested wrapper and the module it wraps are listed once
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        info = getattr(sub, "meta", {}).get("lobster") if isinstance(sub, GraphModule) else None
        if info is not None and info.params:
            out.append((path, list(info.params)))
    return out


def masked_parameter_names(model: nn.Module) -> list[str]:
    """The parameters of ``model`` that are still masked (not folded), by name.

    Names are those of the original model; for an instrumented module inside
    another module they are prefixed with its path. ``[]`` for a folded or a
    plain model. Wrappers (DDP, DataParallel, ``torch.compile``) are looked through.

    Example::

        >>> import torch, lobster_fx
        >>> from lobster_fx.passes.fold import masked_parameter_names
        >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
        >>> masked_parameter_names(gm), masked_parameter_names(lobster_fx.fold(gm))
        (['weight', 'bias'], [])
    """
    return [f"{path}.{name}" if path else name for path, names in _instrumented_parts(model) for name in names]


def require_folded(model: nn.Module, what: str) -> None:
    """Raise :class:`MaskedModelError` if ``model`` still has masks; ``what`` names the caller.

    For passes that read the weights as they are (``slim``, ``to_sparse_csr``):
    on an instrumented model they would see the raw weights next to their masks
    and silently keep both. The check only reads ``model``.
    """
    parts = _instrumented_parts(model)
    if not parts:
        return
    names = masked_parameter_names(model)
    n = len(names)
    path = parts[0][0]
    if not path:
        how = "call lobster_fx.fold(gm) first and pass its result"
    else:
        how = (f"the instrumented submodule {path!r} was not folded: replace it with "
               f"lobster_fx.fold(model.get_submodule({path!r})) first")
    raise MaskedModelError(
        f"{what}: this model still has masks ({n} masked parameter{'s' if n != 1 else ''}, e.g. {names[0]!r}): {how}",
        names,
    )


def _unshare_parametrized_classes(model: nn.Module) -> None:
    """deepcopy shares the class that parametrize injects per module, and
    removing a parametrization edits that class: give each copy its own."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


@torch.no_grad()
def fold(gm: nn.Module) -> GraphModule:
    """Return a copy of the instrumented ``gm`` with its masks folded into the weights.

    A module that was never instrumented is returned as a deep copy.
    """
    gm = unwrap(gm)
    try:
        lobster_info(gm)
    except TypeError:
        return copy.deepcopy(gm)
    # the copy shares the masks: they are only read here and removed from the copy,
    # so copying them would cost a transient mask-sized copy of every prunable weight
    folded = copy.deepcopy(gm, {id(mask): mask for _, _, mask in masked_parameters(gm)})
    _unshare_parametrized_classes(folded)
    info = lobster_info(folded)
    graph_masks: dict[int, torch.Tensor] = {}
    for entry, p, mask in masked_parameters(folded):
        if entry.route == "graph":
            p.mul_(mask)
            graph_masks[id(mask)] = mask
    # mask nodes are found structurally (mul by a get_attr of a mask buffer), so
    # graphs rebuilt from code (pickle), which lose node.meta, fold too
    for sub in folded.modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        for graph in {id(g): g for g in sub.mode_graphs.values()}.values():
            for node in list(graph.nodes):
                if node.op != "get_attr" or id(_resolve(sub, node.target)) not in graph_masks:
                    continue
                for mul in list(node.users):
                    weight = mul.args[0] if mul.args[1] is node else mul.args[1]
                    mul.replace_all_uses_with(weight)
                    graph.erase_node(mul)
                graph.erase_node(node)
    # every mask parametrization: the module route's, and those of tied uses (also_masked_in).
    # leave_parametrized sets the masked value into the same Parameter object: ties survive
    for module in list(folded.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in [a for a, plist in module.parametrizations.items() if any(isinstance(f, _Mask) for f in plist)]:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    for module in folded.modules():
        for name in [n for n, b in module._buffers.items() if b is not None and id(b) in graph_masks]:
            del module._buffers[name]
    # taps are training instrumentation (SeReNe, NEq): the folded model is for inference, and
    # slim / export would see an op they do not know after every layer
    remove_taps(folded)
    for sub in folded.modules():
        if isinstance(sub, LobsterGraphModule):
            sub.recompile_all()
    del folded.meta["lobster"]
    # where each prunable parameter now lives (a parametrized one is back at its owner)
    paths = {name: e.param_path.replace(".parametrizations.", ".").removesuffix(".original").removeprefix("parametrizations.")
             for name, e in info.params.items()}
    folded.meta["lobster_folded"] = {"params": sorted(info.params), "param_paths": paths}
    return folded
