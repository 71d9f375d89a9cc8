"""Channel groups and layouts: how slim describes the units a tensor carries.

A *channel group* is a set of aligned unit indices that must be removed together
(the outputs of a layer, and every tensor added to / multiplied with them); groups are
merged with union-find. A :class:`Layout` says how one axis of a tensor is made of
segments of groups (``torch.cat`` puts several side by side; ``flatten`` turns one
channel into ``inner`` contiguous columns), and which channels are constants.

    >>> import torch
    >>> groups = Groups()
    >>> a, b = groups.new(4), groups.new(4)
    >>> groups.union(a, b)
    >>> groups.find(b) == groups.find(a)
    True
    >>> lay = Layout(rank=2, axis=1, segs=[Seg(a, 4, 3, torch.zeros(4, dtype=torch.bool))])
    >>> lay.width, lay.describe(groups)
    (12, 'axis 1/2: g0[4x3]')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_flatten


class Unsupported(Exception):
    """Raised by an op handler: the op is not understood for its channel groups. The
    message is the reason the groups of its inputs are frozen (kept whole)."""


class _UnknownType:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: a handler's answer for "this op is not one I know": the analysis freezes the groups
#: of its tracked inputs ("unsupported op ...") and treats its output as untracked
UNKNOWN: Any = _UnknownType()


class Groups:
    """Union-find over channel groups; a group is a set of aligned unit indices."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        assert self.size[ra] == self.size[rb]
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))

    def freeze(self, g: int, reason: str) -> None:
        self.frozen.setdefault(self.find(g), reason)

    def is_frozen(self, g: int) -> bool:
        return self.find(g) in self.frozen


@dataclass
class Seg:
    group: int
    count: int  # channels of the group in this segment
    inner: int  # contiguous positions per channel along the axis (after flatten)
    const: torch.Tensor  # bool[count]: channel is a constant (input-independent)


@dataclass
class Layout:
    """How a tensor's ``axis`` is made of channel-group segments."""

    rank: int
    axis: int
    segs: list[Seg]

    @property
    def width(self) -> int:
        return sum(s.count * s.inner for s in self.segs)

    def structure(self) -> list[tuple[int, int]]:
        return [(s.count, s.inner) for s in self.segs]

    def with_(self, *, rank: int | None = None, axis: int | None = None,
              segs: list[Seg] | None = None) -> Layout:
        return Layout(self.rank if rank is None else rank, self.axis if axis is None else axis,
                      list(self.segs) if segs is None else segs)

    def no_const(self) -> Layout:
        return self.with_(segs=[Seg(s.group, s.count, s.inner, torch.zeros_like(s.const)) for s in self.segs])

    def offsets(self) -> list[int]:
        """Start of every segment along the axis."""
        out, off = [], 0
        for s in self.segs:
            out.append(off)
            off += s.count * s.inner
        return out

    def describe(self, groups: Groups) -> str:
        parts = [f"g{groups.find(s.group)}[{s.count}x{s.inner}]" for s in self.segs]
        return f"axis {self.axis}/{self.rank}: " + "+".join(parts)


@dataclass
class Plan:
    """Which units of which group a round removes."""

    keep: dict[int, torch.Tensor]  # group root -> bool[size], only groups that lose units
    groups: Groups
    aligned: int = 0  # removable units kept to round channel counts up (channel_multiple)

    def expand(self, lay: Layout) -> torch.Tensor:
        """Keep mask over the positions of ``lay.axis``."""
        parts = []
        for s in lay.segs:
            k = self.keep.get(self.groups.find(s.group))
            k = torch.ones(s.count, dtype=torch.bool) if k is None else k
            parts.append(k.repeat_interleave(s.inner))
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool)


# --------------------------------------------------------------------------- #
# small helpers on nodes
# --------------------------------------------------------------------------- #


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, positional or by keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def set_arg(node: Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, bool)) and not isinstance(x, Node)


def has_node(x: Any) -> bool:
    return any(isinstance(a, Node) for a in tree_flatten(x)[0])


def all_zero(p: Any) -> bool:
    return all(v == 0 for v in (p if isinstance(p, (tuple, list)) else (p,)))
