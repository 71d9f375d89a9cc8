"""Unit taps: the per-unit outputs ``z`` of every prunable Linear / Conv, and their gradients.

A *unit* is an output feature of a ``linear`` (a row of its weight) or an output channel of a
``conv1d/2d/3d`` (a filter) whose weight is masked by :func:`lobster_fx.instrument`.

* :func:`find_units` is the analysis: it finds those layers in every traced graph (both
  modes), writes a :class:`Unit` into the layer node's ``node.meta["lobster_unit"]`` and
  returns them keyed by the layer's name (its module path in the original model). Neuron
  pruning (``prune(..., granularity="neuron")``) uses it too.
* :func:`install_taps` is the pass: after each unit layer it inserts a :func:`tap_point` node
  reading a :class:`UnitTap` (identity) and returns a :class:`Taps` mapping. A method listens with
  :meth:`UnitTap.on_output` (called with ``z`` at each forward) or :meth:`UnitTap.on_grad`
  (called with ``dL/dz`` during the same backward, by a tensor hook on ``z``); or, for every
  layer at once, :meth:`Taps.track` keeps a per-unit statistic (a mean over batches, or every
  batch's value). The user's training loop does not change.

An idle tap (no listener, or :meth:`Taps.disable`) returns its input tensor itself: outputs and
gradients are bit-identical to the untapped model, and the cost is one attribute read and one
function call per layer. Under ``torch.compile`` idle taps add no graph break (dynamo guards on
whether a tap listens: starting or stopping to listen recompiles once; listeners are Python code
and break the graph while they listen). Taps hold no parameters or buffers: ``state_dict`` keys
do not change. Remove them (:meth:`Taps.remove`) before ``fold`` / ``slim`` / export.

For the methods that build on them:

* SeReNe's loss-based sensitivity ``|mean_b dL/dz_n|`` is ``taps.track(lambda u: u.mean(1),
  on="grad")`` then ``.abs()``; its output-based one, ``mean |d(sum_k y_k)/dz_n|``, needs one more
  backward: keep each ``z`` with :meth:`UnitTap.on_output` (attached) and call
  ``torch.autograd.grad(y.sum(), zs, retain_graph=True)`` before the loss's backward.
* NEq's per-neuron outputs on a validation subset are ``taps.track(lambda u: u.clone(),
  on="output", keep="all")`` run under ``eval()`` (the eval graph has its taps too); the cosine
  between two epochs' concatenated outputs is then per row of ``torch.cat(values, 1)``.

Example::

    >>> import torch, lobster_fx
    >>> from lobster_fx.graph.taps import install_taps, mean_abs
    >>> gm = lobster_fx.instrument(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
    ...                                                 torch.nn.Linear(3, 2)))
    >>> taps = install_taps(gm)
    >>> sorted(taps), taps["0"].count, taps["0"].channel_dim
    (['0', '2'], 3, -1)
    >>> sens = taps.track(mean_abs, on="grad")
    >>> gm(torch.randn(5, 4)).sum().backward()
    >>> sens.values()["2"]  # d(sum y)/dz of the last layer is 1 everywhere
    tensor([1., 1.])
    >>> sens.close(); taps.remove()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, Node

from lobster_fx.graph.instrument import lobster_info, masked_weight, unwrap
from lobster_fx.graph.trace import LobsterGraphModule

__all__ = [
    "Unit",
    "UnitTap",
    "Taps",
    "Tracker",
    "find_units",
    "install_taps",
    "remove_taps",
    "per_unit",
    "mean_abs",
    "UNIT_META",
    "TAP_PREFIX",
    "tap_point",
]

#: ``node.meta`` key of a unit layer's :class:`Unit`
UNIT_META = "lobster_unit"
#: attributes of a (sub)graph module holding its taps: ``lobster_tap_0``, ...
TAP_PREFIX = "lobster_tap_"

_LINEAR = {torch._C._nn.linear, F.linear}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


@dataclass(frozen=True)
class Unit:
    """One layer's units: where they live and which parameters make them."""

    name: str  #: the layer's module path in the original model ("" for the root)
    kind: str  #: "linear" or "conv"
    weight: str  #: its weight's name, a key of :func:`lobster_fx.masks`
    bias: str | None  #: its bias's name if the bias is masked, else None
    count: int  #: number of units (output features / output channels)
    channel_dim: int  #: the dim of ``z`` holding the units: -1 (linear) or 1 (conv)
    norm: str | None  #: path (in the instrumented module) of a BatchNorm applied right after, if any
    feeds_output: bool  #: ``z`` is returned by the graph itself
    module: str  #: path of the graph module holding the layer node ("" for the root)
    node: str  #: the layer node's name in that graph


def _arg(node: Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _masked_name(arg: object, by_path: dict[str, str], prefix: str) -> str | None:
    """The masked parameter read by ``arg`` (a ``masked_weight`` node), else None. From the node's
    meta, or from the parameter it reads (a pickled module's graphs are re-traced without meta)."""
    if not (isinstance(arg, Node) and arg.op == "call_function" and arg.target is masked_weight):
        return None
    name = arg.meta.get("lobster_mask")
    raw = arg.args[0] if arg.args else None
    if name is None and isinstance(raw, Node) and raw.op == "get_attr":
        name = by_path.get(prefix + raw.target)
    return name


def _owner(info, weight: str) -> str:
    return info.params[weight].owner


def _graphs(sub: LobsterGraphModule) -> list[Graph]:
    return list({id(g): g for g in sub.mode_graphs.values()}.values())


def _unit_of(node: Node, info, by_path: dict[str, str], sub: LobsterGraphModule, prefix: str) -> Unit | str | None:
    """The :class:`Unit` of ``node``, None if it is no linear / conv, or why it is not usable."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        kind = "linear"
    elif node.target in _CONV:
        kind = "conv"
    else:
        return None
    weight = _masked_name(_arg(node, 1, "weight"), by_path, prefix)
    if weight is None or weight not in info.params:
        return f"its weight is not masked: {node.format_node()}"
    shape = info.params[weight].shape
    if len(shape) != (2 if kind == "linear" else _CONV[node.target] + 2):
        return f"its weight has an unexpected shape {tuple(shape)}: {node.format_node()}"
    bias_arg = _arg(node, 2, "bias")
    bias = _masked_name(bias_arg, by_path, prefix)
    norm = None
    users, src = list(node.users), node
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is tap_point:
        src = users[0]  # installed taps (a method listening while it trains): look through the tap
        users = list(src.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args[:1] == (src,):
        mod = sub.get_submodule(users[0].target)
        # after a Linear, a BatchNorm1d of as many features is taken to see (N, C) inputs
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.num_features == shape[0]:
            norm = prefix + users[0].target
    feeds_output = any(u.op == "output" for u in users)
    return Unit(_owner(info, weight), kind, weight, bias, int(shape[0]), -1 if kind == "linear" else 1,
                norm, feeds_output, prefix.rstrip("."), node.name)


def find_units(gm: nn.Module, *, skipped: dict[str, str] | None = None) -> dict[str, Unit]:
    """Every prunable Linear / Conv layer of an instrumented module, keyed by :attr:`Unit.name`.

    Looks at the traced graphs of both modes (nested graph modules included) and writes each
    layer node's :class:`Unit` into ``node.meta["lobster_unit"]``. A weight used by more than
    one layer node of a graph (shared weights) is left out; so are layers whose weight is not
    masked, transposed convs and layers inside leaf or untraced modules. ``skipped``, when
    given, receives ``{description: reason}`` for each linear / conv node left out (the
    reason names the node).

        >>> import torch, lobster_fx
        >>> gm = lobster_fx.instrument(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
        >>> u = find_units(gm)["0"]
        >>> (u.kind, u.weight, u.bias, u.count, u.norm)
        ('conv', '0.weight', '0.bias', 4, '1')
    """
    root = unwrap(gm)
    info = lobster_info(root)
    by_path = {p.param_path: p.name for p in info.params.values()}
    found: list[tuple[Node, Unit]] = []
    shared: set[str] = set()
    for path, sub in root.named_modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        prefix = f"{path}." if path else ""
        for graph in _graphs(sub):
            seen: dict[str, Node] = {}
            for node in graph.nodes:
                node.meta.pop(UNIT_META, None)
                unit = _unit_of(node, info, by_path, sub, prefix)
                if unit is None:
                    continue
                if isinstance(unit, str):
                    if skipped is not None:
                        skipped[f"{prefix}{node.name}"] = unit
                    continue
                if unit.weight in seen:  # the same weight twice in one graph: units are not one layer's
                    shared.add(unit.weight)
                    if skipped is not None:
                        skipped[f"{prefix}{node.name}"] = (f"its weight {unit.weight} is also used by "
                                                          f"{seen[unit.weight].format_node()}: {node.format_node()}")
                    continue
                seen[unit.weight] = node
                found.append((node, unit))
    # a layer is named after its module; a module with several unit weights, after each weight
    weights_of: dict[str, set[str]] = {}
    for _, unit in found:
        weights_of.setdefault(unit.name, set()).add(unit.weight)
    units: dict[str, Unit] = {}
    for node, unit in found:
        if unit.weight in shared:
            continue
        if len(weights_of[unit.name]) > 1:
            unit = replace(unit, name=unit.weight)
        node.meta[UNIT_META] = unit
        units.setdefault(unit.name, unit)
    return units


def per_unit(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``t`` (a layer's ``z`` or its gradient) as ``(units, everything else)``.

        >>> per_unit(torch.zeros(2, 3, 5, 5), 1).shape
        torch.Size([3, 50])
    """
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def mean_abs(u: torch.Tensor) -> torch.Tensor:
    """Per-unit mean of ``|.|`` of a :func:`per_unit` view (a :meth:`Taps.track` reducer)."""
    return u.abs().mean(1)


class _Handle:
    def __init__(self, hooks: list, fn: Callable, tap: UnitTap) -> None:
        self._hooks, self._fn, self._tap = hooks, fn, tap

    def remove(self) -> None:
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)
            self._tap._update()


class UnitTap(nn.Module):
    """Identity on one layer's output ``z``; calls its listeners when there are any.

    ``on_output(fn)``: ``fn(z, tap)`` at each forward, ``z`` the live tensor (detach it to keep
    it). ``on_grad(fn)``: ``fn(grad, tap)`` with ``dL/dz`` during each backward through ``z``
    (the gradient as autograd has it: scaled under a GradScaler). Both return a handle whose
    ``remove()`` stops it. Listeners must not modify what they get.
    """

    def __init__(self, unit: Unit) -> None:
        super().__init__()
        self.unit = unit
        self.count = unit.count
        self.channel_dim = unit.channel_dim
        self.enabled = True
        self.attr_name = ""  #: its attribute in the graph module (set by install_taps)
        self._output_fns: list[Callable] = []
        self._grad_fns: list[Callable] = []
        self._idle = True

    def _update(self) -> None:
        self._idle = not (self.enabled and (self._output_fns or self._grad_fns))

    def on_output(self, fn: Callable[[torch.Tensor, UnitTap], None]) -> _Handle:
        self._output_fns.append(fn)
        self._update()
        return _Handle(self._output_fns, fn, self)

    def on_grad(self, fn: Callable[[torch.Tensor, UnitTap], None]) -> _Handle:
        self._grad_fns.append(fn)
        self._update()
        return _Handle(self._grad_fns, fn, self)

    def _grad_hook(self, grad: torch.Tensor) -> None:
        for fn in list(self._grad_fns):
            fn(grad, self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self._idle:
            return z
        for fn in list(self._output_fns):
            fn(z, self)
        if self._grad_fns and z.requires_grad and torch.is_grad_enabled():
            z.register_hook(self._grad_hook)
        return z

    def extra_repr(self) -> str:
        return f"{self.unit.name!r}, units={self.count}"

    def __getstate__(self):  # listeners (closures) are not part of a copy or a pickle
        state = self.__dict__.copy()
        state["_output_fns"], state["_grad_fns"], state["_idle"] = [], [], True
        return state


class Tracker:
    """A per-unit statistic over every tap (made by :meth:`Taps.track`).

    Each call of the listener reduces the tap's tensor (seen through :func:`per_unit`) with
    ``reduce`` under ``torch.no_grad()`` and keeps the ``"mean"`` over calls, the ``"sum"``,
    or ``"all"`` of them (a list per layer)."""

    def __init__(self, taps: Taps, reduce: Callable[[torch.Tensor], torch.Tensor], on: str, keep: str) -> None:
        if on not in ("output", "grad"):
            raise ValueError(f"Taps.track: on must be 'output' or 'grad', got {on!r}")
        if keep not in ("mean", "sum", "all"):
            raise ValueError(f"Taps.track: keep must be 'mean', 'sum' or 'all', got {keep!r}")
        if not callable(reduce):
            raise TypeError(f"Taps.track: reduce must be a callable (units, n) tensor -> (units,) tensor, "
                            f"got {reduce!r} ({type(reduce).__name__})")
        self.reduce, self.on, self.keep = reduce, on, keep
        self._sums: dict[str, torch.Tensor] = {}
        self._all: dict[str, list[torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self._handles = [
            (tap.on_output if on == "output" else tap.on_grad)(self._listener(name)) for name, tap in taps.items()
        ]

    def _listener(self, name: str) -> Callable:
        def record(t: torch.Tensor, tap: UnitTap) -> None:
            with torch.no_grad():
                value = self.reduce(per_unit(t.detach(), tap.channel_dim))
            if self.keep == "all":
                self._all.setdefault(name, []).append(value)
            else:
                value = value.double() if value.is_floating_point() else value
                self._sums[name] = value if name not in self._sums else self._sums[name] + value
            self.calls[name] = self.calls.get(name, 0) + 1
        return record

    def values(self) -> dict:
        """Per layer: the mean over calls (``keep="mean"``), the sum, or the list of values."""
        if self.keep == "all":
            return {k: list(v) for k, v in self._all.items()}
        if self.keep == "sum":
            return dict(self._sums)
        return {k: (s / self.calls[k]).float() for k, s in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._all.clear()
        self.calls.clear()

    def close(self) -> None:
        """Stop listening (the taps go idle again if no one else listens)."""
        for h in self._handles:
            h.remove()
        self._handles = []


class Taps(Mapping):
    """The taps of an instrumented module, keyed by layer name (:attr:`Unit.name`)."""

    def __init__(self, gm: nn.Module, taps: dict[str, UnitTap]) -> None:
        self.gm = gm
        self._taps = taps

    def __getitem__(self, name: str) -> UnitTap:
        return self._taps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def track(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, on: str = "output",
              keep: str = "mean") -> Tracker:
        """Listen on every tap: see :class:`Tracker`."""
        return Tracker(self, reduce, on, keep)

    def enable(self) -> None:
        for tap in self._taps.values():
            tap.enabled = True
            tap._update()

    def disable(self) -> None:
        """Every tap idle (listeners kept, not called) until :meth:`enable`."""
        for tap in self._taps.values():
            tap.enabled = False
            tap._update()

    def remove(self) -> None:
        """Take the tap nodes and modules out of the graphs (the module is as before install)."""
        remove_taps(self.gm)
        self._taps = {}


def tap_point(z: torch.Tensor, tap: UnitTap) -> torch.Tensor:
    """The graph's call of a tap: ``z`` itself while ``tap`` is idle, else ``tap``'s listeners run.

    A plain function reading the tap from the graph module's instance attributes: an idle tap
    costs one attribute read and one call, not a module call."""
    if isinstance(z, torch.fx.Proxy):  # re-traced (a pickled GraphModule is): stay one node
        if not isinstance(tap, torch.fx.Proxy):
            tap = z.tracer.create_proxy("get_attr", tap.attr_name, (), {})
        return z.tracer.create_proxy("call_function", tap_point, (z, tap), {})
    if tap._idle:
        return z
    return tap.forward(z)


def _tap_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is tap_point]


def install_taps(gm: nn.Module) -> Taps:
    """Insert an idle :class:`UnitTap` after every unit layer of :func:`find_units`, in both modes.

    Edits ``gm`` in place (the instrumented module, not a copy: the user keeps training it);
    returns a :class:`Taps`. Installing twice returns the taps already there.

    Raises:
        TypeError: ``gm`` was not made by :func:`lobster_fx.instrument`.
        ValueError: no Linear / Conv layer with a masked weight was found in a traced graph.
    """
    root = unwrap(gm)
    units = find_units(root)
    if not units:
        raise ValueError("install_taps: no Linear / Conv layer with a masked weight in a traced graph "
                         f"(graph modules: {[p or '<root>' for p, m in root.named_modules() if isinstance(m, LobsterGraphModule)]})")
    taps: dict[str, UnitTap] = {}
    for path, sub in root.named_modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        attr_of: dict[str, str] = {}  # layer name -> the tap's attribute in ``sub``
        changed = False
        for graph in _graphs(sub):
            for node in list(graph.nodes):
                unit = node.meta.get(UNIT_META)
                if unit is None or unit.name not in units or unit.module != path:
                    continue
                existing = [u for u in node.users if u.op == "call_function" and u.target is tap_point]
                if existing:  # installed before
                    taps[unit.name] = getattr(sub, existing[0].args[1].target)
                    continue
                if unit.name not in attr_of:
                    attr = f"{TAP_PREFIX}{len(taps)}"
                    while hasattr(sub, attr):
                        attr += "_"
                    tap = taps.setdefault(unit.name, UnitTap(unit))
                    tap.attr_name = attr
                    # an instance attribute, not a registered submodule: read without nn.Module.__getattr__
                    sub.__dict__[attr] = tap
                    attr_of[unit.name] = attr
                with graph.inserting_after(node):
                    get = graph.get_attr(attr_of[unit.name])
                with graph.inserting_after(get):
                    tap_node = graph.call_function(tap_point, (node, get))
                node.replace_all_uses_with(tap_node, delete_user_cb=lambda u, t=tap_node: u is not t)
                tap_node.meta["lobster_tap"] = unit.name
                changed = True
        if changed:
            sub.recompile_all()
    return Taps(root, taps)


def remove_taps(gm: nn.Module) -> None:
    """Undo :func:`install_taps` on ``gm`` (nothing to do if it has no taps)."""
    root = unwrap(gm)
    for sub in root.modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        attrs: set[str] = set()
        for graph in _graphs(sub):
            for node in _tap_nodes(graph):
                get = node.args[1]
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                if isinstance(get, Node) and get.op == "get_attr" and not get.users:
                    attrs.add(get.target)
                    graph.erase_node(get)
        for attr in attrs:
            if hasattr(sub, attr):
                delattr(sub, attr)
        if attrs:
            sub.recompile_all()
