"""Rule stage: the LOBSTER update, applied at every ``optimizer.step()``.

Eq. (6) of the paper, with ``g = dL/dw`` at ``w_{t-1}``::

    w_t = w_{t-1} - eta * g - lmbda * w_{t-1} * relu(1 - |g|)

The rule needs the *final* gradient of a step (after gradient accumulation,
after the DDP all-reduce, after ``GradScaler`` unscaled it), which exists when
``optimizer.step()`` starts. So :class:`Lobster` registers an optimizer step
pre-hook that computes ``delta = lmbda * w_{t-1} * relu(1 - |g|)`` and a
post-hook that subtracts it from whatever the optimizer produced: with plain SGD
that is eq. (6) exactly, with any other optimizer the optimizer's own update
plus the decoupled LOBSTER term. When the optimizer's update does not read the
weights (SGD, Adam, AdamW, RMSprop, ... with ``weight_decay=0``) the sum is the
same if the pre-hook subtracts ``delta`` from ``w_{t-1}`` in place, which it then
does: one pass, and no parameter-sized ``delta`` kept across the step. A step
that ``GradScaler`` skips never calls ``optimizer.step()``, so the rule is skipped too (a fused optimizer, which gets
still-scaled gradients, sees ``optimizer.grad_scale`` / ``found_inf``, and so does
the rule). The post-hook also pins pruned parameters to exactly zero (momentum,
weight decay and Adam would move them).

Each hook is either a few eager ``_foreach`` passes or, with ``fused=True``, one
``torch.compile``-generated pass over each parameter: the rule is memory-bound, so
fusing its elementwise passes (4-6 eager) into 1-2 is what makes it cheap on large
models.

bfloat16 / float16 parameters: at ``lmbda=1e-4`` the term is below half an ulp of ``w``
(bf16: ``2**-9 |w|``, fp16: ``2**-12 |w|``), so ``w - term`` rounded to nearest is ``w``
and the weights would never shrink. For those parameters the rule computes the new value
in float32 and rounds it to the parameter's dtype *stochastically* (up with probability
equal to the distance from the lower neighbour in ulps), so every step moves the weight
like float32 in expectation. Stochastic rounding rather than a float32 residual per
parameter (error feedback): the residual would cost 4 bytes per weight for good, twice a
bf16 model's weights, it would have to be checkpointed, and it goes stale whenever weights
change outside the rule (pruning, plateau rollbacks, a loaded checkpoint); rounding
stochastically keeps nothing but a seed. The random bits come from a generator owned by
the rule and re-seeded at every step from ``(seed, steps)``: every DDP rank draws the same
bits without communicating, and a run resumed from ``state_dict()`` rounds exactly like an
uninterrupted one. Half parameters take this eager path even with ``fused=True`` (a
``torch.compile`` kernel cannot take a generator); float32 / float64 parameters keep the
arithmetic above unchanged. Cost (``benchmarks/half_rule_cost.py``, a 2.9M-parameter MLP,
one CPU thread, two runs on a shared machine): 17-24 ms per step in bf16 against 6.3-7.5 ms
for the eager float32 rule (0.9-1.0 ms fused), mostly the random bits and page faults of the
float32 temporaries, which exist for one parameter (slice) at a time.

Example::

    >>> import torch, lobster_fx
    >>> gm = lobster_fx.instrument(torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    >>> rule = lobster_fx.Lobster(gm, opt, lmbda=1e-4)
    >>> gm(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step()  # SGD step + LOBSTER term
    >>> rule.steps
    1
"""

from __future__ import annotations

import gc
import math
import types
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lobster_fx.instrument import (
    MaskedParam,
    lobster_info,
    mask_has_zeros,
    masked_parameters,
    unwrap,
)
from lobster_fx.prune import check_real

__all__ = ["Lobster", "lobster_delta", "FUSE_MIN_NUMEL"]

# fused="auto" compiles the rule when the prunable parameters hold at least this many
# elements: below it the first step's compile (seconds) costs more than the rule itself
FUSE_MIN_NUMEL = 1 << 20
# the eager rule keeps its |g| buffers across steps up to this many elements (4 MB in float32)
SCRATCH_MAX_NUMEL = 1 << 20
# bfloat16 / float16 parameters are rounded in slices of this many elements: their float32 and
# random temporaries (~20 bytes per element) stay under ~80 MB however large one parameter is
HALF_CHUNK_NUMEL = 1 << 22


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def lobster_delta(w: torch.Tensor, grad: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``lmbda * w * relu(1 - |grad|)``: the LOBSTER shrinkage of eq. (6)."""
    return torch.relu(1 - grad.abs()).mul_(w).mul_(lmbda)


# parameters in these dtypes get the term in float32 and stochastic rounding (module docstring)
_LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})
_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of ``(seed, step)``: each step's stream is unrelated to its neighbours'."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _random_u16(shape: torch.Size, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Uniform 16-bit integers in ``[0, 2**16)`` (int32), four per 64-bit draw: on CPU the
    generator (mt19937) costs per draw, and this is 3.3x faster than ``randint`` per element.
    16 bits are all float32 holds below bf16's last mantissa bit (13 below float16's)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # the full 64 bits
    return words.view(torch.int16)[:numel].to(torch.int32).bitwise_and_(0xFFFF).view(shape)


# float32 mantissa bits below the last one of each half format
_DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}
_FP16_TINY = 2.0 ** -14  # float16's smallest normal


def _stochastic_round(v: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round float32 ``v`` to ``dtype`` (bfloat16 / float16) stochastically: to the neighbour
    above ``|v|`` with probability ``(|v| - lower) / (upper - lower)``, so ``E[out] == v``.

    On ``|v|``'s bit pattern: add random bits below ``dtype``'s last mantissa bit and truncate
    them; the carry into that bit happens with exactly that probability, and the truncated
    float32 converts to ``dtype`` exactly. Below float16's smallest normal its grid is uniform
    (``2**-24``) like the binade above, so those values are shifted up by ``2**-14``, rounded
    there and shifted back (both exact). Values on ``dtype``'s grid come back unchanged (zeros
    keep their sign); NaN stays NaN; values beyond ``dtype``'s range become infinities.
    ``v`` is left unchanged.
    """
    dropped = _DROPPED_BITS[dtype]
    r = _random_u16(v.shape, v.device, generator)
    if dropped < 16:
        r.bitwise_and_((1 << dropped) - 1)
    a = v.abs()
    shift = None
    if dtype == torch.float16:
        shift = (a < _FP16_TINY).to(torch.float32).mul_(_FP16_TINY)
        a.add_(shift)
    bits = a.view(torch.int32)
    bits.clamp_max_(0x7FC00000)  # NaN payloads -> the quiet NaN: the add cannot carry into the sign bit
    bits.add_(r).bitwise_and_(-(1 << dropped))
    if shift is not None:
        a.sub_(shift)
    return a.copysign_(v).to(dtype)


def _fused_deltas(params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    # -w * relu(1 - |g|) = w * min(|g| - 1, 0): the same ops as the eager path, in one pass
    if grad_scale is None:
        return [p * (g.abs() - 1).clamp_max(0) for p, g in zip(params, grads)]
    return [p * (g.abs() / grad_scale - 1).clamp_max(0) for p, g in zip(params, grads)]


# lmbda reaches the compiled kernels as a 0-dim tensor: a Python float would be baked into
# the graph, and a changing lambda would recompile until dynamo's limit (8) gives up


def _fused_apply(params: list[torch.Tensor], deltas: list[torch.Tensor], masks: list[torch.Tensor],
                 lmbda: torch.Tensor) -> None:
    # the term after the optimizer's update, and the mask pin, in one pass per parameter. Every
    # mask is applied (x1 is exact): splitting by "has zeros" would recompile as pruning reaches
    # new layers, and the mask is read in the same pass anyway
    for p, d, m in zip(params, deltas, masks):
        p.add_(d * lmbda).mul_(m)


def _fused_shrink(params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                  lmbda: torch.Tensor) -> None:
    # w += lmbda * w * min(|g| - 1, 0), in place, before a weight-free optimizer update
    for p, g in zip(params, grads):
        a = g.abs() if grad_scale is None else g.abs() / grad_scale
        p.add_(p * (a - 1).clamp_max(0) * lmbda)


# optimizers whose update reads the gradient and their own state but not the weight, as long
# as weight_decay is 0: shrinking w_{t-1} in place before their step gives eq. (6)'s sum
# exactly (to rounding), in one pass and without a parameter-sized buffer kept across the step
_WEIGHT_FREE_UPDATES = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)


def _update_reads_weights(optimizer: torch.optim.Optimizer) -> bool:
    # exact types: a subclass may override step()
    if type(optimizer) not in _WEIGHT_FREE_UPDATES:
        return True
    return any(group.get("weight_decay", 0) != 0 for group in optimizer.param_groups)


# every Lobster whose hooks are on an optimizer (remove() takes it out). Weak: a rule dropped
# together with its optimizer leaves by itself. Used to refuse a second rule on one optimizer
_ATTACHED: weakref.WeakSet[Lobster] = weakref.WeakSet()


def _attached_rules() -> list[Lobster]:
    return [rule for rule in list(_ATTACHED) if rule._handles]


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _compile_private(fn):
    # dynamo's cache (and its recompile limit of 8) is per code object: a private copy per
    # Lobster keeps models in one process from evicting each other's kernels
    code = fn.__code__.replace()
    fresh = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(fresh, fullgraph=True, dynamic=False)


class Lobster:
    """Apply the LOBSTER rule at every ``optimizer.step()`` of ``optimizer``.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument` (or a DDP /
            ``torch.compile`` wrapper of one).
        optimizer: any ``torch.optim.Optimizer`` holding (some of) ``gm``'s
            prunable parameters; the rule touches those only.
        lmbda: the regularisation strength (not scaled by the learning rate).
        fused: ``True`` runs the rule as ``torch.compile``-generated kernels,
            one pass over each parameter (the in-place shrink) or two (the term
            before the optimizer's update, then its addition with the mask pin),
            instead of 4-6 eager ``_foreach`` passes; ``False`` keeps the eager
            passes; ``None`` (default) fuses when the prunable parameters hold
            at least ``FUSE_MIN_NUMEL`` elements. Compiling takes seconds at the first step. If it fails
            (no C++ compiler for inductor on CPU, no triton on GPU) the rule
            warns once and runs eagerly; ``rule.fused`` says which path runs.
            Both compute the same arithmetic, equal to float rounding.
            bfloat16 / float16 parameters always take the eager path.
        seed: seeds the stochastic rounding of bfloat16 / float16 parameters
            (with the step count, at every step; see the module docstring). The
            same on every DDP rank, so the default 0 needs no communication.

    ``remove()`` detaches the hooks; ``state_dict()`` / ``load_state_dict()``
    save and restore ``lmbda``, the step count and the seed.

    One rule per optimizer: a second ``Lobster`` on an optimizer that already has one
    attached over the same parameters would apply the term twice per step, so it is
    refused (ValueError naming the optimizer and the parameters) until the first is
    ``remove()``-d. A rule on *another* optimizer holding the same parameters is
    allowed (each optimizer's step applies its own update and the term) but warns.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, ``gm`` is not instrumented, or
            ``lmbda`` / ``seed`` / ``fused`` has the wrong type (``lmbda="abc"``,
            ``lmbda=True``); the message names the argument.
        ValueError: ``lmbda`` is negative or not finite, the optimizer holds none of
            ``gm``'s prunable parameters, or it already has a rule over them.
    """

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, lmbda: float = 1e-4, *,
                 fused: bool | None = None, seed: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lobster expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.gm = unwrap(gm)
        self.lmbda = self._check_lmbda(lmbda)
        self.seed = self._check_seed(seed)
        in_optimizer = self._optimizer_param_ids(optimizer)
        mine = {id(p): info.name for info, p, _ in masked_parameters(self.gm) if id(p) in in_optimizer}
        if not mine:
            raise ValueError(
                "the optimizer holds none of the instrumented model's prunable parameters; "
                "build it from gm.parameters() of the module returned by lobster_fx.instrument"
            )
        sharded = [info.name for info, p, _ in masked_parameters(self.gm) if _is_dtensor(p)]
        if sharded:
            raise NotImplementedError(
                f"Lobster does not support FSDP / DTensor-sharded parameters yet ({sharded[0]!r} is a DTensor): "
                "its masks are plain tensors. Use DistributedDataParallel (see examples/ddp_torchrun.py)"
            )
        if fused not in (None, True, False):
            raise ValueError(f"Lobster: fused must be True, False or None (auto), got {fused!r}")
        self._refuse_a_second_rule(optimizer, mine)
        self.optimizer = optimizer
        # (owner module, parameter name, mask owner, mask name): resolved once, because string
        # paths cost ~0.3 ms per step on LeNet-300; dict lookups on the owners stay right after
        # .to(device) / load_state_dict, which replace tensors but not modules
        self._slots = [self._slot(info) for info in lobster_info(self.gm).params.values()]
        self._membership: tuple[tuple, set[int]] = ((), set())
        self.steps = 0
        self._pending: tuple | None = None
        self._scratch: tuple[tuple, list[torch.Tensor] | None] = ((), None)
        # decided once: above the cap the eager rule allocates per step and builds no per-step key
        self._keep_scratch = sum(p.numel() for _, p, _ in masked_parameters(self.gm)) <= SCRATCH_MAX_NUMEL
        if fused is None:
            fused = sum(p.numel() for _, p, _ in masked_parameters(self.gm)) >= FUSE_MIN_NUMEL
        self.fused = bool(fused)
        self._kernels: dict[str, Any] = {}  # compiled on first use
        self._lmbda_cache: tuple[Any, torch.Tensor | None] = (None, None)
        self._generators: dict[torch.device, torch.Generator] = {}  # for half params, one per device
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        _ATTACHED.add(self)

    def _shared_with(self, other: Lobster, mine: dict[int, str]) -> list[str]:
        """Names of the parameters in ``mine`` (id -> name) that ``other`` applies the term to."""
        theirs = self._optimizer_param_ids(other.optimizer)
        return [mine[id(p)] for _, p, _ in masked_parameters(other.gm) if id(p) in mine and id(p) in theirs]

    def _refuse_a_second_rule(self, optimizer: torch.optim.Optimizer, mine: dict[int, str]) -> None:
        """ValueError if a rule is attached to ``optimizer`` over some of the same parameters
        (the term would be applied twice per step); a warning if one is attached to another
        optimizer over them. Runs before any hook is registered: a refusal changes nothing."""
        found = self._attached_over(mine, optimizer, same=True)
        if found:
            other, shared = found
            raise ValueError(
                f"Lobster: this {type(optimizer).__name__} optimizer (id {id(optimizer):#x}) already has a rule "
                f"attached, {other!r}, over the same parameters ({_names(shared)}): a second rule would apply "
                "the LOBSTER term twice at every step. Call .remove() on the attached rule first (its "
                "state_dict() carries lmbda and the step count over to a new one), or keep one rule per optimizer"
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
                f"Lobster: parameters {_names(shared)} are also in another optimizer "
                f"({type(other.optimizer).__name__}, id {id(other.optimizer):#x}) with a rule attached, "
                f"{other!r}: every step of either optimizer applies the LOBSTER term to them. "
                "Call .remove() on the rule you no longer use",
                RuntimeWarning, stacklevel=4,
            )

    def _attached_over(self, mine: dict[int, str], optimizer: torch.optim.Optimizer,
                       same: bool) -> tuple[Lobster, list[str]] | None:
        """An attached rule on ``optimizer`` (``same``) or on another one applying the term
        to some of the parameters ``mine``, and their names; None if there is none."""
        for other in _attached_rules():
            if (other.optimizer is optimizer) == same:
                shared = self._shared_with(other, mine)
                if shared:
                    return other, shared
        return None

    @staticmethod
    def _check_lmbda(lmbda: float, who: str = "Lobster") -> float:
        # a real number, not a bool or a string: TypeError / ValueError naming lmbda
        return check_real(lmbda, "lmbda", who, minimum=0)

    @staticmethod
    def _check_seed(seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"Lobster: seed must be an int in [0, 2**64), got {seed!r} ({type(seed).__name__})")
        return seed

    @staticmethod
    def _optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def _slot(self, info: MaskedParam) -> tuple[nn.Module, str, nn.Module, str]:
        p_owner, _, p_name = info.param_path.rpartition(".")
        m_owner, _, m_name = info.mask_path.rpartition(".")
        return self.gm.get_submodule(p_owner), p_name, self.gm.get_submodule(m_owner), m_name

    def _in_optimizer(self, optimizer: torch.optim.Optimizer) -> set[int]:
        # rebuilt only when the groups change (add_param_group, a new params list)
        key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if key != self._membership[0]:
            self._membership = (key, self._optimizer_param_ids(optimizer))
        return self._membership[1]

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        self._pending = None
        # GradScaler hands optimizers that unscale inside their step (fused=True) the
        # still-scaled grads, with these two set as optimizer attributes for that step
        found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
        if found_inf is not None and float(found_inf) != 0.0:
            return
        in_optimizer = self._in_optimizer(optimizer)
        params, masks, grads = [], [], []
        half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, mask, grad)
        for p_owner, p_name, m_owner, m_name in self._slots:
            p = p_owner._parameters[p_name]
            if p.grad is not None and id(p) in in_optimizer:
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                if p.dtype in _LOW_PRECISION:
                    half.append((p, m_owner._buffers[m_name], grad))
                else:
                    params.append(p)
                    masks.append(m_owner._buffers[m_name])
                    grads.append(grad)
        deltas = half_deltas = None
        if self.lmbda > 0 and (params or half):
            grad_scale = kwargs.get("grad_scale", getattr(optimizer, "grad_scale", None))
            reads_weights = _update_reads_weights(optimizer)
            if half:
                half_deltas = self._half_before_step(half, grad_scale, reads_weights)
            if params and not reads_weights:
                # the shrink now, in place; the post-hook only pins
                if not (self.fused and self._run_fused(_fused_shrink, params, grads, grad_scale,
                                                       self._lmbda_tensor(params[0]))):
                    shrink = self._eager_min_abs_minus_one(grads, grad_scale)
                    torch._foreach_addcmul_(params, params, shrink, value=self.lmbda)
            elif params:
                # the optimizer reads w (weight decay, ...): keep the term for after its update
                if self.fused:
                    deltas = self._run_fused(_fused_deltas, params, grads, grad_scale)
                if deltas is None:
                    deltas = self._eager_min_abs_minus_one(grads, grad_scale)
                    torch._foreach_mul_(deltas, params)
        self._pending = (params, masks, deltas, half, half_deltas)

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
    def _half_min_abs_minus_one(grad: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
        # min(|g| - 1, 0) in float32, as the eager path computes it
        out = grad.float().abs_() if grad.dtype != torch.float32 else grad.abs()
        if grad_scale is not None:
            out.div_(grad_scale)
        return out.add_(-1.0).clamp_max_(0.0)

    @staticmethod
    def _half_slices(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """``tensors`` (same shape) whole, or in flat slices of ``HALF_CHUNK_NUMEL`` when contiguous."""
        n = tensors[0].numel()
        if n <= HALF_CHUNK_NUMEL or not all(t.is_contiguous() for t in tensors):
            yield tensors
            return
        flat = [t.view(-1) for t in tensors]
        for i in range(0, n, HALF_CHUNK_NUMEL):
            yield tuple(f[i:i + HALF_CHUNK_NUMEL] for f in flat)

    def _half_before_step(self, half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          grad_scale: torch.Tensor | None, reads_weights: bool) -> list[torch.Tensor] | None:
        """bf16 / fp16 parameters, one slice at a time (its float32 temporaries only).

        Weight-free update: the shrink in float32, stochastically rounded into the parameter,
        now; returns None. Otherwise the term ``w * min(|g| - 1, 0)`` in float32 (4 bytes per
        weight, kept across the optimizer's step as the float32 path keeps its own), for
        :meth:`_half_after_step` to add after the optimizer's update.
        """
        if reads_weights:
            return [self._half_min_abs_minus_one(g, grad_scale).mul_(p) for p, _, g in half]
        seeded: set[torch.device] = set()
        for p, _, g in half:
            gen = self._step_generator(p.device, seeded)
            for ps, gs in self._half_slices(p, g):
                v = ps.float()
                v.addcmul_(v, self._half_min_abs_minus_one(gs, grad_scale), value=self.lmbda)
                ps.copy_(_stochastic_round(v, p.dtype, gen))
        return None

    def _half_after_step(self, half: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         deltas: list[torch.Tensor] | None) -> None:
        seeded: set[torch.device] = set()
        for i, (p, m, _) in enumerate(half):
            if deltas is not None:
                gen = self._step_generator(p.device, seeded)
                for ps, ds in self._half_slices(p, deltas[i]):
                    ps.copy_(_stochastic_round(ps.float().add_(ds, alpha=self.lmbda), p.dtype, gen))
            if torch.compiler.is_compiling() or mask_has_zeros(m):
                p.mul_(m)  # exact: the mask is 0 / 1, and a rounded 0 is 0

    def _eager_min_abs_minus_one(self, grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
        # -relu(1 - |g|) = min(|g| - 1, 0), in 3 foreach passes
        out = self._scratch_like(grads)
        if out is None:
            out = torch._foreach_abs(grads)
        else:
            for g, o in zip(grads, out):
                torch.abs(g, out=o)
        if grad_scale is not None:
            torch._foreach_div_(out, grad_scale)
        torch._foreach_add_(out, -1.0)
        torch._foreach_clamp_max_(out, 0.0)
        return out

    def _scratch_like(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Buffers shaped like ``grads`` kept across steps, when they hold at most ``SCRATCH_MAX_NUMEL``.

        A fresh parameter-sized buffer per step is returned to the OS by malloc and
        page-faulted back in at the next step: on LeNet-300 (266k weights, a 1 ms step)
        that was 40-120 page faults and 0.1-0.6 ms per step. Above the cap a buffer kept
        for good costs more memory than the faults cost time, so None: allocate per step.
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
            warnings.warn(f"Lobster: the fused rule could not be compiled ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running the eager rule instead",
                          RuntimeWarning, stacklevel=3)
            return None

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._pending:
            return
        params, masks, deltas, half, half_deltas = self._pending
        self._pending = None
        if half:  # before steps += 1: its rounding is seeded from this step's count
            self._half_after_step(half, half_deltas)
        if not params:
            if half:
                self.steps += 1
            return
        # pruned entries stay exactly zero whatever the optimizer did
        if deltas is not None and self.fused and \
                self._run_fused(_fused_apply, params, deltas, masks, self._lmbda_tensor(params[0])) is not None:
            self.steps += 1
            return
        if deltas is not None:
            torch._foreach_add_(params, deltas, alpha=self.lmbda)
        # masks without zeros are skipped (cached per in-place version, see instrument._mask_facts)
        if torch.compiler.is_compiling():  # a compiled optimizer step: no data-dependent branch
            pinned = list(zip(params, masks))
        else:
            pinned = [(p, m) for p, m in zip(params, masks) if mask_has_zeros(m)]
        if pinned:
            torch._foreach_mul_([p for p, _ in pinned], [m for _, m in pinned])
        self.steps += 1

    def _lmbda_tensor(self, like: torch.Tensor) -> torch.Tensor:
        key = (self.lmbda, like.dtype, like.device)
        if self._lmbda_cache[0] != key:
            self._lmbda_cache = (key, torch.tensor(self.lmbda, dtype=like.dtype, device=like.device))
        return self._lmbda_cache[1]

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
        self.lmbda = self._check_lmbda(state["lmbda"], "Lobster.load_state_dict")
        self.steps = int(state["steps"])
        if "seed" in state:  # checkpoints written before half-precision support have none
            self.seed = self._check_seed(int(state["seed"]))

    def __repr__(self) -> str:
        return (f"Lobster(lmbda={self.lmbda}, steps={self.steps}, fused={self.fused}, seed={self.seed}, "
                f"optimizer={type(self.optimizer).__name__})")
