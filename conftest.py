"""Root pytest configuration: the doctests of modules whose optional extra is not installed are
not collected (they raise a clear ImportError on import; CI installs the extras with [test])."""

import importlib.util

collect_ignore = [path for path, module in (("lobster_fx/integrations/lightning.py", "lightning"),
                                            ("lobster_fx/integrations/transformers.py", "transformers"))
                  if importlib.util.find_spec(module) is None]
