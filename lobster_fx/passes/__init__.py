"""Passes on a trained model, in pipeline order.

* :mod:`lobster_fx.passes.fold`: multiply the masks into the weights and drop them.
* :mod:`lobster_fx.passes.slim`: remove dead units (rows, filters, BatchNorm entries);
  ops are known through a registry a user can extend
  (:func:`lobster_fx.passes.slim.register_elementwise`).
* :mod:`lobster_fx.passes.csr`: store sparse Linear weights as torch CSR tensors.

Each pass takes a module and returns a new one (the input is not modified) with its
report in ``module.meta`` (``"lobster_folded"``, ``"lobster_slim"``, ``"lobster_sparse"``).
The functions are not re-exported here: ``lobster_fx.passes.fold`` is the module.
"""
