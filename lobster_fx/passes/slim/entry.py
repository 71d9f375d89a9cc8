"""Slim's entry point: inputs, tracing, the rounds, and the output check.

:func:`slim` traces the model (a deep copy, eval mode, only the eval graph), then repeats
analysis (:mod:`~lobster_fx.passes.slim.analysis`) and rewrite
(:mod:`~lobster_fx.passes.slim.rewrite`) until no unit is removable, checking the outputs
against the untouched model on ``example_inputs`` after every round. It returns the slim
module with its :class:`~lobster_fx.passes.slim.report.SlimReport` in
``module.meta["lobster_slim"]``.

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    >>> with torch.no_grad():
    ...     m[2].weight[:, 2] = 0
    >>> gm = slim(m, torch.randn(5, 6))
    >>> gm.meta["lobster_slim"].units_removed
    1
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from lobster_fx.graph.trace import LobsterGraphModule, _trace_both_modes, trace_model
from lobster_fx.passes.fold import require_folded
from lobster_fx.passes.slim.analysis import Analysis, Recorder
from lobster_fx.passes.slim.report import (
    META_KEY,
    RTOL_FLOOR,
    LayerSlim,
    SlimError,
    SlimReport,
    coarsest_float_dtype,
    default_rtol,
)
from lobster_fx.passes.slim.rewrite import apply_plan, count_params

__all__ = ["slim", "prepare_inference_graph", "DEFAULT_CHANNEL_MULTIPLE"]

#: ``channel_multiple=None`` rounds the kept channels of conv groups up to this multiple
DEFAULT_CHANNEL_MULTIPLE = 8


def prepare_inference_graph(model: nn.Module, none_args: Iterable[str] = ()) -> GraphModule:
    """A deep copy of ``model`` as an eval-mode GraphModule with only the eval graph.

    ``model`` may be a :class:`LobsterGraphModule`, or any other module, plain
    ``GraphModule`` included (traced with :func:`lobster_fx.graph.trace.trace_model`). ``model`` is not
    modified (not even its training flag).

    ``none_args`` names arguments of ``model.forward`` that will be passed as ``None``
    (an unused optional input). FX traces every argument as a tensor, so ``if mask is
    not None`` would keep the tensor branch; a module traced here is traced with those
    arguments fixed to ``None`` instead (the argument stays in the signature) when the
    ordinary trace took the whole model (an opaque root runs its own code, which sees
    the ``None``), falling back to the ordinary trace if that fails.

        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> gm = prepare_inference_graph(m)
        >>> gm.training, m.training
        (False, True)
    """
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


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple of positional inputs whose last item
    may be a dict of keyword inputs (``torch.onnx.export``'s convention), or a dict.

        >>> split_inputs((1, {"mask": None}))
        ((1,), {'mask': None})
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    args = tuple(example_inputs)
    if args and isinstance(args[-1], dict):
        return args[:-1], dict(args[-1])
    return args, {}


def none_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Names of the ``forward`` arguments of ``model`` that are None: passed as None,
    or not passed and None by default."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [k for k, v in kwargs.items() if v is None]
    bound.apply_defaults()
    return [k for k, v in bound.arguments.items() if v is None]


def positional(gm: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
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


def _layer_shapes(an: Analysis) -> dict[str, LayerSlim]:
    out: dict[str, LayerSlim] = {}
    for layer in an.layers.values():
        w = an.weight(layer)
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


def slim(
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_rounds: int = 100,
    channel_multiple: int | None = None,
) -> GraphModule:
    """Remove dead units from ``model`` (a deep copy); return the slim module, with its
    :class:`~lobster_fx.passes.slim.report.SlimReport` in ``module.meta["lobster_slim"]``.

    ``example_inputs`` (a tensor, a tuple of positional arguments, or keyword
    arguments as ``torch.onnx.export`` takes them: a dict as the tuple's last
    item, or a dict alone; ``None`` for an unused optional argument, which a
    module traced here is traced without) are run to get shapes, the constants
    of dead units, and to check the result: after every round
    ``max|slim - orig| <= atol + rtol * max|orig|`` must hold for every output,
    else :class:`~lobster_fx.passes.slim.report.SlimError` is raised (a bug here, or a
    wrong :func:`~lobster_fx.passes.slim.register_elementwise` claim; never a silently
    wrong model). ``None`` follows the model's dtype: ``rtol`` is
    :func:`~lobster_fx.passes.slim.report.default_rtol` of the coarsest floating dtype
    among its parameters, buffers and outputs (``1e-5`` for float32, ``2**-4`` for
    bfloat16, ``2**-7`` for float16), ``atol`` is 0 (the check is relative to the
    output's scale already). Values passed explicitly are used as given.

    ``channel_multiple`` (default ``None``: :data:`DEFAULT_CHANNEL_MULTIPLE` = 8)
    rounds the number of kept units of every slimmed channel group that a conv
    produces or reads up to a multiple of it, never above the group's original
    size, by keeping the first removable units (a kept dead unit is simply not
    removed, so the result is exact either way); ``1`` removes every removable unit.
    Groups of Linear layers only are not rounded. ONNX Runtime's x86 CPU provider
    runs convs with blocked NCHWc kernels (block 8 with AVX2, 16 with AVX-512) and
    skips convs whose channel counts do not fit the block, which made slim
    ResNet-18s with exact channel counts slower than dense ones; pass 16 for
    AVX-512 hosts. Measurements: benchmarks/RESULTS.md.

    ``model`` must not have masks: slim reads the weights as they are, so on an
    instrumented model (masks not folded) it would see the raw weights and
    remove nothing. Pass ``lobster_fx.fold(gm)``; an instrumented model (also
    inside a DDP / DataParallel / ``torch.compile`` wrapper, or as a submodule)
    raises :class:`lobster_fx.passes.fold.MaskedModelError`, a ``ValueError``, before
    anything is copied. (``lobster_fx.export_onnx`` is the whole pipeline and folds
    by itself.)"""
    require_folded(model, "slim")
    multiple = _channel_multiple(channel_multiple)
    args, kwargs = split_inputs(example_inputs)
    gm = prepare_inference_graph(model, none_names(model, args, kwargs))
    inputs = positional(gm, args, kwargs)
    with torch.no_grad():
        # through the interpreter so that a failure names the node
        ref_out = Recorder(gm, set()).run(*inputs)
    ref = [t for t in tree_flatten(ref_out)[0] if isinstance(t, torch.Tensor)]
    if rtol is None:
        dtype = coarsest_float_dtype([*gm.parameters(), *gm.buffers(), *ref])
        rtol = default_rtol(dtype) if dtype is not None else RTOL_FLOOR
    atol = 0.0 if atol is None else atol
    params_before = count_params(gm)
    layers: dict[str, LayerSlim] | None = None
    rounds = 0
    worst = 0.0
    while True:
        an = Analysis(gm, inputs)
        if layers is None:
            layers = _layer_shapes(an)
        plan = an.plan(multiple)
        if not plan.keep or rounds >= max_rounds:
            break
        apply_plan(gm, an, plan)
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
    gm.meta[META_KEY] = SlimReport(
        params_before=params_before,
        params_after=count_params(gm),
        layers=layers or {},
        rounds=rounds,
        frozen=dict(an.frozen_by),
        max_rel_err=worst,
        channel_multiple=multiple,
        units_kept_for_alignment=plan.aligned,
        atol=float(atol),
        rtol=float(rtol),
    )
    return gm
