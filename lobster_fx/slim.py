"""Slim pass: physically remove dead units from a folded (sparse) model.

LOBSTER leaves whole neurons / filters at zero. Zeros in a dense tensor cost
the same FLOPs as any other value, so this pass deletes the units themselves
(see ``shared/docs/lobster-notes.md`` s.5: removing dead units of LeNet-300
gave 2.4x-3.4x in ONNX Runtime, where sparse initializers are densified).

A unit (output feature of a Linear, output channel of a Conv) is *dead* when

* its outgoing weights are zero in every consumer: its value does not matter,
  so it is deleted (producer row, BatchNorm entries, consumer columns); or
* its incoming weights are all zero: it computes a constant (its bias, passed
  through BatchNorm / activations / pooling). The constant is folded into the
  consumers' biases (``bias += W[:, k] * c``) and the unit is deleted. For a
  consumer conv with zero padding the fold is wrong at the borders, so there
  the unit is deleted only when its constant is exactly 0 (e.g. after a ReLU).

Tensors that are added / multiplied together (residual connections,
squeeze-excitation) share one *channel group* (union-find): a channel is
removed from the group only if it is removable in every consumer of every
member, and it is constant in a member only if every path into it is.
``torch.cat`` concatenates groups with offsets; ``flatten`` (or
``view(x.size(0), -1)``) maps a channel to a contiguous block of columns;
pooling, ``mean`` over spatial dims, eval-mode dropout / stochastic depth pass
channels through. Depthwise convs (``groups == channels``) are per-channel
members of their group (their ``groups`` argument follows the channel count).

Skipped (the group is *frozen*: nothing in it is removed, the reason is in
``report.frozen`` and in ``node.meta["lobster_slim"]``): grouped convs that
are not depthwise, LayerNorm / softmax / anything mixing channels, slicing,
``permute``, reads of the channel count (``x.size(1)``, ``view(-1, 800)``),
weights shared between layers or read elsewhere, Linear/Conv kept as
``call_module`` leaves or opaque (untraced) modules, Embedding and transposed
convs, and the graph output (output shapes never change; inputs are never
pruned either). The pass repeats until no unit is removable (removing a unit
can make others dead) and checks the outputs against the untouched model on
``example_inputs`` after each round.

Channel alignment (``channel_multiple``, default 8): in every slimmed
channel group that a conv produces or reads, the number of kept units is
rounded up to a multiple of ``channel_multiple`` (never above the group's
original size; then nothing is removed) by keeping the first removable units
by index. A kept dead unit is simply not removed (nor folded), so the result is
exact either way. Groups of Linear layers only are not rounded. Irregular
channel counts keep ONNX Runtime's blocked (NCHWc) conv kernels from running,
which made slim ResNet-18s slower than dense ones; see :func:`slim` for the
measurements. ``channel_multiple=1`` removes every removable unit.

The result is an inference model: it is returned in eval mode with only the
eval graph (BatchNorm must use its running statistics for the folds to hold).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lobster_fx.slim import slim
    >>> m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    >>> with torch.no_grad():
    ...     m[0].weight[1] = 0      # unit 1 is constant: relu(bias[1])
    ...     m[2].weight[:, 2] = 0   # unit 2 feeds nothing
    >>> x = torch.randn(5, 6)
    >>> gm = slim(m, (x,))
    >>> tuple(gm.get_submodule("0").weight.shape), tuple(gm.get_submodule("2").weight.shape)
    ((2, 6), (3, 2))
    >>> bool(torch.allclose(gm(x), m(x), atol=1e-6))
    True
    >>> gm.meta["lobster_slim"].params_before, gm.meta["lobster_slim"].params_after
    (43, 23)
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_flatten

from lobster_fx.fold import require_folded
from lobster_fx.trace import LobsterGraphModule, _trace_both_modes, trace_model

__all__ = [
    "slim",
    "slim_with_report",
    "SlimResult",
    "SlimReport",
    "LayerSlim",
    "SlimError",
    "prepare_inference_graph",
    "default_rtol",
]

META_KEY = "lobster_slim"

#: ``channel_multiple=None`` rounds the kept channels of conv groups up to this multiple
DEFAULT_CHANNEL_MULTIPLE = 8

#: default relative tolerances (see :func:`default_rtol`): ``max(RTOL_FLOOR, RTOL_EPS * eps)``
RTOL_FLOOR = 1e-5
RTOL_EPS = 8


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of checks on a model computing in ``dtype``:
    ``max(RTOL_FLOOR, RTOL_EPS * torch.finfo(dtype).eps)``, relative to the output's scale.

    float32 / float64: ``1e-5`` (as before: 84 float32 epsilons). bfloat16: ``2**-4`` (6.25%),
    float16: ``2**-7`` (0.78%): one rounding in a half format is already above ``1e-5``, and
    every folded constant adds one to a bias and to the outputs it moves. Measured relative to
    the output scale, in eps of the dtype: slim on MLPs of depth 3-12 with half their units
    folded, at most 1.1 (bf16 / fp16; 3.3 in float32); ResNet-18 / 50 with half their block
    channels removed, 0; ONNX Runtime's float16 ResNet-18 against torch's, 1.1, and 3.1 after
    slim folded constants (:func:`lobster_fx.export.export_onnx`). 8 is twice the largest.
    A check in bfloat16 cannot see an error below a few percent of the output scale: slim a
    float32 copy (``model.float()``) for a tight one.

        >>> default_rtol(torch.float32), default_rtol(torch.bfloat16), default_rtol(torch.float16)
        (1e-05, 0.0625, 0.0078125)
    """
    return max(RTOL_FLOOR, RTOL_EPS * torch.finfo(dtype).eps)


def coarsest_float_dtype(tensors: Iterable[Any]) -> torch.dtype | None:
    """The floating dtype with the largest epsilon among ``tensors`` (non-tensors and
    non-floating tensors are skipped); None if there is none."""
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)


class SlimError(RuntimeError):
    """The slim pass could not run, or its result failed the output check."""


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


@dataclass
class LayerSlim:
    """Units of one layer before / after (``out`` = rows, ``in`` = columns)."""

    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int

    @property
    def units_removed(self) -> int:
        return self.out_before - self.out_after

    @property
    def inputs_removed(self) -> int:
        return self.in_before - self.in_after


@dataclass
class SlimReport:
    """What :func:`slim` did. ``layers`` is keyed by module path (e.g.
    ``"layer1.0.conv1"``); ``frozen`` maps a node name to why the channel group
    it touches was kept whole; ``max_rel_err`` is the output check's
    ``max|slim - orig| / max|orig|`` on the example inputs; ``channel_multiple``
    is the multiple conv channel groups were rounded up to, and
    ``units_kept_for_alignment`` counts the removable units kept for it (those
    found in the last round); ``atol`` / ``rtol`` are the output check's tolerances
    (given, or derived from the model's dtype)."""

    params_before: int
    params_after: int
    layers: dict[str, LayerSlim] = field(default_factory=dict)
    rounds: int = 0
    frozen: dict[str, str] = field(default_factory=dict)
    max_rel_err: float = 0.0
    channel_multiple: int = 1
    units_kept_for_alignment: int = 0
    atol: float = 0.0
    rtol: float = RTOL_FLOOR

    @property
    def units_removed(self) -> int:
        return sum(layer.units_removed for layer in self.layers.values() if layer.kind != "batchnorm")

    def __str__(self) -> str:
        lines = [
            f"slim: {self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.params_after / max(self.params_before, 1):.1%}), {self.rounds} round(s), "
            f"max rel err {self.max_rel_err:.2e}"
            + (f", conv channels rounded up to multiples of {self.channel_multiple} "
               f"({self.units_kept_for_alignment} removable unit(s) kept)" if self.channel_multiple > 1 else "")
        ]
        for name, layer in self.layers.items():
            if layer.units_removed or layer.inputs_removed:
                lines.append(
                    f"  {name} ({layer.kind}): out {layer.out_before}->{layer.out_after}, "
                    f"in {layer.in_before}->{layer.in_after}"
                )
        return "\n".join(lines)


@dataclass
class SlimResult:
    module: GraphModule
    report: SlimReport


# --------------------------------------------------------------------------- #
# op tables
# --------------------------------------------------------------------------- #

_LINEAR_FNS: set[Callable] = {torch._C._nn.linear, F.linear}
_CONV_FNS: dict[Callable, int] = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}

# Elementwise, constant-preserving modules (any channel axis).
_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity,
    # identity in eval mode (the result is an inference model)
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def _fns(*names: str, mods: Iterable[Any] = (F, torch, torch._C._nn)) -> set[Callable]:
    out: set[Callable] = set()
    for mod in mods:
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None:
                out.add(fn)
    return out


_UNARY_FNS = _fns(
    "relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign",
    "clamp", "clip",
)
# fn -> position of its ``training`` argument; identity when it is literally False
_DROPOUT_FNS: dict[Callable, int] = {
    fn: 2 for fn in _fns("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                         "feature_alpha_dropout", mods=(F,))
}
try:  # torchvision's StochasticDepth (EfficientNet, ConvNeXt, Swin) calls this wrapped function
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _DROPOUT_FNS[_stochastic_depth] = 3
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "clamp", "clip"}
_BINARY_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_CAT_FNS = _fns("cat", "concat", "concatenate", mods=(torch,))

# pooling: name -> (spatial dims, kind)
_POOL_MODULES: dict[type[nn.Module], tuple[int, str]] = {
    nn.MaxPool1d: (1, "max"), nn.MaxPool2d: (2, "max"), nn.MaxPool3d: (3, "max"),
    nn.AdaptiveMaxPool1d: (1, "max"), nn.AdaptiveMaxPool2d: (2, "max"), nn.AdaptiveMaxPool3d: (3, "max"),
    nn.AdaptiveAvgPool1d: (1, "adaptive_avg"), nn.AdaptiveAvgPool2d: (2, "adaptive_avg"),
    nn.AdaptiveAvgPool3d: (3, "adaptive_avg"),
    nn.AvgPool1d: (1, "avg"), nn.AvgPool2d: (2, "avg"), nn.AvgPool3d: (3, "avg"),
}
# functional pooling: fn -> (spatial dims, kind, position of return_indices or -1)
_POOL_FNS: dict[Callable, tuple[int, str, int]] = {}
for _nd in (1, 2, 3):
    for _name, _kind, _ri in ((f"max_pool{_nd}d", "max", 6), (f"adaptive_max_pool{_nd}d", "max", 2),
                              (f"adaptive_avg_pool{_nd}d", "adaptive_avg", -1), (f"avg_pool{_nd}d", "avg", -1)):
        for _fn in _fns(_name):
            _POOL_FNS[_fn] = (_nd, _kind, _ri)


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _split_target(target: str) -> tuple[str, str]:
    prefix, _, name = target.rpartition(".")
    return prefix, name


def _get_tensor(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_tensor(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target`` keeping its kind (parameter / buffer / plain)."""
    prefix, name = _split_target(target)
    owner = gm.get_submodule(prefix)
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, bool)) and not isinstance(x, Node)


def _has_node(x: Any) -> bool:
    return any(isinstance(a, Node) for a in tree_flatten(x)[0])


class _Unsupported(Exception):
    """Raised by an op handler: the op is not understood for its channel groups."""


# --------------------------------------------------------------------------- #
# channel groups and layouts
# --------------------------------------------------------------------------- #


class _Groups:
    """Union-find over channel groups; a group is a set of aligned unit indices."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        assert self.size[ra] == self.size[rb]
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))

    def freeze(self, g: int, reason: str) -> None:
        self.frozen.setdefault(self.find(g), reason)

    def is_frozen(self, g: int) -> bool:
        return self.find(g) in self.frozen


@dataclass
class _Seg:
    group: int
    count: int  # channels of the group in this segment
    inner: int  # contiguous positions per channel along the axis (after flatten)
    const: torch.Tensor  # bool[count]: channel is a constant (input-independent)


@dataclass
class _Layout:
    """How a tensor's ``axis`` is made of channel-group segments."""

    rank: int
    axis: int
    segs: list[_Seg]

    @property
    def width(self) -> int:
        return sum(s.count * s.inner for s in self.segs)

    def structure(self) -> list[tuple[int, int]]:
        return [(s.count, s.inner) for s in self.segs]

    def with_(self, *, rank: int | None = None, axis: int | None = None,
              segs: list[_Seg] | None = None) -> "_Layout":
        return _Layout(self.rank if rank is None else rank, self.axis if axis is None else axis,
                       list(self.segs) if segs is None else segs)

    def no_const(self) -> "_Layout":
        return self.with_(segs=[_Seg(s.group, s.count, s.inner, torch.zeros_like(s.const)) for s in self.segs])

    def describe(self, groups: _Groups) -> str:
        parts = [f"g{groups.find(s.group)}[{s.count}x{s.inner}]" for s in self.segs]
        return f"axis {self.axis}/{self.rank}: " + "+".join(parts)


@dataclass
class _Layer:
    """A linear / conv call whose weight (and bias) are private ``get_attr`` tensors."""

    node: Node
    kind: str  # "linear" | "conv"
    weight_target: str
    bias_target: str | None
    nd: int  # spatial dims, 0 for linear
    groups: int
    padded: bool

    @property
    def name(self) -> str:
        return _split_target(self.weight_target)[0]


def _as_layer(gm: GraphModule, node: Node, tensor_uses: dict[int, int]) -> _Layer | str:
    """Describe ``node`` as a prunable layer, or return why it is not one.

    ``tensor_uses`` counts, per tensor object, the get_attr nodes and called
    modules that reach it: a weight shared with anything else is left alone."""
    if node.op != "call_function":
        return "not a call"
    if not node.args or not isinstance(node.args[0], Node):
        return "input not passed positionally"
    if node.target in _LINEAR_FNS:
        kind, nd = "linear", 0
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if len(node.args) + len(node.kwargs) > 3:
            return "unexpected linear arguments"
    elif node.target in _CONV_FNS:
        kind, nd = "conv", _CONV_FNS[node.target]
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    else:
        return "not a linear/conv"
    if not (isinstance(w, Node) and w.op == "get_attr" and len(w.users) == 1):
        return "weight is not a get_attr"
    weight = _get_tensor(gm, w.target)
    if (not isinstance(weight, torch.Tensor) or weight.layout != torch.strided or weight.dim() != nd + 2
            or not weight.is_floating_point()):
        return "weight is not a dense floating-point tensor of the expected rank"
    if tensor_uses.get(id(weight), 0) != 1:
        return "weight is shared"
    bias_target = None
    if b is not None:
        if not (isinstance(b, Node) and b.op == "get_attr" and len(b.users) == 1):
            return "bias is not a get_attr"
        bias = _get_tensor(gm, b.target)
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            return "bias has an unexpected shape"
        if tensor_uses.get(id(bias), 0) != 1:
            return "bias is shared"
        bias_target = b.target
    groups, padded = 1, False
    if kind == "conv":
        groups = _arg(node, 6, "groups", 1)
        padding = _arg(node, 4, "padding", 0)
        if not isinstance(groups, int) or isinstance(padding, Node) or _has_node(padding):
            return "conv with computed groups/padding"
        if isinstance(padding, str):
            padded = padding == "same" and any(k > 1 for k in weight.shape[2:])
        else:
            padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return _Layer(node, kind, w.target, bias_target, nd, groups, padded)


# --------------------------------------------------------------------------- #
# example run: shapes of every node and the input each layer sees
# --------------------------------------------------------------------------- #


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, watch: set[Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.inputs: dict[Node, torch.Tensor] = {}
        self.shapes: dict[Node, tuple[int, ...]] = {}

    def run_node(self, n: Node) -> Any:
        if n in self.watch:
            x = self.env[n.args[0]] if isinstance(n.args[0], Node) else None
            if isinstance(x, torch.Tensor):
                # clone: a later in-place op may change the tensor we read
                self.inputs[n] = x.detach().clone()
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            raise SlimError(f"example inputs failed at node {n.format_node()}: {type(e).__name__}: {e}") from e
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


# --------------------------------------------------------------------------- #
# analysis
# --------------------------------------------------------------------------- #


@dataclass
class _Plan:
    keep: dict[int, torch.Tensor]  # group root -> bool[size], only groups that lose units
    groups: _Groups
    aligned: int = 0  # removable units kept to round channel counts up (channel_multiple)

    def expand(self, lay: _Layout) -> torch.Tensor:
        """Keep mask over the positions of ``lay.axis``."""
        parts = []
        for s in lay.segs:
            k = self.keep.get(self.groups.find(s.group))
            k = torch.ones(s.count, dtype=torch.bool) if k is None else k
            parts.append(k.repeat_interleave(s.inner))
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool)


class _Analysis:
    """One pass over the graph: channel groups, constants, removable units."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.groups = _Groups()
        self.layout: dict[Node, _Layout | None] = {}
        self.producers: list[tuple[Node, _Layout]] = []
        self.consumers: list[tuple[Node, _Layout]] = []
        self.channelwise: list[tuple[Node, _Layout]] = []  # BatchNorm / depthwise conv members
        self.frozen_by: dict[str, str] = {}

        # uses per tensor / module *object*: aliases (tied weights, a module registered
        # under two names, a parameter an opaque module also reads) must not be sliced
        tensor_uses: dict[int, int] = {}
        module_uses: dict[int, int] = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                t = _get_tensor(gm, n.target)
                tensor_uses[id(t)] = tensor_uses.get(id(t), 0) + 1
            elif n.op == "call_module":
                mod = gm.get_submodule(n.target)
                module_uses[id(mod)] = module_uses.get(id(mod), 0) + 1
                for t in list(mod.parameters()) + list(mod.buffers()):
                    tensor_uses[id(t)] = tensor_uses.get(id(t), 0) + 1
        self.module_uses = module_uses
        self.layers: dict[Node, _Layer] = {}
        self.not_layer: dict[Node, str] = {}
        for n in self.graph.nodes:
            if n.op == "call_function" and (n.target in _LINEAR_FNS or n.target in _CONV_FNS):
                res = _as_layer(gm, n, tensor_uses)
                if isinstance(res, _Layer):
                    self.layers[n] = res
                else:
                    self.not_layer[n] = res

        rec = _Recorder(gm, set(self.layers))
        with torch.no_grad():
            rec.run(*example_inputs)
        self.inputs = rec.inputs
        self.shapes = rec.shapes
        self._walk()

    # -- propagation -------------------------------------------------------- #

    def _weight(self, layer: _Layer) -> torch.Tensor:
        return _get_tensor(self.gm, layer.weight_target)

    def _new_layout(self, n: Node, axis_from_end: int, size: int, const: torch.Tensor) -> _Layout | None:
        shape = self.shapes.get(n)
        if shape is None:
            return None
        rank = len(shape)
        axis = rank - axis_from_end
        if axis < 0 or shape[axis] != size:
            return None
        g = self.groups.new(size)
        return _Layout(rank, axis, [_Seg(g, size, 1, const)])

    def _freeze_inputs(self, n: Node, reason: str) -> None:
        hit = False
        for a in n.all_input_nodes:
            lay = self.layout.get(a)
            if lay is None:
                continue
            for s in lay.segs:
                if not self.groups.is_frozen(s.group):
                    hit = True
                self.groups.freeze(s.group, f"{reason}: {n.format_node()}")
        if hit:
            self.frozen_by[n.name] = reason

    def _walk(self) -> None:
        for n in self.graph.nodes:
            try:
                lay, role = self._visit(n)
            except _Unsupported as e:
                self._freeze_inputs(n, str(e))
                lay, role = None, "frozen"
            self.layout[n] = lay
            meta: dict[str, Any] = {"role": role}
            if lay is not None:
                meta["layout"] = lay.describe(self.groups)
            if n in self.not_layer:
                meta["not_prunable"] = self.not_layer[n]
            n.meta[META_KEY] = meta
        # second pass for the final group ids and frozen reasons
        for n in self.graph.nodes:
            lay = self.layout.get(n)
            if lay is not None:
                n.meta[META_KEY]["layout"] = lay.describe(self.groups)
                reasons = {self.groups.frozen[self.groups.find(s.group)] for s in lay.segs
                           if self.groups.is_frozen(s.group)}
                if reasons:
                    n.meta[META_KEY]["frozen"] = sorted(reasons)

    def _visit(self, n: Node) -> tuple[_Layout | None, str]:
        if n.op in ("placeholder", "get_attr"):
            return None, "input"
        if n.op == "output":
            if any(self.layout.get(a) is not None for a in n.all_input_nodes):
                raise _Unsupported("graph output")
            return None, "output"
        if n in self.layers:
            return self._visit_layer(self.layers[n])
        ins = [a for a in n.all_input_nodes if self.layout.get(a) is not None]
        if n.op == "call_module":
            out = self._visit_module(n)
        elif n.op == "call_function":
            out = self._visit_function(n)
        elif n.op == "call_method":
            out = self._visit_method(n)
        else:
            out = None
        if out is _UNKNOWN:
            if ins:
                what = f"{n.op} {n.target}"
                if n.op == "call_module":  # the class says more than the name (a subclass, a library's layer)
                    what += f" ({type(self.gm.get_submodule(n.target)).__name__})"
                raise _Unsupported(f"unsupported op {what}")
            return None, "other"
        return out, "channelwise" if out is not None else "other"

    def _visit_layer(self, layer: _Layer) -> tuple[_Layout | None, str]:
        n = layer.node
        w = self._weight(layer)
        x = n.args[0]
        lay = self.layout.get(x) if isinstance(x, Node) else None
        if not isinstance(x, Node) or any(self.layout.get(a) is not None for a in n.all_input_nodes if a is not x):
            raise _Unsupported("layer input used as a weight")
        out_units = w.shape[0]
        zero_rows = w.detach().reshape(out_units, -1).eq(0).all(1).cpu()
        if layer.kind == "linear":
            if lay is not None and (lay.axis != lay.rank - 1 or lay.width != w.shape[1]):
                raise _Unsupported("linear input features are not the channel axis")
            if lay is not None:
                self.consumers.append((n, lay))
            out = self._new_layout(n, 1, out_units, zero_rows)
            if out is not None:
                self.producers.append((n, out))
            return out, "layer"
        # conv
        nd = layer.nd
        in_ch = w.shape[1] * layer.groups
        if lay is not None and (lay.axis != lay.rank - nd - 1 or lay.width != in_ch
                                or any(s.inner != 1 for s in lay.segs)):
            raise _Unsupported("conv input channels are not the channel axis")
        if layer.groups == 1:
            if lay is not None:
                self.consumers.append((n, lay))
            out = self._new_layout(n, nd + 1, out_units, zero_rows)
            if out is not None:
                self.producers.append((n, out))
            return out, "layer"
        if layer.groups == in_ch == out_units:
            # depthwise: channel k in -> channel k out, a per-channel member of the group
            if lay is None:
                return None, "depthwise"
            act = self.inputs.get(n)
            in_zero = torch.zeros(in_ch, dtype=torch.bool)
            if act is not None:
                in_zero = act.movedim(lay.axis, 0).reshape(in_ch, -1).eq(0).all(1).cpu()
            segs, off = [], 0
            for s in lay.segs:
                zero = zero_rows[off:off + s.count].cpu()
                # a zero filter outputs its bias; a constant input stays constant if the conv
                # has no zero padding, or if the constant is 0 itself
                const = zero | (s.const & (in_zero[off:off + s.count] | (not layer.padded)))
                segs.append(_Seg(s.group, s.count, 1, const))
                off += s.count
            out = lay.with_(segs=segs)
            self.channelwise.append((n, out))
            return out, "depthwise"
        raise _Unsupported(f"grouped conv (groups={layer.groups})")

    def _unary(self, n: Node, x: Any, rest: Iterable[Any]) -> _Layout | None:
        if not isinstance(x, Node) or _has_node(list(rest)):
            return _UNKNOWN
        return self.layout.get(x)

    def _visit_module(self, n: Node) -> _Layout | None:
        mod = self.gm.get_submodule(n.target)
        if not _has_torch_forward(mod):
            return _UNKNOWN  # an isinstance match below would be a base class that does not run
        x = n.args[0] if n.args else None
        rest = list(n.args[1:]) + list(n.kwargs.values())
        if isinstance(mod, _UNARY_MODULES):
            return self._unary(n, x, rest)
        if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return self._unary(n, x, rest)
        if isinstance(mod, nn.Flatten):
            if not isinstance(x, Node) or rest:
                return _UNKNOWN
            return self._flatten(n, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            lay = self.layout.get(x) if isinstance(x, Node) else None
            if lay is None:
                return _UNKNOWN if rest else None
            if rest or mod.training or not mod.track_running_stats or mod.running_mean is None:
                raise _Unsupported("BatchNorm without running statistics")
            if self.module_uses[id(mod)] != 1:
                raise _Unsupported("BatchNorm module called more than once")
            if lay.axis != 1 or lay.width != mod.num_features:
                raise _Unsupported("BatchNorm axis is not the channel axis")
            self.channelwise.append((n, lay))
            return lay
        for cls, (nd, kind) in _POOL_MODULES.items():
            if isinstance(mod, cls):
                if getattr(mod, "return_indices", False):
                    return _UNKNOWN
                keeps_const = True
                if kind == "avg":
                    # zero padding counted in the mean, or partial windows, change the border values
                    keeps_const = ((_all_zero(mod.padding) or not mod.count_include_pad) and not mod.ceil_mode
                                   and getattr(mod, "divisor_override", None) is None)
                return self._pool(n, x, rest, nd, keeps_const)
        return _UNKNOWN

    def _visit_function(self, n: Node) -> _Layout | None:
        t = n.target
        if t in _CAT_FNS:
            return self._cat(n, _arg(n, 0, "tensors"), _arg(n, 1, "dim", 0))
        if not n.args:
            return _UNKNOWN
        if t is getattr and n.args[1] == "shape":
            return self._shape_read(n)
        if t in _UNARY_FNS:
            # in-place variants are fine: f(constant) is still a constant
            return self._unary(n, n.args[0], list(n.args[1:]) + list(n.kwargs.values()))
        if t in _DROPOUT_FNS:
            if _arg(n, _DROPOUT_FNS[t], "training", True) is not False:
                return _UNKNOWN
            return self._unary(n, n.args[0], list(n.args[1:]) + list(n.kwargs.values()))
        if t in _BINARY_FNS:
            return self._binary(n)
        if t is torch.mean:
            return self._mean(n)
        if t is torch.flatten:
            return self._flatten(n, n.args[0], _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        if t in _POOL_FNS:
            nd, kind, ri = _POOL_FNS[t]
            x = n.args[0]
            rest = list(n.args[1:]) + list(n.kwargs.values())
            if ri >= 0 and _arg(n, ri, "return_indices", False) is not False:
                return _UNKNOWN
            keeps_const = True
            if kind == "avg":
                padding = _arg(n, 3, "padding", 0)
                ceil = _arg(n, 4, "ceil_mode", False)
                incl = _arg(n, 5, "count_include_pad", True)
                div = _arg(n, 6, "divisor_override", None)
                keeps_const = (_all_zero(padding) or not incl) and not ceil and div is None
            return self._pool(n, x, rest, nd, keeps_const)
        return _UNKNOWN

    def _visit_method(self, n: Node) -> _Layout | None:
        t = n.target
        x = n.args[0]
        if t in _UNARY_METHODS:
            return self._unary(n, x, list(n.args[1:]) + list(n.kwargs.values()))
        if t in _BINARY_METHODS:
            return self._binary(n)
        if t == "mean":
            return self._mean(n)
        if t == "flatten":
            return self._flatten(n, x, _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        if t in ("view", "reshape"):
            return self._reshape(n)
        if t == "size":
            d = _arg(n, 1, "dim", None)
            if d is None and not n.kwargs and len(n.args) == 1:
                return self._shape_read(n)
            lay = self.layout.get(x)
            if lay is None:
                return None
            if isinstance(d, int) and _norm_dim(d, lay.rank) != lay.axis:
                return None  # batch / spatial sizes do not change
            raise _Unsupported("size of the channel axis")
        return _UNKNOWN

    def _shape_read(self, n: Node) -> _Layout | None:
        """``x.shape`` / ``x.size()``: fine if only non-channel entries are read."""
        x = n.args[0]
        lay = self.layout.get(x) if isinstance(x, Node) else None
        if lay is None:
            return None
        for u in n.users:
            i = u.args[1] if u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 else None
            if not isinstance(i, int) or _norm_dim(i, lay.rank) == lay.axis:
                raise _Unsupported("shape of the channel axis read")
        return None

    def _pool(self, n: Node, x: Any, rest: list[Any], nd: int, keeps_const: bool) -> _Layout | None:
        if not isinstance(x, Node) or _has_node(rest):
            return _UNKNOWN
        lay = self.layout.get(x)
        if lay is None:
            return None
        if lay.axis != lay.rank - nd - 1 or any(s.inner != 1 for s in lay.segs):
            raise _Unsupported("pooling over the channel axis")
        out_rank = len(self.shapes.get(n, ()))
        if out_rank != lay.rank:
            raise _Unsupported("pooling changed the rank")
        return lay if keeps_const else lay.no_const()

    def _mean(self, n: Node) -> _Layout | None:
        """``x.mean(dims)`` over non-channel dims (global pooling written by hand)."""
        x, dims, keepdim = n.args[0], _arg(n, 1, "dim", None), _arg(n, 2, "keepdim", False)
        if not isinstance(x, Node) or set(n.kwargs) - {"dim", "keepdim"} or len(n.args) > 3:
            return _UNKNOWN
        lay = self.layout.get(x)
        if lay is None:
            return None
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims) \
                or not isinstance(keepdim, bool):
            raise _Unsupported("mean over unknown dims")
        dims = {_norm_dim(d, lay.rank) for d in dims}
        if lay.axis in dims or any(s.inner != 1 for s in lay.segs):
            raise _Unsupported("mean over the channel axis")
        if keepdim:
            return lay
        return lay.with_(rank=lay.rank - len(dims), axis=lay.axis - sum(d < lay.axis for d in dims))

    def _binary(self, n: Node) -> _Layout | None:
        a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
        extra = list(n.args[2:]) + [v for k, v in n.kwargs.items() if k != "other"]
        if _has_node(extra) or any(k not in ("other", "alpha") for k in n.kwargs):
            return _UNKNOWN
        if n.op == "call_method" and n.target.endswith("_"):
            return _UNKNOWN
        la = self.layout.get(a) if isinstance(a, Node) else None
        lb = self.layout.get(b) if isinstance(b, Node) else None
        if isinstance(a, Node) and isinstance(b, Node):
            if la is None and lb is None:
                return None
            if la is None or lb is None:
                raise _Unsupported("elementwise op with an untracked tensor")
            sa, sb, so = self.shapes.get(a), self.shapes.get(b), self.shapes.get(n)
            if (sa is None or sb is None or so is None or la.rank != lb.rank or la.axis != lb.axis
                    or len(so) != la.rank or la.structure() != lb.structure()
                    or not (sa[la.axis] == sb[lb.axis] == so[la.axis])):
                raise _Unsupported("elementwise op on misaligned channels")
            segs = []
            for sa_, sb_ in zip(la.segs, lb.segs):
                self.groups.union(sa_.group, sb_.group)
                segs.append(_Seg(sa_.group, sa_.count, sa_.inner, sa_.const & sb_.const))
            return la.with_(segs=segs)
        node, other = (a, b) if isinstance(a, Node) else (b, a)
        if not isinstance(node, Node) or not _is_number(other):
            return _UNKNOWN
        return self.layout.get(node)

    def _flatten(self, n: Node, x: Any, start: Any, end: Any) -> _Layout | None:
        if not isinstance(x, Node) or not isinstance(start, int) or not isinstance(end, int):
            return _UNKNOWN
        lay = self.layout.get(x)
        if lay is None:
            return None
        shape = self.shapes[x]
        s, e = _norm_dim(start, lay.rank), _norm_dim(end, lay.rank)
        return self._merge_dims(lay, shape, s, e)

    def _merge_dims(self, lay: _Layout, shape: tuple[int, ...], s: int, e: int) -> _Layout:
        rank = lay.rank - (e - s) if e > s else lay.rank
        if e <= s or e < lay.axis:
            # nothing merged, or dims before the axis merged with each other
            return lay.with_(rank=rank, axis=lay.axis - max(e - s, 0) if e < lay.axis else lay.axis)
        if s > lay.axis:
            return lay.with_(rank=rank)
        if s == lay.axis:
            block = math.prod(shape[s + 1:e + 1])
            return lay.with_(rank=rank, segs=[_Seg(g.group, g.count, g.inner * block, g.const) for g in lay.segs])
        raise _Unsupported("flatten merges the channel axis into an earlier dim")

    def _reshape(self, n: Node) -> _Layout | None:
        x = n.args[0]
        spec = list(n.args[1:])
        if len(spec) == 1 and isinstance(spec[0], (tuple, list)):
            spec = list(spec[0])
        if n.kwargs:
            return _UNKNOWN
        lay = self.layout.get(x)
        if lay is None:
            return None
        shape, out = self.shapes.get(x), self.shapes.get(n)
        if shape is None or out is None:
            raise _Unsupported("reshape of unknown shape")
        # only "flatten from the channel axis on" with -1 where the channels go:
        # a literal channel count in the spec would be wrong after slimming
        a = lay.axis
        if (len(spec) == a + 1 and spec[a] == -1 and list(out[:a]) == list(shape[:a])
                and all(isinstance(v, (int, Node)) and not (isinstance(v, int) and v == -1) for v in spec[:a])):
            return self._merge_dims(lay, shape, a, lay.rank - 1)
        raise _Unsupported("reshape of the channel axis")

    def _cat(self, n: Node, tensors: Any, dim: Any) -> _Layout | None:
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or _has_node(
                [v for k, v in n.kwargs.items() if k not in ("tensors", "dim")]):
            return _UNKNOWN
        lays = [self.layout.get(t) if isinstance(t, Node) else None for t in tensors]
        if all(lay is None for lay in lays):
            return None
        if any(lay is None for lay in lays):
            raise _Unsupported("cat with an untracked tensor")
        rank = lays[0].rank
        if any(lay.rank != rank or lay.axis != _norm_dim(dim, rank) for lay in lays):
            raise _Unsupported("cat along a non-channel axis")
        return _Layout(rank, lays[0].axis, [s for lay in lays for s in lay.segs])

    # -- decision ------------------------------------------------------------- #

    def conv_roots(self) -> set[int]:
        """Roots of the groups that some conv (plain or depthwise) produces or reads."""
        g = self.groups
        roots: set[int] = set()
        for n, lay in self.producers + self.consumers + self.channelwise:
            layer = self.layers.get(n)
            if layer is not None and layer.kind == "conv":
                roots.update(g.find(s.group) for s in lay.segs)
        return roots

    def plan(self, channel_multiple: int = 1) -> _Plan:
        """Which units of which group to remove.

        In groups that a conv touches, the number of kept units is rounded up to a
        multiple of ``channel_multiple`` (capped at the group's current size) by
        keeping the first removable units by index."""
        g = self.groups
        removable: dict[int, torch.Tensor] = {}
        for p, lay in self.producers:
            root = g.find(lay.segs[0].group)
            if root not in g.frozen:
                removable.setdefault(root, torch.ones(g.size[root], dtype=torch.bool))
        for c, lay in self.consumers:
            layer = self.layers[c]
            w = self._weight(layer).detach()
            act = self.inputs.get(c)
            for seg, off in zip(lay.segs, _offsets(lay)):
                root = g.find(seg.group)
                if root not in removable:
                    continue
                col_zero, value_ok = self._channel_facts(layer, w, act, lay, seg, off)
                removable[root] &= col_zero | (seg.const & value_ok)
        keep: dict[int, torch.Tensor] = {}
        conv_roots = self.conv_roots() if channel_multiple > 1 else set()
        aligned = 0
        for root, rem in removable.items():
            if rem.all():
                rem = rem.clone()
                rem[0] = False  # keep one unit: zero-sized layers are not worth the edge cases
            if root in conv_roots:
                rem, extra = _round_kept(rem, channel_multiple)
                aligned += extra
            if rem.any():
                keep[root] = ~rem
        return _Plan(keep, g, aligned)

    def _channel_facts(self, layer: _Layer, w: torch.Tensor, act: torch.Tensor | None, lay: _Layout,
                       seg: _Seg, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns all zero, constant value usable for a fold) per channel of ``seg``."""
        width = seg.count * seg.inner
        if layer.kind == "linear":
            cols = w[:, off:off + width].reshape(w.shape[0], seg.count, seg.inner)
            col_zero = cols.eq(0).all(2).all(0)
        else:
            cols = w[:, off:off + seg.count]
            col_zero = cols.eq(0).transpose(0, 1).reshape(seg.count, -1).all(1)
        if act is None:
            return col_zero, torch.zeros_like(col_zero)
        a = act.detach().movedim(lay.axis, 0)
        a = a.reshape(a.shape[0], -1)
        if layer.kind == "linear":
            # each column must be constant over the batch (the columns of one flattened
            # channel may differ, e.g. BatchNorm1d after flatten)
            vals = a[off:off + width]
        else:
            # constant over batch and space
            vals = a[off:off + seg.count]
        ref = vals[:, :1]
        # guard: the structural "constant" claim must hold on the example input
        ok = ((vals - ref).abs() <= 1e-6 * (1 + ref.abs())).all(1) & torch.isfinite(vals).all(1)
        if layer.kind == "conv" and layer.padded:
            # zero padding sees 0 at the borders: only a zero constant folds exactly
            ok &= vals.eq(0).all(1)
        if layer.kind == "linear":
            ok = ok.reshape(seg.count, seg.inner).all(1)
        return col_zero, ok.cpu()


def _round_kept(rem: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Un-mark the first removable units so that the kept count is a multiple of
    ``multiple`` (or all units, if rounding up would exceed them); returns the new
    mask and how many removable units it keeps."""
    size = rem.numel()
    kept = size - int(rem.sum())
    target = min(size, -(-kept // multiple) * multiple)
    extra = target - kept
    if extra <= 0:
        return rem, 0
    rem = rem.clone()
    rem[rem.nonzero().flatten()[:extra]] = False
    return rem, extra


class _UnknownType:
    pass


_UNKNOWN: Any = _UnknownType()


def _has_torch_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` runs the ``forward`` of a torch.nn class (its own class's, or one it
    inherits unchanged, e.g. BatchNorm2d's from _BatchNorm, SyncBatchNorm's own).

    A subclass that overrides ``forward`` (timm's BatchNormAct2d: BatchNorm2d, then an
    activation and drop; anything with extra per-channel state) computes something else than
    its base class, so the rules for the base class do not apply to it."""
    if "forward" in vars(mod):  # an instance attribute replaces the class's forward
        return False
    owner = next((c for c in type(mod).__mro__ if "forward" in vars(c)), None)
    return owner is not None and owner.__module__.startswith("torch.nn.")


def _all_zero(p: Any) -> bool:
    return all(v == 0 for v in (p if isinstance(p, (tuple, list)) else (p,)))


def _offsets(lay: _Layout) -> list[int]:
    out, off = [], 0
    for s in lay.segs:
        out.append(off)
        off += s.count * s.inner
    return out


# --------------------------------------------------------------------------- #
# applying a plan
# --------------------------------------------------------------------------- #


def _apply(gm: GraphModule, an: _Analysis, plan: _Plan) -> None:
    with torch.no_grad():
        # consumers first: folds read the producers' constants from the recorded inputs
        for c, lay in an.consumers:
            keep_cols = plan.expand(lay)
            if keep_cols.all():
                continue
            layer = an.layers[c]
            _shrink_consumer(gm, layer, lay, keep_cols, an.inputs.get(c))
        for p, lay in an.producers:
            keep = plan.expand(lay)
            if keep.all():
                continue
            layer = an.layers[p]
            _keep_output_units(gm, layer, keep.nonzero().flatten())
            _sync_module_meta(gm, layer)
        for n, lay in an.channelwise:
            keep = plan.expand(lay)
            if keep.all():
                continue
            if n in an.layers:  # depthwise conv
                layer = an.layers[n]
                idx = keep.nonzero().flatten()
                _keep_output_units(gm, layer, idx)
                _set_arg(n, 6, "groups", int(idx.numel()))
                layer.groups = int(idx.numel())
                _sync_module_meta(gm, layer)
            else:  # BatchNorm
                bn = gm.get_submodule(n.target)
                idx = keep.nonzero().flatten()
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(bn, name, None)
                    if isinstance(t, torch.Tensor):
                        _set_tensor(gm, f"{n.target}.{name}" if n.target else name,
                                    t.detach()[idx.to(t.device)].clone())
                bn.num_features = int(idx.numel())


def _shrink_consumer(gm: GraphModule, layer: _Layer, lay: _Layout, keep_cols: torch.Tensor,
                     act: torch.Tensor | None) -> None:
    w = _get_tensor(gm, layer.weight_target).detach()
    gone = ~keep_cols
    # a removed column that is not all zero belongs to a constant channel: fold it
    if layer.kind == "linear":
        live = w[:, gone.to(w.device)].ne(0).any(0)
    else:
        live = w[:, gone.to(w.device)].ne(0).transpose(0, 1).reshape(int(gone.sum()), -1).any(1)
    if bool(live.any()):
        if act is None:
            raise SlimError(f"no recorded input to fold constants into {layer.node.format_node()}")
        a = act.movedim(lay.axis, 0)
        a = a.reshape(a.shape[0], -1)
        gone_idx = gone.nonzero().flatten()[live.cpu()]
        if layer.kind == "linear":
            vals = a[gone_idx.to(a.device), 0].to(w.dtype)  # constant over the batch
            add = w[:, gone_idx.to(w.device)] @ vals.to(w.device)
        else:
            vals = a[gone_idx.to(a.device)].mean(1).to(w.dtype)  # constant over batch and space
            wk = w[:, gone_idx.to(w.device)].reshape(w.shape[0], gone_idx.numel(), -1).sum(2)
            add = wk @ vals.to(w.device)
        if layer.bias_target is None:
            if bool(add.ne(0).any()):  # constants that are 0 (after a ReLU) need no bias
                _add_bias(gm, layer, add)
        else:
            b = _get_tensor(gm, layer.bias_target)
            _set_tensor(gm, layer.bias_target, (b.detach() + add.to(b.dtype)).clone())
    _set_tensor(gm, layer.weight_target, w[:, keep_cols.nonzero().flatten().to(w.device)].clone())
    _sync_module_meta(gm, layer)


def _add_bias(gm: GraphModule, layer: _Layer, value: torch.Tensor) -> None:
    """Give a bias-free layer a bias (needed to hold folded constants)."""
    prefix, _ = _split_target(layer.weight_target)
    owner = gm.get_submodule(prefix)
    name = "bias"
    if getattr(owner, name, None) is not None or (hasattr(owner, name) and name not in owner._parameters):
        name = "slim_bias"
        while hasattr(owner, name):
            name += "_"
    owner.register_parameter(name, nn.Parameter(value.clone()))
    target = f"{prefix}.{name}" if prefix else name
    n = layer.node
    with n.graph.inserting_before(n):
        b = n.graph.get_attr(target)
    _set_arg(n, 2, "bias", b)
    layer.bias_target = target


def _keep_output_units(gm: GraphModule, layer: Any, idx: torch.Tensor) -> None:
    """Keep only output units ``idx`` of ``layer``'s weight (dim 0) and bias."""
    for target in (layer.weight_target, layer.bias_target):
        if target is not None:
            t = _get_tensor(gm, target)
            _set_tensor(gm, target, t.detach()[idx.to(t.device)].clone())


def _sync_module_meta(gm: GraphModule, layer: _Layer) -> None:
    """Keep ``in_features`` / ``out_channels`` ... in step with the new weight (for repr / export)."""
    prefix, _ = _split_target(layer.weight_target)
    try:
        owner = gm.get_submodule(prefix)
    except AttributeError:
        return
    w = _get_tensor(gm, layer.weight_target)
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(owner, nn.modules.conv._ConvNd) and not owner.transposed:
        owner.out_channels = int(w.shape[0])
        owner.in_channels = int(w.shape[1]) * layer.groups
        owner.groups = layer.groups


# --------------------------------------------------------------------------- #
# entry points
# --------------------------------------------------------------------------- #


def prepare_inference_graph(model: nn.Module, none_args: Iterable[str] = ()) -> GraphModule:
    """A deep copy of ``model`` as an eval-mode GraphModule with only the eval graph.

    ``model`` may be a :class:`LobsterGraphModule`, or any other module, plain
    ``GraphModule`` included (traced with :func:`lobster_fx.trace.trace_model`). ``model`` is not
    modified (not even its training flag).

    ``none_args`` names arguments of ``model.forward`` that will be passed as ``None``
    (an unused optional input). FX traces every argument as a tensor, so ``if mask is
    not None`` would keep the tensor branch; a module traced here is traced with those
    arguments fixed to ``None`` instead (the argument stays in the signature) when the
    ordinary trace took the whole model (an opaque root runs its own code, which sees
    the ``None``), falling back to the ordinary trace if that fails."""
    gm = copy.deepcopy(model)
    if not isinstance(gm, LobsterGraphModule):
        # plain GraphModules too: symbolic_trace keeps Linear/Conv as call_module leaves,
        # trace_model traces through them so their weights become get_attr nodes
        res = trace_model(gm)
        none_args = set(none_args)
        if none_args and "" in res.summary.traced and not isinstance(gm, GraphModule):
            # the root was traced whole, with a proxy for every argument: again with the
            # None ones fixed (an opaque root runs its own code, which sees the None)
            traced = _trace_with_none(gm, none_args)
            gm = traced if traced is not None else res.module
        else:
            gm = res.module
    if isinstance(gm, LobsterGraphModule):
        gm.drop_mode(False)
    gm.eval()
    gm.recompile()
    return gm


def _trace_with_none(model: nn.Module, none_args: set[str]) -> LobsterGraphModule | None:
    """The whole-model trace of ``model`` with ``none_args`` fixed to None; None if it does
    not trace (the caller then uses :func:`trace_model`'s)."""
    try:
        graphs = _trace_both_modes(model, set(), concrete_args=dict.fromkeys(none_args))
        return LobsterGraphModule(model, graphs, class_name=type(model).__name__)
    except Exception:  # noqa: BLE001 - any failure: the ordinary trace (with its fallbacks) decides
        return None


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple of positional inputs whose last item
    may be a dict of keyword inputs (``torch.onnx.export``'s convention), or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    args = tuple(example_inputs)
    if args and isinstance(args[-1], dict):
        return args[:-1], dict(args[-1])
    return args, {}


def _none_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Names of the ``forward`` arguments of ``model`` that are None: passed as None,
    or not passed and None by default."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [k for k, v in kwargs.items() if v is None]
    bound.apply_defaults()
    return [k for k, v in bound.arguments.items() if v is None]


def _positional(gm: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``args`` and ``kwargs`` as the positional inputs of ``gm`` (an fx Interpreter feeds
    placeholders in order): bound to ``gm.forward``'s signature, defaults filled in."""
    if not kwargs:
        return args
    sig = inspect.signature(gm.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"example inputs do not fit {type(gm).__name__}.forward{sig}: {e}") from e
    bound.apply_defaults()
    out: list[Any] = []
    for name, p in sig.parameters.items():
        value = bound.arguments[name]
        if p.kind == p.VAR_POSITIONAL:
            out.extend(value)
        elif p.kind == p.VAR_KEYWORD:
            if value:
                raise ValueError(
                    f"keyword inputs {sorted(value)} go to **{name} of {type(gm).__name__}.forward, which "
                    "slim's graph interpreter cannot feed: pass them positionally"
                )
        else:
            out.append(value)
    return tuple(out)


def _outputs(gm: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _check(new: list[torch.Tensor], ref: list[torch.Tensor], atol: float, rtol: float) -> tuple[bool, float]:
    """(every output within ``atol + rtol * max|ref|``, worst ``max|new - ref| / max|ref|``)."""
    if len(new) != len(ref):
        return False, math.inf
    ok, worst = True, 0.0
    for a, b in zip(new, ref):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf
        if b.numel() == 0:
            continue
        if not b.is_floating_point():
            same = torch.equal(a, b)
            ok &= same
            worst = max(worst, 0.0 if same else math.inf)
            continue
        scale = float(b.abs().max())
        err = float((a - b).abs().max())
        ok &= err <= atol + rtol * scale
        worst = max(worst, err / scale if scale > 0 else err)
    return ok, worst


def _layer_shapes(an: _Analysis) -> dict[str, LayerSlim]:
    out: dict[str, LayerSlim] = {}
    for layer in an.layers.values():
        w = an._weight(layer)
        kind = "depthwise" if layer.kind == "conv" and layer.groups > 1 else layer.kind
        in_units = int(w.shape[1]) * layer.groups
        out[layer.name] = LayerSlim(kind, int(w.shape[0]), int(w.shape[0]), in_units, in_units)
    for n, _ in an.channelwise:
        if n.op == "call_module":
            c = int(an.gm.get_submodule(n.target).num_features)
            out[n.target] = LayerSlim("batchnorm", c, c, c, c)
    return out


def _channel_multiple(value: int | None) -> int:
    if value is None:
        return DEFAULT_CHANNEL_MULTIPLE
    try:
        n = operator.index(value)  # ints, numpy integers; not floats or strings
    except TypeError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ValueError(f"channel_multiple must be a positive int or None, got {value!r}")
    return n


def slim_with_report(
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_rounds: int = 100,
    channel_multiple: int | None = None,
) -> SlimResult:
    """Remove dead units; return the slim module and a :class:`SlimReport`.

    ``example_inputs`` (a tensor, a tuple of positional arguments, or keyword
    arguments as ``torch.onnx.export`` takes them: a dict as the tuple's last
    item, or a dict alone; ``None`` for an unused optional argument, which a
    module traced here is traced without) are run to get shapes, the constants of dead units, and to check the result: after
    every round ``max|slim - orig| <= atol + rtol * max|orig|`` must hold for
    every output, else :class:`SlimError` is raised (that would be a bug here,
    never a silently wrong model). ``None`` follows the model's dtype: ``rtol``
    is :func:`default_rtol` of the coarsest floating dtype among its parameters,
    buffers and outputs (``1e-5`` for float32, ``2**-4`` for bfloat16, ``2**-7``
    for float16), ``atol`` is 0 (the check is relative to the output's scale
    already). Values passed explicitly are used as given.

    ``channel_multiple`` (default ``None``: :data:`DEFAULT_CHANNEL_MULTIPLE`)
    rounds the number of kept units of every slimmed channel group that a conv
    produces or reads up to a multiple of it, never above the group's original
    size (see :func:`slim`); ``1`` removes every removable unit.

    ``model`` must not have masks: slim reads the weights as they are, so on an
    instrumented model (masks not folded) it would see the raw weights and
    remove nothing. Pass ``lobster_fx.fold(gm)``; an instrumented model (also
    inside a DDP / DataParallel / ``torch.compile`` wrapper, or as a submodule)
    raises :class:`lobster_fx.fold.MaskedModelError`, a ``ValueError``, before
    anything is copied. (:func:`lobster_fx.export.export_onnx` is the whole
    pipeline and folds by itself.)"""
    require_folded(model, "slim")
    multiple = _channel_multiple(channel_multiple)
    args, kwargs = _split_inputs(example_inputs)
    gm = prepare_inference_graph(model, _none_names(model, args, kwargs))
    inputs = _positional(gm, args, kwargs)
    with torch.no_grad():
        # through the interpreter so that a failure names the node
        ref_out = _Recorder(gm, set()).run(*inputs)
    ref = [t for t in tree_flatten(ref_out)[0] if isinstance(t, torch.Tensor)]
    if rtol is None:
        dtype = coarsest_float_dtype([*gm.parameters(), *gm.buffers(), *ref])
        rtol = default_rtol(dtype) if dtype is not None else RTOL_FLOOR
    atol = 0.0 if atol is None else atol
    params_before = _count_params(gm)
    layers: dict[str, LayerSlim] | None = None
    rounds = 0
    worst = 0.0
    while True:
        an = _Analysis(gm, inputs)
        if layers is None:
            layers = _layer_shapes(an)
        plan = an.plan(multiple)
        if not plan.keep or rounds >= max_rounds:
            break
        _apply(gm, an, plan)
        gm.graph.lint()
        gm.recompile()
        rounds += 1
        ok, err = _check(_outputs(gm, inputs), ref, atol, rtol)
        worst = max(worst, err)
        if not ok:
            changed = sorted({an.layers[n].name for n, lay in an.consumers + an.producers
                              if not plan.expand(lay).all()})
            raise SlimError(
                f"slim round {rounds} changed the outputs (max rel err {err:.3g}); "
                f"layers changed in that round: {changed}"
            )
    final = _layer_shapes(an)
    for name, before in (layers or {}).items():
        after = final.get(name)
        if after is not None:
            before.out_after, before.in_after = after.out_before, after.in_before
    report = SlimReport(
        params_before=params_before,
        params_after=_count_params(gm),
        layers=layers or {},
        rounds=rounds,
        frozen=dict(an.frozen_by),
        max_rel_err=worst,
        channel_multiple=multiple,
        units_kept_for_alignment=plan.aligned,
        atol=float(atol),
        rtol=float(rtol),
    )
    gm.meta[META_KEY] = report
    return SlimResult(gm, report)


def slim(model: nn.Module, example_inputs: Any, *, atol: float | None = None, rtol: float | None = None,
         channel_multiple: int | None = None) -> GraphModule:
    """Remove dead units from ``model`` (a deep copy); see :func:`slim_with_report`
    (``atol`` / ``rtol``: None follows the model's dtype; a model that still has
    masks is refused: fold it first).

    The report is attached as ``gm.meta["lobster_slim"]``.

    Channel alignment. With all graph optimisations (the default), ONNX
    Runtime's x86 CPU provider runs convs with blocked NCHWc kernels, whose
    channel block is MLAS's vector width (8 floats with AVX2, 16 with
    AVX-512); its NCHWc rewrite skips convs whose channel counts do not fit
    the block. For the slimmed ResNet-18s below it kept 1 of the 20 convs
    with exact channel counts (the other 19 ran as plain Conv / FusedConv,
    several times slower) and all 20 with multiples of 8 or 16.
    Conv channel groups are therefore rounded up to a multiple of
    ``channel_multiple`` (default :data:`DEFAULT_CHANNEL_MULTIPLE` = 8, the
    AVX2 block; pass 16 for AVX-512 hosts whose ONNX Runtime uses block 16).
    Measured on a 2-core AMD EPYC shared with
    other jobs, ONNX Runtime 1.31.1 (block size 8 there: convs with 40 / 72 /
    232 channels ran NCHWc), one thread, dense-weight ONNX files of ``fold`` /
    ``slim`` models, ``lobster_fx.benchmark`` with rounds=3, repeats=10,
    interleaved; speedup = dense / slim median latency,
    geometric mean of two runs; torchvision ResNet-18, 1x3x32x32 inputs,
    random-init weights with the given sparsity and 30% / 45% / 70% of the
    conv filters dead (``benchmarks/footprint.py`` masks); MAC ratio = dense /
    slim multiply-accumulates:

    ========  ==================  ==================  ==================
    sparsity  MAC ratio           speedup batch 1     speedup batch 64
              (multiple 1/8/16)   (multiple 1/8/16)   (multiple 1/8/16)
    ========  ==================  ==================  ==================
    90%       1.41 / 1.34 / 1.31  0.37 / 1.41 / 1.46  0.43 / 1.35 / 1.29
    95%       1.87 / 1.70 / 1.57  0.64 / 2.45 / 2.69  0.59 / 1.65 / 1.68
    99%       4.59 / 4.14 / 3.30  2.31 / 5.26 / 5.77  1.14 / 2.99 / 3.23
    ========  ==================  ==================  ==================

    With ``channel_multiple=1`` slim is slower than dense below 99%; 8 and 16
    are within noise of each other (16 removes fewer MACs). Rounding costs on
    small conv nets, the more so the larger the multiple: LeNet-5 at 99%
    (conv1 6 -> 8 / 16, conv2 15 -> 16 channels) ran 7.1x / 6.7x / 4.8x
    faster than dense at batch 64 with 1 / 8 / 16 (at 90% and 95% the three
    were within noise), and 16-channel stages (CIFAR ResNet-32) can never
    shrink with 16. Linear layers are never rounded: LeNet-300 at 95% /
    98% with its Linear groups rounded to 1 / 8 / 16 ran 1.79 / 1.78 / 1.76x
    and 2.48 / 2.47 / 2.44x faster than dense at batch 64 (slim speedups of
    MLPs already track their MACs).
    """
    return slim_with_report(model, example_inputs, atol=atol, rtol=rtol, channel_multiple=channel_multiple).module
