"""Old path of :mod:`lobster_fx.passes.slim`."""

# temporary: removed when imports move (issue 14)
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.fx import GraphModule

from lobster_fx.passes.slim import (  # noqa: F401
    DEFAULT_CHANNEL_MULTIPLE,
    META_KEY,
    LayerSlim,
    SlimError,
    SlimReport,
    coarsest_float_dtype,
    default_rtol,
    prepare_inference_graph,
    register_elementwise,
    slim,
)
from lobster_fx.passes.slim.entry import positional as _positional  # noqa: F401
from lobster_fx.passes.slim.report import RTOL_EPS, RTOL_FLOOR  # noqa: F401


# temporary: removed when imports move (issue 14)
@dataclass
class SlimResult:
    module: GraphModule
    report: SlimReport


# temporary: removed when imports move (issue 14); use slim(...).meta["lobster_slim"]
def slim_with_report(model: nn.Module, example_inputs: Any, **kwargs: Any) -> SlimResult:
    gm = slim(model, example_inputs, **kwargs)
    return SlimResult(gm, gm.meta[META_KEY])
