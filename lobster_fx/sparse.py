"""Old path of :mod:`lobster_fx.passes.csr`."""

# temporary: removed when imports move (issue 14)
from lobster_fx.passes.csr import (  # noqa: F401
    DEFAULT_MIN_SPARSITY,
    META_KEY,
    CsrReport,
    CsrTensor,
    csr_linear,
    to_sparse_csr,
)
