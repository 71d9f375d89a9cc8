"""SeReNe: whole units shrink by how little the network depends on them (issue 15).

At every ``optimizer.step()``, for every prunable Linear / Conv unit ``n`` (a row of a Linear
weight, an output channel of a conv: :func:`lobster_fx.graph.taps.find_units`)::

    W[n] <- W[n] - lmbda * relu(1 - S_n) * W[n]

on top of the optimizer's own update, decoupled like LOBSTER's eq. (6) (the term is computed
from ``w_{t-1}``; with plain SGD ``w_t = w_{t-1} - eta * g - lmbda * relu(1 - S_n) * w_{t-1}``).
The term applies to the unit's weight (and its bias with ``include_bias=True``; off by default,
as in the authors' code); every other masked parameter is only pinned. The plumbing (final
gradient, ``GradScaler`` skipped steps, weight-reading optimizers, pinning, bfloat16 / float16
stochastic rounding, one rule per optimizer, ``state_dict``) is
:class:`~lobster_fx.methods.base.StepRule`'s.

Sensitivity ``S_n`` (one value per unit; per output channel for convs, not one scalar per
layer as in the authors' code):

* ``sensitivity="output"`` (the paper's "lower bound")::

      S_n = (1 / C) * mean over the batch and spatial positions of |d(sum_k y_k) / d z_n|

  ``y`` the model's output (``output_fn(output)`` for models that return several tensors),
  ``C = y.numel() / y.shape[0]`` its values per sample, ``z_n`` the unit's output before its
  activation (before a BatchNorm that follows it), from the same forward as the loss. The
  absolute value is taken per sample and position, then averaged (signs of different samples
  do not cancel); the mean (not the sum) over the batch keeps ``S`` independent of the batch
  size; the ``1 / C`` makes it a mean over outputs: ``S_n`` is then a lower bound, by the
  triangle inequality, of the "full" variant ``(1/C) sum_k |dy_k / dz_n|`` (C backwards), and
  of the same order as ``|dy/dz|`` for any number of classes, so that ``relu(1 - S_n)``
  gates with the paper's scale (``S_n >= 1``: no shrink). This is the paper's
  formula (issue 15), written from the formula, not from the authors' code (which collapses conv sensitivities to one scalar). ``y`` is
  summed over the whole batch, as the authors do: with BatchNorm in training mode the batch
  statistics couple the samples, and ``d(sum y)/dz`` is the whole batch's.

  Cost: one extra backward per training forward, from ``y`` to the unit outputs only (no
  weight gradients): a forward hook on the instrumented module calls
  ``torch.autograd.grad(y, z's, grad_outputs=ones, retain_graph=True)`` when the forward
  returns (training mode, gradients enabled), so the user's loop is unchanged:
  ``opt.zero_grad(); loss = f(model(x)); loss.backward(); opt.step()``, no ``retain_graph``.
  The ``z``'s are taken as gradient edges when the taps see them, so an in-place activation
  after the layer (``ReLU(inplace=True)``) does not turn ``z`` into its activation. The extra
  backward does not touch ``.grad`` and fires no DDP hook, but tensor hooks registered on
  intermediate tensors by other code (another tap listener on gradients) see it.

* ``sensitivity="loss"``: ``S_n = |m_n|``, ``m_n`` the signed mean over the batch and
  positions of ``dL/dz_n`` (from the taps during the user's own backward: no extra cost),
  optionally smoothed across steps, ``m <- momentum * m + (1 - momentum) * m_step``
  (``momentum=0``, the default: the step's own value; the authors' unused variant used 0.9).
  Under a ``GradScaler`` ``dL/dz`` is scaled: pass ``scaler=`` and it is divided by
  ``scaler.get_scale()`` at the step. Note: with a mean-reduced
  loss ``dL/dz`` is small, so this variant gates weakly; it is here to be measured.

Gradient accumulation: every training forward (``"output"``) or backward (``"loss"``) since
the last step adds its per-unit value; the step uses their mean, and starts a new mean. A step
skipped by a ``GradScaler`` never reaches the optimizer, so its micro-batches count towards the
next step's mean. A unit with no value since the last step gets no term at that step.

Step cost: ``"output"`` pays one backward from ``y`` to the unit outputs per training forward
(for convs it computes every conv's input gradient), ``"loss"`` only per-unit means of
``dL/dz``; figures will be in ``benchmarks/RESULTS.md`` (``benchmarks/methods.py``, issue 15). A
``torch.compile``-d model runs the hooks (with graph breaks) and gives the eager result
(``tests/test_serene.py``, ``aot_eager``; inductor checked by hand).

DDP: pass the ``DistributedDataParallel`` wrapper as ``gm``. The sums and counts are
all-reduced over its process group before the term is computed (one all-reduce per step),
so every rank applies the same sensitivity: the mean over all ranks' micro-batches.

Example::

    >>> import torch, lobster_fx
    >>> from lobster_fx.methods import SeReNe
    >>> gm = lobster_fx.instrument(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
    ...                                                 torch.nn.Linear(3, 2)))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    >>> rule = SeReNe(gm, opt, lmbda=1e-4)
    >>> gm(torch.randn(8, 4)).square().mean().backward()  # the loop as usual
    >>> opt.step()
    >>> rule.steps, sorted(rule.last_sensitivity)
    (1, ['0', '2'])
    >>> rule.last_sensitivity["2"]  # the logits: d(sum y)/dz = 1, C = 2
    tensor([0.5000, 0.5000])
    >>> rule.remove()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lobster_fx.graph.instrument import MaskedParam, unwrap
from lobster_fx.graph.taps import Taps, UnitTap, find_units, install_taps, per_unit, remove_taps
from lobster_fx.graph.trace import LobsterGraphModule
from lobster_fx.methods.base import StepRule
from lobster_fx.pruning.checks import check_flag, check_real

__all__ = ["SeReNe", "SENSITIVITIES"]

SENSITIVITIES = ("output", "loss")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (bfloat16 / float16 gradients under autocast; float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _inert(*args: Any) -> None:
    return None


def _make_inert() -> Callable[..., None]:
    return _inert


class _ModuleHook:
    """A forward (pre-)hook running ``rule.<method>`` for the rule's own module only. A copy or a
    pickle of the module gets an inert hook: it neither drags the rule (and its optimizer) along
    nor records into the original rule."""

    def __init__(self, rule: SeReNe, method: str) -> None:
        self._rule, self._method = weakref.ref(rule), method

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        rule = self._rule()
        if rule is None or module is not rule.gm:
            return None
        return getattr(rule, self._method)(module, *args)

    def __reduce__(self) -> tuple:
        return _make_inert, ()


def _graph_output_is_structured(root: nn.Module) -> bool:
    """True when a traced graph of ``root`` returns a tuple / list / dict rather than one value."""
    if not isinstance(root, LobsterGraphModule):
        return False
    for graph in root.mode_graphs.values():
        for node in graph.nodes:
            if node.op == "output" and isinstance(node.args[0], (tuple, list, dict)):
                return True
    return False


class SeReNe(StepRule):
    """Apply the SeReNe term ``lmbda * relu(1 - S_n) * W[n]`` at every ``optimizer.step()``.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument`, or a DDP wrapper of one
            (then the sensitivities are all-reduced over its process group).
        optimizer: any ``torch.optim.Optimizer`` holding (some of) ``gm``'s prunable parameters.
        lmbda: the strength (not scaled by the learning rate), >= 0.
        sensitivity: ``"output"`` (default) or ``"loss"``: see the module docstring.
        output_fn: ``output_fn(model_output) -> tensor``, the ``y`` of the output
            sensitivity, for models that do not return one tensor.
        include_bias: shrink the unit's bias with the same factor too (default False).
        momentum: ``"loss"`` only: smoothing of ``m_n`` across steps, in ``[0, 1)``.
        scaler: ``"loss"`` only: the ``torch.amp.GradScaler`` scaling the loss, to unscale ``dL/dz``.
        seed: seeds the stochastic rounding of bfloat16 / float16 parameters (the base's).

    Attributes:
        last_sensitivity: ``{layer: S}`` (one value per unit) used at the last step.

    ``remove()`` detaches the optimizer hooks, the forward hooks and the tap listeners (and the
    taps themselves if this rule installed them and nothing else listens); do it before
    ``fold`` / ``slim`` / ``export_onnx``. ``state_dict()`` holds the base's ``lmbda``, step
    count and seed, the options, and the ``"loss"`` momentum state.

    Raises:
        TypeError: ``gm`` is not instrumented, ``output_fn`` is not callable, an argument
            has the wrong type.
        ValueError: ``lmbda < 0``, unknown ``sensitivity``, ``momentum`` out of range, no
            prunable Linear / Conv unit in ``gm``, a model whose traced output is a
            tuple / list / dict and no ``output_fn``, or the base's refusals. A refused
            construction leaves the model and the optimizer as they were (no hook, no tap).
    """

    term_name = "SeReNe"

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float = 1e-4, *,
                 sensitivity: str = "output", output_fn: Callable[[Any], torch.Tensor] | None = None,
                 include_bias: bool = False, momentum: float = 0.0, scaler: Any = None,
                 seed: int = 0) -> None:
        who = type(self).__name__
        # every check before anything is attached: a refusal changes nothing
        self._check_lmbda(lmbda)
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"{who}: sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"{who}: output_fn must be a callable output -> tensor, got {output_fn!r}")
        self.include_bias = check_flag(include_bias, "include_bias", who)
        self.momentum = check_real(momentum, "momentum", who, minimum=0, below=1)
        if sensitivity == "output" and (momentum or scaler is not None):
            raise ValueError(f"{who}: momentum and scaler apply to sensitivity='loss' only")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"{who}: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        root = unwrap(gm)
        units = find_units(root)  # TypeError if gm is not instrumented
        if not units:
            raise ValueError(f"{who}: the model has no prunable Linear / Conv unit (a layer whose weight "
                             "lobster_fx.instrument masked, in a traced graph): nothing to regularise")
        if sensitivity == "output" and output_fn is None and _graph_output_is_structured(root):
            raise ValueError(f"{who}: the model returns several values, not one tensor; pass "
                             "output_fn=lambda out: <the output tensor> to choose the y of d(sum y)/dz")
        self.sensitivity = sensitivity
        self.output_fn = output_fn
        self.scaler = scaler
        self._units = units
        self._unit_of_param = {u.weight: name for name, u in units.items()}
        if self.include_bias:
            self._unit_of_param.update({u.bias: name for name, u in units.items() if u.bias is not None})
        self._group = None
        if isinstance(gm, nn.parallel.DistributedDataParallel):
            self._group = gm.process_group
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._edges: list[tuple[str, int, Any]] = []
        self._ema: dict[str, torch.Tensor] = {}
        self._step_sens: dict[str, torch.Tensor] = {}
        self.last_sensitivity: dict[str, torch.Tensor] = {}
        self._listeners: list[Any] = []
        self._module_hooks: list[Any] = []
        self._taps: Taps | None = None
        self._installed_taps = False
        super().__init__(gm, optimizer, lmbda, fused=False, seed=seed)
        try:
            self._attach(root)
        except BaseException:
            self.remove()
            raise

    # --- listening --------------------------------------------------------------------------

    def _attach(self, root: nn.Module) -> None:
        self._installed_taps = not any(isinstance(v, UnitTap) for m in root.modules() for v in vars(m).values())
        self._taps = install_taps(root)
        for name, tap in self._taps.items():
            self._listeners.append(tap.on_output(self._listener(name)))
        if self.sensitivity == "output":
            self._module_hooks.append(root.register_forward_pre_hook(_ModuleHook(self, "_clear_edges")))
            self._module_hooks.append(root.register_forward_hook(_ModuleHook(self, "_output_backward")))

    def _recording(self) -> bool:
        return self.gm.training and torch.is_grad_enabled()

    def _listener(self, name: str) -> Callable[[torch.Tensor, UnitTap], None]:
        if self.sensitivity == "output":
            def keep_edge(z: torch.Tensor, tap: UnitTap) -> None:
                if self._recording() and z.requires_grad:
                    self._edges.append((name, tap.channel_dim, torch.autograd.graph.get_gradient_edge(z)))
            return keep_edge

        def hook_grad(z: torch.Tensor, tap: UnitTap) -> None:
            if self._recording() and z.requires_grad:
                cd = tap.channel_dim
                z.register_hook(lambda g: self._add(name, per_unit(_wide(g.detach()), cd).mean(1)))
        return hook_grad

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.double()
        self._sums[name] = value if name not in self._sums else self._sums[name] + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def _clear_edges(self, module: nn.Module, args: Any) -> None:
        self._edges = []

    def _output_backward(self, module: nn.Module, args: Any, output: Any) -> None:
        edges, self._edges = self._edges, []
        if not edges:
            return
        y = self.output_fn(output) if self.output_fn is not None else output
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"SeReNe: the model's output is a {type(y).__name__}, not a tensor"
                            + (" (from output_fn)" if self.output_fn is not None else
                               "; pass output_fn=lambda out: <the output tensor>"))
        if y.dim() == 0 or not y.requires_grad:
            if y.dim() == 0:
                raise ValueError("SeReNe: the model's output y is a scalar; d(sum y)/dz needs a batch dim")
            return
        c = y.numel() // max(y.shape[0], 1)
        with torch.enable_grad():
            grads = torch.autograd.grad(y, [e for _, _, e in edges], grad_outputs=torch.ones_like(y),
                                        retain_graph=True, allow_unused=True)
        with torch.no_grad():
            for (name, cd, _), g in zip(edges, grads):
                if g is None:  # z does not reach y: S = 0
                    self._add(name, torch.zeros(self._units[name].count))
                else:
                    self._add(name, per_unit(_wide(g), cd).abs().mean(1) / c)

    # --- the step -----------------------------------------------------------------------------

    def applies_to(self, info: MaskedParam) -> bool:
        return info.name in self._unit_of_param

    @torch.no_grad()
    def _finalize(self) -> dict[str, torch.Tensor]:
        """This step's ``S`` per layer: the mean since the last step (over all DDP ranks)."""
        names = list(self._units)
        if self._group is not None and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size(self._group) > 1:
            dev = next((s.device for s in self._sums.values()), None)
            if dev is None:
                dev = next(self.gm.parameters()).device
            flat = torch.cat([self._sums[n].to(dev) if n in self._sums else
                              torch.zeros(self._units[n].count, dtype=torch.float64, device=dev)
                              for n in names]
                             + [torch.tensor([float(self._counts.get(n, 0)) for n in names],
                                             dtype=torch.float64, device=dev)])
            torch.distributed.all_reduce(flat, group=self._group)
            sums, counts, i = {}, {}, 0
            for n in names:
                sums[n] = flat[i:i + self._units[n].count]
                i += self._units[n].count
            for j, n in enumerate(names):
                counts[n] = int(flat[i + j].item())
        else:
            sums, counts = self._sums, self._counts
        out: dict[str, torch.Tensor] = {}
        for n in names:
            if not counts.get(n):
                continue
            v = sums[n] / counts[n]
            if self.sensitivity == "loss":
                if self.scaler is not None:
                    v = v / float(self.scaler.get_scale())
                if self.momentum:
                    if n in self._ema:
                        v = self.momentum * self._ema[n].to(v) + (1 - self.momentum) * v
                    self._ema[n] = v.clone()
                v = v.abs()
            out[n] = v  # float64 until the term: the unit's dtype decides the rounding
        return out

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
        if found_inf is None or float(found_inf) == 0.0:
            self._step_sens = self._finalize()
            self.last_sensitivity = {n: s.float() for n, s in self._step_sens.items()}
        super()._before_step(optimizer, args, kwargs)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            super()._after_step(optimizer, args, kwargs)
        finally:
            self._sums, self._counts, self._step_sens = {}, {}, {}

    def unit_term(self, name: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``lmbda * relu(1 - S_n)`` for the unit owning parameter ``name`` (0 without a measured ``S``)."""
        s = self._step_sens.get(self._unit_of_param[name])
        if s is None:
            return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return torch.relu(1 - s.to(device=w.device, dtype=w.dtype)) * self.lmbda

    def shrink_(self, params, grads, grad_scale, out, names) -> None:
        """Before a weight-free update: ``W[n] *= 1 - lmbda * relu(1 - S_n)``, in place (one pass;
        the base's default builds the term in a new parameter-sized tensor, then subtracts it)."""
        for w, name in zip(params, names):
            factor = 1 - self.unit_term(name, w, w)
            w.mul_(factor.reshape((-1,) + (1,) * (w.dim() - 1)))

    # --- lifecycle ----------------------------------------------------------------------------

    def remove(self) -> None:
        super().remove()
        for h in self._listeners + self._module_hooks:
            h.remove()
        self._listeners, self._module_hooks, self._edges = [], [], []
        taps, self._taps = self._taps, None
        if taps is not None and self._installed_taps and \
                all(not (t._output_fns or t._grad_fns) for t in taps.values()):
            remove_taps(self.gm)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(sensitivity=self.sensitivity, include_bias=self.include_bias, momentum=self.momentum,
                     ema={n: v.detach().cpu().clone() for n, v in self._ema.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        who = f"{type(self).__name__}.load_state_dict"
        for key in ("sensitivity", "include_bias"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"{who}: the state has {key}={state[key]!r}, this rule {key}="
                                 f"{getattr(self, key)!r}; build the rule with the same {key}")
        momentum = check_real(state.get("momentum", self.momentum), "momentum", who, minimum=0, below=1)
        ema = state.get("ema", {})
        unknown = sorted(set(ema) - set(self._units))
        if unknown:
            raise ValueError(f"{who}: the state has sensitivities of layers this model lacks: {unknown}")
        super().load_state_dict(state)
        self.momentum = momentum
        self._ema = {n: v.clone() for n, v in ema.items()}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", sensitivity={self.sensitivity!r})"
