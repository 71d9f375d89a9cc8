"""Model and data specs: the strings ``lobster-fx train --model ... --data ...`` takes.

Model specs:

* ``lenet300``, ``lenet5``, ``resnet32`` - the reference models (:mod:`lobster_fx.models`);
  their input size and class count come from the data.
* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, **kwargs)`` (random weights
  unless ``kwargs`` ask for others; nothing is downloaded otherwise).
* ``timm:NAME`` - ``timm.create_model(NAME, **kwargs)`` (``pretrained`` is False by default).
* ``package.module:factory`` - ``factory(**kwargs)`` from a module imported with
  :mod:`importlib`, the current directory first on ``sys.path`` (as ``python -m`` does); it
  must return an ``nn.Module``.

Data specs: ``mnist``, ``fashion-mnist``, ``digits``; ``imagefolder:DIR`` (see
:mod:`lobster_fx.imagefolder`); ``package.module:function`` (see :func:`call_data_function`).

Example::

    >>> parse_model_spec("torchvision:resnet18")
    ('torchvision', 'resnet18')
    >>> parse_model_spec("LeNet300")
    ('builtin', 'lenet300')
    >>> parse_data_spec("imagefolder:photos")
    ('imagefolder', 'photos')
    >>> build_model_from_spec("torchvision:resnet18", {"num_classes": 3}).fc.out_features
    3
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = [
    "BUILTIN_DATASETS", "BUILTIN_MODELS", "build_model_from_spec", "call_data_function", "check_kwargs",
    "import_object", "parse_data_spec", "parse_model_spec",
]

#: the reference models (lobster_fx.models.MODELS)
BUILTIN_MODELS = ("lenet300", "lenet5", "resnet32")
#: the built-in datasets (digits plus lobster_fx.data.DATASETS)
BUILTIN_DATASETS = ("digits", "fashion-mnist", "fashionmnist", "mnist")
MODEL_SPEC_HELP = "torchvision:NAME, timm:NAME or package.module:factory"
DATA_SPEC_HELP = "imagefolder:DIR or package.module:function"


def _is_dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``(kind, name)`` of a model spec: kind is builtin, torchvision, timm or factory.

    Only the syntax is checked (nothing is imported). Built-in names come back lower case.

    Raises:
        ValueError: the spec is none of the forms above; the message lists them.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model spec must be a str, got {spec!r} ({type(spec).__name__})")
    if spec.lower() in BUILTIN_MODELS:
        return "builtin", spec.lower()
    prefix, sep, name = spec.partition(":")
    if sep and prefix.lower() in ("torchvision", "timm") and name.strip():
        return prefix.lower(), name.strip()
    if sep and _is_dotted(prefix) and name.isidentifier():
        return "factory", spec
    raise ValueError(f"unknown model {spec!r}; valid: {', '.join(BUILTIN_MODELS)}; or {MODEL_SPEC_HELP}")


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``(kind, value)`` of a data spec: kind is builtin, imagefolder or function.

    Raises:
        ValueError: the spec is none of the accepted forms; the message lists them.
    """
    if not isinstance(spec, str):
        raise TypeError(f"data spec must be a str, got {spec!r} ({type(spec).__name__})")
    if spec.lower() in BUILTIN_DATASETS:
        return "builtin", spec.lower()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() == "imagefolder" and rest:
        return "imagefolder", rest
    if sep and _is_dotted(prefix) and rest.isidentifier():
        return "function", spec
    raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(BUILTIN_DATASETS)}; or {DATA_SPEC_HELP}")


def check_kwargs(value: Any, name: str) -> dict[str, Any]:
    """``value`` as a JSON-able dict with str keys (what a checkpoint can hold as plain data).

    Raises:
        TypeError: not a dict, a key is not a str, or a value is not JSON data (naming ``name``).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict (a JSON object), got {value!r} ({type(value).__name__})")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name}: keys must be str, got {bad[0]!r}")
    try:
        return json.loads(json.dumps(value))  # a plain copy; lists stay lists
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must hold JSON data only (numbers, strings, lists, dicts): {exc}") from None


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` while importing, as ``python -m`` has it."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_object(spec: str, what: str) -> Any:
    """The attribute ``NAME`` of module ``package.module`` for a ``package.module:NAME`` spec.

    The current directory is searched first, as ``python -m`` does.

    Raises:
        ValueError: the module cannot be imported or lacks the attribute (naming ``spec``).
    """
    module_name, _, attr = spec.partition(":")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise ValueError(f"{what} {spec!r}: importing {module_name!r} failed: it imports {exc.name!r}, "
                             "which is not installed") from exc
        raise ValueError(f"{what} {spec!r}: module {exc.name!r} not found (searched the current directory "
                         f"{os.getcwd()} and sys.path)") from exc
    except Exception as exc:
        raise ValueError(f"{what} {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                         f"attribute {attr!r}")
    obj = getattr(module, attr)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _torchvision_factory(name: str) -> Any:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise ValueError(f"model 'torchvision:{name}': torchvision {torchvision.__version__} has no model {name!r} "
                         "(torchvision.models.list_models() lists them)")
    return lambda **kwargs: torchvision.models.get_model(name, **kwargs)


def _timm_factory(name: str) -> Any:
    try:
        import timm
    except ModuleNotFoundError:
        raise ValueError(f"model 'timm:{name}' needs the timm package (pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"model 'timm:{name}': timm {timm.__version__} has no model {name!r} "
                         "(timm.list_models() lists them)")
    return lambda **kwargs: timm.create_model(name, **kwargs)


def build_model_from_spec(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the ``nn.Module`` a model spec names, with ``kwargs`` for its constructor.

    For a built-in name the kwargs go to its class (``num_classes``, ``in_features`` or
    ``in_channels``); :func:`lobster_fx.train.build_model` fills those in from the data.

    Raises:
        ValueError: unknown spec, module or attribute missing, the constructor or factory
            raised, or it returned something other than an ``nn.Module`` (each message names
            ``spec`` and what went wrong).

    Example::

        >>> build_model_from_spec("lenet300", {"in_features": 64}).fc1.in_features
        64
    """
    kind, name = parse_model_spec(spec)
    kwargs = check_kwargs(kwargs, f"model {spec!r}: model_kwargs")
    if kind == "builtin":
        from lobster_fx.models import MODELS

        factory = MODELS[name]
    elif kind == "torchvision":
        factory = _torchvision_factory(name)
    elif kind == "timm":
        factory = _timm_factory(name)
    else:
        factory = import_object(spec, "model factory")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ValueError(f"model {spec!r}: building it with model_kwargs {kwargs} raised "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def call_data_function(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Call the data function of a ``package.module:function`` data spec with ``kwargs``.

    The contract: the function returns the three splits, ``(train, val, test)`` or a dict with
    the keys ``"train"``, ``"val"`` and ``"test"``. Each split is a pair of tensors ``(x, y)``
    (``x``: ``N x ...`` inputs, float or integer ids; ``y``: ``N`` integer class labels) or a map-style
    ``torch.utils.data.Dataset`` whose items are ``(x, y)``; datasets are read into memory once.
    Inputs are used as given (no normalisation). :func:`lobster_fx.data.splits_from_user` checks
    and converts the result.

    Raises:
        ValueError: the module or function is missing, or the function raised (naming ``spec``).
    """
    fn = import_object(spec, "data function")
    try:
        return fn(**check_kwargs(kwargs, f"data {spec!r}: data_kwargs"))
    except Exception as exc:
        raise ValueError(f"data function {spec!r} raised {type(exc).__name__}: {exc}") from exc
