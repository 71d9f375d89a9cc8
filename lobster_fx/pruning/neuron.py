"""What ``prune(..., granularity="neuron")`` prunes: whole units of Linear / Conv layers.

The units are those of :func:`lobster_fx.graph.taps.find_units`: the output features of a
``linear`` and the output channels (filters) of a ``conv1d/2d/3d`` whose weight is masked, in
the traced graphs. Pruning unit ``k`` of a layer clears, in one go,

* row ``k`` of the weight's mask (a Linear row, a conv filter) and entry ``k`` of the bias's
  mask: the unit then outputs exactly 0;
* entry ``k`` of the weight and bias of a BatchNorm applied right after the layer: the
  normalised output is then ``0 * x_hat + 0 = 0`` as well, not the constant
  ``beta - gamma * mean / sqrt(var + eps)``, which a following zero-padded conv could not
  absorb. Where the BatchNorm's weight and bias are masked (``instrument(model, filter_fn=...)``
  opting them in) their mask entries are cleared: pinned like the unit. Where they are not
  masked (the default) they are set to 0 at pruning. Training then keeps ``gamma`` at 0 (a
  channel that is 0 on every sample has ``x_hat = 0``: no gradient to ``gamma``) but may move
  ``beta``: the unit then outputs the constant ``beta``, which ``slim`` folds into the next
  layer's bias where that is exact; mask the BatchNorm to pin it at 0.

``lobster_fx.fold`` then ``lobster_fx.slim`` delete the pruned units (the rows, the BatchNorm
entries and the consumers' columns). A unit is *live* while some entry of its weight row or its
bias is unmasked; only live units are candidates. Units whose output is the graph's output
(the logits of a classifier) are never pruned: slim keeps output shapes. Masked parameters that
belong to no unit (embeddings, attention, raw matmul weights) are left as they are.

Which units are candidates is slim's call: with example inputs (``prune`` takes them from the
model's first forward inside ``evaluate``) slim's own analysis
(:mod:`lobster_fx.pruning.unit_groups`) says which units it removes only together (layers whose
outputs are added: a residual stage) and which it cannot remove at all. The former are pruned as
one, channel ``k`` of every member, scored by the members' mean score; the latter are left alone
(:attr:`UnitPlan.skipped`). Pruning a residual channel in one block only would spend the
tolerance on a unit that ``slim`` must keep.

Scores: ``score_fn(unit, weight)`` gets the :class:`~lobster_fx.graph.taps.Unit` and the layer's
masked weight (a detached tensor) and returns ``unit.count`` finite scores; or a name from
:data:`UNIT_SCORES` (users may add their own). One threshold for all layers, so the scores must
be comparable across layers:

* ``"relative-norm"`` (the default, :func:`relative_norm`): each unit's L2 norm divided by the
  mean norm of its layer's live units (Torch-Pruning's ``"mean"`` normaliser). Every layer is
  then judged against its own scale, so conv filters compete with fc rows.
* ``"norm"`` (:func:`weight_norm`): the raw L2 norm. A conv filter has more weights than a small
  fc row and a larger norm: on LeNet-5 it kept every conv channel (the layers where the MACs are)
  and pruned only fc1 rows (``benchmarks/results/methods.md``, session 21).

Example::

    >>> import torch, lobster_fx
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> gm = lobster_fx.instrument(model)
    >>> x = torch.randn(64, 8); y = gm(x).detach()
    >>> evaluate = lambda m: float(torch.nn.functional.mse_loss(m(x), y)) + 1.0
    >>> r = lobster_fx.prune(gm, evaluate, twt=0.05, granularity="neuron")
    >>> r.loss_after <= 1.05 * r.loss_before, r.units_total
    (True, 6)
    >>> rows = lobster_fx.masks(gm)["0.weight"].eq(0).all(1)
    >>> int(rows.sum()) == r.units_pruned
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lobster_fx.graph.instrument import masked_parameters
from lobster_fx.graph.taps import Unit, find_units
from lobster_fx.pruning.unit_groups import UnitGroups, slim_unit_groups

__all__ = ["UNIT_SCORES", "UnitPlan", "relative_norm", "resolve_score", "weight_norm"]


def weight_norm(unit: Unit, weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each unit's (masked) weights, in float32 or wider (``score_fn="norm"``).

        >>> import torch
        >>> from lobster_fx.graph.taps import Unit
        >>> u = Unit("fc", "linear", "fc.weight", None, 2, -1, None, False, "", "linear")
        >>> weight_norm(u, torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
    """
    return weight.detach().flatten(1).to(torch.promote_types(weight.dtype, torch.float32)).norm(dim=1)


def relative_norm(unit: Unit, weight: torch.Tensor) -> torch.Tensor:
    """The default unit score: each unit's L2 norm over the mean L2 norm of the layer's live units
    (units whose masked weights are all 0 score 0 and are left out of the mean).

        >>> import torch
        >>> from lobster_fx.graph.taps import Unit
        >>> u = Unit("fc", "linear", "fc.weight", None, 3, -1, None, False, "", "linear")
        >>> relative_norm(u, torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]))
        tensor([1.6667, 0.3333, 0.0000])
    """
    norms = weight_norm(unit, weight)
    live = norms > 0
    if not bool(live.any()):
        return norms
    return norms / norms[live].mean()


#: unit scores by name (``prune(..., score_fn="relative-norm")``); add entries to offer more
UNIT_SCORES: dict[str, Any] = {"relative-norm": relative_norm, "norm": weight_norm}
#: the score of ``granularity="neuron"`` when none is given
DEFAULT_UNIT_SCORE = "relative-norm"


def resolve_score(score_fn: Any, who: str = "prune") -> Any:
    """The callable for ``score_fn``: a name from :data:`UNIT_SCORES`, a callable, or None (the
    default, :data:`DEFAULT_UNIT_SCORE`).

        >>> resolve_score("norm") is weight_norm, resolve_score(None) is relative_norm
        (True, True)
    """
    if score_fn is None:
        score_fn = DEFAULT_UNIT_SCORE
    if isinstance(score_fn, str):
        if score_fn not in UNIT_SCORES:
            raise ValueError(f"{who}: unknown unit score {score_fn!r}; known: {', '.join(UNIT_SCORES)} "
                             "(or pass a callable (unit, weight) -> scores)")
        return UNIT_SCORES[score_fn]
    if not callable(score_fn):
        raise TypeError(f"{who}: score_fn must be a name from UNIT_SCORES, a callable (unit, weight) -> scores "
                        f"or None, got {score_fn!r} ({type(score_fn).__name__})")
    return score_fn


@dataclass
class _Layer:
    unit: Unit
    weight: torch.Tensor  # the raw parameter
    weight_mask: torch.Tensor
    bias: torch.Tensor | None
    bias_mask: torch.Tensor | None
    norm: list[tuple[torch.Tensor, torch.Tensor | None]]  # BatchNorm weight / bias, with their masks
    live: torch.Tensor  # bool[count]
    scores: torch.Tensor  # float[count]


def _unit_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.ne(0).flatten(1).any(1) if mask.dim() > 1 else mask.ne(0)


def _owner_attr(param_path: str) -> tuple[str, str]:
    """``(module path, attribute)`` of a masked parameter's raw path (``bn.parametrizations.weight.original``
    for one masked at module level)."""
    if ".parametrizations." in f".{param_path}":
        mod, _, rest = f".{param_path}".partition(".parametrizations.")
        return mod[1:], rest.split(".")[0]
    mod, _, attr = param_path.rpartition(".")
    return mod, attr


def _norm_entries(gm: nn.Module, path: str, masked: dict[tuple[str, str], tuple]) -> list[tuple[torch.Tensor, Any]]:
    """The raw weight and bias of the BatchNorm at ``path``, each with its mask or None."""
    bn = gm.get_submodule(path)
    out = []
    for attr in ("weight", "bias"):
        if (path, attr) in masked:
            out.append(masked[(path, attr)])
        elif isinstance(bn._parameters.get(attr), torch.Tensor):
            out.append((bn._parameters[attr], None))
    return out


@dataclass
class _Cluster:
    """Units pruned as one: a single layer's units, or the coupled layers of a residual group
    (channel ``k`` of every member at once). Scores are the members' mean."""

    members: list[_Layer]
    scores: torch.Tensor  # float64[count], on the CPU
    live: torch.Tensor  # bool[count], on the CPU: some member's unit is live
    multiple: int = 1  # slim keeps a multiple of this many channels (channel_multiple, conv groups)

    def pruned(self, threshold: float) -> torch.Tensor:
        """The live units scored ``<= threshold``; with ``multiple > 1`` only the lowest-scored of
        them that slim will really remove: slim keeps ``min(count, ceil(max(1, kept) / multiple) *
        multiple)`` channels, so the rest would be zeroed for nothing (and cost loss)."""
        rows = (self.scores <= threshold) & self.live
        if self.multiple <= 1 or not bool(rows.any()):
            return rows
        size, live, wanted = self.scores.numel(), int(self.live.sum()), int(rows.sum())
        kept = min(size, -(-max(1, live - wanted) // self.multiple) * self.multiple)
        take = max(0, live - kept)
        if take >= wanted:
            return rows
        idx = rows.nonzero().flatten()
        lowest = idx[torch.argsort(self.scores[idx], stable=True)[:take]]
        out = torch.zeros_like(rows)
        out[lowest] = True
        return out


class UnitPlan:
    """The units of ``gm``, their scores, and how to prune those scored ``<= threshold``.

    Used by :func:`lobster_fx.prune`: :meth:`candidates`, then :meth:`apply` per evaluated
    threshold, :meth:`restore` on error, :meth:`commit` of the chosen threshold (masks cleared).

    With ``example_inputs`` slim's analysis runs on them
    (:func:`lobster_fx.pruning.unit_groups.slim_unit_groups`): units that slim removes only
    together are pruned together; units slim cannot remove are not candidates (:attr:`skipped`
    names their layers, with slim's reason), and in channel groups a conv touches units are pruned
    only as far as slim with ``channel_multiple`` will remove them. Without them every unit stands
    alone.
    """

    def __init__(self, gm: nn.Module, score_fn: Any = None, example_inputs: Any = None,
                 channel_multiple: int = 1) -> None:
        skipped: dict[str, str] = {}
        units = [u for u in find_units(gm, skipped=skipped).values() if not u.feeds_output]
        if not units:
            why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
            raise ValueError("prune: granularity='neuron' found no Linear / Conv units to prune in the traced graphs "
                             "(a layer whose output is the model's output is not pruned)" + (f"; {why}" if why else ""))
        by_name = {info.name: (p, mask) for info, p, mask in masked_parameters(gm)}
        masked_by_owner = {_owner_attr(info.param_path): (p, mask) for info, p, mask in masked_parameters(gm)}
        score_fn = resolve_score(score_fn)
        self.layers: list[_Layer] = []
        for unit in units:
            w, wm = by_name[unit.weight]
            b, bm = by_name[unit.bias] if unit.bias is not None else (None, None)
            norm = _norm_entries(gm, unit.norm, masked_by_owner) if unit.norm is not None else []
            live = _unit_mask(wm)
            if bm is not None:
                live |= bm.ne(0)
            scores = score_fn(unit, (w * wm).detach())
            if not isinstance(scores, torch.Tensor) or scores.shape != (unit.count,) or scores.is_complex():
                raise ValueError(f"prune: score_fn must return a real tensor of shape ({unit.count},) for layer "
                                 f"{unit.name!r} (node {unit.node}), got "
                                 f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
            scores = scores.detach().to(torch.float64).cpu()
            if not bool(torch.isfinite(scores[live.cpu()]).all()):
                raise ValueError(f"prune: score_fn returned a non-finite score for a live unit of layer {unit.name!r}")
            self.layers.append(_Layer(unit, w, wm, b, bm, norm, live, scores))
        self.skipped: dict[str, str] = {}  #: layer name -> why its units are not candidates
        groups = None if example_inputs is None else self._slim_groups(gm, example_inputs)
        self.clusters = self._clusters(groups, channel_multiple)
        self._tensors = [t for layer in self.layers for t in (layer.weight, layer.bias, *(p for p, _ in layer.norm))
                         if t is not None]
        self._tensors = list({id(t): t for t in self._tensors}.values())
        self._originals = [t.detach().clone() for t in self._tensors]

    def _slim_groups(self, gm: nn.Module, example_inputs: Any) -> UnitGroups | None:
        try:
            return slim_unit_groups(gm, example_inputs, units=[layer.unit.weight for layer in self.layers])
        except Exception as e:  # noqa: BLE001 - any failure: prune as before, and say so
            first = (str(e).strip().splitlines() or [""])[0]
            warnings.warn(f"prune: slim's analysis failed on the example inputs ({type(e).__name__}: {first}); every "
                          "unit is pruned on its own, including units slim cannot remove", stacklevel=4)
            return None

    def _clusters(self, groups: UnitGroups | None, channel_multiple: int) -> list[_Cluster]:
        by_weight = {layer.unit.weight: layer for layer in self.layers}
        blocked = groups.blocked if groups is not None else {}
        coupled = [[by_weight[w] for w in ws if w in by_weight] for ws in (groups.coupled if groups else [])]
        coupled = [c for c in coupled if len(c) > 1 and len({m.unit.count for m in c}) == 1]
        in_coupled = {id(m) for c in coupled for m in c}
        aligned = groups.aligned if groups is not None else set()

        def multiple(members: list[_Layer]) -> int:
            return channel_multiple if any(m.unit.weight in aligned for m in members) else 1

        alone = []
        for layer in self.layers:
            if layer.unit.weight in blocked:
                self.skipped[layer.unit.name] = blocked[layer.unit.weight]
            elif id(layer) not in in_coupled:
                alone.append([layer])
        # a layer on its own is a cluster of one: the mean and the any of one unit are its own
        return [_Cluster(members, torch.stack([m.scores for m in members]).mean(0),
                         torch.stack([m.live.cpu() for m in members]).any(0), multiple(members))
                for members in alone + coupled]

    def candidates(self) -> torch.Tensor:
        """The distinct scores of the live units, sorted."""
        live = [c.scores[c.live] for c in self.clusters]
        return torch.unique(torch.cat(live)) if live else torch.empty(0, dtype=torch.float64)

    def apply(self, threshold: float) -> None:
        """The model with the live units scored ``<= threshold`` zeroed (masks untouched)."""
        self.restore()
        for cluster in self.clusters:
            rows_cpu = cluster.pruned(threshold)
            if not bool(rows_cpu.any()):
                continue
            for layer in cluster.members:
                rows = rows_cpu.to(layer.weight.device)
                layer.weight[rows] = 0
                if layer.bias is not None:
                    layer.bias[rows.to(layer.bias.device)] = 0
                for p, _ in layer.norm:
                    p[rows.to(p.device)] = 0

    def restore(self) -> None:
        for t, o in zip(self._tensors, self._originals):
            t.copy_(o)

    def commit(self, threshold: float) -> dict[str, int]:
        """Prune for good: masks cleared (unmasked BatchNorm entries zeroed); returns the counts."""
        self.restore()
        pruned = units_pruned = 0
        for cluster in self.clusters:
            cluster_rows = cluster.pruned(threshold)
            cluster.live = cluster.live & ~cluster_rows
            if not bool(cluster_rows.any()):
                continue
            for layer in cluster.members:
                rows = cluster_rows & layer.live.cpu()
                units_pruned += int(rows.sum())
                layer.live = layer.live & ~rows.to(layer.live.device)
                targets = [(layer.weight, layer.weight_mask), (layer.bias, layer.bias_mask), *layer.norm]
                for p, mask in targets:
                    if p is None:
                        continue
                    r = cluster_rows.to(p.device)
                    if mask is None:
                        p[r] = 0
                        continue
                    pruned += int(mask[r].ne(0).sum())
                    mask[r] = 0
                    p.mul_(mask)
        return {
            "pruned": pruned,
            "units_pruned": units_pruned,
            "units_remaining": sum(int(layer.live.sum()) for layer in self.layers),
            "units_total": sum(layer.unit.count for layer in self.layers),
        }
