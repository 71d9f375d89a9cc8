"""Tracing stage: turn an arbitrary ``nn.Module`` into FX graphs, one per mode.

Two facts shape this module (both measured):

* Tracing *through* Linear / Conv / Embedding keeps outputs bit-identical and
  makes every weight a ``get_attr`` node, so the mask rewrite is uniform.
  Normalisation layers and ``MultiheadAttention`` stay leaf modules.
* ``symbolic_trace`` bakes ``self.training`` into the graph. We therefore trace
  in train *and* eval mode and :class:`LobsterGraphModule` switches between the
  two graphs on ``.train()`` / ``.eval()``, exactly like the original module.

Code that does not trace does not stop us: :func:`trace_model` falls back to
tracing the children that do trace and keeps the rest as ordinary modules (their
parameters are masked at module level by the instrument pass).

Example::

    >>> import torch
    >>> from lobster_fx.graph.trace import trace_model
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    >>> gm = trace_model(m).module
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'get_attr', 'get_attr', 'call_function', 'call_module', 'output']
"""

from __future__ import annotations

import collections
import copy
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.graph_module import _copy_attr, _forward_from_src

from lobster_fx.graph.state_keys import _external_keys_hook, _internal_keys_hook, _missing_masks_hook

__all__ = [
    "TRACE_THROUGH",
    "LobsterTracer",
    "LobsterGraphModule",
    "TraceSummary",
    "trace_model",
    "is_original_leaf",
]

#: torch.nn modules that are traced into (their weight becomes a ``get_attr``).
TRACE_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
)


class LobsterTracer(torch.fx.Tracer):
    """FX tracer that traces through the prunable torch.nn layers.

    ``extra_leaves`` are module *instances* to keep as leaves (used by the
    fallback for children whose code does not trace).
    """

    def __init__(self, extra_leaves: set[int] | None = None) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves or set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.extra_leaves:
            return True
        if isinstance(m, TRACE_THROUGH) and type(m).__module__.startswith("torch.nn"):
            # NonDynamicallyQuantizableLinear etc. live in torch.nn too: trace them
            return False
        return super().is_leaf_module(m, module_qualified_name)


# ``forward`` of a two-mode LobsterGraphModule: the mode's generated code, chosen at call time
_DISPATCH_SRC = """
def forward(self, *args, **kwargs):
    if self.training:
        return self._lobster_forward_train(*args, **kwargs)
    return self._lobster_forward_eval(*args, **kwargs)
"""


# set while the outermost LobsterGraphModule._apply runs: nested ones leave the re-tying to it
_APPLYING = threading.local()


class LobsterGraphModule(GraphModule):
    """A GraphModule holding one graph per training mode.

    ``.train()`` / ``.eval()`` switch ``self.graph`` to the graph traced in that
    mode, so code that reads ``self.training`` (stochastic depth, auxiliary
    heads) behaves as in the original module. When both modes trace to the same
    code only one graph is kept.
    """

    def __init__(
        self,
        root: nn.Module,
        graphs: dict[bool, Graph],
        class_name: str = "GraphModule",
        training: bool | None = None,
    ) -> None:
        training = root.training if training is None else training
        super().__init__(root, graphs[training], class_name)
        self.training = training
        for g in graphs.values():
            if g is graphs[training]:
                continue
            for node in g.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
            g.owning_module = self
        self._lobster_graphs = dict(graphs)
        if graphs[True] is not graphs[False]:
            self.recompile()  # GraphModule.__init__ compiled the active graph only
        # no-ops unless meta["lobster_keys"] is set (instrument does on its result)
        self._register_state_dict_hook(_external_keys_hook)
        self._register_load_state_dict_pre_hook(_internal_keys_hook, with_module=True)
        self.register_load_state_dict_post_hook(_missing_masks_hook)

    @property
    def mode_graphs(self) -> dict[bool, Graph]:
        """The graph per mode (``True`` = train). May hold the same graph twice."""
        return self._lobster_graphs

    def set_mode_graph(self, mode: bool, graph: Graph) -> None:
        """Replace the graph used in ``mode`` and recompile."""
        graph.owning_module = self
        self._lobster_graphs[mode] = graph
        if mode == self.training:
            self._graph = graph
        self.recompile()

    def drop_mode(self, keep: bool) -> None:
        """Keep only the graph of mode ``keep`` (used by inference-only passes)."""
        g = self._lobster_graphs[keep]
        self._lobster_graphs = {True: g, False: g}
        self._graph = g
        self.recompile()

    def recompile_all(self) -> None:
        """Lint and recompile after the graphs were edited in place."""
        for g in {id(g): g for g in self._lobster_graphs.values()}.values():
            g.lint()
        self.recompile()

    def recompile(self) -> Any:
        """Generate one ``forward`` per mode, and a ``forward`` that picks one at call time.

        Switching modes never regenerates code: a new code object per switch made
        ``torch.compile`` compile again at every ``.train()`` / ``.eval()`` without bound,
        and a switch recompiled every nested graph. Now dynamo guards on
        ``self.training`` and holds one graph per mode (``tests/test_trace.py`` counts them).
        """
        graphs = self.__dict__.get("_lobster_graphs")
        if graphs is None or graphs[True] is graphs[False]:
            self.__dict__.pop("_lobster_mode_code", None)
            if graphs is not None:
                self._graph = graphs[True]
            return super().recompile()
        cls = type(self)
        per_mode: dict[bool, tuple] = {}
        # the inactive mode first: GraphModule.recompile (last) leaves the active one's code,
        # line map and __call__ wrapper in place, and recompiles the submodules once
        for mode in (not self.training, self.training):
            self._graph = graphs[mode]
            python_code = super().recompile()
            per_mode[mode] = (cls.forward, self._code, self._lineno_map, self._prologue_start)
        cls._lobster_forward_train = per_mode[True][0]
        cls._lobster_forward_eval = per_mode[False][0]
        dispatch = _forward_from_src(_DISPATCH_SRC, {}, None)  # a code object of its own per module
        dispatch.__signature__ = inspect.signature(per_mode[True][0])
        cls.forward = dispatch
        self._lobster_mode_code = {mode: code[1:] for mode, code in per_mode.items()}
        return python_code

    def train(self, mode: bool = True) -> LobsterGraphModule:
        super().train(mode)
        self.sync_mode_graph()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> LobsterGraphModule:
        """``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.double()``, ``to_empty()``), keeping
        buffers that one tensor holds in several modules one tensor.

        ``nn.Module._apply`` converts each module's buffers on their own, so a mask shared by a
        graph and a tied use's parametrization (``MaskedParam.also_masked_in``) became two
        tensors after ``.to()``: pruning then cleared only one of them. The outermost
        LobsterGraphModule of the call does this (nested ones just convert)."""
        if getattr(_APPLYING, "active", False) or not recurse:
            return super()._apply(fn, recurse)
        places: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in self.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    places.setdefault(id(buf), []).append((mod, name))
        shared = [group for group in places.values() if len(group) > 1]
        _APPLYING.active = True
        try:
            out = super()._apply(fn, recurse)
        finally:
            _APPLYING.active = False
        for (first, first_name), *others in shared:
            for mod, name in others:
                mod._buffers[name] = first._buffers[first_name]
        return out

    def to_empty(self, *, device: Any, recurse: bool = True) -> LobsterGraphModule:
        """``nn.Module.to_empty``, then every mask reset to ones (not pruned).

        ``to_empty`` leaves every tensor uninitialised, the masks included, and a checkpoint
        of the original model (no masks) loads while masks stay as they are: without the reset
        they would hold whatever memory they got, and the outputs be silently wrong. Loading a
        checkpoint of the instrumented model afterwards restores its masks as usual. Call it
        on the instrumented module itself: a wrapper's ``to_empty`` (``torch.compile``) would
        bypass this reset."""
        out = super().to_empty(device=device, recurse=recurse)
        info = self.meta.get("lobster")
        if info is not None:
            with torch.no_grad():
                for entry in info.params.values():
                    self.get_buffer(entry.mask_path).fill_(1)
        return out

    def sync_mode_graph(self) -> None:
        """Make ``self.graph`` (and ``self.code``) the ones of ``self.training``.

        ``forward`` already picks the mode's code at call time, whatever set ``.training``;
        this only keeps the inspected graph in step. No code is generated."""
        graphs = self.__dict__.get("_lobster_graphs")
        if graphs is None or graphs[self.training] is self._graph:
            return
        self._graph = graphs[self.training]
        code = self.__dict__.get("_lobster_mode_code")
        if code is None:  # not compiled per mode yet
            self.recompile()
        else:
            self._code, self._lineno_map, self._prologue_start = code[self.training]

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles the code of one graph only: pickle one plain
        # GraphModule per mode (sharing tensors) and rebuild both graphs on load
        per_mode = {}
        for mode in (True, False):
            g = self._lobster_graphs[mode]
            if mode is False and g is self._lobster_graphs[True]:
                per_mode[False] = per_mode[True]
                continue
            per_mode[mode] = GraphModule(self, g, class_name=type(self).__name__)
            g.owning_module = self  # GraphModule() took ownership of the shared graph
        return (_rebuild_lobster_graph_module, (per_mode[True], per_mode[False], self.training, self.meta))

    def __deepcopy__(self, memo: dict[int, Any]) -> LobsterGraphModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        fake = torch.fx.graph_module._CodeOnlyModule(copy.deepcopy(self.__dict__, memo))
        graphs = fake.__dict__["_lobster_graphs"]
        LobsterGraphModule.__init__(res, fake, graphs, training=self.training)
        for attr in ("_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            if attr in self.__dict__:
                setattr(res, attr, copy.deepcopy(self.__dict__[attr], memo))
        # plain attributes copied from the original submodule (``_trace_subtree``), which
        # opaque parent code may read (RAFT: ``self.update_block.hidden_state_size``);
        # GraphModule.__init__ keeps only what the graph references
        for k, v in fake.__dict__.items():
            if not k.startswith("_") and isinstance(v, _SIMPLE) and k not in res.__dict__:
                setattr(res, k, v)
        res.meta = copy.deepcopy(getattr(self, "meta", {}), memo)
        return res


def _rebuild_lobster_graph_module(
    train_gm: GraphModule, eval_gm: GraphModule, training: bool, meta: dict
) -> LobsterGraphModule:
    for node in eval_gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _copy_attr(eval_gm, train_gm, node.target)
    graphs = {True: train_gm.graph, False: train_gm.graph if eval_gm is train_gm else eval_gm.graph}
    res = LobsterGraphModule(train_gm, graphs, class_name=type(train_gm).__name__, training=training)
    res.meta = meta
    return res


@dataclass
class TraceSummary:
    """Where tracing worked. ``traced`` / ``opaque`` are module qualified names
    ("" is the root); ``errors`` maps an opaque module to why it did not trace."""

    traced: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = []
        for q in self.traced:
            lines.append(f"  traced  {q or '<root>'}")
        for q in self.opaque:
            lines.append(f"  opaque  {q or '<root>'}: {self.errors.get(q, '')}")
        return "trace summary:\n" + "\n".join(lines)


@dataclass
class TraceResult:
    module: GraphModule
    summary: TraceSummary
    #: ids of modules of the *original* model that the result still calls as
    #: opaque Python code (their own parameters need module-level masking)
    opaque_modules: dict[str, nn.Module] = field(default_factory=dict)


def _set_modes(model: nn.Module, mode: bool) -> None:
    for m in model.modules():
        m.training = mode


def _trace_both_modes(
    model: nn.Module,
    extra_leaves: set[int],
    concrete_args: dict[str, Any] | None = None,
    proxy_buffers: bool = False,
) -> dict[bool, Graph]:
    """Trace ``model`` in train and eval mode; restores every module's flag.

    A module whose code writes into its own buffers while it runs (a norm layer's running
    statistics and ``num_batches_tracked``, whoever wrote the class) cannot be traced into:
    the trace runs that code once on the real buffers (the write never enters the graph, and
    the model's buffers change), and ``momentum=None`` would bake the trace-time average
    factor into the graph. Such modules are found by the writes they make while tracing
    (buffer version counters), their buffers are put back, and they are traced again as leaf
    modules. TraceError if ``model`` itself writes into its own buffers.
    """
    saved = [(m, m.training) for m in model.modules()]
    extra_leaves = set(extra_leaves)
    graphs: dict[bool, Graph] = {}
    try:
        for mode in (True, False):
            _set_modes(model, mode)
            while True:
                with _BufferWriteGuard(model) as writes:
                    tracer = LobsterTracer(extra_leaves)
                    tracer.proxy_buffer_attributes = proxy_buffers
                    graph = tracer.trace(model, concrete_args=concrete_args)
                if not writes.owners:
                    break
                if any(owner is model for owner in writes.owners):
                    raise torch.fx.proxy.TraceError(
                        f"{type(model).__name__}.forward writes into its own buffers "
                        f"({', '.join(writes.names)}): kept as an opaque module"
                    )
                extra_leaves |= {id(owner) for owner in writes.owners}
            _fresh_list_args(graph)
            graphs[mode] = graph
    finally:
        for m, t in saved:
            m.training = t
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        graphs[False] = graphs[True]
    return graphs


class BufferWriteError(RuntimeError):
    """Tracing wrote into a buffer too large to have been copied: the model was changed."""


#: buffers up to this many elements are copied before a trace, to be put back if written
SNAPSHOT_MAX_NUMEL = 1 << 22


def _named_buffer_slots(model: nn.Module):
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, b in mod._buffers.items():
            if b is not None:
                yield mod_name, mod, attr, b


class _BufferWriteGuard:
    """Within the block, note every buffer of ``model`` written in place, and put it back.

    ``owners`` are the modules owning the written buffers, ``names`` their qualified names.
    Version counters see every in-place write through the tensor (not through ``.data``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.owners: list[nn.Module] = []
        self.names: list[str] = []

    def __enter__(self) -> _BufferWriteGuard:
        self._before = []
        for mod_name, mod, attr, b in _named_buffer_slots(self.model):
            # large buffers (rotary caches, attention masks) are not copied: code that writes
            # them while running is not a norm layer, and it gets a clear error below
            value = b.detach().clone() if b.numel() <= SNAPSHOT_MAX_NUMEL else None
            self._before.append((mod_name, mod, attr, b, b._version, value))
        return self

    def __exit__(self, *exc: object) -> None:
        seen: set[int] = set()
        for mod_name, mod, attr, b, version, value in self._before:
            if b._version == version:
                continue
            if id(b) not in seen:
                seen.add(id(b))
                if value is None:
                    raise BufferWriteError(
                        f"lobster_fx: tracing ran code that wrote into buffer {mod_name}.{attr} "
                        f"({type(mod).__name__}, {b.numel()} elements), too large to put back; "
                        "keep that module out of tracing (pass a model whose forward does not write it)"
                    )
                with torch.no_grad():
                    b.copy_(value)
            if all(o is not mod for o in self.owners):
                self.owners.append(mod)
            self.names.append(f"{mod_name}.{attr}" if mod_name else attr)
        self._before = []


def _fresh_list_args(graph: Graph) -> None:
    """Pass a fresh ``list(...)`` where a traced call to a non-torch function
    takes a list literal.

    FX stores list arguments as ``immutable_list`` and ``fx.Interpreter`` (used
    by torch.export and by our slim pass) hands them to the function as they
    are, so a ``torch.fx.wrap``-ed helper that edits its list argument in place
    (torchvision's Swin3D ``_get_window_and_shift_size``) raises
    ``'immutable_list' object does not support mutation`` there, although the
    generated code (which builds a new list per call) runs. Torch ops never
    edit their list arguments and are left alone.
    """
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        mod = getattr(node.target, "__module__", None) or ""
        if mod == "torch" or mod.startswith("torch.") or mod in ("_operator", "operator", "builtins", "math"):
            continue
        if node.target is call_opaque:
            continue

        def fresh(a: Any) -> Any:
            if isinstance(a, list):
                with graph.inserting_before(node):  # noqa: B023 (called at once, in this iteration)
                    return graph.call_function(list, (a,))
            return a

        node.args = tuple(fresh(a) for a in node.args)
        node.kwargs = {k: fresh(v) for k, v in node.kwargs.items()}


def is_original_leaf(obj: object, original: nn.Module) -> bool:
    return any(obj is m for m in original.modules())


_SIMPLE = (int, float, str, bool, tuple, type(None))


def call_opaque(fn: Any, args: tuple, star_args: tuple, kwargs: dict, star_kwargs: dict) -> Any:
    """``fn(*args, *star_args, **kwargs, **star_kwargs)``: how the graph of an opaque
    root whose ``forward`` takes ``*args`` / ``**kwargs`` calls it (an FX node
    cannot splat its arguments)."""
    if not isinstance(star_kwargs, dict):
        # fx.Interpreter (slim, export diagnostics) feeds a ``**kwargs`` placeholder the
        # leftover positional arguments as a list: none are left after ``*args``
        if star_kwargs:
            raise TypeError(f"{type(fn).__name__}.forward got too many positional arguments")
        star_kwargs = {}
    return fn(*args, *star_args, **kwargs, **star_kwargs)


def _wrap_opaque_root(module: nn.Module) -> LobsterGraphModule:
    """A one-call graph calling ``module``: the root's own code does not trace.

    The graph's ``forward`` has the signature of ``module.forward``, ``*args``
    and ``**kwargs`` included (Hugging Face models take ``**kwargs``). Without
    ``*args``, arguments reach ``module`` by keyword, as users call such models:
    Hugging Face's input-checking decorators put ``use_cache`` into ``kwargs``
    and fail on "multiple values" when it also came positionally."""
    sig = inspect.signature(module.forward)
    by_keyword = not any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    g = Graph()
    args, kwargs = [], {}
    star_args = star_kwargs = None
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            star_args = g.placeholder("*" + p.name)
        elif p.kind is p.VAR_KEYWORD:
            star_kwargs = g.placeholder("**" + p.name)
        else:
            default = () if p.default is p.empty else (p.default,)
            node = g.placeholder(p.name, default_value=p.default if default else inspect.Signature.empty)
            if p.kind is p.KEYWORD_ONLY or (by_keyword and p.kind is p.POSITIONAL_OR_KEYWORD):
                kwargs[p.name] = node
            else:
                args.append(node)
    if star_args is None and star_kwargs is None:
        out = g.call_module("opaque", tuple(args), kwargs)
    else:
        fn = g.get_attr("opaque")
        out = g.call_function(
            call_opaque,
            (fn, tuple(args), () if star_args is None else star_args, kwargs, {} if star_kwargs is None else star_kwargs),
        )
    g.output(out)
    holder = nn.Module()
    holder.opaque = module
    holder.training = module.training
    return LobsterGraphModule(holder, {True: g, False: g})


def _shallow_copy_module(m: nn.Module) -> nn.Module:
    """New module object sharing parameters and buffers with ``m``."""
    memo = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
    return copy.deepcopy(m, memo)


def trace_model(model: nn.Module) -> TraceResult:
    """Trace ``model`` for both modes, falling back to traceable subtrees.

    The result shares parameters and buffers with ``model``; ``model`` itself is
    never modified (opaque modules are copied, sharing their tensors).
    """
    summary = TraceSummary()
    opaque: dict[str, nn.Module] = {}
    result = _trace_subtree(model, "", summary, opaque)
    if not isinstance(result, GraphModule):
        result = _wrap_opaque_root(result)
        opaque = {("opaque." + k if k else "opaque"): v for k, v in opaque.items()}
    return TraceResult(result, summary, opaque)


def _ops(graph: Graph) -> collections.Counter:
    """The operations of a graph (a multiset: reads of buffers may move), ignoring
    inputs and FX's ``_assert_is_none`` guards."""
    return collections.Counter(
        (n.op, str(n.target))
        for n in graph.nodes
        if n.op not in ("placeholder", "output") and getattr(n.target, "__name__", "") != "_assert_is_none"
    )


def _none_defaults(module: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [
        p.name for p in sig.parameters.values()
        if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _check_none_branches(module: nn.Module, graphs: dict[bool, Graph]) -> None:
    """TraceError if the code of ``module`` depends on whether an argument defaulting
    to None is None (``if position_ids is None: ...``).

    FX passes a proxy for every argument, so ``x is None`` is always False while
    tracing and the graph silently keeps only the not-None branch; a parent that
    calls the module without the argument would then fail (or compute something
    else). Such a module is left opaque (its children are traced) instead. Only
    used for submodules reached by the fallback: the root is called by the user,
    who gets the whole-model trace.
    """
    for name in _none_defaults(module):
        try:
            specialised = _trace_both_modes(module, set(), concrete_args={name: None}, proxy_buffers=True)
        except Exception:  # noqa: BLE001 - the code cannot run with None there: the proxy graph is right
            continue
        # the proxy graph again with buffers as proxies, so the two compare like with like
        proxied = _trace_both_modes(module, set(), proxy_buffers=True)
        for mode in (True, False):
            if _ops(specialised[mode]) != _ops(proxied[mode]):
                raise torch.fx.proxy.TraceError(
                    f"{type(module).__name__}.forward branches on whether {name!r} is None "
                    "(a traced graph would keep one branch only)"
                )


def _trace_subtree(module: nn.Module, qual: str, summary: TraceSummary, opaque: dict) -> nn.Module:
    try:
        graphs = _trace_both_modes(module, set())
        if qual:
            _check_none_branches(module, graphs)
        gm = LobsterGraphModule(module, graphs, class_name=type(module).__name__)
        summary.traced.append(qual)
        return gm
    except BufferWriteError:
        raise  # the model was changed: no fallback can hide that
    except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
        summary.opaque.append(qual)
        summary.errors[qual] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    shell = _shallow_copy_module(module)
    for name, child in list(module.named_children()):
        cq = f"{qual}.{name}" if qual else name
        if not any(True for _ in child.parameters()):
            continue
        new_child = _trace_subtree(child, cq, summary, opaque)
        if isinstance(new_child, GraphModule):
            for k, v in vars(child).items():
                if isinstance(v, _SIMPLE) and not k.startswith("_") and k not in new_child.__dict__:
                    setattr(new_child, k, v)
        setattr(shell, name, new_child)
    opaque[qual] = shell
    return shell
