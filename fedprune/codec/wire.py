"""Wire size: Flower 1.42 inflatable-object serialization, reproduced without importing flwr."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from typing import Final

import numpy as np

from fedprune.codec.format import (
    _OBJECT_ID_LEN,
    FLWR_CHUNK_SIZE_ENV,
    FLWR_DEFAULT_CHUNK_SIZE,
)
from fedprune.codec.raw import STYPE_RAW, check_raw_dtype


def _raw_data(arr: np.ndarray) -> np.ndarray:
    """Return the bytes a raw ``Array`` of ``arr`` carries (:mod:`fedprune.codec.raw`), flat."""
    check_raw_dtype(arr.dtype)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)


def _object_bytes(class_name: str, n_children: int, body_len: int) -> int:
    """Return the deflated size ``len(f"{class} {ids} {len(body)}") + 1 + len(body)``."""
    ids_len = n_children * _OBJECT_ID_LEN + max(n_children - 1, 0)
    return len(class_name) + 1 + ids_len + 1 + len(str(body_len)) + 1 + body_len


@lru_cache(maxsize=256)
def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name  # ``Array.dtype`` of a raw array; ``dtype.name`` is slow (pure Python)


@lru_cache(maxsize=4096)
def _array_object_bytes(dtype: np.dtype, shape: tuple[int, ...], refs: tuple[int, ...]) -> int:
    """Return the deflated size of an ``Array`` with chunk index list ``refs``."""
    body = {
        "dtype": _dtype_name(dtype),
        "shape": list(shape),
        "stype": STYPE_RAW,
        "arraychunk_ids": list(refs),
    }
    n_children = max(refs) + 1 if refs else 0  # an empty raw array has no chunk
    return _object_bytes("Array", n_children, len(json.dumps(body).encode("utf-8")))


def _chunk_size(chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = int(os.environ.get(FLWR_CHUNK_SIZE_ENV, FLWR_DEFAULT_CHUNK_SIZE))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return chunk_size


def _array_wire_bytes(arr: np.ndarray, chunk_size: int | None = None) -> int:
    """Return the serialized size of one ``Array`` and its chunks (chunks assumed distinct)."""
    size = _chunk_size(chunk_size)
    total = arr.nbytes
    n_chunks = -(-total // size)
    last = total - (n_chunks - 1) * size
    chunk_bytes = (n_chunks - 1) * _object_bytes("ArrayChunk", 0, size)
    chunk_bytes += _object_bytes("ArrayChunk", 0, last)
    return _array_object_bytes(arr.dtype, arr.shape, tuple(range(n_chunks))) + chunk_bytes


_SMALL_CHUNK: Final = 4096
"""Chunks up to this many bytes are compared by content, larger ones by sha256."""


def _chunk_key(data: np.ndarray, start: int, end: int) -> object:
    """Return a key equal for two chunks iff bytes ``[start, end)`` of ``data`` are."""
    body = data.view(np.uint8)[start:end]
    if end - start <= _SMALL_CHUNK:
        return body.tobytes()
    return (end - start, hashlib.sha256(body.data).digest())  # no copy of the chunk


def wire_size(payload: Mapping[str, np.ndarray], *, chunk_size: int | None = None) -> int:
    r"""Exact byte size of Flower 1.42's serialization of ``payload`` as a record of raw arrays.

    Flower sends a message as the unique objects of its tree, each deflated to
    ``f"{ClassName} {child ids} {len(body)}"`` + a NUL byte + ``body`` (child ids are
    comma-joined 64-char sha256 hex digests). Here the tree is one ``ArrayRecord`` (body
    ``json.dumps({name: array_id})``), one ``Array`` per distinct array (body: JSON of dtype,
    shape, stype and chunk indices; children: its distinct chunks) and one ``ArrayChunk`` per
    distinct slice of ``chunk_size`` bytes of the array's raw bytes (:mod:`fedprune.codec.raw`:
    no npy header). Identical objects
    (equal arrays under different names, repeated chunks such as the zeros of a large tensor)
    count once, as in ``flwr.supercore.inflatable.get_all_nested_objects``. Chunk contents are
    compared (large ones by sha256, as Flower's object ids) only when chunks share a length.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        Arrays as ``boundary.records.payload_record`` wraps them (raw ``Array``\ s).
    chunk_size : int, optional
        Flower's array chunk size; default ``$FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` or 5 MiB.

    Returns
    -------
    int
        ``sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())``.

    Raises
    ------
    ValueError
        If a value is not a numpy array of a dtype in :data:`~fedprune.codec.raw.RAW_DTYPES`.
    """
    size = _chunk_size(chunk_size)
    parts: list[tuple[np.ndarray, np.ndarray, int]] = []
    length_counts: Counter[int] = Counter()
    for key, arr in payload.items():
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"payload key {key!r} must be a numpy array, got {type(arr)}")
        data = _raw_data(arr)
        total = data.nbytes
        parts.append((arr, data, total))
        n_full, last = divmod(total, size)
        length_counts[size] += n_full
        if last:
            length_counts[last] += 1

    unique_chunks: set[object] = set()
    unique_arrays: set[object] = set()
    nbytes = 0
    for i, (arr, data, total) in enumerate(parts):
        starts = range(0, total, size)
        keys: list[object] = []
        for start in starts:
            end = min(start + size, total)
            if length_counts[end - start] == 1:
                keys.append((i, start))  # no other chunk has this length: unique content
            else:
                keys.append(_chunk_key(data, start, end))
        array_key = (arr.dtype, arr.shape, tuple(keys))
        if array_key in unique_arrays:
            continue  # the same Array object (same id) under another name
        unique_arrays.add(array_key)
        order: dict[object, int] = {}
        refs = tuple(order.setdefault(k, len(order)) for k in keys)
        nbytes += _array_object_bytes(arr.dtype, arr.shape, refs)
        for chunk, start in zip(keys, starts, strict=True):
            if chunk not in unique_chunks:
                unique_chunks.add(chunk)
                nbytes += _object_bytes("ArrayChunk", 0, min(size, total - start))
    record_body = json.dumps(dict.fromkeys(payload, "0" * _OBJECT_ID_LEN)).encode("utf-8")
    nbytes += _object_bytes("ArrayRecord", len(unique_arrays), len(record_body))
    return nbytes
