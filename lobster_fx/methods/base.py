"""Per-step rules: a term applied to the prunable weights at every ``optimizer.step()``.

:class:`StepRule` holds the plumbing every such method shares, written once; a method
(:class:`~lobster_fx.methods.lobster.Lobster`, :class:`~lobster_fx.methods.l2.L2`, ...) supplies
only its term, ``delta``, and the update is ``w <- w - delta`` on top of the optimizer's own:

* an elementwise term, :meth:`StepRule.term` ``(w, g) -> delta`` (LOBSTER:
  ``lmbda * w * relu(1 - |g|)``), or
* a per-unit term, :meth:`StepRule.unit_term` ``(name, w, g) -> factors``: one factor per
  output unit (a row of a Linear weight, a filter of a conv, an entry of a bias), and
  ``delta[n] = factors[n] * w[n]`` (SeReNe: ``lmbda * relu(1 - S_n)``).

The plumbing:

* The term needs the *final* gradient of a step (after gradient accumulation, after the
  DDP all-reduce, after ``GradScaler`` unscaled it), which exists when ``optimizer.step()``
  starts: an optimizer step pre-hook computes the term from ``w_{t-1}`` and ``g``, a
  post-hook subtracts it from whatever the optimizer produced (with plain SGD,
  ``w_t = w_{t-1} - eta * g - delta``). When the optimizer's update does not read the weights
  (SGD, Adam, AdamW, RMSprop, ... with ``weight_decay=0``) the sum is the same if the pre-hook
  subtracts the term from ``w_{t-1}`` in place, which it then does: one pass, and no
  parameter-sized buffer kept across the step.
* ``GradScaler``: a skipped step never calls ``optimizer.step()``, so the rule is skipped too;
  a fused optimizer, which gets still-scaled gradients, sees ``optimizer.grad_scale`` /
  ``found_inf``, and so does the rule (the term gets the unscaled gradient).
* Pinning: the post-hook sets pruned entries (mask 0) back to exactly zero, whatever the
  optimizer did (momentum, weight decay and Adam would move them).
* Overhead: parameters are resolved once (looking up string paths at every step costs a
  visible share of a small model's step), the eager path runs ``_foreach`` passes over all parameters at once and may reuse
  gradient-shaped scratch buffers across steps; a method with compiled kernels
  (:class:`FusedKernels`) runs one or two ``torch.compile``-generated passes per parameter.
* bfloat16 / float16 parameters: at ``lmbda=1e-4`` a shrinking term is below half an ulp of
  ``w`` (bf16: ``2**-9 |w|``, fp16: ``2**-12 |w|``), so ``w - delta`` rounded to nearest is
  ``w`` and the weights would never shrink. For those parameters the term is computed in
  float32 and the new value rounded to the parameter's dtype *stochastically* (up with
  probability equal to the distance from the lower neighbour in ulps), so every step moves
  the weight like float32 in expectation. Stochastic rounding rather than a float32 residual
  per parameter (error feedback): the residual would cost 4 bytes per weight for good, it
  would have to be checkpointed, and it goes stale whenever weights change outside the rule
  (pruning, plateau rollbacks, a loaded checkpoint); rounding stochastically keeps nothing
  but a seed. The random bits come from a generator owned by the rule and re-seeded at every
  step from ``(seed, steps)``: every DDP rank draws the same bits without communicating, and
  a run resumed from ``state_dict()`` rounds exactly like an uninterrupted one. Half
  parameters take the eager path even with ``fused=True`` (a compiled kernel cannot take a
  generator), one slice of ``HALF_CHUNK_NUMEL`` elements at a time (a per-unit term: one
  whole parameter at a time, since its factors need whole units). Its cost per step is
  measured by ``benchmarks/half_rule_cost.py`` (see ``benchmarks/RESULTS.md``).
* ``state_dict()`` / ``load_state_dict()`` (``lmbda``, the step count, the seed), ``remove()``.
* One rule per optimizer: a second rule (of any :class:`StepRule` class) on an optimizer that
  already has one attached over some of the same parameters would apply two terms per step,
  so it is refused until the first is ``remove()``-d; a rule on *another* optimizer holding
  the same parameters is allowed but warns.

A method in a few lines (``lmbda`` is the rule's strength; ``seed`` and ``fused`` are the base's)::

    >>> import torch, lobster_fx
    >>> from lobster_fx.methods.base import StepRule
    >>> class Shrink(StepRule):
    ...     term_name = "shrink"
    ...     def term(self, w, g):
    ...         return w * self.lmbda
    >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    >>> rule = Shrink(gm, opt, lmbda=0.5)
    >>> w0 = gm.get_parameter("weight").detach().clone()
    >>> gm(torch.randn(8, 4)).sum().backward()
    >>> opt.step()
    >>> torch.allclose(gm.get_parameter("weight"), 0.5 * w0), rule.steps
    (True, 1)
"""

from __future__ import annotations

import gc
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from lobster_fx.graph.instrument import (
    MaskedParam,
    is_dtensor,
    lobster_info,
    mask_has_zeros,
    masked_parameters,
    unwrap,
)
from lobster_fx.methods.rounding import _step_seed, _stochastic_round
from lobster_fx.pruning.checks import check_real

__all__ = ["StepRule", "FusedKernels", "FUSE_MIN_NUMEL"]

# fused=None compiles the rule when the prunable parameters hold at least this many
# elements: below it the first step's compile (seconds) costs more than the rule itself
FUSE_MIN_NUMEL = 1 << 20
# the eager rule keeps its scratch buffers across steps up to this many elements (4 MB in float32)
SCRATCH_MAX_NUMEL = 1 << 20
# bfloat16 / float16 parameters are rounded in slices of this many elements: their float32 and
# random temporaries (~20 bytes per element) stay under ~80 MB however large one parameter is
HALF_CHUNK_NUMEL = 1 << 22


# parameters in these dtypes get the term in float32 and stochastic rounding (module docstring)
_LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})


# optimizers whose update reads the gradient and their own state but not the weight, as long
# as weight_decay is 0: subtracting the term from w_{t-1} in place before their step gives the
# same sum (to rounding), in one pass and without a parameter-sized buffer kept across the step
_WEIGHT_FREE_UPDATES = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)


def _update_reads_weights(optimizer: torch.optim.Optimizer) -> bool:
    # exact types: a subclass may override step()
    if type(optimizer) not in _WEIGHT_FREE_UPDATES:
        return True
    return any(group.get("weight_decay", 0) != 0 for group in optimizer.param_groups)


# every StepRule whose hooks are on an optimizer (remove() takes it out). Weak: a rule dropped
# together with its optimizer leaves by itself. Used to refuse a second rule on one optimizer
_ATTACHED: weakref.WeakSet[StepRule] = weakref.WeakSet()


def _attached_rules() -> list[StepRule]:
    return [rule for rule in list(_ATTACHED) if rule._handles]


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _compile_private(fn):
    # dynamo's cache (and its recompile limit of 8) is per code object: a private copy per
    # rule keeps models in one process from evicting each other's kernels
    code = fn.__code__.replace()
    fresh = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(fresh, fullgraph=True, dynamic=False)


class FusedKernels(NamedTuple):
    """A method's ``torch.compile``-able kernels (plain functions of tensors: ``lmbda`` arrives
    as a 0-dim tensor, since a Python float would be baked into the graph and a changing
    lambda would recompile until dynamo's limit gives up).

    * ``shrink(params, grads, grad_scale, lmbda)``: the term subtracted in place (weight-free update).
    * ``terms(params, grads, grad_scale) -> pending``: the term before a weight-reading update,
      in the same form as :meth:`StepRule.terms` returns (the eager apply may take it over).
    * ``apply(params, pending, masks, lmbda)``: the pending term applied after the update, and
      every mask multiplied in (pinning), in one pass.
    """

    shrink: Callable[..., None]
    terms: Callable[..., list[torch.Tensor]]
    apply: Callable[..., None]


class StepRule:
    """Apply a method's term to ``gm``'s prunable weights at every ``optimizer.step()``.

    A method subclasses it and implements :meth:`term` (elementwise) or :meth:`unit_term`
    (per unit); optionally :meth:`applies_to` (which parameters get the term; all are pinned),
    the batch hooks :meth:`terms` / :meth:`apply_terms_` / :meth:`shrink_` (for speed), and
    ``fused_kernels``. ``term_name`` names the term in messages.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument` (or a DDP /
            ``torch.compile`` wrapper of one).
        optimizer: any ``torch.optim.Optimizer`` holding (some of) ``gm``'s
            prunable parameters; the rule touches those only.
        lmbda: the rule's strength, a float >= 0 (0: no term; the rule only pins).
        fused: ``True`` runs the method's ``fused_kernels`` (compiled at the first step; if
            compiling fails the rule warns once and runs eagerly; ``rule.fused`` says which
            path runs); ``False`` the eager passes; ``None`` (default) fuses when the method
            has kernels and the prunable parameters hold at least ``FUSE_MIN_NUMEL`` elements.
        seed: seeds the stochastic rounding of bfloat16 / float16 parameters (with the step
            count, at every step). The same on every DDP rank, so the default 0 needs no
            communication.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, ``gm`` is not instrumented, or
            ``lmbda`` / ``seed`` has the wrong type; the message names the argument.
        ValueError: ``lmbda`` is negative or not finite, ``fused`` is not True / False /
            None (or True for a method without kernels), the optimizer holds none of
            ``gm``'s prunable parameters, or it already has a rule over them.
    """

    #: names the term in messages ("a second rule would apply the LOBSTER term twice")
    term_name = "rule's"
    #: the method's compiled kernels, or None: the eager path only
    fused_kernels: FusedKernels | None = None
    #: the eager batch hooks get gradient-shaped buffers kept across steps (``out``)
    uses_scratch = False

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float, *,
                 fused: bool | None = None, seed: int = 0) -> None:
        who = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{who} expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._unit = type(self).unit_term is not StepRule.unit_term
        if type(self).term is StepRule.term and not self._unit:
            raise TypeError(f"{who} defines no term: a StepRule implements term() or unit_term()")
        self.gm = unwrap(gm)
        self.lmbda = self._check_lmbda(lmbda)
        self.seed = self._check_seed(seed)
        in_optimizer = self._optimizer_param_ids(optimizer)
        infos = list(lobster_info(self.gm).params.values())
        applies = {info.name: bool(self.applies_to(info)) for info in infos}
        mine = {id(p): info.name for info, p, _ in masked_parameters(self.gm)
                if id(p) in in_optimizer and applies[info.name]}
        if not mine:
            raise ValueError(
                "the optimizer holds none of the instrumented model's prunable parameters; "
                "build it from gm.parameters() of the module returned by lobster_fx.graph.instrument"
            )
        sharded = [info.name for info, p, _ in masked_parameters(self.gm) if is_dtensor(p)]
        if sharded:
            raise NotImplementedError(
                f"{who} does not support FSDP / DTensor-sharded parameters yet ({sharded[0]!r} is a DTensor): "
                "its masks are plain tensors. Use DistributedDataParallel (see examples/ddp_torchrun.py)"
            )
        if fused not in (None, True, False):
            raise ValueError(f"{who}: fused must be True, False or None (auto), got {fused!r}")
        if fused and self.fused_kernels is None:
            raise ValueError(f"{who}: fused=True, but this rule has no fused kernels; use fused=False or None")
        self._refuse_a_second_rule(optimizer, mine)
        self.optimizer = optimizer
        # (owner module, parameter name, mask owner, mask name, name, term applies): resolved once,
        # because string paths cost ~0.3 ms per step on LeNet-300; dict lookups on the owners stay
        # right after .to(device) / load_state_dict, which replace tensors but not modules
        self._slots = [self._slot(info, applies[info.name]) for info in infos]
        self._membership: tuple[tuple, set[int]] = ((), set())
        self.steps = 0
        self._pending: tuple | None = None
        self._scratch: tuple[tuple, list[torch.Tensor] | None] = ((), None)
        numel = sum(p.numel() for _, p, _ in masked_parameters(self.gm))
        # decided once: above the cap the eager rule allocates per step and builds no per-step key
        self._keep_scratch = self.uses_scratch and numel <= SCRATCH_MAX_NUMEL
        if fused is None:
            fused = self.fused_kernels is not None and numel >= FUSE_MIN_NUMEL
        self.fused = bool(fused)
        self._kernels: dict[str, Any] = {}  # compiled on first use
        self._lmbda_cache: tuple[Any, torch.Tensor | None] = (None, None)
        self._generators: dict[torch.device, torch.Generator] = {}  # for half params, one per device
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        _ATTACHED.add(self)

    # --- what a method supplies -------------------------------------------------------------

    def term(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The elementwise term ``delta`` (a new tensor shaped like ``w``): ``w <- w - delta``.

        ``w`` is ``w_{t-1}``, ``g`` the step's final, unscaled gradient (both float32 for
        bfloat16 / float16 parameters, and then possibly a flat slice of the parameter: the
        term must be elementwise). Must not modify ``w`` or ``g``."""
        raise NotImplementedError

    def unit_term(self, name: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-unit term: one factor per output unit (``w.shape[0]`` of them: rows of a Linear
        weight, filters of a conv, entries of a bias), ``delta[n] = factors[n] * w[n]``.

        ``name`` is the parameter's name in the original model (a key of
        :func:`lobster_fx.masks`), ``w`` / ``g`` the whole parameter and its final, unscaled
        gradient (float32 for bfloat16 / float16 parameters). Must not modify ``w`` or ``g``."""
        raise NotImplementedError

    def applies_to(self, info: MaskedParam) -> bool:
        """Whether the term applies to this prunable parameter (asked once, inside
        ``StepRule.__init__``: set what it reads before calling it; default: all). Parameters
        it does not apply to are still pinned."""
        return True

    def terms(self, params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
              out: list[torch.Tensor] | None, names: list[str]) -> list[torch.Tensor]:
        """The term of every parameter before the optimizer's update, in the form
        :meth:`apply_terms_` takes after it (default: ``delta``; a method overriding one
        overrides both). ``grads`` are still multiplied by ``grad_scale`` when it is not
        None. ``out``: buffers shaped like ``grads`` kept across steps (``uses_scratch``), or
        None; the result may be written into them, never into ``params`` or ``grads``."""
        if grad_scale is not None:
            grads = [g / grad_scale for g in grads]
        if self._unit:
            return [w * self.unit_term(name, w, g).reshape((-1,) + (1,) * (w.dim() - 1))
                    for w, g, name in zip(params, grads, names)]
        return [self.term(w, g) for w, g in zip(params, grads)]

    def apply_terms_(self, params: list[torch.Tensor], pending: list[torch.Tensor]) -> None:
        """Apply what :meth:`terms` returned, in place (default: ``w -= delta``)."""
        torch._foreach_sub_(params, pending)

    def shrink_(self, params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                out: list[torch.Tensor] | None, names: list[str]) -> None:
        """The term subtracted from ``params`` in place, before a weight-free update."""
        self.apply_terms_(params, self.terms(params, grads, grad_scale, out, names))

    # --- the refusal of a second rule ---------------------------------------------------------

    def _shared_with(self, other: StepRule, mine: dict[int, str]) -> list[str]:
        """Names of the parameters in ``mine`` (id -> name) that ``other`` applies its term to."""
        theirs = self._optimizer_param_ids(other.optimizer)
        return [mine[id(p)] for p_owner, p_name, _, _, _, applies in other._slots if applies
                for p in (p_owner._parameters[p_name],) if id(p) in mine and id(p) in theirs]

    def _refuse_a_second_rule(self, optimizer: torch.optim.Optimizer, mine: dict[int, str]) -> None:
        """ValueError if a rule is attached to ``optimizer`` over some of the same parameters
        (two terms per step); a warning if one is attached to another optimizer over them.
        Runs before any hook is registered: a refusal changes nothing."""
        who = type(self).__name__
        found = self._attached_over(mine, optimizer, same=True)
        if found:
            other, shared = found
            twice = (f"the {self.term_name} term twice" if type(other) is type(self) else
                     f"the {self.term_name} term on top of the {other.term_name} term")
            raise ValueError(
                f"{who}: this {type(optimizer).__name__} optimizer (id {id(optimizer):#x}) already has a rule "
                f"attached, {other!r}, over the same parameters ({_names(shared)}): a second rule would apply "
                f"{twice} at every step. Call .remove() on the attached rule first (its state_dict() carries "
                "lmbda and the step count over to a new one of its kind), or keep one rule per optimizer"
            )
        if not self._attached_over(mine, optimizer, same=False):
            return
        # a rule dropped with its optimizer but not collected yet (a reference cycle) is no rule. No
        # strong reference to one may be held here (hence the helper, whose loop variable dies with it)
        gc.collect()
        found = self._attached_over(mine, optimizer, same=False)
        if found:
            other, shared = found
            warnings.warn(
                f"{who}: parameters {_names(shared)} are also in another optimizer "
                f"({type(other.optimizer).__name__}, id {id(other.optimizer):#x}) with a rule attached, "
                f"{other!r}: every step of either optimizer applies the {other.term_name} term to them. "
                "Call .remove() on the rule you no longer use",
                RuntimeWarning, stacklevel=5,
            )

    def _attached_over(self, mine: dict[int, str], optimizer: torch.optim.Optimizer,
                       same: bool) -> tuple[StepRule, list[str]] | None:
        """An attached rule on ``optimizer`` (``same``) or on another one applying its term
        to some of the parameters ``mine``, and their names; None if there is none."""
        for other in _attached_rules():
            if (other.optimizer is optimizer) == same:
                shared = self._shared_with(other, mine)
                if shared:
                    return other, shared
        return None

    # --- checks and resolution ----------------------------------------------------------------

    def _check_lmbda(self, lmbda: float, who: str | None = None) -> float:
        # a real number, not a bool or a string: TypeError / ValueError naming lmbda
        return check_real(lmbda, "lmbda", who or type(self).__name__, minimum=0)

    def _check_seed(self, seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"{type(self).__name__}: seed must be an int in [0, 2**64), "
                             f"got {seed!r} ({type(seed).__name__})")
        return seed

    @staticmethod
    def _optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def _slot(self, info: MaskedParam, applies: bool) -> tuple[nn.Module, str, nn.Module, str, str, bool]:
        p_owner, _, p_name = info.param_path.rpartition(".")
        m_owner, _, m_name = info.mask_path.rpartition(".")
        return self.gm.get_submodule(p_owner), p_name, self.gm.get_submodule(m_owner), m_name, info.name, applies

    def _in_optimizer(self, optimizer: torch.optim.Optimizer) -> set[int]:
        # rebuilt only when the groups change (add_param_group, a new params list)
        key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if key != self._membership[0]:
            self._membership = (key, self._optimizer_param_ids(optimizer))
        return self._membership[1]

    # --- the hooks ----------------------------------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> Any:
        # ``step(closure)`` (Lightning's automatic optimization, ...) computes this step's gradient
        # inside the step, after the pre-hooks: the term must wait for it, so the closure is
        # wrapped and the term computed right after its first call (an optimizer that calls its
        # closure several times, like LBFGS, gets the term of the first gradient only)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before_step(optimizer, args, kwargs)
            return None
        self._pending = None
        done = []

        def closure_then_term() -> Any:
            loss = closure()
            if not done:
                done.append(True)
                self._before_step(optimizer, args, kwargs)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_term}
        return (args[0], closure_then_term, *args[2:]), kwargs

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        self._pending = None
        # GradScaler hands optimizers that unscale inside their step (fused=True) the
        # still-scaled grads, with these two set as optimizer attributes for that step
        found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
        if found_inf is not None and float(found_inf) != 0.0:
            return
        in_optimizer = self._in_optimizer(optimizer)
        params, masks, grads, names = [], [], [], []
        half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]] = []  # (param, mask, grad, name)
        pin_only: list[tuple[torch.Tensor, torch.Tensor]] = []  # no term (applies_to), pinned
        for p_owner, p_name, m_owner, m_name, name, applies in self._slots:
            p = p_owner._parameters[p_name]
            if p.grad is not None and id(p) in in_optimizer:
                if not applies:
                    pin_only.append((p, m_owner._buffers[m_name]))
                    continue
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                if p.dtype in _LOW_PRECISION:
                    half.append((p, m_owner._buffers[m_name], grad, name))
                else:
                    params.append(p)
                    masks.append(m_owner._buffers[m_name])
                    grads.append(grad)
                    names.append(name)
        deltas = half_deltas = None
        if self.lmbda > 0 and (params or half):
            grad_scale = kwargs.get("grad_scale", getattr(optimizer, "grad_scale", None))
            reads_weights = _update_reads_weights(optimizer)
            if half:
                half_deltas = self._half_before_step(half, grad_scale, reads_weights)
            if params and not reads_weights:
                # the term now, in place; the post-hook only pins
                if not (self.fused and self._run_fused(self.fused_kernels.shrink, params, grads, grad_scale,
                                                       self._lmbda_tensor(params[0]))):
                    self.shrink_(params, grads, grad_scale, self._scratch_like(grads), names)
            elif params:
                # the optimizer reads w (weight decay, ...): keep the term for after its update
                if self.fused:
                    deltas = self._run_fused(self.fused_kernels.terms, params, grads, grad_scale)
                if deltas is None:
                    deltas = self.terms(params, grads, grad_scale, self._scratch_like(grads), names)
        self._pending = (params, masks, deltas, half, half_deltas, pin_only)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._pending:
            return
        params, masks, deltas, half, half_deltas, pin_only = self._pending
        self._pending = None
        if pin_only:
            self._pin(pin_only)
        if half:  # before steps += 1: its rounding is seeded from this step's count
            self._half_after_step(half, half_deltas)
        if not params:
            if half:
                self.steps += 1
            return
        # pruned entries stay exactly zero whatever the optimizer did
        if deltas is not None and self.fused and \
                self._run_fused(self.fused_kernels.apply, params, deltas, masks,
                                self._lmbda_tensor(params[0])) is not None:
            self.steps += 1
            return
        if deltas is not None:
            self.apply_terms_(params, deltas)
        self._pin(zip(params, masks))
        self.steps += 1

    @staticmethod
    def _pin(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # masks without zeros are skipped (cached per in-place version, see instrument._mask_facts);
        # in a compiled optimizer step every mask is applied: no data-dependent branch
        if torch.compiler.is_compiling():
            pairs = list(pairs)
        else:
            pairs = [(p, m) for p, m in pairs if mask_has_zeros(m)]
        if pairs:
            torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])

    # --- bfloat16 / float16 parameters --------------------------------------------------------

    def _step_generator(self, device: torch.device, seeded: set[torch.device]) -> torch.Generator:
        """The rule's generator on ``device``, seeded from ``(seed, steps)`` at its first use in a step."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        if device not in seeded:
            gen.manual_seed(_step_seed(self.seed, self.steps))
            seeded.add(device)
        return gen

    @staticmethod
    def _half_slices(*tensors: torch.Tensor, whole: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """``tensors`` (same shape) whole, or in flat slices of ``HALF_CHUNK_NUMEL`` when contiguous."""
        n = tensors[0].numel()
        if whole or n <= HALF_CHUNK_NUMEL or not all(t.is_contiguous() for t in tensors):
            yield tensors
            return
        flat = [t.view(-1) for t in tensors]
        for i in range(0, n, HALF_CHUNK_NUMEL):
            yield tuple(f[i:i + HALF_CHUNK_NUMEL] for f in flat)

    def _half_before_step(self, half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]],
                          grad_scale: torch.Tensor | None, reads_weights: bool) -> list[torch.Tensor] | None:
        """bf16 / fp16 parameters, one slice at a time (its float32 temporaries only).

        Weight-free update: the term in float32, stochastically rounded into the parameter,
        now; returns None. Otherwise the terms in float32 (4 bytes per weight, kept across the
        optimizer's step as the float32 path keeps its own), for :meth:`_half_after_step`.
        The float32 copy of the gradient is the batch hooks' ``out``: no extra temporary.
        """
        if reads_weights:
            pending = []
            for p, _, g, name in half:
                g32 = g.float()
                pending.append(self.terms([p.float()], [g32], grad_scale, None if g32 is g else [g32], [name])[0])
            return pending
        seeded: set[torch.device] = set()
        for p, _, g, name in half:
            gen = self._step_generator(p.device, seeded)
            for ps, gs in self._half_slices(p, g, whole=self._unit):
                v, g32 = ps.float(), gs.float()
                self.shrink_([v], [g32], grad_scale, None if g32 is gs else [g32], [name])
                ps.copy_(_stochastic_round(v, p.dtype, gen))
        return None

    def _half_after_step(self, half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]],
                         deltas: list[torch.Tensor] | None) -> None:
        seeded: set[torch.device] = set()
        for i, (p, m, _, _) in enumerate(half):
            if deltas is not None:
                gen = self._step_generator(p.device, seeded)
                for ps, ds in self._half_slices(p, deltas[i]):
                    v = ps.float()
                    self.apply_terms_([v], [ds])
                    ps.copy_(_stochastic_round(v, p.dtype, gen))
            if torch.compiler.is_compiling() or mask_has_zeros(m):
                p.mul_(m)  # exact: the mask is 0 / 1, and a rounded 0 is 0

    # --- eager scratch and fused kernels ------------------------------------------------------

    def _scratch_like(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Buffers shaped like ``grads`` kept across steps, when they hold at most ``SCRATCH_MAX_NUMEL``.

        A fresh parameter-sized buffer per step is returned to the OS by malloc and
        page-faulted back in at the next step, which costs a measurable share of a small
        model's step (``benchmarks/RESULTS.md``). Above the cap a buffer kept for good costs
        more memory than the faults cost time, so None: allocate per step.
        """
        if not self._keep_scratch:
            return None
        key = tuple((g.shape, g.stride(), g.dtype, g.device) for g in grads)
        if self._scratch[0] != key:
            self._scratch = (key, [torch.empty_like(g) for g in grads])
        return self._scratch[1]

    def _run_fused(self, kernel, *args: Any) -> Any:
        """Run ``kernel`` compiled; on a compile failure warn once, go eager, return None."""
        if torch.compiler.is_compiling():
            return None  # inside a compiled optimizer step: the eager ops get traced and fused there
        try:
            compiled = self._kernels.get(kernel.__name__)
            if compiled is None:
                compiled = self._kernels[kernel.__name__] = _compile_private(kernel)
            out = compiled(*args)
            return True if out is None else out
        except Exception as exc:  # inductor needs a C++ compiler (CPU) or triton (GPU)
            self.fused, self._kernels = False, {}
            warnings.warn(f"{type(self).__name__}: the fused rule could not be compiled ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running the eager rule instead",
                          RuntimeWarning, stacklevel=3)
            return None

    def _lmbda_tensor(self, like: torch.Tensor) -> torch.Tensor:
        key = (self.lmbda, like.dtype, like.device)
        if self._lmbda_cache[0] != key:
            self._lmbda_cache = (key, torch.tensor(self.lmbda, dtype=like.dtype, device=like.device))
        return self._lmbda_cache[1]

    # --- lifecycle ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach from the optimizer; later steps are plain optimizer steps."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _ATTACHED.discard(self)  # the optimizer is free for another rule

    def state_dict(self) -> dict[str, Any]:
        # the step count and the seed are all the stochastic rounding needs to resume exactly
        return {"lmbda": self.lmbda, "steps": self.steps, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lmbda = self._check_lmbda(state["lmbda"], f"{type(self).__name__}.load_state_dict")
        self.steps = int(state["steps"])
        if "seed" in state:  # checkpoints written before half-precision support have none
            self.seed = self._check_seed(int(state["seed"]))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lmbda={self.lmbda}, steps={self.steps}, fused={self.fused}, "
                f"seed={self.seed}, optimizer={type(self.optimizer).__name__})")
