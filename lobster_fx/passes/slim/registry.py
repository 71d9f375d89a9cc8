"""The op registry: what slim knows about each op, as data.

Slim follows channels through the graph one node at a time. What a node does to them
is looked up in one table per kind of node (rewrites as data, in the style of tinygrad's
pattern tables), from the node's target to an :class:`OpRule`:

* ``call_module`` nodes: by module class (the nearest registered class in the MRO);
* ``call_function`` nodes: by the function object (``torch.relu``, ``operator.add``, ...);
* ``call_method`` nodes: by the method name (``"relu"``, ``"view"``, ...).

A rule's ``handler(analysis, node, module)`` returns the layout of the node's output
(:class:`~lobster_fx.passes.slim.layout.Layout`, or None when it carries no tracked
channels), :data:`~lobster_fx.passes.slim.layout.UNKNOWN` when it does not understand
the call (the channel groups of its inputs are then kept whole), or raises
:class:`~lobster_fx.passes.slim.layout.Unsupported` with the reason. Every op slim knows
is an entry here (:mod:`lobster_fx.passes.slim.ops` adds them); an op without an entry
freezes the channel groups it touches, with the reason in the report.

Users extend the table with :func:`register_elementwise` (a module class, a function
or a tensor method name that is channel-preserving: the same function of each element,
no per-channel state), e.g. a custom activation:

    >>> import torch
    >>> from torch import nn
    >>> from lobster_fx.passes.slim import op_rule, register_elementwise, unregister_elementwise
    >>> @register_elementwise
    ... class SquaredReLU(nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x) ** 2
    >>> op_rule(SquaredReLU).kind, op_rule(SquaredReLU).builtin
    ('elementwise', False)
    >>> op_rule(nn.ReLU).kind, op_rule(nn.ReLU).builtin, op_rule(torch.cat).kind
    ('elementwise', True, 'cat')
    >>> unregister_elementwise(SquaredReLU)
    >>> op_rule(SquaredReLU) is None
    True
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn
from torch.fx import Node

from lobster_fx.graph.trace import TRACE_THROUGH
from lobster_fx.passes.slim.layout import UNKNOWN, has_node

if TYPE_CHECKING:
    from lobster_fx.passes.slim.analysis import Analysis

__all__ = [
    "OpRule",
    "OpRegistry",
    "REGISTRY",
    "ELEMENTWISE",
    "register_elementwise",
    "unregister_elementwise",
    "op_rule",
]

#: ``handler(analysis, node, module)``; ``module`` is the called module of a ``call_module`` node, else None
Handler = Callable[["Analysis", Node, "nn.Module | None"], Any]
T = TypeVar("T")


@dataclass(frozen=True)
class OpRule:
    """What slim knows about one op. ``kind`` names the rule (``"elementwise"``,
    ``"binary"``, ``"cat"``, ``"batchnorm"``, ``"pool"``, ...); ``builtin`` is False for
    a user's entry."""

    kind: str
    handler: Handler
    builtin: bool = True

    def __repr__(self) -> str:
        return f"OpRule({self.kind!r}, {getattr(self.handler, '__name__', self.handler)}, builtin={self.builtin})"


def elementwise(an: Analysis, n: Node, module: nn.Module | None = None) -> Any:
    """Channel-preserving op of one tensor (its other arguments are constants): the output
    has the input's layout, and a constant channel stays constant."""
    x = n.args[0] if n.args else None
    if not isinstance(x, Node) or has_node(list(n.args[1:]) + list(n.kwargs.values())):
        return UNKNOWN
    return an.layout.get(x)


def _forward_owner(cls: type) -> type | None:
    """The class whose ``forward`` instances of ``cls`` run."""
    return next((c for c in cls.__mro__ if "forward" in vars(c)), None)


class OpRegistry:
    """Three tables from an op's target to its :class:`OpRule` (see the module docstring)."""

    def __init__(self) -> None:
        self.modules: dict[type, OpRule] = {}
        self.functions: dict[Callable, OpRule] = {}
        self.methods: dict[str, OpRule] = {}
        self._lock = threading.Lock()

    def _table(self, target: Any) -> dict:
        if isinstance(target, str):
            return self.methods
        if isinstance(target, type):
            return self.modules
        return self.functions

    def add(self, target: Any, rule: OpRule) -> None:
        """Enter ``rule`` for ``target`` (a module class, a function, or a method name).
        A target has one rule: a second, different one is refused."""
        with self._lock:
            table = self._table(target)
            old = table.get(target)
            if old is not None and old != rule:
                raise ValueError(f"{_describe(target)} already has a slim rule: {old}")
            table[target] = rule

    def remove(self, target: Any) -> OpRule | None:
        with self._lock:
            return self._table(target).pop(target, None)

    def get(self, target: Any) -> OpRule | None:
        """The entry for exactly ``target`` (no MRO lookup)."""
        try:
            return self._table(target).get(target)
        except TypeError:  # an unhashable target
            return None

    def class_rule(self, cls: type) -> OpRule | None:
        """The rule for instances of ``cls``: that of the nearest registered class in its MRO,
        if instances run that class's ``forward`` (a subclass that overrides ``forward``
        computes something else). A built-in rule also holds for torch.nn's own subclasses
        (SyncBatchNorm runs its own forward of _BatchNorm's)."""
        owner = _forward_owner(cls)
        if owner is None:
            return None
        for c in cls.__mro__:
            rule = self.modules.get(c)
            if rule is None:
                continue
            if issubclass(c, owner) or (rule.builtin and owner.__module__.startswith("torch.nn.")):
                return rule
            return None
        return None

    def module_rule(self, module: nn.Module) -> OpRule | None:
        if "forward" in vars(module):  # an instance attribute replaces the class's forward
            return None
        return self.class_rule(type(module))

    def node_rule(self, gm: nn.Module, n: Node) -> tuple[OpRule | None, nn.Module | None]:
        """The rule for node ``n`` of ``gm`` and, for a ``call_module`` node, the module."""
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            return self.module_rule(mod), mod
        if n.op == "call_function":
            return self.get(n.target) if not isinstance(n.target, (str, type)) else None, None
        if n.op == "call_method":
            return self.methods.get(n.target), None
        return None, None


#: the table slim reads; :mod:`lobster_fx.passes.slim.ops` enters the built-in ops
REGISTRY = OpRegistry()

#: the rule :func:`register_elementwise` enters
ELEMENTWISE = OpRule("elementwise", elementwise, builtin=False)


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return f"tensor method {target!r}"
    return getattr(target, "__qualname__", None) or repr(target)


def _check_target(target: Any) -> None:
    if isinstance(target, nn.Module):
        raise TypeError(
            f"register_elementwise takes a module class, not an instance: "
            f"register_elementwise({type(target).__name__}) (type(module))")
    if isinstance(target, str):
        if not target.isidentifier():
            raise ValueError(f"register_elementwise: {target!r} is not a method name")
    elif isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_elementwise: class {target.__qualname__} is not an nn.Module subclass")
        if issubclass(target, TRACE_THROUGH):
            raise ValueError(
                f"register_elementwise: {target.__qualname__} is a layer (Linear / Conv / Embedding), "
                "not an elementwise op")
    elif not callable(target):
        raise TypeError(
            "register_elementwise takes an nn.Module subclass, a function or a tensor method name, "
            f"got {type(target).__name__} {target!r}")
    old = op_rule(target)
    if old is not None and old.kind != "elementwise":
        raise ValueError(f"register_elementwise: {_describe(target)} is a built-in {old.kind!r} op of slim")


def register_elementwise(target: T) -> T:
    """Declare ``target`` channel-preserving, so slim removes units across it.

    ``target`` is an ``nn.Module`` subclass (a user's activation; usable as a class
    decorator), a function (a ``call_function`` target: a torch op slim does not know,
    such as ``torch.erf``, or a function kept whole in the graph with ``torch.fx.wrap``),
    or a tensor method name (``"erf"``, for ``x.erf()``). Returns ``target``.

    *Channel-preserving* means the same function of every element: the output has the
    input's shape, element ``i`` depends only on input element ``i``, and the module has
    no per-channel state. A registered module class matches its instances wherever they
    are in the graph: called as a module (a leaf, e.g. one that writes its own buffers),
    or traced through (the nodes FX recorded inside that call, found by their
    ``nn_module_stack``, are taken as one op of one tensor; its parameters and buffers must
    be scalars; a graph rebuilt from code, e.g. unpickled, has no ``nn_module_stack``, so
    there its ops are seen one by one). A subclass matches if it does not override ``forward``.

    A plain Python function is traced through by FX, so slim sees its ops rather than the
    function; registering it only helps where it is a node of its own. Registering a wrong
    claim is caught by slim's output check (:class:`~lobster_fx.passes.slim.SlimError`),
    not a silently wrong model.

    Raises ``TypeError`` for anything else (a module instance: pass its class) and
    ``ValueError`` for a layer class or an op slim already knows as something else
    (``torch.cat``, ``operator.add``, ``nn.BatchNorm2d``, ``"view"``, ...). Registering
    an elementwise op again does nothing.
    """
    _check_target(target)
    if REGISTRY.get(target) is None:
        REGISTRY.add(target, ELEMENTWISE)
    return target


def unregister_elementwise(target: Any) -> None:
    """Remove a user's :func:`register_elementwise` entry (``ValueError`` for a built-in
    op or a target that is not registered)."""
    rule = REGISTRY.get(target)
    if rule is None:
        raise ValueError(f"unregister_elementwise: {_describe(target)} is not registered")
    if rule.builtin:
        raise ValueError(f"unregister_elementwise: {_describe(target)} is a built-in op of slim")
    REGISTRY.remove(target)


def op_rule(target: Any) -> OpRule | None:
    """The rule slim uses for ``target``: a module class (MRO lookup, as for a module of
    that class in a graph), a function, or a tensor method name; None if slim does not
    know it (it then keeps the channel groups the op touches whole)."""
    if isinstance(target, type):
        return REGISTRY.class_rule(target)
    return REGISTRY.get(target)


def user_class_rule(cls: Any) -> OpRule | None:
    """The rule of a user's (non built-in) elementwise class entry that applies to ``cls``."""
    if not inspect.isclass(cls):
        return None
    rule = REGISTRY.class_rule(cls)
    return rule if rule is not None and not rule.builtin and rule.kind == "elementwise" else None
