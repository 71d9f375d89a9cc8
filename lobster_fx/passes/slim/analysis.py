"""Slim's analysis: one pass over the graph finds the layers, the channel groups, the
constant channels, and which units a round can remove (a :class:`~lobster_fx.passes.slim.layout.Plan`).

What each op does to channels is looked up in the op registry
(:mod:`lobster_fx.passes.slim.registry`); Linear / conv calls whose weight and bias are
private ``get_attr`` tensors are the layers (:class:`Layer`), sliced by
:mod:`lobster_fx.passes.slim.rewrite`. A module class a user registered as elementwise is
also found where FX traced through it (by the nodes' ``nn_module_stack``).

    >>> import torch
    >>> from torch import nn
    >>> from lobster_fx.passes.slim.entry import prepare_inference_graph
    >>> m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    >>> with torch.no_grad():
    ...     m[2].weight[:, 2] = 0   # unit 2 of the first layer feeds nothing
    >>> gm = prepare_inference_graph(m)
    >>> an = Analysis(gm, (torch.randn(2, 6),))
    >>> plan = an.plan()
    >>> [keep.tolist() for keep in plan.keep.values()]
    [[True, True, False, True]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from lobster_fx.passes.slim import ops as _ops  # noqa: F401 - enters the built-in ops
from lobster_fx.passes.slim.layout import UNKNOWN, Groups, Layout, Plan, Seg, Unsupported, arg, has_node
from lobster_fx.passes.slim.registry import REGISTRY, user_class_rule
from lobster_fx.passes.slim.report import META_KEY, SlimError
from lobster_fx.passes.slim.rewrite import get_tensor, split_target

__all__ = ["Analysis", "Layer", "Recorder"]


class Layer:
    """A linear / conv call whose weight (and bias) are private ``get_attr`` tensors."""

    def __init__(self, node: Node, kind: str, weight_target: str, bias_target: str | None, nd: int,
                 groups: int, padded: bool) -> None:
        self.node = node
        self.kind = kind  # "linear" | "conv"
        self.weight_target = weight_target
        self.bias_target = bias_target
        self.nd = nd  # spatial dims, 0 for linear
        self.groups = groups
        self.padded = padded

    @property
    def name(self) -> str:
        return split_target(self.weight_target)[0]


def as_layer(gm: GraphModule, node: Node, kind: str, nd: int, tensor_uses: dict[int, int]) -> Layer | str:
    """Describe ``node`` (a ``kind`` call: ``"linear"`` or ``"conv"``) as a prunable layer,
    or return why it is not one.

    ``tensor_uses`` counts, per tensor object, the get_attr nodes and called
    modules that reach it: a weight shared with anything else is left alone."""
    if not node.args or not isinstance(node.args[0], Node):
        return "input not passed positionally"
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if kind == "linear" and len(node.args) + len(node.kwargs) > 3:
        return "unexpected linear arguments"
    if not (isinstance(w, Node) and w.op == "get_attr" and len(w.users) == 1):
        return "weight is not a get_attr"
    weight = get_tensor(gm, w.target)
    if (not isinstance(weight, torch.Tensor) or weight.layout != torch.strided or weight.dim() != nd + 2
            or not weight.is_floating_point()):
        return "weight is not a dense floating-point tensor of the expected rank"
    if tensor_uses.get(id(weight), 0) != 1:
        return "weight is shared"
    bias_target = None
    if b is not None:
        if not (isinstance(b, Node) and b.op == "get_attr" and len(b.users) == 1):
            return "bias is not a get_attr"
        bias = get_tensor(gm, b.target)
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            return "bias has an unexpected shape"
        if tensor_uses.get(id(bias), 0) != 1:
            return "bias is shared"
        bias_target = b.target
    groups, padded = 1, False
    if kind == "conv":
        groups = arg(node, 6, "groups", 1)
        padding = arg(node, 4, "padding", 0)
        if not isinstance(groups, int) or isinstance(padding, Node) or has_node(padding):
            return "conv with computed groups/padding"
        if isinstance(padding, str):
            padded = padding == "same" and any(k > 1 for k in weight.shape[2:])
        else:
            padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return Layer(node, kind, w.target, bias_target, nd, groups, padded)


class Recorder(Interpreter):
    """Runs the graph on the example inputs: the shape of every node, and the input each
    watched node (a layer) sees; a failure names the node."""

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


class Analysis:
    """One pass over the graph: channel groups, constants, removable units."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.groups = Groups()
        self.layout: dict[Node, Layout | None] = {}
        self.producers: list[tuple[Node, Layout]] = []
        self.consumers: list[tuple[Node, Layout]] = []
        self.channelwise: list[tuple[Node, Layout]] = []  # BatchNorm / depthwise conv members
        self.frozen_by: dict[str, str] = {}

        # uses per tensor / module *object*: aliases (tied weights, a module registered
        # under two names, a parameter an opaque module also reads) must not be sliced
        tensor_uses: dict[int, int] = {}
        module_uses: dict[int, int] = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                t = get_tensor(gm, n.target)
                tensor_uses[id(t)] = tensor_uses.get(id(t), 0) + 1
            elif n.op == "call_module":
                mod = gm.get_submodule(n.target)
                module_uses[id(mod)] = module_uses.get(id(mod), 0) + 1
                for t in list(mod.parameters()) + list(mod.buffers()):
                    tensor_uses[id(t)] = tensor_uses.get(id(t), 0) + 1
        self.module_uses = module_uses
        self.layers: dict[Node, Layer] = {}
        self.not_layer: dict[Node, str] = {}
        for n in self.graph.nodes:
            rule = REGISTRY.get(n.target) if n.op == "call_function" else None
            if rule is not None and rule.builtin and rule.kind in ("linear", "conv"):
                nd = _ops.LINEAR_FNS.get(n.target, _ops.CONV_FNS.get(n.target, 0))
                res = as_layer(gm, n, rule.kind, nd, tensor_uses)
                if isinstance(res, Layer):
                    self.layers[n] = res
                else:
                    self.not_layer[n] = res

        rec = Recorder(gm, set(self.layers))
        with torch.no_grad():
            rec.run(*example_inputs)
        self.inputs = rec.inputs
        self.shapes = rec.shapes
        self._regions = self._user_regions()
        self._walk()

    # -- propagation -------------------------------------------------------- #

    def weight(self, layer: Layer) -> torch.Tensor:
        return get_tensor(self.gm, layer.weight_target)

    def _new_layout(self, n: Node, axis_from_end: int, size: int, const: torch.Tensor) -> Layout | None:
        shape = self.shapes.get(n)
        if shape is None:
            return None
        rank = len(shape)
        axis = rank - axis_from_end
        if axis < 0 or shape[axis] != size:
            return None
        g = self.groups.new(size)
        return Layout(rank, axis, [Seg(g, size, 1, const)])

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
            except Unsupported as e:
                reason = str(e)
                if reason.startswith("unsupported op"):
                    reason += self._hint(n)
                self._freeze_inputs(n, reason)
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

    def _visit(self, n: Node) -> tuple[Layout | None, str]:
        if n.op in ("placeholder", "get_attr"):
            return None, "input"
        if n in self._regions:
            return self._visit_region(n)
        if n.op == "output":
            if any(self.layout.get(a) is not None for a in n.all_input_nodes):
                raise Unsupported("graph output")
            return None, "output"
        if n in self.layers:
            return self._visit_layer(self.layers[n])
        rule, module = REGISTRY.node_rule(self.gm, n)
        out = UNKNOWN if rule is None else rule.handler(self, n, module)
        if out is UNKNOWN:
            if any(self.layout.get(a) is not None for a in n.all_input_nodes):
                what = f"{n.op} {n.target}"
                if n.op == "call_module":  # the class says more than the name (a subclass, a library's layer)
                    what += f" ({type(module).__name__})"
                raise Unsupported(f"unsupported op {what}")
            return None, "other"
        if module is not None and rule is not None and not rule.builtin and out is not None:
            _check_scalar_state(module, rule.kind)
        return out, "channelwise" if out is not None else "other"

    # -- a user's elementwise module that FX traced through ------------------- #

    def _module_calls(self) -> dict[str, tuple[str, type, list[Node]]]:
        """Every module call FX traced through, by its ``nn_module_stack`` key:
        ``(path, class, nodes recorded inside it)``."""
        if self._calls is None:
            self._calls = {}
            for n in self.graph.nodes:
                if n.op in ("call_function", "call_method", "call_module", "get_attr"):
                    for key, value in (n.meta.get("nn_module_stack") or {}).items():
                        if isinstance(value, tuple) and len(value) > 1 and isinstance(value[1], type):
                            self._calls.setdefault(key, (str(value[0]), value[1], []))[2].append(n)
        return self._calls

    def _why_not_one_op(self, nodes: list[Node]) -> tuple[str | None, Node | None]:
        """Why the nodes of a module call are not one op of one tensor (None if they are),
        and that tensor."""
        members = set(nodes)
        ext = {a for m in nodes for a in m.all_input_nodes if a not in members}
        tensors = [a for a in ext if a.op != "get_attr"]
        outputs = [m for m in nodes if any(u not in members for u in m.users)]
        state = [get_tensor(self.gm, a.target) for a in ext | members if a.op == "get_attr"]
        if len(tensors) != 1:
            return f"takes {len(tensors)} tensors", None
        if any(m in self.layers or m in self.not_layer for m in nodes):
            return "contains a linear/conv", None
        if any(isinstance(t, torch.Tensor) and t.numel() > 1 for t in state):
            return "holds a tensor of more than one element (per-channel state is not elementwise)", None
        if any(self.shapes.get(m) != self.shapes.get(tensors[0]) for m in outputs):
            return "changes the shape", None
        return None, tensors[0]

    def _user_regions(self) -> dict[Node, tuple[str, type, Node]]:
        """Node -> (call key, class, input) for the nodes recorded inside a call of a module
        class a user registered as elementwise (FX traced through it: no ``call_module``
        node; the outermost such call). A call that is not one op of one tensor (two tensor
        inputs, a linear / conv inside, per-channel state, an output of another shape) is
        visited node by node instead; why is kept for the frozen reasons."""
        self._calls: dict[str, tuple[str, type, list[Node]]] | None = None
        self.region_rejects: dict[str, str] = {}
        out: dict[Node, tuple[str, type, Node]] = {}
        outer: set[str] = set()
        for n in self.graph.nodes:
            for key, value in (n.meta.get("nn_module_stack") or {}).items():
                cls = value[1] if isinstance(value, tuple) and len(value) > 1 else None
                if user_class_rule(cls) is not None:
                    outer.add(key)
                    break
        for key in outer:
            _, cls, nodes = self._module_calls()[key]
            why, x = self._why_not_one_op(nodes)
            if why is not None:
                self.region_rejects[key] = f"{cls.__name__} is registered as elementwise, but this call {why}"
                continue
            for m in nodes:
                out[m] = (key, cls, x)
        return out

    def _hint(self, n: Node) -> str:
        """For an op slim does not know inside a user's module call that looks like one op of
        one tensor (an activation): how to declare it channel-preserving, or why its
        registration did not apply."""
        stack = n.meta.get("nn_module_stack") or {}
        for key, value in reversed(list(stack.items())):
            if key in self.region_rejects:
                return f" (inside {value[0]}: {self.region_rejects[key]})"
            call = self._module_calls().get(key)
            if call is None or call[1].__module__.startswith("torch."):
                continue
            path, cls, nodes = call
            if self._why_not_one_op(nodes)[0] is not None:
                return ""
            return (f" (inside {path}: {cls.__name__}; if it is elementwise: "
                    f"lobster_fx.register_elementwise({cls.__name__}))")
        return ""

    def _visit_region(self, n: Node) -> tuple[Layout | None, str]:
        """A node inside a registered elementwise module's call, taken as one op of one
        tensor: the call's outputs carry the layout of its input, the nodes inside none."""
        key, cls, x = self._regions[n]
        if all(u in self._regions and self._regions[u][0] == key for u in n.users):
            return None, f"inside {cls.__name__}"
        lay = self.layout.get(x)
        return lay, "channelwise" if lay is not None else "other"

    def _visit_layer(self, layer: Layer) -> tuple[Layout | None, str]:
        n = layer.node
        w = self.weight(layer)
        x = n.args[0]
        lay = self.layout.get(x) if isinstance(x, Node) else None
        if not isinstance(x, Node) or any(self.layout.get(a) is not None for a in n.all_input_nodes if a is not x):
            raise Unsupported("layer input used as a weight")
        out_units = w.shape[0]
        zero_rows = w.detach().reshape(out_units, -1).eq(0).all(1).cpu()
        if layer.kind == "linear":
            if lay is not None and (lay.axis != lay.rank - 1 or lay.width != w.shape[1]):
                raise Unsupported("linear input features are not the channel axis")
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
            raise Unsupported("conv input channels are not the channel axis")
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
                segs.append(Seg(s.group, s.count, 1, const))
                off += s.count
            out = lay.with_(segs=segs)
            self.channelwise.append((n, out))
            return out, "depthwise"
        raise Unsupported(f"grouped conv (groups={layer.groups})")

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

    def plan(self, channel_multiple: int = 1) -> Plan:
        """Which units of which group to remove.

        In groups that a conv touches, the number of kept units is rounded up to a
        multiple of ``channel_multiple`` (capped at the group's current size) by
        keeping the first removable units by index."""
        g = self.groups
        removable: dict[int, torch.Tensor] = {}
        for _, lay in self.producers:
            root = g.find(lay.segs[0].group)
            if root not in g.frozen:
                removable.setdefault(root, torch.ones(g.size[root], dtype=torch.bool))
        for c, lay in self.consumers:
            layer = self.layers[c]
            w = self.weight(layer).detach()
            act = self.inputs.get(c)
            for seg, off in zip(lay.segs, lay.offsets()):
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
                rem, extra = round_kept(rem, channel_multiple)
                aligned += extra
            if rem.any():
                keep[root] = ~rem
        return Plan(keep, g, aligned)

    def _channel_facts(self, layer: Layer, w: torch.Tensor, act: torch.Tensor | None, lay: Layout,
                       seg: Seg, off: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _check_scalar_state(module: nn.Module, kind: str) -> None:
    """A module registered as elementwise must not hold per-channel state (slim would not slice it)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.numel() > 1:
            raise Unsupported(
                f"{type(module).__name__} is registered as {kind}, but holds a tensor of shape "
                f"{tuple(t.shape)} (per-channel state is not elementwise)")


def round_kept(rem: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Un-mark the first removable units so that the kept count is a multiple of
    ``multiple`` (or all units, if rounding up would exceed them); returns the new
    mask and how many removable units it keeps.

        >>> import torch
        >>> rem, extra = round_kept(torch.tensor([True, True, True, False, True]), 2)
        >>> rem.tolist(), extra
        ([False, True, True, False, True], 1)
    """
    size = rem.numel()
    kept = size - int(rem.sum())
    target = min(size, -(-kept // multiple) * multiple)
    extra = target - kept
    if extra <= 0:
        return rem, 0
    rem = rem.clone()
    rem[rem.nonzero().flatten()[:extra]] = False
    return rem, extra
