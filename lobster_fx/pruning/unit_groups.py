"""Which units ``slim`` can remove, and which it removes only together: neuron pruning asks slim.

Neuron pruning zeroes a unit so that :func:`lobster_fx.slim` deletes it. Two kinds of units
defeat that when pruned one by one:

* *coupled* units: the output channels of layers whose outputs are added (a residual stage:
  the stem and every block's last conv, or a conv shortcut). Channel ``k`` of the sum is 0
  only when channel ``k`` of every addend is: pruning it in one block alone removes nothing.
* units slim cannot remove at all: their channel group is *frozen* by an op slim does not
  slice (a channel ``F.pad`` of an option-A shortcut, a strided ``getitem``, the graph
  output, a grouped conv), or produced also by a layer that is not pruned.

:func:`slim_unit_groups` runs slim's own analysis (:class:`lobster_fx.passes.slim.analysis.Analysis`,
the single source of truth for what slim removes) on a folded copy of the model and returns
both: the coupled sets, pruned as one unit (channel ``k`` of every member at once, scored by
the members' mean score, as Torch-Pruning's dependency groups are), the units left alone,
each with slim's reason, and the units whose channel count slim rounds to its ``channel_multiple``
(groups a conv touches). The model is not modified.

    >>> import torch, lobster_fx
    >>> from torch import nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
    ...     def forward(self, x):
    ...         h = torch.relu(self.a(x))
    ...         return self.c(h + self.b(h))
    >>> gm = lobster_fx.instrument(Res())
    >>> groups = slim_unit_groups(gm, (torch.randn(3, 4),))
    >>> groups.coupled, sorted(groups.blocked)  # c is the output layer: slim keeps its units
    ([['a.weight', 'b.weight']], ['c.weight'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["UnitGroups", "slim_unit_groups"]


@dataclass
class UnitGroups:
    """What slim's analysis says about the units of a model (keys: masked weight names)."""

    #: sets of units whose output channels slim removes only together (sorted weight names)
    coupled: list[list[str]] = field(default_factory=list)
    #: units slim cannot remove, with the reason (a frozen channel group, an unpruned co-producer)
    blocked: dict[str, str] = field(default_factory=dict)
    #: units slim's analysis saw as layers (others are left to score alone)
    seen: set[str] = field(default_factory=set)
    #: units of channel groups that a conv produces or reads: slim rounds their kept count up to
    #: a multiple of its ``channel_multiple``
    aligned: set[str] = field(default_factory=set)


def first_rows(example_inputs: Any, rows: int = 2) -> Any:
    """``example_inputs`` with every tensor whose first dim is the batch (the first dim of the first
    tensor found) cut to its first ``rows`` rows: the channel groups do not depend on the batch, and
    slim's analysis keeps a copy of every layer's input (a validation batch of 5,000 images would
    cost gigabytes).

        >>> x, mask = torch.zeros(100, 3), torch.zeros(7)
        >>> [tuple(t.shape) for t in first_rows((x, {"mask": mask}))[:1]], first_rows((x, {"mask": mask}))[1]["mask"].shape
        ([(2, 3)], torch.Size([7]))
    """
    leaves = [t for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves:
        return example_inputs
    batch = leaves[0].shape[0]
    if batch <= rows:
        return example_inputs
    return tree_map(lambda t: t[:rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch
                    else t, example_inputs)


@torch.no_grad()
def slim_unit_groups(gm: nn.Module, example_inputs: Any, units: list[str] | None = None) -> UnitGroups:
    """Slim's channel groups of the instrumented ``gm`` on ``example_inputs`` (a tensor, a tuple of
    positional inputs whose last item may be a dict of keyword inputs, or a dict; as :func:`lobster_fx.slim`
    takes them).

    ``units``: the weight names that neuron pruning may prune (default: every masked weight
    slim sees). A group that another layer also produces (an unmasked conv, the classifier) is
    blocked: pruning only some producers of a channel leaves it alive.

    The analysis runs on the first two samples (:func:`first_rows`), or on all of them if that fails.
    Raises whatever tracing or running the folded copy raises (the caller decides what to do).
    """
    from lobster_fx.graph.instrument import unwrap
    from lobster_fx.passes.fold import fold
    from lobster_fx.passes.slim.analysis import Analysis
    from lobster_fx.passes.slim.entry import none_names, positional, prepare_inference_graph, split_inputs

    args, kwargs = split_inputs(example_inputs)
    folded = fold(unwrap(gm))
    inference = prepare_inference_graph(folded, none_names(folded, args, kwargs))
    del folded
    small_args, small_kwargs = first_rows((args, kwargs))
    try:
        an = Analysis(inference, positional(inference, small_args, small_kwargs))
    except Exception:  # noqa: BLE001 - a model whose inputs do not cut along dim 0: the whole batch
        an = Analysis(inference, positional(inference, args, kwargs))
    g = an.groups
    by_root: dict[int, list[str]] = {}
    for n, lay in an.producers:
        by_root.setdefault(g.find(lay.segs[0].group), []).append(an.layers[n].weight_target)
    allowed = set(units) if units is not None else {w for ws in by_root.values() for w in ws}
    out = UnitGroups(seen={w for ws in by_root.values() for w in ws})
    conv_roots = an.conv_roots()
    out.aligned = {w for root, ws in by_root.items() if root in conv_roots for w in ws}
    for root, weights in by_root.items():
        mine = sorted(w for w in weights if w in allowed)
        if not mine:
            continue
        if root in g.frozen:
            reason = g.frozen[root]
        elif len(mine) < len(weights):
            others = ", ".join(sorted(w for w in weights if w not in allowed))
            reason = f"its channels are also produced by {others}, which neuron pruning does not prune"
        else:
            if len(mine) > 1:
                out.coupled.append(mine)
            continue
        for w in mine:
            out.blocked[w] = reason
    out.coupled.sort()
    return out
