"""Stochastic rounding of float32 values to bfloat16 / float16, for the per-step rules.

A rule's term on a half-precision weight is computed in float32 and rounded back
stochastically, so the weight moves like float32 in expectation (see
:mod:`lobster_fx.methods.base`); the random bits are re-seeded at every step from
``(seed, step)`` by :func:`_step_seed`.

    >>> import torch
    >>> from lobster_fx.methods.rounding import _stochastic_round
    >>> gen = torch.Generator().manual_seed(0)
    >>> v = torch.full((10000,), 1.0 + 2.0 ** -9)  # a quarter of the way from 1 to the next bf16
    >>> out = _stochastic_round(v, torch.bfloat16, gen).float()
    >>> sorted(out.unique().tolist()), abs((out == 1.0).float().mean().item() - 0.75) < 0.02
    ([1.0, 1.0078125], True)
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of ``(seed, step)``: each step's stream is unrelated to its neighbours'."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _random_u16(shape: torch.Size, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Uniform 16-bit integers in ``[0, 2**16)`` (int32), four per 64-bit draw: on CPU the
    generator (mt19937) costs per draw, and this is several times faster than ``randint`` per
    element. 16 bits are all float32 holds below bf16's last mantissa bit (13 below float16's)."""
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
