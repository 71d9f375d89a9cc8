"""A folder of images, one subfolder per class, read into memory as train/val/test tensors.

This is what ``lobster-fx train --data imagefolder:DIR`` trains on. The training loop of
:mod:`lobster_fx.train` works on in-memory tensors, so the images are decoded once (PIL),
converted to RGB, resized to ``image_size`` x ``image_size`` when given, and kept as float32
``N x 3 x H x W``: ``N * 3 * H * W * 4`` bytes (10,000 images of 64 x 64 take 0.5 GB). That suits
the small folders this command is for; for large image sets write your own loop with a
``DataLoader`` (the README's training-loop section) or use the Lightning integration.

Layouts:

* ``DIR/CLASS/*.png`` - the images are split at random (``seed``) into train, validation
  (``val_fraction``) and test (``test_fraction``), the same way every time;
* ``DIR/train/CLASS/...`` with ``DIR/val/CLASS/...`` and ``DIR/test/CLASS/...`` - used as they
  are; where ``val/`` or ``test/`` is missing, that split is drawn from ``train/`` as above.

Classes are the subfolder names of ``DIR`` (or ``DIR/train``), sorted; label ``i`` is the ``i``-th.
Pixels are scaled to [0, 1] and standardised with the training split's mean/std, as
:mod:`lobster_fx.data` does for MNIST.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for cls in ("cat", "dog"):
    ...     (root / cls).mkdir()
    ...     for i in range(10):
    ...         Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(root / cls / f"{i}.png")
    >>> splits = load_image_folder(root, image_size=8, val_fraction=0.2, test_fraction=0.2)
    >>> len(splits.train), len(splits.val), len(splits.test), tuple(splits.train.x.shape[1:])
    (12, 4, 4, (3, 8, 8))
    >>> splits.classes
    ['cat', 'dog']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lobster_fx.data import Splits, TensorData, _normalise, _split_indices

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

#: the file suffixes read as images (lower case; torchvision's ImageFolder takes the same)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(folder: Path, root: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"imagefolder {root}: {folder} has no class subfolders (expected {folder}/CLASS/*.png)")
    return dirs


def _list_images(folder: Path, classes: list[str], root: Path) -> list[tuple[Path, int]]:
    """(file, label) of every image under ``folder/CLASS/``, labels by ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for d in _class_dirs(folder, root):
        if d.name not in index:
            raise ValueError(f"imagefolder {root}: class {d.name!r} in {folder} is not among the training "
                             f"classes ({', '.join(classes)})")
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(p, index[d.name]) for p in files]
    if not items:
        raise ValueError(f"imagefolder {root}: no images under {folder} (suffixes: {', '.join(IMAGE_EXTENSIONS)})")
    return items


def _read_images(items: list[tuple[Path, int]], image_size: int | None, size: tuple[int, int] | None,
                 root: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Decode, convert to RGB and resize; ``size`` (w, h) is the size every image must have."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path, _ in items:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if image_size is not None:
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                elif size is None:
                    size = img.size
                elif img.size != size:
                    raise ValueError(f"imagefolder {root}: images differ in size ({items[0][0].name} is "
                                     f"{size[0]}x{size[1]}, {path} is {img.size[0]}x{img.size[1]}): "
                                     "give --image-size N to resize them all to N x N")
                arrays.append(np.asarray(img, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"imagefolder {root}: cannot read {path} as an image ({exc})") from exc
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return x, y, size if size is not None else (image_size, image_size)


def _holdout_count(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def load_image_folder(
    root: str | Path,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    normalize: bool = True,
) -> Splits:
    """Read an image folder into train / validation / test tensors (see the module docstring).

    ``image_size`` N resizes every image to N x N; without it all images must have one size.
    ``val_fraction`` and ``test_fraction`` (each at least one image) are drawn with ``seed``
    where the folder has no ``val/`` or ``test/`` subfolder.

    Raises:
        ValueError: ``root`` is not a folder, has no class subfolders or images, an image
            cannot be read, sizes differ without ``image_size``, a ``val/`` or ``test/`` class
            is not a training class, or too few images are left for training (each message
            names the folder).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"imagefolder {root}: not a directory (expected {root}/CLASS/*.png, or train/ and val/)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
    base = root / "train" if (root / "train").is_dir() else root
    classes = [d.name for d in _class_dirs(base, root)]
    pool = _list_images(base, classes, root)
    given = {name: _list_images(root / name, classes, root)
             for name in ("val", "test") if base is not root and (root / name).is_dir()}
    need = [name for name in ("test", "val") if name not in given]
    counts = {"val": _holdout_count(len(pool), val_fraction), "test": _holdout_count(len(pool), test_fraction)}
    if sum(counts[name] for name in need) >= len(pool):
        raise ValueError(f"imagefolder {root}: {len(pool)} images in {base} leave none for training after "
                         f"holding out {' and '.join(f'{counts[n]} for {n}' for n in need)}")
    x, y, size = _read_images(pool, image_size, None, root)
    parts = dict(zip([*need, "train"], _split_indices(len(y), tuple(counts[n] for n in need), seed)))
    data = {name: (x[idx], y[idx]) for name, idx in parts.items()}
    for name, items in given.items():
        gx, gy, _ = _read_images(items, image_size, size, root)
        data[name] = (gx, gy)
    order = ("train", "val", "test")
    (x_train, x_val, x_test), mean, std = _normalise([data[n][0] for n in order], normalize)
    return Splits(train=TensorData(x_train, data["train"][1]), val=TensorData(x_val, data["val"][1]),
                  test=TensorData(x_test, data["test"][1]), mean=mean, std=std, classes=classes)
