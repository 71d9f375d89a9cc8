"""Slim's rewrite: apply a :class:`~lobster_fx.passes.slim.layout.Plan` to the model.

Consumers lose the columns of removed units (a constant unit's value is folded into their
bias first), producers lose the rows (weight and bias), BatchNorms and depthwise convs
lose the entries; module attributes (``in_features``, ``out_channels``, ...) follow.

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Linear(3, 2)
    >>> set_tensor(m, "weight", torch.zeros(2, 1))
    >>> tuple(get_tensor(m, "weight").shape), isinstance(m.weight, nn.Parameter)
    ((2, 1), True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import GraphModule

from lobster_fx.passes.slim.layout import Layout, Plan, set_arg
from lobster_fx.passes.slim.report import SlimError

if TYPE_CHECKING:
    from lobster_fx.passes.slim.analysis import Analysis, Layer

__all__ = ["apply_plan", "get_tensor", "set_tensor", "split_target", "count_params"]


def split_target(target: str) -> tuple[str, str]:
    prefix, _, name = target.rpartition(".")
    return prefix, name


def get_tensor(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target`` keeping its kind (parameter / buffer / plain)."""
    prefix, name = split_target(target)
    owner = gm.get_submodule(prefix)
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def apply_plan(gm: GraphModule, an: Analysis, plan: Plan) -> None:
    """Remove the units ``plan`` drops from the layers, BatchNorms and depthwise convs
    ``an`` found (the graph is edited in place; recompile it afterwards)."""
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
                set_arg(n, 6, "groups", int(idx.numel()))
                layer.groups = int(idx.numel())
                _sync_module_meta(gm, layer)
            else:  # BatchNorm
                bn = gm.get_submodule(n.target)
                idx = keep.nonzero().flatten()
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(bn, name, None)
                    if isinstance(t, torch.Tensor):
                        set_tensor(gm, f"{n.target}.{name}" if n.target else name,
                                   t.detach()[idx.to(t.device)].clone())
                bn.num_features = int(idx.numel())


def _shrink_consumer(gm: GraphModule, layer: Layer, lay: Layout, keep_cols: torch.Tensor,
                     act: torch.Tensor | None) -> None:
    w = get_tensor(gm, layer.weight_target).detach()
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
            b = get_tensor(gm, layer.bias_target)
            set_tensor(gm, layer.bias_target, (b.detach() + add.to(b.dtype)).clone())
    set_tensor(gm, layer.weight_target, w[:, keep_cols.nonzero().flatten().to(w.device)].clone())
    _sync_module_meta(gm, layer)


def _add_bias(gm: GraphModule, layer: Layer, value: torch.Tensor) -> None:
    """Give a bias-free layer a bias (needed to hold folded constants)."""
    prefix, _ = split_target(layer.weight_target)
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
    set_arg(n, 2, "bias", b)
    layer.bias_target = target


def _keep_output_units(gm: GraphModule, layer: Layer, idx: torch.Tensor) -> None:
    """Keep only output units ``idx`` of ``layer``'s weight (dim 0) and bias."""
    for target in (layer.weight_target, layer.bias_target):
        if target is not None:
            t = get_tensor(gm, target)
            set_tensor(gm, target, t.detach()[idx.to(t.device)].clone())


def _sync_module_meta(gm: GraphModule, layer: Layer) -> None:
    """Keep ``in_features`` / ``out_channels`` ... in step with the new weight (for repr / export)."""
    prefix, _ = split_target(layer.weight_target)
    try:
        owner = gm.get_submodule(prefix)
    except AttributeError:
        return
    w = get_tensor(gm, layer.weight_target)
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(owner, nn.modules.conv._ConvNd) and not owner.transposed:
        owner.out_channels = int(w.shape[0])
        owner.in_channels = int(w.shape[1]) * layer.groups
        owner.groups = layer.groups
