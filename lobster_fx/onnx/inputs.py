"""The example inputs: their forms, their checks, and which ONNX input each one is.

``export_onnx`` takes example inputs as ``torch.onnx.export`` does: a tensor, a tuple of
positional inputs (``None`` for an unused optional argument; a trailing dict for keyword
inputs) or a dict of keyword inputs. :func:`_as_example` checks them and splits them into
an :class:`_Example`. When they do not run through the model, :func:`_run_example` says
why in one sentence: the input whose dtype or device is not the model's, else the layer
that failed and the input shape it expects (:func:`_locate_failure` finds it).

Example::

    >>> import torch
    >>> from lobster_fx.onnx.inputs import _as_example, _run_example
    >>> ex = _as_example((torch.zeros(2, 3), {"mask": None}), None)
    >>> [label for label, _ in ex.tensors()], ex.kwargs
    (['input 0'], {'mask': None})
    >>> _run_example(torch.nn.Sequential(torch.nn.Linear(4, 2)), _as_example(torch.zeros(2, 3), None))
    Traceback (most recent call last):
    ValueError: example_inputs of shape (2, 3) do not run through Sequential: layer '0' (Linear) expects input of shape (*, 4) but got (2, 3) [...]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Example:
    """The example inputs: positional ``args`` and keyword ``kwargs``, each a tensor or
    ``None`` (an unused optional argument: not an input of the ONNX graph)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, model: Any) -> Any:
        return model(*self.args, **self.kwargs)

    def in_signature_order(self, model: Any) -> _Example:
        """The keyword inputs in the order of ``model.forward``'s arguments (the legacy
        exporter orders graph inputs so, and the dynamo exporter names the ONNX inputs of a
        GraphModule wrongly when its keyword inputs come in another order: measured, torch
        2.14, a slimmed model fed by input name disagreed with torch). Wrappers (DDP,
        ``torch.compile``) are looked through."""
        import inspect

        from lobster_fx.graph.instrument import unwrap

        try:
            order = {name: k for k, name in enumerate(inspect.signature(unwrap(model).forward).parameters)}
        except (TypeError, ValueError):
            return self
        keys = sorted(self.kwargs, key=lambda k: order.get(k, len(order)))
        return _Example(self.args, {k: self.kwargs[k] for k in keys})

    def map(self, fn: Callable[[Any], Any]) -> _Example:
        """A copy with ``fn`` applied to every tensor."""
        f = lambda v: None if v is None else fn(v)
        return _Example(tuple(f(v) for v in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def tensors(self) -> list[tuple[str, Any]]:
        """``(label, tensor)`` of every tensor input, in the order ``torch.onnx`` makes them
        graph inputs (positional, then keyword in the order given); labels are
        ``input 0`` / ``input 'attention_mask'``."""
        out = [(f"input {i}", t) for i, t in enumerate(self.args) if t is not None]
        return out + [(f"input {k!r}", t) for k, t in self.kwargs.items() if t is not None]

    def names(self, model: Any) -> list[str | None]:
        """The ``forward`` argument name of each tensor of :meth:`tensors` (``None`` where
        ``model.forward``'s signature does not say)."""
        import inspect

        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        names: list[str | None] = []
        for i, t in enumerate(self.args):
            if t is not None:
                p = params[i] if i < len(params) and params[i].kind in (
                    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else None
                names.append(p.name if p is not None else None)
        return names + [k for k, t in self.kwargs.items() if t is not None]

    def for_slim(self) -> tuple[Any, ...]:
        """The inputs in the form :func:`lobster_fx.passes.slim.slim` takes (a trailing dict = kwargs)."""
        return (*self.args, self.kwargs) if self.kwargs else self.args

    def dynamic_shapes(self, model: Any, batched: Callable[[Any], bool], dim: Any) -> Any:
        """``torch.export`` dynamic shapes: ``{0: dim}`` for each batched tensor, else None;
        a tuple for positional inputs, a dict by argument name once there are keyword ones."""
        spec = lambda v: {0: dim} if v is not None and batched(v) else None
        if not self.kwargs:
            return tuple(spec(v) for v in self.args)
        import inspect

        sig = inspect.signature(model.forward)
        bound = sig.bind(*self.args, **self.kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                out[name] = tuple(spec(v) for v in value)
            elif kind == inspect.Parameter.VAR_KEYWORD:
                out[name] = {k: spec(v) for k, v in value.items()}
            else:
                out[name] = spec(value)
        return out


def _as_example(example_inputs: Any, kwargs: dict[str, Any] | None) -> _Example:
    """Check and split the example inputs as ``torch.onnx.export`` takes them: a tensor,
    a tuple / list (its last item a dict of keyword inputs when ``kwargs`` is not given),
    or a dict of keyword inputs alone; ``None`` marks an unused optional argument."""
    import torch

    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of keyword inputs, got {type(kwargs).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kw: dict[str, Any] = {}
    elif isinstance(example_inputs, dict):
        if kwargs:
            raise TypeError("example_inputs is a dict of keyword inputs and kwargs is given too: pass them once")
        args, kw = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kw = tuple(example_inputs), {}
        if args and isinstance(args[-1], dict) and not kwargs:
            args, kw = args[:-1], dict(args[-1])  # torch.onnx.export's convention
        if not args and not kw and not kwargs:
            raise ValueError("example_inputs is empty: pass a tensor or a tuple of tensors")
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors (None for an unused optional "
            f"argument; a dict as the last item for keyword inputs) or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}"
        )
    if kwargs:
        kw = dict(kwargs)
    for key in kw:
        if not isinstance(key, str):
            raise TypeError(f"keyword input names must be strings, got {key!r}")
    example = _Example(args, kw)
    where = [(f"input {i}", v) for i, v in enumerate(args)] + [(f"input {k!r}", v) for k, v in kw.items()]
    for label, v in where:
        if v is not None and not isinstance(v, torch.Tensor):
            raise TypeError(
                f"example_inputs: {label} is a {type(v).__name__}; each input must be a tensor, "
                "or None for an unused optional argument"
            )
    if not example.tensors():
        raise ValueError("example_inputs has no tensor: pass at least one input tensor")
    return example


def _shape(t: Any) -> str:
    import torch

    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _expected_input(mod: Any, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The input shape a layer wants, from the module or the functional call's weight."""
    import torch
    from torch import nn

    if isinstance(mod, nn.Linear):
        return f"(*, {mod.in_features})"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return f"(N, {mod.in_channels}, {', '.join('*' * len(mod.kernel_size))})"
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        return f"(N, {mod.num_features}, ...)"
    if isinstance(mod, nn.LayerNorm):
        return f"(*, {', '.join(map(str, mod.normalized_shape))})"
    if isinstance(mod, nn.Embedding):
        return f"integer indices < {mod.num_embeddings}"
    fname = getattr(target, "__name__", "")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if not isinstance(weight, torch.Tensor):
        return None
    if fname == "linear" and weight.dim() == 2:
        return f"(*, {weight.shape[1]})"
    if fname.startswith("conv") and not fname.startswith("conv_t") and weight.dim() >= 3:
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        spatial = ", ".join("*" * (weight.dim() - 2))
        return f"(N, {weight.shape[1] * int(groups)}, {spatial})"
    return None


@dataclass
class _Failure:
    layer: str
    kind: str
    got: str
    expected: str | None
    #: the layer's input and weight, where known (to tell a dtype / device clash from a shape one)
    input: Any = None
    weight: Any = None


def _layer_weight(mod: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The weight of a failing layer: the module's, or a functional call's second argument."""
    import torch

    w = getattr(mod, "weight", None) if mod is not None else (args[1] if len(args) > 1 else kwargs.get("weight"))
    return w if isinstance(w, torch.Tensor) else None


def _locate_failure(model: Any, inputs: _Example) -> _Failure | None:
    """Re-run ``model`` instrumented to find the innermost layer that raised.

    Module hooks find failing submodules; for GraphModules an Interpreter also
    catches functional calls (``F.linear`` on a traced-through weight), whose
    layer is taken from ``node.meta["nn_module_stack"]``.
    """
    import torch

    entered: list[tuple[str, Any, tuple[Any, ...]]] = []
    node_failure: dict[str, Any] = {}

    def pre(name: str):
        def hook(mod, args):
            entered.append((name, mod, args))

        return hook

    def post(mod, args, out):
        if entered:
            entered.pop()

    class _Interp(torch.fx.Interpreter):
        def run_node(self, n):  # type: ignore[override]
            try:
                return super().run_node(n)
            except Exception:
                if "node" not in node_failure:
                    try:
                        args, kwargs = self.fetch_args_kwargs_from_env(n)
                    except Exception:  # noqa: BLE001
                        args, kwargs = (), {}
                    node_failure.update(node=n, args=args, kwargs=kwargs)
                raise

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            if isinstance(model, torch.fx.GraphModule):
                from lobster_fx.passes.slim.entry import positional as _positional

                _Interp(model).run(*_positional(model, inputs.args, inputs.kwargs))
            else:
                inputs.call(model)
    except Exception:  # noqa: BLE001 - we only want to know where
        pass
    else:
        return None
    finally:
        for h in handles:
            h.remove()
    if entered:
        name, mod, args = entered[-1]
        got = _shape(args[0]) if args else "no input"
        return _Failure(name, type(mod).__name__, got, _expected_input(mod, None, args, {}),
                        args[0] if args else None, _layer_weight(mod, (), {}))
    if node_failure:
        n = node_failure["node"]
        args, kwargs = node_failure["args"], node_failure["kwargs"]
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            path, typ = list(stack.values())[-1]
            kind = getattr(typ, "__name__", str(typ).rsplit(".", 1)[-1])
            layer = path
        else:
            layer, kind = n.name, str(getattr(n.target, "__name__", n.target))
        mod = None
        if n.op == "call_module":
            mod = model.get_submodule(n.target)
        first = args[0] if args else None
        return _Failure(layer, kind, _shape(first), _expected_input(mod, n.target, args, kwargs),
                        first, _layer_weight(mod, args, kwargs))
    return None


_DTYPE_METHOD = {"float32": "float()", "float16": "half()", "float64": "double()", "bfloat16": "bfloat16()"}


def _dtype_str(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _input_mismatches(model: Any, inputs: _Example) -> list[str]:
    """The example's dtype / device clashes with ``model``, each said in one sentence.

    A floating input must have the floating dtype of the model's parameters (integer
    inputs are indices, for embeddings); every input must be on the model's device.
    Only checked when the model's parameters agree on one dtype / one device."""
    params = list(model.parameters())
    floats = {p.dtype for p in params if p.is_floating_point()}
    devices = {t.device for t in (*params, *model.buffers())}
    out: list[str] = []
    for (label, t), name in zip(inputs.tensors(), inputs.names(model)):
        var = name if label.startswith("input '") else "x"
        if len(devices) == 1:
            (device,) = devices
            if t.device != device:
                to = "cpu()" if device.type == "cpu" else f"to({str(device)!r})"
                out.append(f"{label} is on {t.device} but the model is on {device}: pass {var}.{to}")
                continue
        if t.is_floating_point() and len(floats) == 1:
            (dtype,) = floats
            if t.dtype != dtype:
                method = _DTYPE_METHOD.get(_dtype_str(dtype), f"to({dtype})")
                out.append(f"{label} is {_dtype_str(t.dtype)} but the model's parameters are "
                           f"{_dtype_str(dtype)}: pass {var}.{method}")
    return out


def _layer_mismatch(where: _Failure) -> str | None:
    """The failing layer's input vs weight dtype / device clash, if that is what it is."""
    import torch

    x, w = where.input, where.weight
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return None
    if x.device != w.device:
        return f"its weight is on {w.device} but its input is on {x.device}"
    if x.is_floating_point() and w.is_floating_point() and x.dtype != w.dtype:
        return f"its weight is {_dtype_str(w.dtype)} but its input is {_dtype_str(x.dtype)}"
    return None


def _run_example(model: Any, inputs: _Example) -> Any:
    """Run the example through ``model``; a ValueError naming the cause if it fails: the
    input whose dtype or device does not match the model's, else the layer and the
    shape it expects."""
    import torch

    try:
        with torch.no_grad():
            return inputs.call(model)
    except Exception as e:  # noqa: BLE001 - every failure here means "bad example_inputs"
        where = _locate_failure(model, inputs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        cause = f" [{type(e).__name__}: {first}]"
        mismatches = _input_mismatches(model, inputs)
        layer_mismatch = _layer_mismatch(where) if where is not None else None
        if mismatches or layer_mismatch:
            msg = f"example_inputs do not run through {type(model).__name__}: "
            if mismatches:
                msg += "; ".join(mismatches)
                msg += f" (layer {where.layer!r} ({where.kind}) failed)" if where is not None else ""
            else:  # a model of mixed dtypes / devices: the failing layer says it
                msg += f"layer {where.layer!r} ({where.kind}) failed: {layer_mismatch}"
            raise ValueError(msg + cause) from e
        given = ", ".join(f"{label.removeprefix('input ')}={_shape(t)}" if label.startswith("input '") else _shape(t)
                          for label, t in inputs.tensors())
        msg = f"example_inputs of shape {given} do not run through {type(model).__name__}"
        if where is not None:
            msg += f": layer {where.layer!r} ({where.kind})"
            if where.expected:
                msg += f" expects input of shape {where.expected} but got {where.got}"
            else:
                msg += f" failed on input of shape {where.got}"
        raise ValueError(msg + cause) from e


def _flatten_outputs(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    return []


def _batched(inputs: _Example) -> Callable[[Any], bool]:
    """Which tensors have the batch dimension: those whose first dim is the first
    tensor's (none if that one is 0-d)."""
    first = inputs.tensors()[0][1]
    if not first.dim():
        return lambda t: False
    return lambda t: t.dim() >= 1 and t.shape[0] == first.shape[0]


def _input_names(model: Any, inputs: _Example, exporter: str) -> list[str | None]:
    """The ONNX graph input name of each tensor of ``inputs.tensors()``: the ``forward``
    argument names for keyword / None inputs (the dynamo exporter names inputs after
    them; the torchscript path passes them); ``input`` / ``input_<i>`` for the
    torchscript exporter's positional tensors, as always; None where unknown (the
    parity check then feeds by position)."""
    n = len(inputs.tensors())
    if exporter == "torchscript" and not inputs.kwargs and None not in inputs.args:
        return [f"input_{i}" for i in range(n)] if n > 1 else ["input"]
    return inputs.names(model)


def _match_inputs(graph_inputs: Sequence[Any], given: Sequence[tuple[str | None, Any]]) -> list[tuple[Any, Any]]:
    """Pair the ONNX graph inputs (objects with ``.name``) with the example tensors: by
    name when the names are the same set, else by position."""
    names = [n for n, _ in given]
    if None not in names and sorted(names) == sorted(g.name for g in graph_inputs):
        by_name = dict(given)
        return [(g, by_name[g.name]) for g in graph_inputs]
    return list(zip(graph_inputs, (t for _, t in given)))
