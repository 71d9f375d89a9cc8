"""Slim's result types: the report attached as ``module.meta["lobster_slim"]``, its error,
and the tolerances of its output check.

    >>> r = SlimReport(params_before=43, params_after=23, layers={"0": LayerSlim("linear", 4, 2, 6, 6)})
    >>> r.units_removed
    2
    >>> print(r)
    slim: 43 -> 23 parameters (53.5%), 0 round(s), max rel err 0.00e+00
      0 (linear): out 4->2, in 6->6
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "META_KEY",
    "RTOL_FLOOR",
    "RTOL_EPS",
    "SlimError",
    "LayerSlim",
    "SlimReport",
    "default_rtol",
    "coarsest_float_dtype",
]

#: ``module.meta[META_KEY]`` holds the :class:`SlimReport`; ``node.meta[META_KEY]`` each node's role
META_KEY = "lobster_slim"

#: default relative tolerances (see :func:`default_rtol`): ``max(RTOL_FLOOR, RTOL_EPS * eps)``
RTOL_FLOOR = 1e-5
RTOL_EPS = 8


class SlimError(RuntimeError):
    """The slim pass could not run, or its result failed the output check."""


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of checks on a model computing in ``dtype``:
    ``max(RTOL_FLOOR, RTOL_EPS * torch.finfo(dtype).eps)``, relative to the output's scale.

    float32 / float64: ``1e-5``. bfloat16: ``2**-4`` (6.25%), float16: ``2**-7`` (0.78%):
    one rounding in a half format is already above ``1e-5``, and every folded constant adds
    one to a bias and to the outputs it moves. ``RTOL_EPS`` = 8 is twice the largest error
    (in eps of the dtype) measured on slimmed MLPs and ResNets and on ONNX Runtime's float16
    exports. A check in bfloat16 cannot see an error below a few percent of the output
    scale: slim a float32 copy (``model.float()``) for a tight one.

        >>> default_rtol(torch.float32), default_rtol(torch.bfloat16), default_rtol(torch.float16)
        (1e-05, 0.0625, 0.0078125)
    """
    return max(RTOL_FLOOR, RTOL_EPS * torch.finfo(dtype).eps)


def coarsest_float_dtype(tensors: Iterable[Any]) -> torch.dtype | None:
    """The floating dtype with the largest epsilon among ``tensors`` (non-tensors and
    non-floating tensors are skipped); None if there is none.

        >>> coarsest_float_dtype([torch.zeros(1), torch.zeros(1, dtype=torch.float16), 3])
        torch.float16
    """
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)


@dataclass
class LayerSlim:
    """Units of one layer before / after (``out`` = rows, ``in`` = columns)."""

    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int

    @property
    def units_removed(self) -> int:
        return self.out_before - self.out_after

    @property
    def inputs_removed(self) -> int:
        return self.in_before - self.in_after


@dataclass
class SlimReport:
    """What :func:`~lobster_fx.passes.slim.slim` did. ``layers`` is keyed by module path
    (e.g. ``"layer1.0.conv1"``); ``frozen`` maps a node name to why the channel group it
    touches was kept whole; ``max_rel_err`` is the output check's
    ``max|slim - orig| / max|orig|`` on the example inputs; ``channel_multiple``
    is the multiple conv channel groups were rounded up to, and
    ``units_kept_for_alignment`` counts the removable units kept for it (those
    found in the last round); ``atol`` / ``rtol`` are the output check's tolerances
    (given, or derived from the model's dtype)."""

    params_before: int
    params_after: int
    layers: dict[str, LayerSlim] = field(default_factory=dict)
    rounds: int = 0
    frozen: dict[str, str] = field(default_factory=dict)
    max_rel_err: float = 0.0
    channel_multiple: int = 1
    units_kept_for_alignment: int = 0
    atol: float = 0.0
    rtol: float = RTOL_FLOOR

    @property
    def units_removed(self) -> int:
        return sum(layer.units_removed for layer in self.layers.values() if layer.kind != "batchnorm")

    def __str__(self) -> str:
        lines = [
            f"slim: {self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.params_after / max(self.params_before, 1):.1%}), {self.rounds} round(s), "
            f"max rel err {self.max_rel_err:.2e}"
            + (f", conv channels rounded up to multiples of {self.channel_multiple} "
               f"({self.units_kept_for_alignment} removable unit(s) kept)" if self.channel_multiple > 1 else "")
        ]
        for name, layer in self.layers.items():
            if layer.units_removed or layer.inputs_removed:
                lines.append(
                    f"  {name} ({layer.kind}): out {layer.out_before}->{layer.out_after}, "
                    f"in {layer.in_before}->{layer.in_after}"
                )
        return "\n".join(lines)
