"""Offline datasets held as in-memory tensors, plus a fast batch iterator.

* :func:`load_dataset` reads MNIST / Fashion-MNIST straight from the gzip'd IDX
  files the dataset authors publish (``<root>/MNIST/raw/train-images-idx3-ubyte.gz``
  and so on). Nothing is ever downloaded and
  torchvision is not involved, so no unpacked copies are written next to the data.
* :func:`load_digits` uses scikit-learn's bundled 8x8 digits (no files needed).
* :func:`batches` slices the tensors directly, much faster than a ``DataLoader``
  for data that already sits in memory.

Images come out as float32 ``N x 1 x H x W`` in [0, 1], then (by default)
standardised with the mean/std of the *training split* pixels, which are kept in
:class:`Splits` so new inputs can be normalised the same way. For reference, the
full 60k MNIST training set has mean 0.1307 and std 0.3081 (Fashion-MNIST:
0.2860 and 0.3530); the 55k training split gives the same values to 3 decimals.

Example::

    >>> import torch
    >>> from lobster_fx.data import batches, load_digits
    >>> splits = load_digits()
    >>> len(splits.train), len(splits.val), len(splits.test)
    (1197, 300, 300)
    >>> gen = torch.Generator().manual_seed(0)
    >>> x, y = next(batches(splits.train, 64, shuffle=True, generator=gen))
    >>> tuple(x.shape), y.dtype
    ((64, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "TensorData",
    "Splits",
    "load_dataset",
    "load_digits",
    "read_idx_pair",
    "batches",
    "splits_from_user",
]

#: Accepted dataset names (lower case) -> folder under the data root.
DATASETS: dict[str, str] = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "fashionmnist": "FashionMNIST",
}

_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class TensorData:
    """Inputs ``x`` (float32, ``N x C x H x W``; any ``N x ...`` from a data function) and labels ``y`` (int64, ``N``)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y disagree on the number of samples: {self.x.shape[0]} vs {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Splits:
    """Train / validation / test data and the normalisation that was applied.

    ``x_normalised = (x_in_[0,1] - mean) / std``; ``mean=0, std=1`` when not normalised.
    ``classes`` names the labels where the data has names (an image folder's subfolders).
    """

    train: TensorData
    val: TensorData
    test: TensorData
    mean: float
    std: float
    classes: list[str] | None = None

    def to(self, device: torch.device | str) -> Splits:
        """The same splits with every tensor on ``device`` (``self`` when already there)."""
        if self.train.x.device == torch.device(device):
            return self
        parts = [TensorData(d.x.to(device), d.y.to(device)) for d in (self.train, self.val, self.test)]
        return Splits(*parts, mean=self.mean, std=self.std, classes=self.classes)


def _canonical_folder(name: str) -> str:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}") from None


def _raw_dir(folder: str, root: str | Path) -> Path:
    """The ``raw/`` folder for ``folder``, given the data root, ``<folder>/`` or its ``raw/``."""
    root = Path(root).expanduser()
    if root.name == "raw" and root.parent.name == folder:
        return root
    if root.name == folder:
        return root / "raw"
    return root / folder / "raw"


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (the only element type MNIST uses)."""
    # Header: 2 zero bytes, element type (0x08 = ubyte), ndim, then ndim big-endian uint32.
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {dims} "
            f"({expected} bytes), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    # mtime and size are part of the key so a replaced file is read again.
    with gzip.open(path, "rb") as f:
        return _parse_idx(f.read(), path)


def _read_idx(path: Path) -> np.ndarray:
    stat = path.stat()
    return _read_idx_cached(path, stat.st_mtime_ns, stat.st_size)


def read_idx_pair(name: str, root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw images (uint8, ``N x 28 x 28``) and labels (uint8, ``N``) of one IDX file pair.

    ``root`` is the folder holding ``MNIST/`` (or ``FashionMNIST/``), that folder
    itself, or its ``raw/``. Decoded arrays are cached per process and returned
    read-only (``np.frombuffer`` over immutable bytes); copy them before editing.

    Example::

        >>> images, labels = read_idx_pair("mnist", "path/to/datasets")  # doctest: +SKIP
        >>> images.shape, labels.shape  # doctest: +SKIP
        ((60000, 28, 28), (60000,))
    """
    folder = _canonical_folder(name)
    raw = _raw_dir(folder, root)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {str(root)!r} does not exist or is not a directory; expected "
            f"the folder holding {folder}/raw/*.gz (nothing is ever downloaded)"
        )
    paths = [raw / f for f in _FILES[train]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{name}: missing {path}; put the original gzip'd IDX files there "
                f"(nothing is ever downloaded). root may be the folder holding {folder}/, "
                f"{folder}/ itself or {folder}/raw/"
            )
    images, labels = (_read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths[0]} and {paths[1]} do not form an image/label pair: "
            f"shapes {images.shape} and {labels.shape}"
        )
    return images, labels


def _normalise(parts: list[Tensor], normalize: bool) -> tuple[list[Tensor], float, float]:
    """Standardise every part with the mean/std of ``parts[0]`` (the training split)."""
    if not normalize:
        return parts, 0.0, 1.0
    mean = parts[0].mean().item()
    std = parts[0].std().item()
    return [(p - mean) / std for p in parts], mean, std


def _split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """Random disjoint index sets of the given ``sizes`` plus the remainder (last).

    Each set is sorted, so a split keeps the original sample order.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = list(torch.split(perm, [*sizes, n - sum(sizes)]))
    return [c.sort().values for c in chunks]


def _check_size(what: str, size: int, available: int) -> None:
    if not 0 <= size < available:
        raise ValueError(f"{what} must be in [0, {available}), got {size}")


def load_dataset(
    name: str,
    root: str | Path,
    *,
    val_size: int = 5000,
    seed: int = 0,
    normalize: bool = True,
) -> Splits:
    """Load MNIST or Fashion-MNIST from the gzip'd IDX files under ``root``.

    ``name`` is ``"mnist"`` or ``"fashion-mnist"`` (``"fashionmnist"`` too,
    any case). ``val_size`` images, drawn with ``seed``, move from the 60k
    training set to the validation set; the 10k test set is untouched. With
    ``normalize`` the images are standardised by the training split's mean/std.

    Example::

        >>> splits = load_dataset("mnist", "path/to/datasets")  # doctest: +SKIP
        >>> len(splits.train), len(splits.val), len(splits.test)  # doctest: +SKIP
        (55000, 5000, 10000)
    """
    train_images, train_labels = read_idx_pair(name, root, train=True)
    test_images, test_labels = read_idx_pair(name, root, train=False)
    _check_size("val_size", val_size, len(train_labels))

    def to_x(images: np.ndarray) -> Tensor:
        return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)

    def to_y(labels: np.ndarray) -> Tensor:
        return torch.from_numpy(labels.astype(np.int64))

    x_full, y_full = to_x(train_images), to_y(train_labels)
    val_idx, train_idx = _split_indices(len(y_full), (val_size,), seed)
    (x_train, x_val, x_test), mean, std = _normalise(
        [x_full[train_idx], x_full[val_idx], to_x(test_images)], normalize
    )
    return Splits(
        train=TensorData(x_train, y_full[train_idx]),
        val=TensorData(x_val, y_full[val_idx]),
        test=TensorData(x_test, to_y(test_labels)),
        mean=mean,
        std=std,
    )


def load_digits(
    *,
    val_size: int = 300,
    test_size: int = 300,
    seed: int = 0,
    normalize: bool = True,
) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as ``1 x 8 x 8``.

    Pixels (0..16) are scaled to [0, 1], then standardised by the training split's
    mean/std when ``normalize``. ``test_size`` and ``val_size`` images are drawn
    at random with ``seed``; the rest (1,197 by default) is the training set.

    Example::

        >>> splits = load_digits(val_size=100, test_size=200)
        >>> len(splits.train), tuple(splits.test.x.shape)
        (1497, (200, 1, 8, 8))
    """
    from sklearn.datasets import load_digits as sk_load_digits  # slow import, only here

    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    _check_size("test_size", test_size, len(y))
    _check_size("val_size + test_size", val_size + test_size, len(y))
    test_idx, val_idx, train_idx = _split_indices(len(y), (test_size, val_size), seed)
    (x_train, x_val, x_test), mean, std = _normalise(
        [x[train_idx], x[val_idx], x[test_idx]], normalize
    )
    return Splits(
        train=TensorData(x_train, y[train_idx]),
        val=TensorData(x_val, y[val_idx]),
        test=TensorData(x_test, y[test_idx]),
        mean=mean,
        std=std,
    )


def batches(
    data: TensorData,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches covering ``data`` once (one epoch).

    With ``shuffle`` the order is a fresh ``torch.randperm`` drawn from
    ``generator`` (a CPU generator; the global RNG when ``None``), so a seeded
    generator gives a reproducible epoch. Without it the batches are views into
    the tensors, in order. ``drop_last`` skips a final batch smaller than
    ``batch_size``.

    Example::

        >>> import torch
        >>> data = TensorData(torch.arange(5.0), torch.arange(5))
        >>> [y.tolist() for _, y in batches(data, 2, shuffle=False)]
        [[0, 1], [2, 3], [4]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(data)
    stop = n - n % batch_size if drop_last else n
    # Drawn now rather than on the first next(), so the generator advances when called.
    perm = torch.randperm(n, generator=generator).to(data.x.device) if shuffle else None

    def epoch() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, stop, batch_size):
            if perm is None:
                yield data.x[start : start + batch_size], data.y[start : start + batch_size]
            else:
                idx = perm[start : start + batch_size]
                yield data.x[idx], data.y[idx]

    return epoch()


def _as_tensor_data(part: Any, name: str, spec: str) -> TensorData:
    """One split a data function returned, as TensorData (float32 inputs, int64 labels)."""
    if isinstance(part, TensorData):
        x, y = part.x, part.y
    elif isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, Tensor) for t in part):
        x, y = part
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):  # a map-style Dataset of (x, y)
        if len(part) == 0:
            raise ValueError(f"data function {spec!r}: its {name} split is empty")
        items = [part[i] for i in range(len(part))]
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items[:1]):
            raise ValueError(f"data function {spec!r}: items of its {name} dataset must be (x, y) pairs, "
                             f"got {type(items[0]).__name__}")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise ValueError(f"data function {spec!r}: its {name} split must be an (x, y) pair of tensors or a "
                         f"Dataset of (x, y) items, got {type(part).__name__}")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"data function {spec!r}: {name} labels must be a 1-D integer tensor of class indices, "
                         f"got shape {tuple(y.shape)} {y.dtype}")
    if len(y) == 0:
        raise ValueError(f"data function {spec!r}: its {name} split is empty")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data function {spec!r}: {name} has {x.shape[0]} inputs but {y.shape[0]} labels")
    if int(y.min()) < 0:
        raise ValueError(f"data function {spec!r}: {name} labels must be >= 0, got {int(y.min())}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"data function {spec!r}: {name} inputs must be real numbers or integer ids, got {x.dtype}")
    x_dtype = torch.int64 if not x.dtype.is_floating_point else torch.float32  # integer inputs: token ids
    return TensorData(x.detach().to(x_dtype).contiguous(), y.detach().to(torch.int64))


def splits_from_user(result: Any, spec: str) -> Splits:
    """Check and convert what a ``package.module:function`` data function returned.

    ``result`` is ``(train, val, test)`` or ``{"train": ..., "val": ..., "test": ...}``; each
    split an ``(x, y)`` pair of tensors, a :class:`TensorData`, or a map-style Dataset of
    ``(x, y)`` items (read into memory). Floating-point inputs become float32, integer inputs
    (token ids for an embedding) int64; they are not normalised (``mean=0, std=1``). Labels
    become int64.

    Raises:
        ValueError: the result breaks this contract (the message names ``spec`` and the split).

    Example::

        >>> import torch
        >>> part = (torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))
        >>> splits = splits_from_user({"train": part, "val": part, "test": part}, "mydata:load")
        >>> len(splits.train), splits.train.x.dtype
        (4, torch.float32)
    """
    if isinstance(result, dict):
        missing = [k for k in ("train", "val", "test") if k not in result]
        if missing:
            raise ValueError(f"data function {spec!r} returned a dict without {', '.join(map(repr, missing))} "
                             f"(keys: {', '.join(map(repr, result))}); it must hold 'train', 'val' and 'test'")
        parts = [result["train"], result["val"], result["test"]]
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        parts = list(result)
    else:
        raise ValueError(f"data function {spec!r} must return (train, val, test) or a dict with 'train', 'val' "
                         f"and 'test', got {type(result).__name__}"
                         + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    train, val, test = (_as_tensor_data(p, n, spec) for p, n in zip(parts, ("train", "val", "test")))
    for name, part in (("val", val), ("test", test)):
        if part.x.shape[1:] != train.x.shape[1:]:
            raise ValueError(f"data function {spec!r}: {name} inputs have shape {tuple(part.x.shape[1:])}, "
                             f"train inputs {tuple(train.x.shape[1:])}")
    return Splits(train, val, test, mean=0.0, std=1.0)
