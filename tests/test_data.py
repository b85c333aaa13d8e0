"""Tests of fedprune.data: in-memory datasets, IDX parsing, loaders and partitions."""

from __future__ import annotations

import gzip
import math
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.datasets import CIFAR10

from fedprune.data import (
    DATASET_SHAPES,
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    NORMALIZATION,
    ArrayDataset,
    DatasetUnavailableError,
    _client_data_cached,
    _load_cached,
    _load_vision,
    _partition_cached,
    client_data,
    load_dataset,
    parse_idx,
    partition,
    read_idx,
)

torch.set_num_threads(1)

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as an IDX file, independently of the parser under test."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = IDX_TYPE_CODES[big.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + big.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def standardised(u8: np.ndarray, name: str) -> np.ndarray:
    """Expected float images (N, C, H, W) from uint8 (N, C, H, W), written the obvious way."""
    mean, std = NORMALIZATION[name]
    m = np.asarray(mean)[None, :, None, None]
    s = np.asarray(std)[None, :, None, None]
    return (u8 / 255.0 - m) / s


def toy(n: int = 6, num_classes: int = 3) -> ArrayDataset:
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    y = (np.arange(n) % num_classes).astype(np.int64)
    return ArrayDataset(x, y, num_classes, "toy")


# -- ArrayDataset ---------------------------------------------------------------------------


def test_array_dataset_validates_its_fields() -> None:
    x = np.zeros((3, 2), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="x must be a float32"):
        ArrayDataset(x.astype(np.float64), y, 2, "t")
    with pytest.raises(ValueError, match="x must have shape"):
        ArrayDataset(np.zeros((3, 2, 2), np.float32), y, 2, "t")
    with pytest.raises(ValueError, match="y must be a 1-D int64"):
        ArrayDataset(x, y.astype(np.int32), 2, "t")
    with pytest.raises(ValueError, match="same length"):
        ArrayDataset(x, np.zeros(4, np.int64), 2, "t")
    with pytest.raises(ValueError, match="num_classes"):
        ArrayDataset(x, y, 0, "t")
    with pytest.raises(ValueError, match=r"y must lie in \[0, num_classes=2\)"):
        ArrayDataset(x, np.array([0, 2, 1], np.int64), 2, "t")


def test_array_dataset_basics() -> None:
    ds = toy()
    assert len(ds) == 6
    assert ds.input_shape == (4,)
    np.testing.assert_array_equal(ds.class_counts(), [2, 2, 2])


def test_subset_by_indices_copies_only_the_rows() -> None:
    ds = toy()
    sub = ds.subset(np.array([4, 1, 1]))
    np.testing.assert_array_equal(sub.x, [[16, 17, 18, 19], [4, 5, 6, 7], [4, 5, 6, 7]])
    np.testing.assert_array_equal(sub.y, [1, 1, 1])
    assert sub.num_classes == 3 and sub.name == "toy"
    assert not np.shares_memory(sub.x, ds.x)
    empty = ds.subset(np.array([], dtype=np.int64))
    assert len(empty) == 0 and empty.input_shape == (4,)


def test_subset_by_slice_is_a_view() -> None:
    ds = toy()
    sub = ds.subset(slice(2, 4))
    np.testing.assert_array_equal(sub.y, [2, 0])
    assert np.shares_memory(sub.x, ds.x)


def test_subset_rejects_bad_indices() -> None:
    ds = toy()
    with pytest.raises(ValueError, match="indices must be a 1-D integer"):
        ds.subset(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="indices must be a 1-D integer"):
        ds.subset(np.array([[0, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        ds.subset(np.array([6]))


def test_to_loader_batches_and_seeded_shuffle() -> None:
    ds = toy(n=10)
    batches = list(ds.to_loader(4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x0, y0 = batches[0]
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64
    np.testing.assert_array_equal(y0.numpy(), ds.y[:4])

    def order(seed: int) -> np.ndarray:
        loader = ds.to_loader(3, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return np.concatenate([x[:, 0].numpy() for x, _ in loader]) / 4

    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))
    np.testing.assert_array_equal(np.sort(order(1)), np.arange(10))
    assert [len(y) for _, y in ds.to_loader(4, drop_last=True)] == [4, 4]


def test_to_loader_rejects_bad_arguments() -> None:
    ds = toy()
    with pytest.raises(ValueError, match="generator is required"):
        ds.to_loader(2, shuffle=True)
    with pytest.raises(ValueError, match="batch_size"):
        ds.to_loader(0)


def test_tensors_share_memory_even_when_read_only() -> None:
    ds = toy()
    ds.x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning is handled
        x, y = ds.tensors()
    assert x.data_ptr() == ds.x.ctypes.data
    assert y.dtype == torch.int64


# -- IDX ----------------------------------------------------------------------------------


def test_parse_idx_hand_written_bytes() -> None:
    u8 = b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    np.testing.assert_array_equal(parse_idx(u8), [[0, 1, 2], [3, 4, 5]])
    assert parse_idx(u8).dtype == np.uint8
    i2 = b"\x00\x00\x0b\x01" + (2).to_bytes(4, "big") + b"\xff\xfe\x01\x00"
    out = parse_idx(i2)
    np.testing.assert_array_equal(out, [-2, 256])
    assert out.dtype == np.dtype("int16") and out.dtype.isnative
    f4 = b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x3f\xc0\x00\x00"
    np.testing.assert_array_equal(parse_idx(f4), [1.5])


def test_parse_idx_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(b"\x00\x00\x08\x02\x00\x00\x00\x01")
    with pytest.raises(ValueError, match=r"need 3 bytes of data, found 2"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", source="f")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_files(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
        rng.integers(-(2**31), 2**31, (7,), dtype=np.int64).astype(">i4"),
        rng.standard_normal((2, 3)).astype(">f4"),
    ]
    for i, arr in enumerate(arrays):
        path = tmp_path / f"a{i}-idx{suffix}"
        write_idx(path, arr)
        out = read_idx(path)
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == arr.dtype.newbyteorder("=")


# -- load_dataset -------------------------------------------------------------------------


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset name 'imagenet'"):
        load_dataset("imagenet")


def test_digits_split_shapes_range_and_stratification() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == test.num_classes == 10
    assert train.name == "digits"
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert not train.x.flags.writeable and not test.y.flags.writeable
    full_counts = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(test.class_counts() - 0.2 * full_counts) <= 1)
    np.testing.assert_array_equal(train.class_counts() + test.class_counts(), full_counts)
    # train and test together are exactly the bundled images (scaled by 1/16), each once.
    ours = np.concatenate([train.x, test.x]).reshape(1797, 64) * 16
    ref = load_digits().data
    np.testing.assert_array_equal(
        ours[np.lexsort(ours.T[::-1])], ref[np.lexsort(ref.T[::-1])].astype(np.float32)
    )


def test_digits_is_cached_and_deterministic() -> None:
    train, test = load_dataset("digits")
    assert load_dataset("digits")[0] is train
    assert load_dataset("digits", root="/nonexistent", download=False)[0] is train
    _load_cached.cache_clear()
    train2, test2 = load_dataset("digits")
    assert train2 is not train
    np.testing.assert_array_equal(train2.x, train.x)
    np.testing.assert_array_equal(train2.y, train.y)
    np.testing.assert_array_equal(test2.y, test.y)


def _tiny_images(seed: int, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def test_fashion_mnist_from_gz_idx_files(tmp_path: Path) -> None:
    train_u8, train_y = _tiny_images(1, 5, (4, 3))
    test_u8, test_y = _tiny_images(2, 2, (4, 3))
    train_u8[0, 0, 0], train_u8[0, 1, 2] = 0, 255
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_u8)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_u8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_y)

    train, test = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert train.x.shape == (5, 1, 4, 3) and test.x.shape == (2, 1, 4, 3)
    np.testing.assert_array_equal(train.y, train_y.astype(np.int64))
    np.testing.assert_array_equal(test.y, test_y.astype(np.int64))
    assert train.y.dtype == np.int64 and train.x.dtype == np.float32
    np.testing.assert_allclose(
        train.x, standardised(train_u8[:, None], "fashion-mnist"), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        test.x, standardised(test_u8[:, None], "fashion-mnist"), rtol=1e-6, atol=1e-6
    )
    assert train.x[0, 0, 0, 0] == pytest.approx(-0.2860 / 0.3530, rel=1e-6)
    assert train.x[0, 0, 1, 2] == pytest.approx((1 - 0.2860) / 0.3530, rel=1e-6)


def test_fashion_mnist_missing_offline_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"
    ) as info:
        load_dataset("fashion-mnist", root=tmp_path / "absent", download=False)
    assert "downloads are disabled" in str(info.value)
    assert str(tmp_path / "absent") in str(info.value)


def test_mnist_through_torchvision_from_raw_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    train_u8, train_y = _tiny_images(3, 4, (28, 28))
    test_u8, test_y = _tiny_images(4, 3, (28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train_u8)
    write_idx(raw / "train-labels-idx1-ubyte", train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", test_u8)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)

    train, test = load_dataset("mnist", root=tmp_path, download=False)
    assert train.x.shape == (4, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert train.name == "mnist" and train.num_classes == 10
    np.testing.assert_array_equal(train.y, train_y)
    np.testing.assert_array_equal(test.y, test_y)
    np.testing.assert_allclose(
        train.x, standardised(train_u8[:, None], "mnist"), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        test.x, standardised(test_u8[:, None], "mnist"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_missing_offline_is_a_clear_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "absent"
    with pytest.raises(DatasetUnavailableError, match="downloads are disabled") as info:
        load_dataset(name, root=root, download=False)
    assert repr(name) in str(info.value) and str(root) in str(info.value)
    assert not root.exists()


def test_offline_environment_variable_forbids_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPRUNE_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="FEDPRUNE_OFFLINE=1"):
        load_dataset("mnist", root=tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


class _Cifar10WithoutChecksums(CIFAR10):
    """torchvision's CIFAR10 with the md5 sums of the real files dropped (for tiny fakes)."""

    train_list: ClassVar[list[list[Any]]] = [[f"data_batch_{i}", None] for i in range(1, 6)]
    test_list: ClassVar[list[list[Any]]] = [["test_batch", None]]
    meta: ClassVar[dict[str, Any]] = {"filename": "batches.meta", "key": "label_names", "md5": None}


def _write_cifar_batches(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, 2)]
        rows.append(data)
        labels += lab
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": lab}, f)
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    test_data[0, 1024 + 5 * 32 + 7] = 200  # green channel, row 5, column 7 of image 0
    test_labels = [9, 0, 4]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test_data, "labels": test_labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return np.concatenate(rows), labels, test_data, test_labels


def test_cifar10_conversion_from_python_batches(tmp_path: Path) -> None:
    """Our conversion of torchvision's parsed CIFAR-10 batches (md5 checks skipped).

    torchvision verifies each batch against the md5 of the real 170 MB archive, which tiny
    fakes cannot match, so the parser runs through a subclass without checksums; our
    conversion (HWC -> CHW, scaling, standardisation, labels) is the code under test. The
    md5-checked public path must reject the same fakes as unavailable.
    """
    train_rows, train_labels, test_rows, test_labels = _write_cifar_batches(tmp_path)
    train_bytes, test_bytes = _load_vision(
        _Cifar10WithoutChecksums, "cifar10", tmp_path, download=False
    )
    train, test = train_bytes.to_float(), test_bytes.to_float()  # uint8 kept, floats on demand
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(train.y, train_labels)
    np.testing.assert_array_equal(test.y, test_labels)
    # CIFAR rows are R (1024), G (1024), B (1024), each a row-major 32x32 plane.
    np.testing.assert_allclose(
        train.x, standardised(train_rows.reshape(-1, 3, 32, 32), "cifar10"), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        test.x, standardised(test_rows.reshape(-1, 3, 32, 32), "cifar10"), rtol=1e-5, atol=1e-5
    )
    assert test.x[0, 1, 5, 7] == pytest.approx((200 / 255 - 0.4822) / 0.2435, rel=1e-6)
    assert train.x.flags.c_contiguous

    with pytest.raises(DatasetUnavailableError, match="not found or corrupted"):
        load_dataset("cifar10", root=tmp_path, download=False)


@pytest.fixture
def system_fashion_mnist() -> Iterator[None]:
    if not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install -y dataset-fashion-mnist to run this test")
    yield
    _load_cached.cache_clear()  # free the 220 MB copy


@pytest.mark.usefixtures("system_fashion_mnist")
def test_fashion_mnist_from_the_debian_package() -> None:
    train, test = load_dataset("fashion-mnist")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(train.class_counts(), np.full(10, 6000))
    np.testing.assert_array_equal(test.class_counts(), np.full(10, 1000))
    # standardised with the dataset's own statistics: mean ~0 and std ~1
    assert abs(float(train.x.mean(dtype=np.float64))) < 1e-3
    assert float(train.x.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-3)


# -- partition ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_dataset("digits")[0].y


def test_iid_is_a_seeded_shuffle_cut_into_contiguous_shards() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    parts = partition(labels, 3, scheme="iid", seed=7)
    perm = np.random.default_rng(7).permutation(10)
    expected = [perm[0:4], perm[4:7], perm[7:10]]
    for got, want in zip(parts, expected, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64 and not got.flags.writeable


def test_iid_disjoint_complete_balanced(digits_labels: np.ndarray) -> None:
    parts = partition(digits_labels, 10, scheme="iid", seed=0)
    assert [len(p) for p in parts] == [144] * 7 + [143] * 3
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_partitions_are_deterministic_by_seed(digits_labels: np.ndarray, scheme: str) -> None:
    a = partition(digits_labels, 8, scheme=scheme, alpha=0.5, classes_per_client=3, seed=1)
    _partition_cached.cache_clear()  # recompute, not the cached arrays of `a`
    b = partition(digits_labels.copy(), 8, scheme=scheme, alpha=0.5, classes_per_client=3, seed=1)
    c = partition(digits_labels, 8, scheme=scheme, alpha=0.5, classes_per_client=3, seed=2)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c, strict=True))


def test_dirichlet_is_complete_and_skewed_for_small_alpha(digits_labels: np.ndarray) -> None:
    def skew(alpha: float) -> float:
        parts = partition(digits_labels, 10, scheme="dirichlet", alpha=alpha, seed=0)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))
        assert min(len(p) for p in parts) >= 10  # the default min_partition_size
        counts = np.stack([np.bincount(digits_labels[p], minlength=10) for p in parts])
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    assert skew(0.1) > 0.5  # mostly one class per client
    assert skew(1000.0) < 0.2  # near-uniform: about 1/10 per class


def test_dirichlet_default_min_size_backs_off(digits_labels: np.ndarray) -> None:
    # Ten draws at min_partition_size=10 all fail here; the default halves it until one fits.
    with pytest.raises(ValueError, match="could not draw a Dirichlet partition"):
        partition(digits_labels, 50, scheme="dirichlet", alpha=0.1, min_partition_size=10)
    parts = partition(digits_labels, 50, scheme="dirichlet", alpha=0.1)
    assert min(len(p) for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))


def test_dirichlet_impossible_sizes_are_clear_errors() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match="min_partition_size=11 is impossible"):
        partition(labels, 10, scheme="dirichlet", min_partition_size=11)
    with pytest.raises(ValueError, match=r"could not draw .* alpha=0\.01"):
        partition(labels, 10, scheme="dirichlet", alpha=0.01, min_partition_size=5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_scheme_gives_k_classes_per_client(digits_labels: np.ndarray, k: int) -> None:
    parts = partition(digits_labels, 10, scheme="classes", classes_per_client=k, seed=3)
    for pid, p in enumerate(parts):
        present = np.unique(digits_labels[p])
        assert present.size == k
        assert pid % 10 in present  # first class is partition_id % num_classes
    # 10 partitions cover all 10 classes: every index used exactly once
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))


def test_classes_scheme_uses_each_index_at_most_once_when_classes_are_left_out() -> None:
    labels = np.repeat(np.arange(10), 5)
    with pytest.warns(UserWarning, match="will NOT be used"):
        parts = partition(labels, 2, scheme="classes", classes_per_client=2, seed=0)
    used = np.concatenate(parts)
    assert np.unique(used).size == used.size < 50
    assert all(np.unique(labels[p]).size == 2 for p in parts)


def test_partition_rejects_bad_arguments() -> None:
    labels = np.arange(20) % 4
    with pytest.raises(ValueError, match="unknown scheme 'shards'"):
        partition(labels, 2, scheme="shards")
    with pytest.raises(ValueError, match="num_partitions must be in"):
        partition(labels, 0)
    with pytest.raises(ValueError, match="num_partitions must be in"):
        partition(labels, 21)
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        partition(labels.astype(float), 2)
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        partition(labels.reshape(4, 5), 2)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        partition(labels, 2, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="classes_per_client must be in"):
        partition(labels, 2, scheme="classes", classes_per_client=5)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        partition(labels, 2, seed=-1)


@settings(max_examples=25, deadline=None)
@given(
    num_partitions=st.integers(1, 10),
    per_partition=st.integers(20, 40),
    num_classes=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_iid_and_dirichlet_use_every_index_once(
    num_partitions: int, per_partition: int, num_classes: int, seed: int, scheme: str
) -> None:
    n = num_partitions * per_partition
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    parts = partition(labels, num_partitions, scheme=scheme, alpha=1.0, seed=seed)
    assert len(parts) == num_partitions
    assert min(len(p) for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=15, deadline=None)
@given(
    num_partitions=st.integers(1, 8),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_classes_scheme_property(num_partitions: int, k: int, seed: int) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(5), 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes that no partition draws
        parts = partition(labels, num_partitions, scheme="classes", classes_per_client=k, seed=seed)
    used = np.concatenate(parts)
    assert np.unique(used).size == used.size  # each index at most once
    assert all(np.unique(labels[p]).size == k for p in parts)


# -- client_data --------------------------------------------------------------------------


def test_client_data_rows_are_the_partition_rows() -> None:
    train, _ = load_dataset("digits")
    parts = partition(train.y, 5, scheme="dirichlet", alpha=0.5, seed=4)
    total = 0
    for pid in range(5):
        ds = client_data("digits", pid, 5, scheme="dirichlet", alpha=0.5, seed=4)
        idx = np.sort(parts[pid])
        np.testing.assert_array_equal(ds.x, train.x[idx])
        np.testing.assert_array_equal(ds.y, train.y[idx])
        assert not ds.x.flags.writeable
        total += len(ds)
    assert total == len(train)
    assert client_data("digits", 0, 5, scheme="dirichlet", alpha=0.5, seed=4) is client_data(
        "digits", 0, 5, scheme="dirichlet", alpha=0.5, seed=4
    )


def test_client_data_validation_split() -> None:
    kw: dict[str, Any] = {"scheme": "iid", "seed": 0, "val_fraction": 0.1}
    fit = client_data("digits", 2, 4, **kw)
    val = client_data("digits", 2, 4, split="val", **kw)
    whole = client_data("digits", 2, 4, scheme="iid", seed=0)
    assert len(val) == math.ceil(0.1 * len(whole)) == 36
    assert len(fit) + len(val) == len(whole)
    rows = np.concatenate([fit.x, val.x]).reshape(len(whole), -1)
    ref = whole.x.reshape(len(whole), -1)
    np.testing.assert_array_equal(rows[np.lexsort(rows.T[::-1])], ref[np.lexsort(ref.T[::-1])])
    assert fit.num_classes == 10 and val.x.shape[1:] == (1, 8, 8)
    _client_data_cached.cache_clear()  # recompute, not the cached arrays of `val`
    again = client_data("digits", 2, 4, split="val", **kw)
    assert again is not val
    np.testing.assert_array_equal(again.y, val.y)
    np.testing.assert_array_equal(again.x, val.x)


def test_client_data_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="partition_id must be in"):
        client_data("digits", 4, 4)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        client_data("digits", 0, 4, val_fraction=1.0)
    with pytest.raises(ValueError, match="split='val' needs val_fraction"):
        client_data("digits", 0, 4, split="val")
    with pytest.raises(ValueError, match="unknown dataset name"):
        client_data("emnist", 0, 4)


def test_dataset_shapes_match_what_loads() -> None:
    train, _ = load_dataset("digits")
    assert DATASET_SHAPES["digits"] == (train.input_shape, train.num_classes)
    assert set(DATASET_SHAPES) == set(DATASETS)
