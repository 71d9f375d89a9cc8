"""State-dict keys of an instrumented model in the original model's terms.

The instrumented model keeps some parameters under other paths: ``opaque.<name>`` where
the top level did not trace (the graph calls it through a wrapper), and
``<owner>.parametrizations.<w>.original`` where a weight is masked by a parametrization.
Hooks on :class:`~lobster_fx.graph.trace.LobsterGraphModule` (no-ops unless
``meta["lobster_keys"]`` is set, which ``instrument`` does) make ``state_dict()`` and
``load_state_dict()`` use the original names, with one ``<name>_mask`` per mask, so a
checkpoint of the original loads strictly (its masks stay as they are).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["external_key"]

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")
_PARAMETRIZED_MASK = re.compile(r"(^|\.)parametrizations\.([^.]+)\.0\.mask$")


def external_key(key: str, strip: str) -> str:
    """The name a state_dict key of an instrumented model has in the original model's terms:
    without the opaque-root wrapper's ``strip`` prefix, and ``a.parametrizations.w.original``
    as ``a.w`` (its mask ``a.parametrizations.w.0.mask`` as ``a.w_mask``, like graph-route masks).

        >>> external_key("opaque.block.parametrizations.scale.0.mask", "opaque.")
        'block.scale_mask'
    """
    if strip and key.startswith(strip):
        key = key[len(strip):]
    key = _PARAMETRIZED.sub(r"\1\2", key)
    return _PARAMETRIZED_MASK.sub(r"\1\2_mask", key)


def _key_options(module: nn.Module) -> dict | None:
    meta = module.__dict__.get("meta")
    return meta.get("lobster_keys") if isinstance(meta, dict) else None


def _external_keys_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    options = _key_options(module)
    if not options:
        return
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        if k.startswith(prefix):
            k = prefix + external_key(k[len(prefix):], options["strip"])
        state_dict[k] = v


def _internal_keys(module: nn.Module) -> list[str]:
    options = module.meta["lobster_keys"]
    module.meta["lobster_keys"] = None  # this module's own names, not the renamed ones
    try:
        return list(module.state_dict(keep_vars=True))
    finally:
        module.meta["lobster_keys"] = options


def _internal_keys_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    options = _key_options(module)
    if not options:
        return
    internal = {external_key(k, options["strip"]): k for k in _internal_keys(module)}
    for k in [k for k in state_dict if k.startswith(prefix)]:
        name = k[len(prefix):]
        if name in internal and internal[name] != name and prefix + internal[name] not in state_dict:
            state_dict[prefix + internal[name]] = state_dict.pop(k)


def _missing_masks_hook(module: nn.Module, incompatible: Any) -> None:
    # a checkpoint of the original model has no masks: its weights load, the masks stay
    options = _key_options(module)
    if not options:
        return
    masks = set(options.get("masks", ()))
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not any(k == m or k.endswith("." + m) for m in masks)]
