"""Slim pass: physically remove dead units from a folded (sparse) model.

LOBSTER leaves whole neurons / filters at zero. Zeros in a dense tensor cost the same
FLOPs as any other value, so this pass deletes the units themselves (ONNX Runtime
densifies sparse initializers; measurements in benchmarks/RESULTS.md).

A unit (output feature of a Linear, output channel of a Conv) is *dead* when

* its outgoing weights are zero in every consumer: its value does not matter,
  so it is deleted (producer row, BatchNorm entries, consumer columns); or
* its incoming weights are all zero: it computes a constant (its bias, passed
  through BatchNorm / activations / pooling). The constant is folded into the
  consumers' biases (``bias += W[:, k] * c``) and the unit is deleted. For a
  consumer conv with zero padding the fold is wrong at the borders, so there
  the unit is deleted only when its constant is exactly 0 (e.g. after a ReLU).

Tensors that are added / multiplied together (residual connections,
squeeze-excitation) share one *channel group* (union-find): a channel is
removed from the group only if it is removable in every consumer of every
member, and it is constant in a member only if every path into it is.
``torch.cat`` concatenates groups with offsets; ``flatten`` (or
``view(x.size(0), -1)``) maps a channel to a contiguous block of columns;
pooling, ``mean`` over spatial dims, eval-mode dropout / stochastic depth pass
channels through. Depthwise convs (``groups == channels``) are per-channel
members of their group (their ``groups`` argument follows the channel count).

What each op does is an entry of the op registry (:mod:`.registry`; the built-in
entries are in :mod:`.ops`). A user extends it with :func:`register_elementwise`: a
custom activation module, function or tensor method declared channel-preserving, so
units are removed across it.

Skipped (the group is *frozen*: nothing in it is removed, the reason is in
``report.frozen`` and in ``node.meta["lobster_slim"]``): ops without a registry entry,
grouped convs that are not depthwise, LayerNorm / softmax / anything mixing channels,
slicing, ``permute``, reads of the channel count (``x.size(1)``, ``view(-1, 800)``),
weights shared between layers or read elsewhere, Linear/Conv kept as ``call_module``
leaves or opaque (untraced) modules, Embedding and transposed convs, and the graph
output (output shapes never change; inputs are never pruned either). The pass repeats
until no unit is removable (removing a unit can make others dead) and checks the
outputs against the untouched model on ``example_inputs`` after each round.

Conv channel groups are rounded up to a multiple of ``channel_multiple`` (default 8)
kept units, for ONNX Runtime's blocked conv kernels; see :func:`slim`.

The result is an inference model: it is returned in eval mode with only the
eval graph (BatchNorm must use its running statistics for the folds to hold).

Modules: :mod:`.entry` (inputs, tracing, rounds, output check), :mod:`.analysis`
(layers, channel groups, the plan), :mod:`.layout` (groups and layouts),
:mod:`.registry` / :mod:`.ops` (what slim knows about ops), :mod:`.rewrite` (apply the
plan), :mod:`.report` (report, error, tolerances).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lobster_fx.passes.slim import slim
    >>> m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    >>> with torch.no_grad():
    ...     m[0].weight[1] = 0      # unit 1 is constant: relu(bias[1])
    ...     m[2].weight[:, 2] = 0   # unit 2 feeds nothing
    >>> x = torch.randn(5, 6)
    >>> gm = slim(m, (x,))
    >>> tuple(gm.get_submodule("0").weight.shape), tuple(gm.get_submodule("2").weight.shape)
    ((2, 6), (3, 2))
    >>> bool(torch.allclose(gm(x), m(x), atol=1e-6))
    True
    >>> gm.meta["lobster_slim"].params_before, gm.meta["lobster_slim"].params_after
    (43, 23)
"""

from lobster_fx.passes.slim.entry import DEFAULT_CHANNEL_MULTIPLE, prepare_inference_graph, slim
from lobster_fx.passes.slim.registry import (
    OpRule,
    op_rule,
    register_elementwise,
    unregister_elementwise,
)
from lobster_fx.passes.slim.report import (
    META_KEY,
    LayerSlim,
    SlimError,
    SlimReport,
    coarsest_float_dtype,
    default_rtol,
)

__all__ = [
    "slim",
    "register_elementwise",
    "unregister_elementwise",
    "op_rule",
    "OpRule",
    "SlimReport",
    "LayerSlim",
    "SlimError",
    "prepare_inference_graph",
    "default_rtol",
    "coarsest_float_dtype",
    "DEFAULT_CHANNEL_MULTIPLE",
    "META_KEY",
]
