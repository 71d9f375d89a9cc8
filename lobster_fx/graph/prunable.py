"""Which parameters are prunable by default: the weights that multiply inputs.

Zeroing such a weight removes a connection. Other parameters have zeros that mean
something else: Mamba's ``A_log`` (zero sets ``A = -1``), CLIP's ``logit_scale``, a
norm layer's scale, position embeddings that are added. So the default prunes

* every parameter of a layer whose weight multiplies its input: ``Linear``,
  ``Bilinear``, ``Conv*`` / ``ConvTranspose*``, ``Embedding*``,
  ``MultiheadAttention`` (subclasses included; their biases go with them), and
* a raw parameter of any other module when every use of it in the traced graph is an
  operand of a linear / conv / matmul op (``F.linear(x, self.w)``, ``x @ self.w.T``,
  Hugging Face's ``Conv1D``: ``torch.addmm(bias, x, weight)``, where the bias is the
  added term and stays), possibly through shape-only ops (``.t()``, ``.view``...).

The rest is listed in ``print(gm.meta["lobster"])`` as not masked, with the reason;
``instrument(model, filter_fn=...)`` decides for itself.

Example::

    >>> import torch, lobster_fx
    >>> class Scaled(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj = torch.nn.Parameter(torch.randn(4, 4))
    ...         self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    ...     def forward(self, x):
    ...         return (x @ self.proj.t()) * self.logit_scale.exp()
    >>> gm = lobster_fx.instrument(Scaled())
    >>> sorted(lobster_fx.masks(gm))
    ['proj']
    >>> gm.meta["lobster"].skipped["logit_scale"]
    "not the weight of a linear/conv/matmul op (its zero is not 'no connection'); filter_fn opts it in"
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, Node

__all__ = ["NORM_TYPES", "WEIGHT_LAYERS", "default_filter", "is_norm", "multiplies_inputs"]

#: layers whose weights multiply their inputs: all their parameters are prunable by default
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
)

#: normalisation layers (also recognised by class name: ``LlamaRMSNorm``, timm's ``LayerNorm2d``)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# ops that multiply an operand by another: every operand counts, except the added term of
# the addmm family (operand 0, or the tensor a method is called on)
_MATMUL_FUNCTIONS = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.embedding, F.embedding_bag, torch.matmul, torch.mm, torch.bmm, torch.mv,
    torch.einsum, torch.tensordot, torch.inner, torch.chain_matmul, operator.matmul,
    torch.conv1d, torch.conv2d, torch.conv3d,
}
_ADD_FIRST_FUNCTIONS = {torch.addmm, torch.baddbmm, torch.addbmm, torch.addmv}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "mv", "__matmul__", "__rmatmul__"}
_ADD_FIRST_METHODS = {"addmm", "baddbmm", "addbmm", "addmv"}
# ops that only move or split a weight's entries (their output's zeros are the weight's)
_SHAPE_FUNCTIONS = {
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.swapaxes, torch.movedim, torch.chunk, torch.split, torch.unbind, operator.getitem,
}
_SHAPE_METHODS = {
    "t", "transpose", "permute", "view", "reshape", "contiguous", "flatten", "squeeze", "unsqueeze",
    "expand", "expand_as", "to", "type_as", "float", "half", "bfloat16", "double", "swapaxes", "movedim",
    "view_as", "reshape_as", "chunk", "split", "unbind",
}
_SHAPE_ATTRS = {"T", "mT", "H", "mH"}
#: attributes of a tensor that read metadata only (a use that needs no mask)
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "is_sparse", "names"}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def default_filter(module: nn.Module, fqn: str) -> bool:
    """True for the parameters of layers whose weights multiply their inputs (``WEIGHT_LAYERS``).

    ``instrument`` also prunes, by default, raw parameters of other modules that the traced
    graph uses only as linear / conv / matmul operands (:func:`multiplies_inputs`).
    """
    return isinstance(module, WEIGHT_LAYERS)


def _is_metadata(user: Node) -> bool:
    if user.op == "call_function" and user.target is builtins.getattr:
        return user.args[1] in METADATA_ATTRS
    return user.op == "call_method" and user.target in {"size", "dim", "numel", "get_device", "is_floating_point",
                                                         "is_contiguous", "stride"}


def _multiplying_use(node: Node, user: Node, depth: int = 0) -> bool:
    """``user`` takes ``node`` (a weight, or a reshaped piece of it) as a factor of a product."""
    if _is_metadata(user):
        return True
    if depth > 8:
        return False
    if user.op == "call_function":
        target = user.target
        if target in _MATMUL_FUNCTIONS:
            return True
        if target in _ADD_FIRST_FUNCTIONS:
            return not (user.args and user.args[0] is node) and user.kwargs.get("input") is not node
        passthrough = target in _SHAPE_FUNCTIONS or (target is builtins.getattr and user.args[1] in _SHAPE_ATTRS)
    elif user.op == "call_method":
        if user.target in _MATMUL_METHODS:
            return True
        if user.target in _ADD_FIRST_METHODS:
            return user.args[0] is not node
        passthrough = user.target in _SHAPE_METHODS
    else:
        return False
    return passthrough and bool(user.users) and all(_multiplying_use(user, u, depth + 1) for u in user.users)


def multiplies_inputs(graph_uses: list[tuple[Graph, Node]]) -> bool:
    """True when the parameter read by these ``get_attr`` nodes is used, and every use is a
    factor of a linear / conv / matmul product (through shape-only ops)."""
    users = [(node, u) for _, node in graph_uses for u in node.users]
    return any(not _is_metadata(u) for _, u in users) and all(_multiplying_use(n, u) for n, u in users)
