"""The built-in ops of slim: handlers, and the registry entries that name them.

Every op slim understands is an entry of :data:`~lobster_fx.passes.slim.registry.REGISTRY`,
added here at import; a user's :func:`~lobster_fx.passes.slim.register_elementwise` adds
to the same tables. Elementwise activations, eval-mode dropout and stochastic depth,
BatchNorm, pooling, ``mean`` over spatial dims, ``flatten`` / ``view(x.size(0), -1)``,
``torch.cat``, ``+ - * /`` between aligned tensors (residuals, squeeze-excitation) and
reads of the non-channel sizes; Linear / conv calls are entries too (their handler
answers UNKNOWN: a layer slim can slice is recognised before, by the analysis).

    >>> import operator, torch
    >>> from torch import nn
    >>> from lobster_fx.passes.slim.registry import REGISTRY
    >>> REGISTRY.class_rule(nn.BatchNorm2d).kind, REGISTRY.functions[operator.add].kind
    ('batchnorm', 'binary')
    >>> REGISTRY.methods["view"].kind, REGISTRY.functions[torch.conv2d].kind
    ('reshape', 'conv')
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from lobster_fx.passes.slim.layout import (
    UNKNOWN,
    Layout,
    Seg,
    Unsupported,
    all_zero,
    arg,
    has_node,
    is_number,
    norm_dim,
)
from lobster_fx.passes.slim.registry import REGISTRY, OpRule, elementwise

if TYPE_CHECKING:
    from lobster_fx.passes.slim.analysis import Analysis

__all__ = ["LINEAR_FNS", "CONV_FNS"]


def _fns(*names: str, mods: Iterable[Any] = (F, torch, torch._C._nn)) -> set[Callable]:
    out: set[Callable] = set()
    for mod in mods:
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None:
                out.add(fn)
    return out


# --------------------------------------------------------------------------- #
# handlers
# --------------------------------------------------------------------------- #


def _not_a_layer(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    """A linear / conv call the analysis could not take as a layer (shared weight, ...)."""
    return UNKNOWN


def _prelu(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    """PReLU with one slope is elementwise; a slope per channel would need slicing."""
    if module is None or module.num_parameters != 1:
        return UNKNOWN
    return elementwise(an, n, module)


def _dropout(training_pos: int) -> Callable:
    def dropout(an: Analysis, n: Node, module: nn.Module | None) -> Any:
        """Identity when its ``training`` argument is literally False."""
        if arg(n, training_pos, "training", True) is not False:
            return UNKNOWN
        return elementwise(an, n, module)

    return dropout


def shape_read(an: Analysis, n: Node) -> Layout | None:
    """``x.shape`` / ``x.size()``: fine if only non-channel entries are read."""
    x = n.args[0]
    lay = an.layout.get(x) if isinstance(x, Node) else None
    if lay is None:
        return None
    for u in n.users:
        i = u.args[1] if u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 else None
        if not isinstance(i, int) or norm_dim(i, lay.rank) == lay.axis:
            raise Unsupported("shape of the channel axis read")
    return None


def _getattr(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    if len(n.args) > 1 and n.args[1] == "shape":
        return shape_read(an, n)
    return UNKNOWN


def _size(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    d = arg(n, 1, "dim", None)
    if d is None and not n.kwargs and len(n.args) == 1:
        return shape_read(an, n)
    lay = an.layout.get(n.args[0])
    if lay is None:
        return None
    if isinstance(d, int) and norm_dim(d, lay.rank) != lay.axis:
        return None  # batch / spatial sizes do not change
    raise Unsupported("size of the channel axis")


def _pool(an: Analysis, n: Node, x: Any, rest: list[Any], nd: int, keeps_const: bool) -> Any:
    if not isinstance(x, Node) or has_node(rest):
        return UNKNOWN
    lay = an.layout.get(x)
    if lay is None:
        return None
    if lay.axis != lay.rank - nd - 1 or any(s.inner != 1 for s in lay.segs):
        raise Unsupported("pooling over the channel axis")
    out_rank = len(an.shapes.get(n, ()))
    if out_rank != lay.rank:
        raise Unsupported("pooling changed the rank")
    return lay if keeps_const else lay.no_const()


def _pool_module(nd: int, kind: str) -> Callable:
    def pool_module(an: Analysis, n: Node, mod: nn.Module | None) -> Any:
        if getattr(mod, "return_indices", False):
            return UNKNOWN
        keeps_const = True
        if kind == "avg":
            # zero padding counted in the mean, or partial windows, change the border values
            keeps_const = ((all_zero(mod.padding) or not mod.count_include_pad) and not mod.ceil_mode
                           and getattr(mod, "divisor_override", None) is None)
        x = n.args[0] if n.args else None
        return _pool(an, n, x, list(n.args[1:]) + list(n.kwargs.values()), nd, keeps_const)

    return pool_module


def _pool_function(nd: int, kind: str, return_indices_pos: int) -> Callable:
    def pool_function(an: Analysis, n: Node, module: nn.Module | None) -> Any:
        if not n.args:
            return UNKNOWN
        if return_indices_pos >= 0 and arg(n, return_indices_pos, "return_indices", False) is not False:
            return UNKNOWN
        keeps_const = True
        if kind == "avg":
            padding = arg(n, 3, "padding", 0)
            ceil = arg(n, 4, "ceil_mode", False)
            incl = arg(n, 5, "count_include_pad", True)
            div = arg(n, 6, "divisor_override", None)
            keeps_const = (all_zero(padding) or not incl) and not ceil and div is None
        return _pool(an, n, n.args[0], list(n.args[1:]) + list(n.kwargs.values()), nd, keeps_const)

    return pool_function


def _batchnorm(an: Analysis, n: Node, mod: nn.Module | None) -> Any:
    x = n.args[0] if n.args else None
    rest = list(n.args[1:]) + list(n.kwargs.values())
    lay = an.layout.get(x) if isinstance(x, Node) else None
    if lay is None:
        return UNKNOWN if rest else None
    if rest or mod.training or not mod.track_running_stats or mod.running_mean is None:
        raise Unsupported("BatchNorm without running statistics")
    if an.module_uses[id(mod)] != 1:
        raise Unsupported("BatchNorm module called more than once")
    if lay.axis != 1 or lay.width != mod.num_features:
        raise Unsupported("BatchNorm axis is not the channel axis")
    an.channelwise.append((n, lay))
    return lay


def _mean(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    """``x.mean(dims)`` over non-channel dims (global pooling written by hand)."""
    if not n.args:
        return UNKNOWN
    x, dims, keepdim = n.args[0], arg(n, 1, "dim", None), arg(n, 2, "keepdim", False)
    if not isinstance(x, Node) or set(n.kwargs) - {"dim", "keepdim"} or len(n.args) > 3:
        return UNKNOWN
    lay = an.layout.get(x)
    if lay is None:
        return None
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims) \
            or not isinstance(keepdim, bool):
        raise Unsupported("mean over unknown dims")
    dims = {norm_dim(d, lay.rank) for d in dims}
    if lay.axis in dims or any(s.inner != 1 for s in lay.segs):
        raise Unsupported("mean over the channel axis")
    if keepdim:
        return lay
    return lay.with_(rank=lay.rank - len(dims), axis=lay.axis - sum(d < lay.axis for d in dims))


def _binary(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    if not n.args:
        return UNKNOWN
    a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    extra = list(n.args[2:]) + [v for k, v in n.kwargs.items() if k != "other"]
    if has_node(extra) or any(k not in ("other", "alpha") for k in n.kwargs):
        return UNKNOWN
    if n.op == "call_method" and n.target.endswith("_"):
        return UNKNOWN
    la = an.layout.get(a) if isinstance(a, Node) else None
    lb = an.layout.get(b) if isinstance(b, Node) else None
    if isinstance(a, Node) and isinstance(b, Node):
        if la is None and lb is None:
            return None
        if la is None or lb is None:
            raise Unsupported("elementwise op with an untracked tensor")
        sa, sb, so = an.shapes.get(a), an.shapes.get(b), an.shapes.get(n)
        if (sa is None or sb is None or so is None or la.rank != lb.rank or la.axis != lb.axis
                or len(so) != la.rank or la.structure() != lb.structure()
                or not (sa[la.axis] == sb[lb.axis] == so[la.axis])):
            raise Unsupported("elementwise op on misaligned channels")
        segs = []
        for sa_, sb_ in zip(la.segs, lb.segs):
            an.groups.union(sa_.group, sb_.group)
            segs.append(Seg(sa_.group, sa_.count, sa_.inner, sa_.const & sb_.const))
        return la.with_(segs=segs)
    node, other = (a, b) if isinstance(a, Node) else (b, a)
    if not isinstance(node, Node) or not is_number(other):
        return UNKNOWN
    return an.layout.get(node)


def _merge_dims(lay: Layout, shape: tuple[int, ...], s: int, e: int) -> Layout:
    rank = lay.rank - (e - s) if e > s else lay.rank
    if e <= s or e < lay.axis:
        # nothing merged, or dims before the axis merged with each other
        return lay.with_(rank=rank, axis=lay.axis - max(e - s, 0) if e < lay.axis else lay.axis)
    if s > lay.axis:
        return lay.with_(rank=rank)
    if s == lay.axis:
        block = math.prod(shape[s + 1:e + 1])
        return lay.with_(rank=rank, segs=[Seg(g.group, g.count, g.inner * block, g.const) for g in lay.segs])
    raise Unsupported("flatten merges the channel axis into an earlier dim")


def _flatten_call(an: Analysis, x: Any, start: Any, end: Any) -> Any:
    if not isinstance(x, Node) or not isinstance(start, int) or not isinstance(end, int):
        return UNKNOWN
    lay = an.layout.get(x)
    if lay is None:
        return None
    shape = an.shapes[x]
    return _merge_dims(lay, shape, norm_dim(start, lay.rank), norm_dim(end, lay.rank))


def _flatten(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    """``torch.flatten(x, start, end)`` / ``x.flatten(start, end)``."""
    if not n.args:
        return UNKNOWN
    return _flatten_call(an, n.args[0], arg(n, 1, "start_dim", 0), arg(n, 2, "end_dim", -1))


def _flatten_module(an: Analysis, n: Node, mod: nn.Module | None) -> Any:
    x = n.args[0] if n.args else None
    if not isinstance(x, Node) or list(n.args[1:]) + list(n.kwargs.values()):
        return UNKNOWN
    return _flatten_call(an, x, mod.start_dim, mod.end_dim)


def _reshape(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    """``x.view(x.size(0), -1)``: only "flatten from the channel axis on", with -1 where the
    channels go (a literal channel count in the spec would be wrong after slimming)."""
    x = n.args[0]
    spec = list(n.args[1:])
    if len(spec) == 1 and isinstance(spec[0], (tuple, list)):
        spec = list(spec[0])
    if n.kwargs:
        return UNKNOWN
    lay = an.layout.get(x)
    if lay is None:
        return None
    shape, out = an.shapes.get(x), an.shapes.get(n)
    if shape is None or out is None:
        raise Unsupported("reshape of unknown shape")
    a = lay.axis
    if (len(spec) == a + 1 and spec[a] == -1 and list(out[:a]) == list(shape[:a])
            and all(isinstance(v, (int, Node)) and not (isinstance(v, int) and v == -1) for v in spec[:a])):
        return _merge_dims(lay, shape, a, lay.rank - 1)
    raise Unsupported("reshape of the channel axis")


def _cat(an: Analysis, n: Node, module: nn.Module | None) -> Any:
    tensors, dim = arg(n, 0, "tensors"), arg(n, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or has_node(
            [v for k, v in n.kwargs.items() if k not in ("tensors", "dim")]):
        return UNKNOWN
    lays = [an.layout.get(t) if isinstance(t, Node) else None for t in tensors]
    if all(lay is None for lay in lays):
        return None
    if any(lay is None for lay in lays):
        raise Unsupported("cat with an untracked tensor")
    rank = lays[0].rank
    if any(lay.rank != rank or lay.axis != norm_dim(dim, rank) for lay in lays):
        raise Unsupported("cat along a non-channel axis")
    return Layout(rank, lays[0].axis, [s for lay in lays for s in lay.segs])


# --------------------------------------------------------------------------- #
# the entries
# --------------------------------------------------------------------------- #

#: function -> spatial dims (0: linear); the analysis slices these calls when their weights allow
LINEAR_FNS: dict[Callable, int] = {torch._C._nn.linear: 0, F.linear: 0}
CONV_FNS: dict[Callable, int] = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}

_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity,
    # identity in eval mode (the result is an inference model)
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_UNARY_FNS = _fns(
    "relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign",
    "clamp", "clip",
)
_UNARY_METHODS = ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "clamp", "clip")
_BINARY_FNS = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div)
_BINARY_METHODS = ("add", "sub", "mul", "div")
_POOL_MODULES: dict[type[nn.Module], tuple[int, str]] = {
    nn.MaxPool1d: (1, "max"), nn.MaxPool2d: (2, "max"), nn.MaxPool3d: (3, "max"),
    nn.AdaptiveMaxPool1d: (1, "max"), nn.AdaptiveMaxPool2d: (2, "max"), nn.AdaptiveMaxPool3d: (3, "max"),
    nn.AdaptiveAvgPool1d: (1, "adaptive_avg"), nn.AdaptiveAvgPool2d: (2, "adaptive_avg"),
    nn.AdaptiveAvgPool3d: (3, "adaptive_avg"),
    nn.AvgPool1d: (1, "avg"), nn.AvgPool2d: (2, "avg"), nn.AvgPool3d: (3, "avg"),
}


def _builtin(kind: str, handler: Callable) -> OpRule:
    return OpRule(kind, handler, builtin=True)


def _register_builtins() -> None:
    add = REGISTRY.add
    layer_rules = {0: _builtin("linear", _not_a_layer)}
    for fn, nd in {**LINEAR_FNS, **CONV_FNS}.items():
        add(fn, layer_rules.setdefault(nd, _builtin("conv", _not_a_layer)))
    unary = _builtin("elementwise", elementwise)
    for cls in _UNARY_MODULES:
        add(cls, unary)
    for fn in _UNARY_FNS:  # in-place variants too: f(constant) is still a constant
        add(fn, unary)
    for name in _UNARY_METHODS:
        add(name, unary)
    add(nn.PReLU, _builtin("elementwise", _prelu))
    # fn -> position of its ``training`` argument; identity when it is literally False
    dropout_fns: dict[Callable, int] = {
        fn: 2 for fn in _fns("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                             "feature_alpha_dropout", mods=(F,))
    }
    try:  # torchvision's StochasticDepth (EfficientNet, ConvNeXt, Swin) calls this wrapped function
        from torchvision.ops import stochastic_depth

        dropout_fns[stochastic_depth] = 3
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    rules: dict[int, OpRule] = {}
    for fn, pos in dropout_fns.items():
        add(fn, rules.setdefault(pos, _builtin("dropout", _dropout(pos))))
    binary = _builtin("binary", _binary)
    for fn in _BINARY_FNS:
        add(fn, binary)
    for name in _BINARY_METHODS:
        add(name, binary)
    cat = _builtin("cat", _cat)
    for fn in _fns("cat", "concat", "concatenate", mods=(torch,)):
        add(fn, cat)
    add(nn.modules.batchnorm._BatchNorm, _builtin("batchnorm", _batchnorm))
    for cls, (nd, kind) in _POOL_MODULES.items():
        add(cls, _builtin("pool", _pool_module(nd, kind)))
    for nd in (1, 2, 3):
        for name, kind, ri in ((f"max_pool{nd}d", "max", 6), (f"adaptive_max_pool{nd}d", "max", 2),
                               (f"adaptive_avg_pool{nd}d", "adaptive_avg", -1), (f"avg_pool{nd}d", "avg", -1)):
            rule = _builtin("pool", _pool_function(nd, kind, ri))
            for fn in _fns(name):
                add(fn, rule)
    add(nn.Flatten, _builtin("flatten", _flatten_module))
    flatten = _builtin("flatten", _flatten)
    add(torch.flatten, flatten)
    add("flatten", flatten)
    mean = _builtin("mean", _mean)
    add(torch.mean, mean)
    add("mean", mean)
    reshape = _builtin("reshape", _reshape)
    add("view", reshape)
    add("reshape", reshape)
    add("size", _builtin("size", _size))
    add(getattr, _builtin("shape", _getattr))


_register_builtins()
