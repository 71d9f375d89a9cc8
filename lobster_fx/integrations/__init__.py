"""Training-framework integrations, each an optional extra (its module imports the framework).

* :mod:`lobster_fx.integrations.lightning`: :class:`~lobster_fx.integrations.lightning.LobsterPruning`,
  a Lightning ``Callback`` (``pip install 'lobster_fx[lightning]'``).
* :mod:`lobster_fx.integrations.transformers`:
  :class:`~lobster_fx.integrations.transformers.LobsterCallback`, a Hugging Face
  ``TrainerCallback`` (``pip install 'lobster_fx[hf]'``).

Both keep their run in a :class:`lobster_fx.sparsifier.Sparsifier` (masks, rule and plateau
schedule behind one ``state_dict``), which a plain loop can use directly. Nothing is imported
here: ``import lobster_fx.integrations`` needs neither framework.
"""
