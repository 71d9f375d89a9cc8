"""NEq's fast path: the backward skips the work of frozen units (see :class:`lobster_fx.methods.neq.NEq`).

Route taken, and why:

* **Whole tensors frozen** (every unit of a layer frozen, one process): ``requires_grad_(False)``
  on its weight and bias (and on the affine parameters of the BatchNorm right after it). Autograd
  then computes neither ``dW`` nor ``db`` for the layer, and when every layer below the lowest
  trainable one is frozen no backward node is recorded below it at all: the backward stops
  there, ``dX`` included. This is free (no graph edit, no Python in the backward) and is where
  most of the measured saving comes from on LeNet-5: the early convolutions settle first, and
  their ``dW`` plus ``conv2``'s ``dX`` are the largest backward terms.
* **Some units frozen**: the layer's call in the traced graph (``linear`` / ``conv1d/2d/3d``) is
  routed through :func:`neq_layer`, which, while its :class:`LayerCtl` says so, runs the op as a
  custom autograd function whose backward computes ``dX`` in full (if any input needs it) but
  the weight and bias gradients only for the active rows: ``gy[:, active]^T x`` for a Linear, one
  ``aten.convolution_backward`` on ``gy[:, active]`` and the active filters for a conv. The
  gradient tensor keeps its full shape (frozen rows exactly 0), so optimizers, DDP buckets and
  ``GradScaler`` see what they expect. While a layer has no frozen unit the node calls the
  original op directly (one attribute read and a branch more than before).
* Under DDP no ``requires_grad`` is ever switched (the reducer expects a gradient for every
  parameter it was built with): a fully frozen layer runs the row-wise backward with no active
  row, so its gradient is zeros at the cost of one allocation, and the backward does not stop early.

Not taken: permuting frozen units into a contiguous block and splitting each layer into a
frozen and an active part: it saves the same ``dW`` rows, but reorders the parameters under the
optimizer's state and the masks at every epoch. The row-wise function falls back to the full
backward for grouped convs, string padding (``"same"``) and under autocast.

The graph edit keeps the layer node (its target becomes :func:`neq_layer`, the original op is
kept in the :class:`LayerCtl`), so :func:`remove_fast_path` restores the graph exactly. While it
is installed, :func:`lobster_fx.graph.taps.find_units` does not see the rerouted layers: create
taps-based rules (SeReNe) before NEq, and ``remove()`` NEq before neuron pruning, ``fold``,
``slim`` or export.

Example (NEq installs it; here by hand, rows 0 and 2 of the first layer active)::

    >>> import torch, lobster_fx
    >>> from lobster_fx.graph.taps import install_taps
    >>> gm = lobster_fx.instrument(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
    ...                                                 torch.nn.Linear(3, 2)))
    >>> _ = install_taps(gm)
    >>> ctls = install_fast_path(gm, {"0"})
    >>> ctls["0"].active = torch.tensor([0, 2])
    >>> gm(torch.randn(5, 4)).sum().backward()
    >>> gm.get_parameter("0.weight").grad[1].abs().sum().item()  # row 1 frozen: not computed
    0.0
    >>> remove_fast_path(gm); "neq_layer" in gm.code
    False
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from lobster_fx.graph.instrument import unwrap
from lobster_fx.graph.taps import _CONV, _LINEAR, tap_point
from lobster_fx.graph.trace import LobsterGraphModule

__all__ = ["LayerCtl", "neq_layer", "install_fast_path", "remove_fast_path", "NEQ_PREFIX"]

#: attributes of a graph module holding the layer controls: ``lobster_neq_0``, ...
NEQ_PREFIX = "lobster_neq_"
_META = "lobster_neq"


class LayerCtl(nn.Module):
    """How one layer runs its backward: ``active is None`` plain op, else rows ``active`` only.

    A module (as a unit tap is) so that the graph's ``get_attr`` of it is a known kind of
    reference; kept as an instance attribute, never registered: no ``state_dict`` key."""

    def __init__(self, name: str, op, conv_dim: int) -> None:
        super().__init__()
        self.name = name
        self.op = op
        self.conv_dim = conv_dim  # 0 for linear
        self.active: torch.Tensor | None = None
        self.attr_name = ""

    def __getstate__(self):  # a copy or a pickle of the model runs the plain op
        state = self.__dict__.copy()
        state["active"] = None
        return state

    def extra_repr(self) -> str:
        rows = "all" if self.active is None else f"{self.active.numel()} active"
        return f"{self.name!r}, rows={rows}"


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, active):
        ctx.save_for_backward(x, w, active)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w, active = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = gy.matmul(w)
        g2 = gy.reshape(-1, gy.shape[-1]).index_select(1, active) if active.numel() else None
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(w)
            if g2 is not None:
                dw.index_copy_(0, active, g2.t().matmul(x.reshape(-1, x.shape[-1])))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.new_zeros(gy.shape[-1])
            if g2 is not None:
                db.index_copy_(0, active, g2.sum(0))
        return dx, dw, db, None


class _RowConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, active, op, stride, padding, dilation, dim):
        ctx.save_for_backward(x, w, active)
        ctx.has_bias = b is not None
        ctx.conf = (stride, padding, dilation, dim)
        return op(x, w, b, stride, padding, dilation, 1)

    @staticmethod
    def backward(ctx, gy):
        x, w, active = ctx.saved_tensors
        stride, padding, dilation, dim = ctx.conf
        dx = dw = db = None
        zeros = [0] * dim
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, zeros, 1,
                                                     [True, False, False])[0]
        ga = gy.index_select(1, active) if active.numel() else None
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(w)
            if ga is not None:
                dwa = torch.ops.aten.convolution_backward(ga, x, w.index_select(0, active), None, stride, padding,
                                                          dilation, False, zeros, 1, [False, True, False])[1]
                dw.index_copy_(0, active, dwa)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.new_zeros(gy.shape[1])
            if ga is not None:
                db.index_copy_(0, active, ga.sum([0] + list(range(2, ga.dim()))))
        return dx, dw, db, None, None, None, None, None, None


def _tuple(v, dim: int) -> list[int] | None:
    if isinstance(v, int):
        return [v] * dim
    if isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v):
        return list(v) if len(v) == dim else ([v[0]] * dim if len(v) == 1 else None)
    return None  # "same" / "valid": the full backward


def neq_layer(ctl: LayerCtl, *args, **kwargs):
    """The graph's call of a rerouted layer: ``ctl.op(*args, **kwargs)``, with the row-wise
    backward while ``ctl.active`` holds the active units' indices."""
    if isinstance(args[0], torch.fx.Proxy):  # re-traced (a pickled GraphModule is): stay one node
        tracer = args[0].tracer
        if not isinstance(ctl, torch.fx.Proxy):
            ctl = tracer.create_proxy("get_attr", ctl.attr_name, (), {})
        return tracer.create_proxy("call_function", neq_layer, (ctl, *args), kwargs)
    active = ctl.active
    if active is None or not torch.is_grad_enabled() or torch.is_autocast_enabled():
        return ctl.op(*args, **kwargs)
    names = ("input", "weight", "bias") if not ctl.conv_dim else \
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, w, b = bound["input"], bound["weight"], bound.get("bias")
    if active.device != w.device:
        active = ctl.active = active.to(w.device)
    if not ctl.conv_dim:
        return _RowLinear.apply(x, w, b, active)
    dim = ctl.conv_dim
    stride, padding = _tuple(bound.get("stride", 1), dim), _tuple(bound.get("padding", 0), dim)
    dilation = _tuple(bound.get("dilation", 1), dim)
    if bound.get("groups", 1) != 1 or None in (stride, padding, dilation):
        return ctl.op(*args, **kwargs)
    return _RowConv.apply(x, w, b, active, ctl.op, stride, padding, dilation, dim)


def _graphs(sub: LobsterGraphModule):
    return list({id(g): g for g in sub.mode_graphs.values()}.values())


def install_fast_path(gm: nn.Module, names: set[str]) -> dict[str, LayerCtl]:
    """Reroute the layers ``names`` (unit taps installed: found through their tap nodes) through
    :func:`neq_layer`, in both modes; returns their controls (all idle). Idempotent."""
    root = unwrap(gm)
    ctls: dict[str, LayerCtl] = {}
    for _, sub in root.named_modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        changed = False
        attr_of: dict[str, str] = {}
        for graph in _graphs(sub):
            for node in list(graph.nodes):
                if not (node.op == "call_function" and node.target is tap_point):
                    continue
                name, layer = node.meta.get("lobster_tap"), node.args[0]
                if name not in names or not isinstance(layer, Node):
                    continue
                if layer.target is neq_layer:  # installed before
                    ctls[name] = getattr(sub, layer.args[0].target)
                    continue
                if layer.target not in _LINEAR and layer.target not in _CONV:
                    continue
                if name not in attr_of:
                    ctl = ctls.setdefault(name, LayerCtl(name, layer.target, _CONV.get(layer.target, 0)))
                    attr = f"{NEQ_PREFIX}{len(ctls) - 1}"
                    while hasattr(sub, attr):
                        attr += "_"
                    ctl.attr_name = attr
                    sub.__dict__[attr] = ctl  # an instance attribute, as taps are: no state_dict key
                    attr_of[name] = attr
                with graph.inserting_before(layer):
                    get = graph.get_attr(attr_of[name])
                layer.meta[_META] = layer.target
                layer.target = neq_layer
                layer.args = (get, *layer.args)
                changed = True
        if changed:
            sub.recompile_all()
    return ctls


def remove_fast_path(gm: nn.Module) -> None:
    """Undo :func:`install_fast_path`: every rerouted layer calls its original op again."""
    root = unwrap(gm)
    for sub in root.modules():
        if not isinstance(sub, LobsterGraphModule):
            continue
        attrs: set[str] = set()
        for graph in _graphs(sub):
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not neq_layer:
                    continue
                get = node.args[0]
                ctl = getattr(sub, get.target)
                node.target = node.meta.pop(_META, ctl.op)
                node.args = node.args[1:]
                if not get.users:
                    attrs.add(get.target)
                    graph.erase_node(get)
        for attr in attrs:
            sub.__dict__.pop(attr, None)
        if attrs:
            sub.recompile_all()
