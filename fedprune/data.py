"""Datasets as in-memory arrays, and their federated partitions.

Every dataset is loaded once per process into two :class:`ArrayDataset` objects (train and
held-out test): ``float32`` images ``(N, C, H, W)`` and ``int64`` labels ``(N,)``. In a Ray
simulation each worker process loads a dataset once (:func:`load_dataset` is cached) and every
virtual client it hosts takes its rows from that copy (:func:`client_data`, also cached).

Datasets
--------
``"digits"``
    scikit-learn's bundled 8x8 digits (1797 images, offline, the embedded default). A
    stratified 20 % held-out test split with a fixed ``random_state`` (1437 train, 360 test).
``"fashion-mnist"``
    The IDX files of the Debian package ``dataset-fashion-mnist``
    (``apt-get install -y dataset-fashion-mnist``, files under
    ``/usr/share/datasets/fashion-mnist``) when present, else ``torchvision`` (download).
``"mnist"``, ``"cifar10"``
    ``torchvision`` datasets, downloaded into ``root`` when allowed.

Normalisation
-------------
Pixels are scaled to ``[0, 1]``; the torchvision-sourced datasets are then standardised per
channel with the customary published constants (:data:`NORMALIZATION`), digits are left in
``[0, 1]`` (mean 0, std 1 in the table). Labels are ``0 .. num_classes - 1``.

Downloads
---------
``root=None`` means ``$FEDPRUNE_DATA_DIR`` or ``~/.cache/fedprune/data``. Downloads are allowed
unless ``download=False`` is passed or the environment sets ``FEDPRUNE_OFFLINE=1``; a dataset
that is neither on disk nor downloadable raises :class:`DatasetUnavailableError` saying how to
get it.

Memory: the float32 copies are 188 MB (MNIST / Fashion-MNIST train) and 614 MB (CIFAR-10
train) per process; digits is 0.4 MB. A deployed node holds only its own rows, as ``uint8``
(:class:`ByteDataset`, read from the file :mod:`fedprune.node_data` writes), standardised
example by example as batches are drawn.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedprune.catalog import (
    DATASET_SHAPES,
    DATASETS,
    PARTITION_SCHEMES,
    DatasetName,
    PartitionScheme,
)

__all__ = [
    "DATASETS",
    "DATASET_SHAPES",
    "FASHION_MNIST_SYSTEM_DIR",
    "NORMALIZATION",
    "ArrayDataset",
    "ByteDataset",
    "ClientDataset",
    "DatasetName",
    "DatasetUnavailableError",
    "PartitionScheme",
    "client_data",
    "load_bytes",
    "load_dataset",
    "parse_idx",
    "partition",
    "read_idx",
]

NORMALIZATION: Final[dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "digits": ((0.0,), (1.0,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
"""Per-channel ``(mean, std)`` applied after scaling pixels to ``[0, 1]``."""

FASHION_MNIST_SYSTEM_DIR: Final = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs its IDX files."""
_IDX_FILES: Final = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_OFFLINE_ENV: Final = "FEDPRUNE_OFFLINE"
_DATA_DIR_ENV: Final = "FEDPRUNE_DATA_DIR"
_DIGITS_TEST_FRACTION: Final = 0.2
_DIGITS_RANDOM_STATE: Final = 0
_NUM_CLASSES: Final = 10
_NOT_WRITABLE_WARNING: Final = "The given NumPy array is not writable"


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says how to get it."""


# -- ArrayDataset -------------------------------------------------------------------------


class _Rows:
    """What every dataset here has: one row of ``x`` and one label of ``y`` per example."""

    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(C, H, W)`` or ``(D,)``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Count the examples of each class, ``(num_classes,)``."""
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class ArrayDataset(_Rows):
    """An in-memory labelled dataset.

    Parameters
    ----------
    x : numpy.ndarray
        ``float32`` inputs, ``(N, C, H, W)`` for images or ``(N, D)`` for flat features.
    y : numpy.ndarray
        ``int64`` labels ``(N,)`` in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the task (not only those present in ``y``).
    name : str
        Name of the dataset it came from.

    Notes
    -----
    The arrays of the cached datasets returned by :func:`load_dataset` and :func:`client_data`
    are read-only: they are shared by every caller in the process.
    """

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise ValueError(f"x must be a float32 numpy array, got {_describe(self.x)}")
        if self.x.ndim not in (2, 4):
            raise ValueError(f"x must have shape (N, D) or (N, C, H, W), got {self.x.shape}")
        _check_labels(self.y, self.x.shape[0], self.num_classes)

    def subset(self, indices: npt.NDArray[np.integer[Any]] | slice) -> ArrayDataset:
        """Select rows ``indices`` of this dataset.

        Parameters
        ----------
        indices : numpy.ndarray or slice
            1-D integer row indices (copies only the selected rows) or a slice (a view, no
            copy).

        Returns
        -------
        ArrayDataset
            The selected rows, same ``num_classes`` and ``name``.
        """
        if isinstance(indices, slice):
            return ArrayDataset(self.x[indices], self.y[indices], self.num_classes, self.name)
        idx = _check_indices(indices, len(self))
        return ArrayDataset(
            np.take(self.x, idx, axis=0), np.take(self.y, idx), self.num_classes, self.name
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` as CPU tensors sharing the arrays' memory (do not write to them)."""
        with warnings.catch_warnings():
            # Read-only (cached) arrays: torch warns that it cannot mark the tensor read-only.
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE_WARNING)
            return torch.from_numpy(self.x), torch.from_numpy(self.y)

    def to_loader(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Make a single-process ``DataLoader`` over this dataset (no copy of the arrays).

        Parameters
        ----------
        batch_size : int
            Examples per batch, ``>= 1``.
        shuffle : bool
            Reshuffle every epoch; requires ``generator``.
        generator : torch.Generator, optional
            Source of the shuffling order (required when ``shuffle``).
        drop_last : bool
            Drop the last incomplete batch.

        Returns
        -------
        torch.utils.data.DataLoader
            Batches ``(x, y)`` of ``float32`` and ``int64`` tensors.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle and generator is None:
            raise ValueError("generator is required when shuffle=True (randomness is passed in)")
        return DataLoader(
            TensorDataset(*self.tensors()),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
        )


@dataclass(frozen=True, eq=False)
class ByteDataset(_Rows):
    """A labelled image dataset kept as ``uint8`` pixels, standardised batch by batch.

    What a node holds (:mod:`fedprune.node_data`): a quarter of the memory of the ``float32``
    copy, and no full float copy ever exists; :meth:`to_loader` converts each example as it is
    drawn, with the same arithmetic as :func:`load_dataset` (bit-identical floats).

    Parameters
    ----------
    x : numpy.ndarray
        ``uint8`` pixels ``(N, C, H, W)``.
    y : numpy.ndarray
        ``int64`` labels ``(N,)`` in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the task.
    name : str
        Name of the dataset it came from.
    scale, shift : numpy.ndarray
        ``float32`` per channel ``(C,)``: an example is ``x * scale - shift``.
    """

    x: npt.NDArray[np.uint8]
    y: npt.NDArray[np.int64]
    num_classes: int
    name: str
    scale: npt.NDArray[np.float32]
    shift: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(f"x must be a uint8 (N, C, H, W) array, got {_describe(self.x)}")
        channels = self.x.shape[1]
        for field in ("scale", "shift"):
            value = getattr(self, field)
            if (
                not isinstance(value, np.ndarray)
                or value.dtype != np.float32
                or value.shape != (channels,)
            ):
                raise ValueError(
                    f"{field} must be a float32 array of shape ({channels},), "
                    f"got {_describe(value)}"
                )
        _check_labels(self.y, self.x.shape[0], self.num_classes)

    def subset(self, indices: npt.NDArray[np.integer[Any]]) -> ByteDataset:
        """Select rows ``indices`` (1-D integer array; copies the selected rows)."""
        idx = _check_indices(indices, len(self))
        return ByteDataset(
            np.take(self.x, idx, axis=0),
            np.take(self.y, idx),
            self.num_classes,
            self.name,
            self.scale,
            self.shift,
        )

    def standardise(self, x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Return ``x * scale - shift`` as ``float32`` for rows ``x`` ``(B, C, H, W)``."""
        return _standardise(x, self.scale[:, None, None], self.shift[:, None, None])

    def to_float(self) -> ArrayDataset:
        """Return the whole dataset as ``float32`` (a full copy: for tests and small data)."""
        return ArrayDataset(self.standardise(self.x), self.y, self.num_classes, self.name)

    def to_loader(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Make a single-process ``DataLoader`` converting each example as it is drawn.

        Same arguments and batches as :meth:`ArrayDataset.to_loader` on :meth:`to_float`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle and generator is None:
            raise ValueError("generator is required when shuffle=True (randomness is passed in)")
        return DataLoader(
            _ByteRows(self),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
        )


ClientDataset = ArrayDataset | ByteDataset
"""What local training and evaluation take: float rows, or bytes standardised on the fly."""


class _ByteRows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style view of a :class:`ByteDataset`: example ``i`` as ``(float32 x, int64 y)``."""

    def __init__(self, data: ByteDataset) -> None:
        self.data = data
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE_WARNING)
            self.labels = torch.from_numpy(data.y)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data.standardise(self.data.x[index : index + 1])[0]
        return torch.from_numpy(x), self.labels[index]


def _check_labels(y: object, n: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``y`` is ``n`` int64 labels in ``[0, num_classes)``."""
    if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
        raise ValueError(f"y must be a 1-D int64 numpy array, got {_describe(y)}")
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same length, got {n} and {y.shape[0]}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y must lie in [0, num_classes={num_classes}), got [{y.min()}, {y.max()}]"
        )


def _check_indices(indices: npt.ArrayLike, n: int) -> npt.NDArray[np.intp]:
    """Return ``indices`` as ``intp`` after checking they are 1-D row indices of ``n`` rows."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise ValueError(f"indices must be a 1-D integer array, got {_describe(idx)}")
    idx = idx.astype(np.intp, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise ValueError(f"indices out of range for a dataset of {n} rows")
    return idx


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"array of dtype {a.dtype} and shape {a.shape}"
    return type(a).__name__


def _freeze(ds: ArrayDataset) -> ArrayDataset:
    ds.x.flags.writeable = False
    ds.y.flags.writeable = False
    return ds


# -- IDX files ----------------------------------------------------------------------------

_IDX_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, *, source: str = "<bytes>") -> npt.NDArray[Any]:
    """Parse the bytes of an IDX file (the MNIST format).

    Parameters
    ----------
    data : bytes
        The whole (uncompressed) file: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
        ``uint32`` dimensions, then the values in C order.
    source : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray
        The values, native byte order; a read-only view of ``data`` for 1-byte types.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown IDX type code 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{source}: IDX dimensions {dims} need {expected} bytes of data, "
            f"found {len(data) - header}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read an IDX file, gzip-compressed when its name ends in ``.gz``.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    numpy.ndarray
        See :func:`parse_idx`.
    """
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            data = f.read()
    else:
        data = path.read_bytes()
    return parse_idx(data, source=str(path))


# -- Loading ------------------------------------------------------------------------------


def _standardise(
    x: npt.NDArray[np.uint8], scale: npt.NDArray[np.float32], shift: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Return ``x * scale - shift`` in ``float32`` (the one place pixels become floats)."""
    out = np.empty(x.shape, dtype=np.float32)
    np.multiply(x, scale, out=out)
    out -= shift
    return out


def _to_bytes(images: npt.NDArray[np.uint8], labels: npt.ArrayLike, name: str) -> ByteDataset:
    """``uint8`` images ``(N, H, W)`` or ``(N, H, W, C)`` to a :class:`ByteDataset` (NCHW).

    Scaled to ``[0, 1]`` then standardised with :data:`NORMALIZATION`: ``scale = 1 / (255 std)``
    and ``shift = mean / std`` per channel.
    """
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got {images.shape}")
    mean, std = NORMALIZATION[name]
    if images.shape[1] != len(mean):
        raise ValueError(f"images have {images.shape[1]} channels, expected {len(mean)}")
    std_arr = np.asarray(std, dtype=np.float32)
    return ByteDataset(
        np.asarray(images, dtype=np.uint8),
        np.asarray(labels).astype(np.int64),
        _NUM_CLASSES,
        name,
        np.float32(1.0 / 255.0) / std_arr,
        np.asarray(mean, dtype=np.float32) / std_arr,
    )


def _load_digits() -> tuple[ByteDataset, ByteDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train_idx, test_idx = train_test_split(
        np.arange(y.shape[0]),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=y,
        random_state=_DIGITS_RANDOM_STATE,
    )
    # Pixel values are the integers 0 .. 16, scaled to [0, 1] (x / 16, exact in float32).
    images = x.astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = y.astype(np.int64)
    scale, shift = np.array([1.0 / 16.0], dtype=np.float32), np.zeros(1, dtype=np.float32)
    return (
        ByteDataset(images[train_idx], labels[train_idx], _NUM_CLASSES, "digits", scale, shift),
        ByteDataset(images[test_idx], labels[test_idx], _NUM_CLASSES, "digits", scale, shift),
    )


def _has_idx_files(directory: Path) -> bool:
    return all((directory / f).is_file() for files in _IDX_FILES.values() for f in files)


def _load_idx_dir(directory: Path, name: str) -> tuple[ByteDataset, ByteDataset]:
    splits = []
    for split in ("train", "test"):
        image_file, label_file = _IDX_FILES[split]
        images = read_idx(directory / image_file)
        labels = read_idx(directory / label_file)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"{directory / image_file}: expected uint8 (N, H, W) images")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{directory / label_file}: expected {images.shape[0]} labels")
        splits.append(_to_bytes(images, labels, name))
    return splits[0], splits[1]


def _unavailable_message(name: str, root: Path, download: bool, err: Exception) -> str:
    how = {
        "fashion-mnist": (
            "install the Debian package (`apt-get install -y dataset-fashion-mnist`, files in "
            f"{FASHION_MNIST_SYSTEM_DIR}), put its four *.gz IDX files in root, or go online"
        ),
    }.get(name, "go online, or copy the torchvision files into root")
    state = (
        "the download failed"
        if download
        else f"downloads are disabled (download=False or {_OFFLINE_ENV}=1)"
    )
    return (
        f"dataset {name!r} is not available under root={str(root)!r} and {state}: {err}. "
        f"To get it: {how}; downloads go to root (default ${_DATA_DIR_ENV} or "
        "~/.cache/fedprune/data)."
    )


def _load_vision(
    dataset_cls: Callable[..., Any], name: str, root: Path, *, download: bool
) -> tuple[ByteDataset, ByteDataset]:
    """Load both splits through a torchvision dataset class (``MNIST``, ``CIFAR10``, ...)."""
    try:
        train = dataset_cls(str(root), train=True, download=download)
        test = dataset_cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise DatasetUnavailableError(_unavailable_message(name, root, download, err)) from err
    return (
        _to_bytes(np.asarray(train.data), np.asarray(train.targets), name),
        _to_bytes(np.asarray(test.data), np.asarray(test.targets), name),
    )


def _default_root() -> Path:
    env = os.environ.get(_DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fedprune" / "data"


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: Path | None, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    train, test = _load_bytes(name, root, download)
    return _freeze(train.to_float()), _freeze(test.to_float())


def _load_bytes(name: str, root: Path | None, download: bool) -> tuple[ByteDataset, ByteDataset]:
    if name == "digits":
        return _load_digits()

    import torchvision.datasets as tvd

    if name == "fashion-mnist":
        if root is not None and _has_idx_files(root):
            return _load_idx_dir(root, name)
        if root is None and _has_idx_files(FASHION_MNIST_SYSTEM_DIR):
            return _load_idx_dir(FASHION_MNIST_SYSTEM_DIR, name)
    classes = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}
    return _load_vision(
        classes[name], name, _default_root() if root is None else root, download=download
    )


def _downloads_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get(_OFFLINE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a dataset as ``(train, held-out test)``, once per process.

    Parameters
    ----------
    name : {"digits", "fashion-mnist", "mnist", "cifar10"}
        The dataset.
    root : str or os.PathLike, optional
        Data directory. For ``"fashion-mnist"`` a ``root`` holding the four ``*.gz`` IDX files
        is read directly; ``root=None`` first tries :data:`FASHION_MNIST_SYSTEM_DIR`. Default
        for torchvision downloads: ``$FEDPRUNE_DATA_DIR`` or ``~/.cache/fedprune/data``.
    download : bool, optional
        Allow torchvision to download missing files; default: allowed unless the environment
        sets ``FEDPRUNE_OFFLINE=1``.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)`` with read-only arrays shared by all callers.

    Raises
    ------
    ValueError
        Unknown ``name``.
    DatasetUnavailableError
        The files are missing and cannot be downloaded (the message says how to get them).
    """
    return _load_cached(*_source_key(name, root, download))


def load_bytes(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> tuple[ByteDataset, ByteDataset]:
    """Load a dataset as ``uint8`` pixels ``(train, held-out test)``, not cached.

    The same rows, order and sources as :func:`load_dataset`, whose ``float32`` arrays are
    these datasets' :meth:`ByteDataset.to_float`. Used to write per-node data files
    (:mod:`fedprune.node_data`). Arguments and errors as :func:`load_dataset`.
    """
    return _load_bytes(*_source_key(name, root, download))


def _source_key(
    name: str, root: str | os.PathLike[str] | None, download: bool | None
) -> tuple[str, Path | None, bool]:
    """Return the validated, normalised cache key ``(name, root, download)`` of a source."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {DATASETS}")
    if name == "digits":  # bundled with scikit-learn: one cache entry whatever root says
        return name, None, False
    resolved = None if root is None else Path(root).expanduser().resolve()
    return name, resolved, _downloads_allowed(download)


# -- Partitioning -------------------------------------------------------------------------


def partition(
    labels: npt.ArrayLike,
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int | None = None,
) -> list[npt.NDArray[np.int64]]:
    """Split example indices into ``num_partitions`` federated partitions.

    Uses flwr-datasets partitioners over an in-memory ``datasets.Dataset`` of the labels and
    their row indices. The result is deterministic given the arguments and cached per process.

    Parameters
    ----------
    labels : array_like
        1-D integer labels of the whole (train) set.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= len(labels)``.
    scheme : {"iid", "dirichlet", "classes"}
        ``"iid"``: a seeded shuffle cut into near-equal contiguous shards
        (``IidPartitioner``). ``"dirichlet"``: per-class proportions drawn from
        ``Dir(alpha)`` with self-balancing (``DirichletPartitioner``); smaller ``alpha`` means
        more label skew. ``"classes"``: each partition holds exactly ``classes_per_client``
        classes (``PathologicalPartitioner``, first class ``partition_id % num_classes``, the
        others drawn at random); a class's examples are split evenly among the partitions
        holding it.
    alpha : float
        Dirichlet concentration, ``> 0`` (``"dirichlet"`` only).
    classes_per_client : int
        Classes per partition (``"classes"`` only).
    seed : int
        Non-negative seed of every random choice.
    min_partition_size : int, optional
        Smallest acceptable Dirichlet partition (redrawn up to 10 times otherwise). Default:
        ``m = max(1, min(10, len(labels) // (2 * num_partitions)))``, halved down to 1 while
        ten draws in a row fail (small data, many partitions, small ``alpha``).

    Returns
    -------
    list of numpy.ndarray
        One read-only ``int64`` index array per partition. Every index occurs at most once;
        ``"iid"`` and ``"dirichlet"`` use every index, ``"classes"`` leaves out classes that no
        partition draws (only when ``num_partitions * classes_per_client < num_classes``).

    Raises
    ------
    ValueError
        Bad arguments, or no Dirichlet draw met ``min_partition_size``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {_describe(y)}")
    n = int(y.shape[0])
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be in [1, len(labels)={n}], got {num_partitions}")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {PARTITION_SCHEMES}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    y = y.astype(np.int64, copy=False)
    if scheme == "iid":
        key: tuple[Any, ...] = ()
    elif scheme == "dirichlet":
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {alpha}")
        if min_partition_size is None:
            # Halve the default down to 1 until a draw succeeds (deterministic by seed).
            start = max(1, min(10, n // (2 * num_partitions)))
            sizes = tuple(start >> i for i in range(start.bit_length()))
        else:
            if not 0 <= min_partition_size * num_partitions <= n:
                raise ValueError(
                    f"min_partition_size={min_partition_size} is impossible for {n} examples "
                    f"in {num_partitions} partitions"
                )
            sizes = (int(min_partition_size),)
        key = (float(alpha), sizes)
    else:
        num_classes = int(np.unique(y).size)
        if not 1 <= classes_per_client <= num_classes:
            raise ValueError(
                f"classes_per_client must be in [1, {num_classes}] (classes present in "
                f"labels), got {classes_per_client}"
            )
        key = (int(classes_per_client),)
    parts = _partition_cached(y.tobytes(), num_partitions, scheme, int(seed), key)
    return list(parts)


@functools.lru_cache(maxsize=32)
def _partition_cached(
    label_bytes: bytes, num_partitions: int, scheme: str, seed: int, key: tuple[Any, ...]
) -> tuple[npt.NDArray[np.int64], ...]:
    try:
        from flwr_datasets.partitioner import (
            DirichletPartitioner,
            IidPartitioner,
            PathologicalPartitioner,
        )
    except ImportError as err:  # a node's install: it reads its prepared file instead
        raise ImportError(
            "partitioning a dataset needs flwr-datasets (pip install '.[simulation]'); a "
            "deployed node reads its own data file instead (node config data-path, written by "
            "`python -m simulations.node_data`)"
        ) from err

    y = np.frombuffer(label_bytes, dtype=np.int64)
    index = np.arange(y.shape[0], dtype=np.int64)
    if scheme == "iid":
        index = np.random.default_rng(seed).permutation(index)
        return _run_partitioner(IidPartitioner(num_partitions), y[index], index)
    if scheme == "classes":
        (classes_per_client,) = key
        partitioner = PathologicalPartitioner(
            num_partitions,
            "label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
        try:
            return _run_partitioner(partitioner, y, index)
        except ValueError as err:
            raise ValueError(f"cannot partition with scheme='classes': {err}") from err
    alpha, sizes = key
    for min_size in sizes:
        partitioner = DirichletPartitioner(
            num_partitions,
            "label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
        try:
            with warnings.catch_warnings():
                # It warns on every redraw; a final failure is reported below instead.
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                return _run_partitioner(partitioner, y, index)
        except ValueError as err:
            error = err
    raise ValueError(
        f"could not draw a Dirichlet partition of {y.shape[0]} examples into {num_partitions} "
        f"partitions of at least min_partition_size={sizes[-1]} examples each with "
        f"alpha={alpha} (10 draws per size): raise alpha, or lower num_partitions or "
        "min_partition_size"
    ) from error


def _run_partitioner(
    partitioner: Any, labels: npt.NDArray[np.int64], index: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], ...]:
    """Run a flwr-datasets partitioner over ``(label, index)`` rows; return each part's index."""
    from datasets import Dataset

    # Arrow format: columns come back as Arrow arrays (zero-copy to numpy), not Python lists.
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": index}).with_format("arrow")
    parts = tuple(
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(partitioner.num_partitions)
    )
    for p in parts:
        p.flags.writeable = False
    return parts


# -- Per-client data ----------------------------------------------------------------------


def client_data(
    dataset_name: str,
    partition_id: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    val_fraction: float = 0.0,
    split: Literal["train", "val"] = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> ArrayDataset:
    """Return one client's share of a dataset's train split (cached per process).

    Parameters
    ----------
    dataset_name : str
        See :func:`load_dataset`.
    partition_id : int
        This client's partition, ``0 <= partition_id < num_partitions``.
    num_partitions : int
        Number of partitions of the train split.
    scheme, alpha, classes_per_client, seed
        See :func:`partition`.
    val_fraction : float
        Fraction of the partition held out for local validation, ``[0, 1)``; the held-out
        rows are a seeded random ``ceil(val_fraction * n)`` of the partition (at least one,
        and at least one row is left for training).
    split : {"train", "val"}
        Which part to return.
    root, download
        See :func:`load_dataset`.

    Returns
    -------
    ArrayDataset
        The rows (in increasing index order), read-only arrays.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be in [0, num_partitions={num_partitions}), got {partition_id}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if split == "val" and val_fraction == 0.0:
        raise ValueError("split='val' needs val_fraction > 0")
    return _client_data_cached(
        _source_key(dataset_name, root, download),
        partition_id,
        num_partitions,
        scheme,
        float(alpha),
        int(classes_per_client),
        int(seed),
        float(val_fraction),
        split,
    )


@functools.lru_cache(maxsize=256)
def _client_data_cached(
    source: tuple[str, Path | None, bool],
    partition_id: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_client: int,
    seed: int,
    val_fraction: float,
    split: str,
) -> ArrayDataset:
    train, _ = _load_cached(*source)
    idx = partition(
        train.y,
        num_partitions,
        scheme=scheme,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )[partition_id]
    if val_fraction > 0.0:
        n = int(idx.shape[0])
        if n < 2:
            raise ValueError(
                f"partition {partition_id} has {n} example(s), too few for val_fraction > 0"
            )
        n_val = min(max(1, math.ceil(val_fraction * n)), n - 1)
        order = np.random.default_rng([seed, partition_id]).permutation(n)
        idx = idx[order[:n_val]] if split == "val" else idx[order[n_val:]]
    return _freeze(train.subset(np.sort(idx)))
