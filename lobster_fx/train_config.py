"""The options of a training run: :class:`TrainConfig`, its checks, and what a resume may change.

:mod:`lobster_fx.train` re-exports everything here; ``lobster-fx train`` builds its options
from :class:`TrainConfig` (:mod:`lobster_fx.config_cli`).

Example::

    >>> from lobster_fx.train_config import TrainConfig
    >>> TrainConfig(model="torchvision:resnet18", dataset="imagefolder:photos", image_size=32).model
    'torchvision:resnet18'
    >>> TrainConfig(lr=-1)
    Traceback (most recent call last):
    ...
    ValueError: TrainConfig.lr must be a finite number > 0, got -1.0
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lobster_fx.pruning.neuron import UNIT_SCORES
from lobster_fx.specs import check_kwargs, parse_data_spec, parse_model_spec

__all__ = ["CHOICES", "METHODS", "OPTIMIZERS", "RESUMABLE_CHANGES", "TrainConfig", "check_device",
           "config_from_dict"]

#: the per-step rule of each ``TrainConfig.method``, and what its pruning phases remove
METHODS = {"lobster": "weight", "serene": "neuron"}
#: ``TrainConfig.optimizer`` values
OPTIMIZERS = ("sgd", "adamw")


class _Choices(Mapping):
    """Field -> allowed values, read when asked: a unit score a user adds to ``UNIT_SCORES`` after
    import is a valid ``TrainConfig.unit_score`` (and a command-line choice) from then on."""

    _fixed = {"method": tuple(METHODS), "sensitivity": ("output", "loss"), "optimizer": OPTIMIZERS}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return tuple(UNIT_SCORES) if name == "unit_score" else self._fixed[name]

    def __iter__(self) -> Iterator[str]:
        return iter((*self._fixed, "unit_score"))

    def __len__(self) -> int:
        return len(self._fixed) + 1

    def __repr__(self) -> str:
        return repr(dict(self))


#: the fields that take one of a set of values (the command line offers them as choices)
CHOICES: Mapping[str, tuple[str, ...]] = _Choices()
#: TrainConfig fields a resumed run may change: how long, where and how fast it runs, and what it
#: prints. Every other field defines the run (its data, model or arithmetic), and a resume that
#: changes one is refused. ``threads`` can change float rounding in some kernels, like resuming on
#: another machine would; it is allowed so that a resumed run can use the machine it lands on.
#: ``device`` may change too: a run trained on a GPU can continue on the CPU and back (float rounding
#: differs between devices, as with ``threads``).
RESUMABLE_CHANGES = frozenset({"epochs", "max_minutes", "out_dir", "progress", "checkpoint_every", "threads",
                               "device"})

@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoint and log).

    ``lobster-fx train`` offers every field as an option (``--batch-size`` for ``batch_size``;
    :mod:`lobster_fx.config_cli`); the ``#:`` comments are its help texts.
    """

    #: lenet300, lenet5, resnet32; torchvision:NAME, timm:NAME, or package.module:factory (imported
    #: with the current directory first on sys.path, as python -m does; called with model_kwargs)
    model: str = "lenet300"
    #: mnist, fashion-mnist, digits (bundled with scikit-learn); imagefolder:DIR (DIR/CLASS/*.png, or
    #: DIR/train/, DIR/val/, DIR/test/; read into memory); or package.module:function, called with
    #: data_kwargs, returning (train, val, test) or a dict with those keys, each an (x, y) pair of
    #: tensors or a Dataset of (x, y) items (used as given, not normalised)
    dataset: str = "mnist"
    data_root: str | None = None  #: folder holding MNIST/ and FashionMNIST/ (not needed for digits)
    #: keyword arguments (JSON) for the model's constructor or factory, e.g. {"num_classes": 10}
    model_kwargs: dict[str, Any] | None = None
    data_kwargs: dict[str, Any] | None = None  #: keyword arguments (JSON) for a package.module:function dataset
    image_size: int | None = None  #: imagefolder: resize every image to N x N (default: keep; sizes must agree)
    val_fraction: float = 0.1  #: imagefolder: share of images held out for validation (where no val/ folder)
    test_fraction: float = 0.1  #: imagefolder: share of images held out for testing (where no test/ folder)
    #: cpu, cuda or cuda:N: model, masks, optimizer state and data batches live there
    device: str = "cpu"
    #: sgd (with momentum, weight_decay as L2) or adamw (weight_decay decoupled; momentum must be 0).
    #: Either way the LOBSTER / SeReNe term is applied separately, with strength lmbda
    optimizer: str = "sgd"
    epochs: int = 100  #: epochs to train in all (a resume may raise it)
    batch_size: int = 100  #: training mini-batch size
    lr: float = 0.1  #: learning rate
    momentum: float = 0.0  #: SGD momentum
    weight_decay: float = 0.0  #: plain L2 (the weight-decay baseline)
    lmbda: float = 1e-4  #: LOBSTER strength; 0 = pure magnitude pruning at plateaus
    twt: float = 0.05  #: tolerance of each pruning phase: how much worse the validation loss may get
    pwe: int = 20  #: epochs without validation improvement before a pruning phase (plateau)
    rollback: bool = True  #: at a plateau, go back to the best epoch's weights before pruning
    plateau_threshold: float = 0.0  #: relative validation-loss improvement that resets the plateau count
    search_precision: float = 0.0  #: threshold search stops at this share of candidates (0 = exact, the paper)
    lr_min_factor: float = 1.0  #: cosine decay of lr down to lr*factor within each prune cycle (1 = constant)
    val_size: int = 5000  #: mnist, fashion-mnist: training images held out for validation
    seed: int = 0  #: initialisation, data splits and shuffling
    max_minutes: float | None = None  #: stop (with a checkpoint) after this much wall time
    out_dir: str | None = None  #: checkpoint.pt and log.json go here
    progress: bool = True  #: a progress bar on stderr
    checkpoint_every: int = 1  #: epochs between checkpoints (the last epoch is always saved)
    threads: int | None = None  #: torch intra-op threads (None: torch's default); 1 suits small models on a busy machine
    eval_batch_size: int = 5000  #: batch size of validation and test passes
    #: store conv weights and activations NHWC (oneDNN's NHWC kernels); same arithmetic. Its speed
    #: effect on LeNet-5 is within this machine's noise: benchmarks/results/train_cost.md
    channels_last: bool = False
    #: ``Lobster(fused=...)``: None = compiled kernels from 2**20 prunable weights up; True pays a
    #: compile once for a cheaper step on smaller models (figures: benchmarks/RESULTS.md)
    fused_rule: bool | None = None
    #: "lobster" (eq. 6, weights pruned at plateaus) or "serene" (neuron sensitivity, whole units
    #: pruned at plateaus: ``granularity="neuron"``)
    method: str = "lobster"
    #: SeReNe's sensitivity: "output" (d(sum y)/dz, one extra backward per step) or "loss" (dL/dz)
    sensitivity: str = "output"
    #: how SeReNe's pruning phases rank units: "relative-norm" (each unit's weight norm over its
    #: layer's mean, so conv channels compete with fc rows) or "norm" (raw norm, one scale for all)
    unit_score: str = "relative-norm"

    def __post_init__(self) -> None:
        """Check every field's type and range, naming the field and value that are wrong.

        Raises:
            TypeError: a field of the wrong type (``True`` is not a number here).
            ValueError: a value out of range, an unknown model or dataset, or a model the
                dataset's images do not fit (LeNet-5 needs 28 x 28; digits are 8 x 8).
        """
        _validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INT_MIN = {"epochs": 1, "batch_size": 1, "pwe": 1, "checkpoint_every": 1, "eval_batch_size": 1, "val_size": 0,
            "seed": 0, "image_size": 1}
_FLOAT_RANGE = {  # field: (low, low included, high, high included)
    "lr": (0.0, False, math.inf, False), "momentum": (0.0, True, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False), "lmbda": (0.0, True, math.inf, False),
    "twt": (0.0, True, math.inf, False), "plateau_threshold": (0.0, True, 1.0, False),
    "search_precision": (0.0, True, 1.0, False), "lr_min_factor": (0.0, True, 1.0, True),
    "max_minutes": (0.0, True, math.inf, False), "val_fraction": (0.0, False, 1.0, False),
    "test_fraction": (0.0, False, 1.0, False),
}
_OPTIONAL = ("max_minutes", "threads", "image_size")
_BOOLS = ("rollback", "progress", "channels_last")


def _field_error(name: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"TrainConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_int(name: str, value: Any, low: int) -> int | None:
    if value is None and name in _OPTIONAL:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _field_error(name, value, "an int" + (" or None" if name in _OPTIONAL else ""))
    if value < low:
        raise ValueError(f"TrainConfig.{name} must be >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, low_ok: bool, high: float, high_ok: bool) -> float | None:
    if value is None and name in _OPTIONAL:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _field_error(name, value, "a number" + (" or None" if name in _OPTIONAL else ""))
    value = float(value)
    if not (math.isfinite(value) and (low <= value if low_ok else low < value)
            and (value <= high if high_ok else value < high)):
        if math.isinf(high):
            bound = f"a finite number {'>=' if low_ok else '>'} {low:g}"
        else:
            bound = f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise ValueError(f"TrainConfig.{name} must be {bound}, got {value!r}")
    return value


def _check_name(name: str, value: Any, valid: list[str]) -> str:
    if not isinstance(value, str):
        raise _field_error(name, value, "a str")
    if value.lower() not in valid:
        raise ValueError(f"TrainConfig.{name}: unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value.lower()


def _check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _field_error(name, value, "a path (str) or None")
    return os.fspath(value)  # a str: checkpoints hold plain data only


def _check_spec(name: str, value: Any, parse: Callable[[str], tuple[str, str]]) -> str:
    if not isinstance(value, str):
        raise _field_error(name, value, "a str")
    try:
        kind, parsed = parse(value)
    except ValueError as exc:
        raise ValueError(f"TrainConfig.{name}: {exc}") from None
    return parsed if kind == "builtin" else value  # built-in names lower case; paths and modules as given


def _check_device(value: Any) -> str:
    if not isinstance(value, str):
        raise _field_error("device", value, "a str")
    text = value.strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"TrainConfig.device must be cpu, cuda or cuda:N, got {value!r}")
    return text


def _validate_config(config: TrainConfig) -> None:
    c = config
    c.model = _check_spec("model", c.model, parse_model_spec)
    c.dataset = _check_spec("dataset", c.dataset, parse_data_spec)
    for name, valid in CHOICES.items():
        setattr(c, name, _check_name(name, getattr(c, name), list(valid)))
    c.device = _check_device(c.device)
    for name in ("model_kwargs", "data_kwargs"):
        value = getattr(c, name)
        setattr(c, name, (check_kwargs(value, f"TrainConfig.{name}") or None) if value is not None else None)
    c.data_root, c.out_dir = _check_path("data_root", c.data_root), _check_path("out_dir", c.out_dir)
    for name, low in {**_INT_MIN, "threads": 1}.items():
        setattr(c, name, _check_int(name, getattr(c, name), low))
    for name, bounds in _FLOAT_RANGE.items():
        setattr(c, name, _check_float(name, getattr(c, name), *bounds))
    for name in _BOOLS:
        if not isinstance(getattr(c, name), bool):
            raise _field_error(name, getattr(c, name), "True or False")
    if c.fused_rule is not None and not isinstance(c.fused_rule, bool):
        raise _field_error("fused_rule", c.fused_rule, "True, False or None")
    if c.model == "lenet5" and c.dataset == "digits":
        raise ValueError("TrainConfig: model 'lenet5' needs 28 x 28 images (mnist, fashion-mnist), but dataset "
                         "'digits' has 8 x 8 images: use lenet300 or resnet32 with digits")
    if c.optimizer == "adamw" and c.momentum != 0.0:
        raise ValueError(f"TrainConfig.momentum applies to optimizer 'sgd'; 'adamw' has its own moments: "
                         f"leave momentum at 0, got {c.momentum!r}")
    if c.image_size is not None and not c.dataset.lower().startswith("imagefolder:"):
        raise ValueError(f"TrainConfig.image_size applies to imagefolder:DIR data only, not {c.dataset!r}")
    if c.data_kwargs is not None and parse_data_spec(c.dataset)[0] != "function":
        raise ValueError(f"TrainConfig.data_kwargs applies to package.module:function data only, not {c.dataset!r}")


def config_from_dict(saved: dict[str, Any], source: str | Path = "the checkpoint") -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint's ``config`` entry describes.

    Raises:
        ValueError: the entry names fields this version does not know, or holds invalid values
            (the message names ``source``).
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{source}: its config has options this version of lobster-fx does not know: "
                         f"{', '.join(unknown)}")
    try:
        return TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid config: {exc}") from exc


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, after checking that this machine has it.

    Raises:
        ValueError: CUDA is asked for but not available, or the index is past the last GPU.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: CUDA is not available on this machine ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


#: fields that only an image folder uses
_IMAGE_OPTIONS = ("image_size", "val_fraction", "test_fraction")
#: fields added with the user-model command line, and the value every older checkpoint ran with
_ADDED_FIELDS = {"model_kwargs": None, "data_kwargs": None, "image_size": None, "val_fraction": 0.1,
                 "test_fraction": 0.1, "optimizer": "sgd",
                 "unit_score": "norm"}  # runs before session 22 ranked units by their raw norm


def _same_option(name: str, old: Any, new: Any, dataset: str) -> bool:
    kind = parse_data_spec(dataset)[0]
    if name in _IMAGE_OPTIONS and kind != "imagefolder":
        return True  # not used by this data
    if name == "dataset" and kind == "imagefolder" and isinstance(old, str) \
            and old.lower().startswith("imagefolder:"):
        return Path(old[12:]).expanduser().resolve() == Path(dataset[12:]).expanduser().resolve()
    if name == "data_root":
        if dataset == "digits" or kind != "builtin":  # bundled with scikit-learn, or not a built-in set
            return True
        if old is None or new is None:
            return old is new
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    if name in ("model", "dataset") and isinstance(old, str) and ":" in old:
        return old == new  # module and attribute names are case-sensitive
    if isinstance(old, str) and isinstance(new, str):
        return old.lower() == new.lower()
    return old == new


def _check_resume(saved: dict[str, Any], config: TrainConfig, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with run-defining options other than those it was trained with."""
    saved = {**_ADDED_FIELDS, **saved}  # an older checkpoint ran with these values
    changed = [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in config.to_dict().items()
        if name not in RESUMABLE_CHANGES and name in saved  # older checkpoints may lack newer fields
        and not _same_option(name, saved[name], value, config.dataset)
        and not (name == "unit_score" and METHODS[config.method] == "weight")  # ranks units only
    ]
    if changed:
        raise ValueError(
            f"cannot resume {ckpt}: options that define the run differ from the checkpoint's "
            f"(checkpoint -> now): {'; '.join(changed)}. Resume with the checkpoint's values, start over "
            "(--restart, or train(..., resume=False)), or write to another output directory"
        )

