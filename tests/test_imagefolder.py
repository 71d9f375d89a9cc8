"""Image folders read into memory: layouts, reproducible splits, pixel values, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lobster_fx.imagefolder import load_image_folder


def _write(path: Path, colour: tuple[int, int, int], size=(6, 5), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def _flat_folder(root: Path, per_class: int = 10) -> dict[int, tuple[int, Path]]:
    """Uniform images, each with its own red value (its id): id -> (label, file)."""
    files = {}
    for label, name in enumerate(("ant", "bee", "cow")):
        for i in range(per_class):
            ident = 10 + label * per_class + i
            path = root / name / f"{i}.png"
            _write(path, (ident, 2 * i, 200 - label))
            files[ident] = (label, path)
    (root / "bee" / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    return files


def _ids(x, mean: float, std: float) -> list[int]:
    """The red value (id) of each uniform image, from its normalised tensor."""
    raw = x * std + mean
    return [round(float(v) * 255) for v in raw[:, 0, 0, 0]]


def test_flat_folder_splits_reproducibly_and_normalises_by_the_training_split(tmp_path):
    files = _flat_folder(tmp_path)
    splits = load_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert splits.classes == ["ant", "bee", "cow"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 6, 3)  # 30 * 0.2, 30 * 0.1
    assert tuple(splits.train.x.shape[1:]) == (3, 5, 6)  # C x H x W of 6 x 5 images
    ids = {name: _ids(getattr(splits, name).x, splits.mean, splits.std) for name in ("train", "val", "test")}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(files)  # each image in exactly one split
    for name in ("train", "val", "test"):
        assert getattr(splits, name).y.tolist() == [files[i][0] for i in ids[name]]
    # the normalisation: mean and std of the training images' pixels, read here with numpy
    pixels = np.stack([np.asarray(Image.open(files[i][1]).convert("RGB"), dtype=np.float64) / 255
                       for i in ids["train"]])
    assert splits.mean == pytest.approx(pixels.mean(), abs=1e-6)
    assert splits.std == pytest.approx(pixels.std(ddof=1), rel=1e-5)
    again = load_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert _ids(again.val.x, again.mean, again.std) == ids["val"]
    other = load_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert _ids(other.val.x, other.mean, other.std) != ids["val"]


def test_train_val_subfolders_are_used_and_test_is_drawn_from_train(tmp_path):
    for label, name in enumerate(("a", "b")):
        for i in range(8):
            _write(tmp_path / "train" / name / f"{i}.png", (10 + 8 * label + i, 0, 0))
        for i in range(2):
            _write(tmp_path / "val" / name / f"{i}.png", (100 + 2 * label + i, 0, 0))
    splits = load_image_folder(tmp_path, test_fraction=0.25)
    assert splits.classes == ["a", "b"]
    assert sorted(_ids(splits.val.x, splits.mean, splits.std)) == [100, 101, 102, 103]
    assert splits.val.y.tolist() == [0, 0, 1, 1]
    assert (len(splits.train), len(splits.test)) == (12, 4)
    assert all(i < 100 for i in _ids(splits.test.x, splits.mean, splits.std))


def test_image_size_resizes_and_grayscale_becomes_rgb(tmp_path):
    for label, name in enumerate(("a", "b")):
        for i in range(5):
            _write(tmp_path / name / f"{i}.png", (40 * label + i + 1, 0, 0), size=(7 + i, 9), mode="L")
    splits = load_image_folder(tmp_path, image_size=4, normalize=False)
    assert tuple(splits.train.x.shape[1:]) == (3, 4, 4)
    x = splits.train.x  # a uniform grey stays uniform and equal in R, G and B
    assert bool((x == x[:, :1, :1, :1]).all())


def test_sizes_that_differ_need_image_size(tmp_path):
    _write(tmp_path / "a" / "0.png", (1, 1, 1), size=(6, 5))
    _write(tmp_path / "a" / "1.png", (1, 1, 1), size=(6, 5))
    _write(tmp_path / "b" / "0.png", (1, 1, 1), size=(8, 8))
    _write(tmp_path / "b" / "1.png", (1, 1, 1), size=(6, 5))
    with pytest.raises(ValueError, match=r"images differ in size .* give --image-size N"):
        load_image_folder(tmp_path, val_fraction=0.25, test_fraction=0.25)


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        load_image_folder(tmp_path)
    for i in range(2):
        _write(tmp_path / "a" / f"{i}.png", (1, 1, 1))
    with pytest.raises(ValueError, match="2 images .* leave none for training"):
        load_image_folder(tmp_path)
    (tmp_path / "a" / "9.png").write_bytes(b"not a png")
    for i in range(3, 8):
        _write(tmp_path / "a" / f"{i}.png", (1, 1, 1))
    with pytest.raises(ValueError, match=r"cannot read .*9\.png as an image"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_image_folder(tmp_path, val_fraction=1.0)


def test_val_class_unknown_to_train_is_refused(tmp_path):
    for i in range(4):
        _write(tmp_path / "train" / "a" / f"{i}.png", (1, 1, 1))
    _write(tmp_path / "val" / "zebra" / "0.png", (1, 1, 1))
    with pytest.raises(ValueError, match="class 'zebra' .* is not among the training classes"):
        load_image_folder(tmp_path)
