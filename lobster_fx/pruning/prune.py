"""Prune stage: the pruning phase of LOBSTER (section 4 of the paper), by weight or by unit.

One global threshold ``T`` on a score: the largest ``T`` such that pruning everything scored
``<= T`` keeps the validation loss within ``(1 + twt)`` of the loss before pruning. With
``granularity="weight"`` (the paper) the things pruned are single parameters, scored by
``|w|``; with ``"neuron"`` they are whole units of Linear / Conv layers (a weight row or
filter, its bias, and the entries of a BatchNorm right after), scored by the norm of the
unit's weights or by ``score_fn`` (:mod:`lobster_fx.pruning.neuron`). The candidates are the
distinct scores; a bisection over them evaluates ``O(log n)`` of them, and the threshold
returned is always one that was evaluated and met the bound (the authors' code returned an
unevaluated midpoint). Pruned entries are zeroed and their masks cleared: pinned.

Example::

    >>> import torch, lobster_fx
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> gm = lobster_fx.instrument(torch.nn.Linear(16, 1))
    >>> x = torch.randn(64, 16); y = gm(x).detach()
    >>> evaluate = lambda m: float(torch.nn.functional.mse_loss(m(x), y)) + 1.0
    >>> result = lobster_fx.prune(gm, evaluate, twt=0.05)
    >>> result.loss_after <= 1.05 * result.loss_before
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lobster_fx.graph.instrument import masked_parameters, unwrap
from lobster_fx.graph.trace import LobsterGraphModule
from lobster_fx.pruning.checks import check_evaluate, check_flag, check_real

__all__ = ["GRANULARITIES", "PruneAction", "PruneResult", "distinct_magnitudes", "prune"]

Evaluate = Callable[[nn.Module], float]
#: ``score_fn(unit, weight) -> scores`` of ``prune(granularity="neuron")``
ScoreFn = Callable[[Any, torch.Tensor], torch.Tensor] | str

#: what one pruning phase removes
GRANULARITIES = ("weight", "neuron")


@dataclass
class PruneResult:
    """Outcome of one pruning phase."""

    threshold: float  #: what scored ``<= threshold`` (``|w|``, or a unit's score) was pruned (-inf: none)
    loss_before: float
    loss_after: float  #: the evaluated loss at ``threshold`` (no re-evaluation needed)
    bound: float  #: ``loss_before + twt * |loss_before|``
    evaluations: int  #: calls to ``evaluate``, ``loss_before`` included
    pruned: int  #: parameters pruned by this phase
    remaining: int  #: unpruned prunable parameters after it
    total: int  #: prunable parameters
    granularity: str = "weight"  #: "weight" or "neuron"
    units_pruned: int = 0  #: units pruned by this phase ("neuron")
    units_remaining: int = 0  #: live units after it ("neuron")
    units_total: int = 0  #: units of the layers found ("neuron")
    #: units left out because slim cannot remove them ("neuron" with ``slim_aware``; see
    #: :mod:`lobster_fx.pruning.unit_groups`)
    units_skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_loss(evaluate: Evaluate, model: nn.Module, what: str) -> float:
    value = evaluate(model)
    try:
        loss = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"prune: evaluate(model) must return a float loss, got {type(value).__name__}") from e
    if not math.isfinite(loss):
        raise ValueError(f"prune: evaluate(model) returned {loss} {what}; the model is left as it was")
    return loss


def _reduction_device(group: Any = None) -> torch.device:
    """The device a collective of ``group``'s backend accepts tensors on.

    NCCL takes CUDA tensors only (a CPU tensor raises at the first pruning phase),
    on the device this rank uses; gloo and mpi take CPU tensors. A combined backend
    (``"cpu:gloo,cuda:nccl"``) that serves the CPU reduces there (no device copy).
    Decided from the backend's name only, so it is testable without CUDA.
    """
    backend = str(torch.distributed.get_backend(group)).lower()
    if ":" in backend:  # "device:backend" pairs
        device_types = [pair.split(":", 1)[0].strip() for pair in backend.split(",")]
    else:
        device_types = list(torch.distributed.Backend.backend_capability.get(backend, ["cpu"]))
    if "cpu" in device_types or not device_types:
        return torch.device("cpu")
    device_type = device_types[0]
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def _all_reduce_mean(loss: float) -> float:
    """Average the loss over ranks so every rank takes the same decision."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss
    # float64 on every backend's device: NCCL supports it, and the mean keeps a float's digits
    t = torch.tensor([loss], dtype=torch.float64, device=_reduction_device())
    torch.distributed.all_reduce(t)
    return float(t.item() / torch.distributed.get_world_size())


@torch.no_grad()
def distinct_magnitudes(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sorted distinct ``|w|`` over the entries whose mask is not 0: the threshold candidates.

    In the weights' common dtype (every candidate is exactly one of them) and sorted in
    place (no int64 sort indices): the extra peak memory is about two copies of the live
    weights, where ``torch.unique`` over a float64 ``torch.cat`` needs several times more
    (the measurements belong in ``benchmarks/RESULTS.md``).

        >>> distinct_magnitudes([torch.tensor([-2.0, 1.0, 2.0, 3.0])], [torch.tensor([1.0, 1.0, 1.0, 0.0])])
        tensor([1., 2.])
    """
    if not weights:
        return torch.empty(0)
    dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights))
    on_cpu = all(w.device.type == "cpu" for w in weights)
    if on_cpu and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # exact for both; numpy sorts it (no bfloat16 in numpy)
    live = [mask != 0 for mask in masks]
    flat = torch.empty(sum(int(k.sum()) for k in live), dtype=dtype, device=weights[0].device)
    start = 0
    for w, keep in zip(weights, live):
        values = w.detach().abs()[keep]
        flat[start:start + values.numel()] = values
        start += values.numel()
    del live
    if not on_cpu or flat.numel() == 0:
        return torch.unique(flat)
    a = flat.numpy()
    a.sort()  # in place: no int64 sort indices
    distinct = np.empty(a.size, dtype=bool)
    distinct[0] = True
    np.not_equal(a[1:], a[:-1], out=distinct[1:])
    return torch.from_numpy(a[distinct])


class _WeightPlan:
    """``granularity="weight"``: every live masked parameter, scored by ``|w|``."""

    def __init__(self, gm: nn.Module) -> None:
        self.entries = list(masked_parameters(gm))
        self.originals = [p.detach().clone() for _, p, _ in self.entries]

    def candidates(self) -> torch.Tensor:
        return distinct_magnitudes(self.originals, [mask for _, _, mask in self.entries])

    def apply(self, threshold: float) -> None:
        for w, (_, p, mask) in zip(self.originals, self.entries):
            p.copy_(torch.where(w.abs() <= threshold, torch.zeros_like(w), w) * mask)

    def restore(self) -> None:
        for w, (_, p, _) in zip(self.originals, self.entries):
            p.copy_(w)

    def commit(self, threshold: float) -> dict[str, int]:
        pruned = 0
        for w, (_, p, mask) in zip(self.originals, self.entries):
            newly = (w.abs() <= threshold) & (mask != 0)
            pruned += int(newly.sum())
            mask.masked_fill_(newly, 0)
            p.copy_(w * mask)
        return {"pruned": pruned}


@torch.no_grad()
def prune(
    gm: nn.Module,
    evaluate: Evaluate,
    twt: float,
    *,
    granularity: str = "weight",
    score_fn: ScoreFn | None = None,
    loss_before: float | None = None,
    sync_distributed: bool = True,
    precision: float = 0.0,
    slim_aware: bool = True,
    example_inputs: Any = None,
    channel_multiple: int | None = 1,
) -> PruneResult:
    """Run one pruning phase on an instrumented module.

    Args:
        gm: a module returned by :func:`lobster_fx.instrument`.
        evaluate: ``evaluate(model) -> float``, the validation loss of ``model``
            (deterministic: it is called on several candidate models).
        twt: relative tolerance, ``>= 0``; ``0`` prunes only what costs nothing.
        granularity: ``"weight"``: single parameters by ``|w|``; ``"neuron"``: whole
            units of the Linear / Conv layers in the traced graphs (a row or filter, its
            bias, and the matching entries of a BatchNorm right after); other masked
            parameters are left as they are. See :mod:`lobster_fx.pruning.neuron`.
        score_fn: with ``"neuron"``, a name from
            :data:`lobster_fx.pruning.neuron.UNIT_SCORES` (``"relative-norm"``, the default:
            each unit's L2 norm over its layer's mean; ``"norm"``: the raw L2 norm) or
            ``score_fn(unit, weight) -> tensor of unit.count`` scores (``unit`` a
            :class:`lobster_fx.graph.taps.Unit`, ``weight`` its masked weight). Scores of
            all layers share one threshold.
        loss_before: the loss of ``gm`` as it is, when already known (saves one
            evaluation); must be what ``evaluate(gm)`` would return.
        sync_distributed: under ``torch.distributed`` average each loss over the
            ranks so that every rank takes the same decision.
        precision: stop the bisection once the undecided candidates are at most
            this share of all of them (``0``: exact, the paper's largest threshold).
            The returned threshold still met the bound; it prunes at most
            ``precision`` x (live candidates) fewer than the exact search, and
            needs about ``log2(1 / precision)`` evaluations instead of
            ``log2(live candidates)``.
        slim_aware: with ``"neuron"``, ask slim's analysis which units it can remove
            (:mod:`lobster_fx.pruning.unit_groups`): units whose outputs are added (a
            residual stage) are pruned together, channel ``k`` of all of them at once,
            scored by their mean score; units slim cannot remove (a channel group
            frozen by an op slim does not slice) are not candidates, so the tolerance
            is spent where slim turns it into speed. ``False``: every unit alone.
        example_inputs: the inputs slim's analysis runs the model on (as
            :func:`lobster_fx.slim` takes them). Default: the inputs of the model's first
            forward in ``evaluate(model)``, which is stopped there (not a full evaluation).
            If the analysis fails, a warning says why and every unit stands alone.
        channel_multiple: with ``slim_aware``, in channel groups that a conv touches,
            prune only the units that slim with this ``channel_multiple`` will remove (the
            lowest-scored, so many that the kept count is a multiple of it; ``None``: slim's
            default, 8). The default ``1`` prunes every unit under the threshold: a unit
            that slim rounds back is kept as a zero filter, and a later phase can complete
            the block. Measured on LeNet-5 / MNIST (SeReNe, 60 epochs): ``8`` reached 1.30x
            fewer live MACs than dense, ``1`` 1.86x (``benchmarks/results/methods.md``).

    Returns:
        A :class:`PruneResult`. On error (NaN loss, bad ``twt``) the model is
        left exactly as it was.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range
            (``twt=None``, ``twt="x"``, ``precision=1``, ``granularity="row"``, a
            ``score_fn`` with ``"weight"``); the message names it.
    """
    check_evaluate(evaluate, "prune")
    twt = check_real(twt, "twt", "prune", minimum=0)
    precision = check_real(precision, "precision", "prune", minimum=0, below=1)
    if loss_before is not None:
        loss_before = check_real(loss_before, "loss_before", "prune")
    sync_distributed = check_flag(sync_distributed, "sync_distributed", "prune")
    check_granularity(granularity, score_fn, "prune")
    gm = unwrap(gm)
    modes = [(m, m.training) for m in gm.modules()]

    def loss_of(what: str) -> float:
        loss = _checked_loss(evaluate, gm, what)
        return _all_reduce_mean(loss) if sync_distributed else loss

    slim_aware = check_flag(slim_aware, "slim_aware", "prune")
    channel_multiple = _check_multiple(channel_multiple, "prune")
    plan: Any = None
    evaluations = 0
    try:
        capture = granularity == "neuron" and slim_aware and example_inputs is None
        if loss_before is None:
            with _FirstInputs(gm, stop=False) if capture else contextlib.nullcontext() as first:
                loss_before = loss_of("before pruning")
            evaluations += 1
        elif capture:
            with _FirstInputs(gm, stop=True) as first:
                evaluate(gm)  # stopped at the model's first forward: not an evaluation
        if capture:
            example_inputs = first.inputs
        if granularity == "neuron":
            from lobster_fx.pruning.neuron import UnitPlan

            plan = UnitPlan(gm, score_fn, example_inputs=example_inputs if slim_aware else None,
                            channel_multiple=channel_multiple)
        else:
            plan = _WeightPlan(gm)
        bound = loss_before + twt * abs(loss_before)
        candidates = plan.candidates()

        # bisection over candidate index: lo is known to meet the bound (-1 = prune nothing)
        lo, hi, loss_lo = -1, candidates.numel(), loss_before
        stop_width = max(1, int(precision * candidates.numel()))
        while hi - lo > stop_width:
            mid = (lo + hi) // 2
            plan.apply(float(candidates[mid]))
            loss = loss_of(f"with threshold {float(candidates[mid]):.6g}")
            evaluations += 1
            if loss <= bound:
                lo, loss_lo = mid, loss
            else:
                hi = mid
    except BaseException:
        if plan is not None:
            plan.restore()
        raise
    finally:
        for m, t in modes:
            m.training = t
        for m, _ in modes:  # a LobsterGraphModule must also switch back its graph
            if isinstance(m, LobsterGraphModule):
                m.sync_mode_graph()

    threshold = float(candidates[lo]) if lo >= 0 else -math.inf
    counts = plan.commit(threshold)
    entries = list(masked_parameters(gm))
    total = sum(mask.numel() for _, _, mask in entries)
    remaining = sum(int((mask != 0).sum()) for _, _, mask in entries)
    if granularity == "neuron":
        counts["units_skipped"] = sum(layer.unit.count for layer in plan.layers if layer.unit.name in plan.skipped)
    return PruneResult(threshold, loss_before, loss_lo, bound, evaluations, counts.pop("pruned"), remaining, total,
                       granularity, **counts)


class _Captured(BaseException):
    """Stops ``evaluate`` at the model's first forward (a BaseException: ``except Exception``
    in a user's evaluate does not swallow it)."""


class _FirstInputs:
    """Keeps the inputs of ``gm``'s first forward in the block as ``(*args, kwargs)`` (:attr:`inputs`,
    None if there was none); with ``stop``, that forward is stopped and the block ends there."""

    def __init__(self, gm: nn.Module, stop: bool) -> None:
        self.gm, self.stop, self.inputs = gm, stop, None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs is None:
            self.inputs = (*args, dict(kwargs))
            if self.stop:
                raise _Captured

    def __enter__(self) -> _FirstInputs:
        self.handle = self.gm.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        self.handle.remove()
        return kind is _Captured


def _check_multiple(value: Any, who: str) -> int:
    """slim's ``channel_multiple`` (None: its default), checked; the message names ``who``."""
    from lobster_fx.passes.slim.entry import _channel_multiple

    try:
        return _channel_multiple(value)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None


def check_granularity(granularity: Any, score_fn: Any, who: str) -> str:
    """``granularity`` if it is one of :data:`GRANULARITIES` and ``score_fn`` fits it."""
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"{who}: granularity must be 'weight' or 'neuron', got {granularity!r} "
                         f"({type(granularity).__name__})")
    if score_fn is not None:
        from lobster_fx.pruning.neuron import resolve_score

        resolve_score(score_fn, who)  # an unknown name or a non-callable, named now
    if score_fn is not None and granularity != "neuron":
        raise ValueError(f"{who}: score_fn scores units: it needs granularity='neuron' (weights are scored by |w|)")
    return granularity


class PruneAction:
    """What a schedule does when its trigger fires: one :func:`prune` call with fixed settings.

    ``action(gm, evaluate, loss_before=None)`` runs the phase. The settings are checked here
    (the message names the argument and ``who``).

        >>> PruneAction(0.05, granularity="neuron")
        PruneAction(twt=0.05, granularity='neuron', precision=0)
    """

    def __init__(self, twt: float = 0.05, *, granularity: str = "weight", score_fn: ScoreFn | None = None,
                 precision: float = 0.0, sync_distributed: bool = True, slim_aware: bool = True,
                 channel_multiple: int | None = 1, who: str = "PruneAction") -> None:
        self.twt = check_real(twt, "twt", who, minimum=0)
        self.granularity = check_granularity(granularity, score_fn, who)
        self.score_fn = score_fn
        self.precision = check_real(precision, "search_precision" if who == "PlateauPruner" else "precision", who,
                                    minimum=0, below=1)
        self.sync_distributed = check_flag(sync_distributed, "sync_distributed", who)
        self.slim_aware = check_flag(slim_aware, "slim_aware", who)
        self.channel_multiple = _check_multiple(channel_multiple, who)

    def __call__(self, gm: nn.Module, evaluate: Evaluate, loss_before: float | None = None) -> PruneResult:
        return prune(gm, evaluate, self.twt, granularity=self.granularity, score_fn=self.score_fn,
                     loss_before=loss_before, sync_distributed=self.sync_distributed, precision=self.precision,
                     slim_aware=self.slim_aware, channel_multiple=self.channel_multiple)

    def __repr__(self) -> str:
        return f"PruneAction(twt={self.twt:g}, granularity={self.granularity!r}, precision={self.precision:g})"
