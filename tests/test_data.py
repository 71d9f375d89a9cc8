"""Offline datasets: IDX parsing, splits, normalisation, errors and the batch iterator.

Tests using the ``real_root`` fixture read the original MNIST / Fashion-MNIST
files from ``../shared/datasets`` beside the repository and are skipped without them;
the rest run on small IDX files written to a temporary folder.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import datasets as sklearn_datasets

from lobster_fx.data import (
    Splits,
    TensorData,
    batches,
    load_dataset,
    load_digits,
    read_idx_pair,
)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip'd IDX file (magic 0x0000 0x08 ndim, then dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 30) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return raw


def row_keys(pixels: torch.Tensor | np.ndarray) -> Counter[bytes]:
    """Multiset of images, keyed by their bytes; ``pixels`` holds integer levels 0..255."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.numpy()
    rows = np.rint(pixels).astype(np.uint8).reshape(len(pixels), -1)
    return Counter(r.tobytes() for r in rows)


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not (SHARED_DATASETS / "MNIST" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="module")
def mnist(real_root: Path) -> Splits:
    return load_dataset("mnist", real_root)


# --- real MNIST / Fashion-MNIST -------------------------------------------------------


def test_mnist_split_sizes_and_types(mnist: Splits) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55_000, 5_000, 10_000)
    for part in (mnist.train, mnist.val, mnist.test):
        assert part.x.dtype == torch.float32 and part.x.shape[1:] == (1, 28, 28)
        assert part.y.dtype == torch.int64 and part.y.min() >= 0 and part.y.max() <= 9


def test_mnist_raw_label_counts(real_root: Path) -> None:
    images, labels = read_idx_pair("mnist", real_root, train=True)
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    test_images, test_labels = read_idx_pair("mnist", real_root, train=False)
    assert test_images.shape == (10_000, 28, 28) and test_labels.shape == (10_000,)


def test_mnist_normalisation(mnist: Splits) -> None:
    assert mnist.mean == pytest.approx(0.1307, abs=5e-4)
    assert mnist.std == pytest.approx(0.3081, abs=5e-4)
    assert mnist.train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert mnist.train.x.std().item() == pytest.approx(1.0, abs=1e-4)


def test_mnist_train_val_partition_the_training_set(real_root: Path) -> None:
    splits = load_dataset("mnist", real_root, normalize=False)
    images, labels = read_idx_pair("mnist", real_root, train=True)
    train, val = row_keys(splits.train.x * 255), row_keys(splits.val.x * 255)
    assert not set(train) & set(val)
    # Multiset equality: every training image lands in exactly one split.
    assert train + val == row_keys(images)
    counts = torch.bincount(torch.cat([splits.train.y, splits.val.y]), minlength=10)
    assert counts.tolist() == MNIST_TRAIN_COUNTS
    test_images, _ = read_idx_pair("mnist", real_root, train=False)
    assert torch.equal(splits.test.x[:, 0], torch.tensor(test_images).float() / 255)


def test_mnist_split_is_seeded(real_root: Path, mnist: Splits) -> None:
    same = load_dataset("mnist", real_root, seed=0)
    other = load_dataset("mnist", real_root, seed=1)
    assert torch.equal(same.val.x, mnist.val.x) and torch.equal(same.val.y, mnist.val.y)
    assert not torch.equal(other.val.y, mnist.val.y)


@pytest.mark.parametrize("sub", ["", "MNIST", "MNIST/raw"])
def test_root_may_point_at_dataset_or_raw_folder(real_root: Path, sub: str) -> None:
    images, labels = read_idx_pair("MNIST", real_root / sub, train=False)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)


def test_fashion_mnist(real_root: Path) -> None:
    if not (real_root / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST not present")
    splits = load_dataset("FashionMNIST", real_root, val_size=1000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (59_000, 1_000, 10_000)
    assert torch.bincount(splits.test.y).tolist() == [1000] * 10
    assert splits.mean == pytest.approx(0.2860, abs=5e-4)
    _, labels = read_idx_pair("fashion-mnist", real_root)
    assert np.bincount(labels).tolist() == [6000] * 10


# --- synthetic IDX files ---------------------------------------------------------------


def test_fake_files_round_trip(tmp_path: Path) -> None:
    raw = make_fake(tmp_path, n_train=50, n_test=20)
    splits = load_dataset("mnist", tmp_path, val_size=10, normalize=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    assert (splits.mean, splits.std) == (0.0, 1.0)
    images, labels = read_idx_pair("mnist", raw, train=False)
    assert torch.equal(splits.test.y, torch.from_numpy(labels.astype(np.int64)))
    assert images.flags.writeable is False  # cached arrays are shared: read-only


def test_val_size_zero_and_out_of_range(tmp_path: Path) -> None:
    make_fake(tmp_path, n_train=30)
    splits = load_dataset("mnist", tmp_path, val_size=0)
    assert len(splits.train) == 30 and splits.val.x.shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 30\), got 30"):
        load_dataset("mnist", tmp_path, val_size=30)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is ever downloaded") as e:
        load_dataset("mnist", missing)
    assert str(missing) in str(e.value)


def test_missing_file_names_the_expected_path(tmp_path: Path) -> None:
    raw = make_fake(tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="nothing is ever downloaded") as e:
        load_dataset("mnist", tmp_path)
    assert str(raw / "t10k-labels-idx1-ubyte.gz") in str(e.value)
    # Fashion-MNIST looks in its own folder, never in MNIST's.
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw/train-images"):
        read_idx_pair("fashion-mnist", tmp_path)


def test_corrupt_files_are_rejected(tmp_path: Path) -> None:
    raw = make_fake(tmp_path)
    path = raw / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x0d\x03garbage")  # element type 0x0d = float, not ubyte
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx_pair("mnist", tmp_path)
    write_idx(path, np.zeros((5, 28, 28)))
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx_pair("mnist", tmp_path)


def test_mismatched_image_label_counts(tmp_path: Path) -> None:
    raw = make_fake(tmp_path, n_train=20)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(ValueError, match="do not form an image/label pair"):
        read_idx_pair("mnist", tmp_path)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*fashion-mnist.*mnist"):
        load_dataset("cifar10", tmp_path)


# --- digits --------------------------------------------------------------------------


def test_digits_default_split() -> None:
    splits = load_digits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1197, 300, 300)
    assert splits.train.x.shape[1:] == (1, 8, 8) and splits.train.y.dtype == torch.int64
    assert splits.train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    raw = load_digits(normalize=False)
    assert raw.train.x.min() >= 0 and raw.train.x.max() == 1


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.test.x, c.test.x)
    raw = load_digits(val_size=100, test_size=200, normalize=False)
    # Pixels are k/16: scaling by 16 gives back the integer levels.
    parts = [row_keys(p.x * 16) for p in (raw.train, raw.val, raw.test)]
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] + parts[2] == row_keys(sklearn_datasets.load_digits().images)


def test_digits_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="val_size \\+ test_size must be in"):
        load_digits(val_size=1000, test_size=900)


# --- batches -------------------------------------------------------------------------


def toy(n: int = 23) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.arange(n))


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_sample_once(shuffle: bool) -> None:
    data = toy()
    got = list(batches(data, 5, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in got] == [5, 5, 5, 5, 3]
    ys = torch.cat([y for _, y in got])
    assert sorted(ys.tolist()) == list(range(23))
    for x, y in got:  # x and y stay paired
        assert torch.equal(x.flatten().long(), y)
    assert torch.equal(ys, torch.arange(23)) != shuffle


def test_batches_drop_last() -> None:
    got = list(batches(toy(), 5, shuffle=True, drop_last=True))
    assert [len(y) for _, y in got] == [5, 5, 5, 5]
    assert len(set(torch.cat([y for _, y in got]).tolist())) == 20


def test_batches_reproducible_with_seeded_generator() -> None:
    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in batches(toy(), 4, shuffle=True, generator=gen)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    # One generator, two epochs: different orders, each reproducible from the seed.
    gen = torch.Generator().manual_seed(0)
    first = [y.tolist() for _, y in batches(toy(), 4, shuffle=True, generator=gen)]
    second = [y.tolist() for _, y in batches(toy(), 4, shuffle=True, generator=gen)]
    assert first != second and sum(first, []) == order(0)


def test_batches_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        batches(toy(), 0, shuffle=False)


def test_tensor_data_length_mismatch() -> None:
    with pytest.raises(ValueError, match="disagree on the number of samples: 3 vs 2"):
        TensorData(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
