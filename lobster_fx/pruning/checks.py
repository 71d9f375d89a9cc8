"""Argument checks shared by :func:`~lobster_fx.pruning.prune.prune`, ``PlateauPruner``, the
triggers and the rules: each names the argument and the caller in its message.

    >>> check_real(0.05, "twt", "prune", minimum=0)
    0.05
    >>> check_flag(1, "rollback", "PlateauPruner")
    True
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["check_real", "check_int", "check_flag", "check_evaluate"]


def _as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (int, float, numpy scalar, one-element
    real tensor), else None. ``bool`` is refused: ``lmbda=True`` is a mistake, not 1.0;
    so are strings, even numeric ones (``float("1e-4")`` would hide a config bug)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool \
            and not value.is_complex() and not value.is_meta:
        return float(value.item())
    return None


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def check_real(value: Any, name: str, who: str, *, minimum: float | None = None,
               below: float | None = None) -> float:
    """``value`` as a finite float in ``[minimum, below)`` (either bound optional).

    Raises TypeError for a value that is not a real number (a string, None, a bool) and
    ValueError for one out of range or not finite; both say ``"<who>: <name> must be ...,
    got <value> (<type>)"``.

        >>> check_real(0.5, "twt", "prune", minimum=0)
        0.5
        >>> check_real("abc", "lmbda", "Lobster", minimum=0)
        Traceback (most recent call last):
        TypeError: Lobster: lmbda must be a finite float >= 0, got 'abc' (str)
    """
    if minimum is not None and below is not None:
        desc = f"a float in [{minimum:g}, {below:g})"
    elif minimum is not None:
        desc = f"a finite float >= {minimum:g}"
    elif below is not None:
        desc = f"a finite float < {below:g}"
    else:
        desc = "a finite float"
    x = _as_real(value)
    if x is None:
        raise TypeError(f"{who}: {name} must be {desc}, {_got(value)}")
    if not math.isfinite(x) or (minimum is not None and x < minimum) or (below is not None and x >= below):
        raise ValueError(f"{who}: {name} must be {desc}, {_got(value)}")
    return x


def check_int(value: Any, name: str, who: str, *, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; an integral float (``20.0``) is taken, ``2.5`` and
    ``True`` are not. TypeError / ValueError as :func:`check_real`.

        >>> check_int(2.5, "pwe", "PlateauPruner", minimum=1)
        Traceback (most recent call last):
        TypeError: PlateauPruner: pwe must be an int >= 1, got 2.5 (float)
    """
    desc = f"an int >= {minimum}"
    x = _as_real(value)
    if x is None or not math.isfinite(x) or not x.is_integer():
        raise TypeError(f"{who}: {name} must be {desc}, {_got(value)}")
    if x < minimum:
        raise ValueError(f"{who}: {name} must be {desc}, {_got(value)}")
    return int(x)


def check_flag(value: Any, name: str, who: str) -> bool:
    """``value`` as a bool: ``True`` / ``False`` (or numpy's), or the ints 0 and 1.
    Anything else (``"no"``, ``None``, ``2``) is a TypeError naming the argument."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{who}: {name} must be True or False, {_got(value)}")


def check_evaluate(evaluate: Any, who: str) -> None:
    """TypeError unless ``evaluate`` is callable (``evaluate(model) -> float``)."""
    if not callable(evaluate):
        raise TypeError(f"{who}: evaluate must be a callable model -> float loss, {_got(evaluate)}")
