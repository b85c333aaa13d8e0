"""Wire size: Flower 1.42 inflatable-object serialization, reproduced without importing flwr."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from typing import Final

import numpy as np

from fedprune.codec.format import (
    _OBJECT_ID_LEN,
    _STYPE_NUMPY,
    FLWR_CHUNK_SIZE_ENV,
    FLWR_DEFAULT_CHUNK_SIZE,
)


@lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, fortran_order: bool, shape: tuple[int, ...]) -> bytes:
    """Return the ``np.save`` header of an array (format 1.0, or 2.0 if 1.0 cannot hold it)."""
    header: dict[str, object] = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": fortran_order,
        "shape": shape,
    }
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:
        buf = io.BytesIO()
        try:
            np.lib.format.write_array_header_2_0(buf, header)
        except UnicodeEncodeError as err:
            raise ValueError(f"dtype {dtype} needs npy format 3.0 (not supported)") from err
    return buf.getvalue()


def _npy_parts(arr: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Return ``np.save(arr)`` bytes as ``(header, data)``; ``data`` is a flat C-ordered view."""
    if arr.dtype.hasobject or arr.dtype.kind == "T":
        raise ValueError(f"dtype {arr.dtype} cannot be serialized without pickle")
    fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)
    data = arr.T if fortran else np.ascontiguousarray(arr)
    return _npy_header(arr.dtype, fortran, arr.shape), data.reshape(-1)


def _object_bytes(class_name: str, n_children: int, body_len: int) -> int:
    """Return the deflated size ``len(f"{class} {ids} {len(body)}") + 1 + len(body)``."""
    ids_len = n_children * _OBJECT_ID_LEN + max(n_children - 1, 0)
    return len(class_name) + 1 + ids_len + 1 + len(str(body_len)) + 1 + body_len


@lru_cache(maxsize=256)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)  # ``Array.dtype``; ``str(dtype)`` is slow (pure Python)


@lru_cache(maxsize=4096)
def _array_object_bytes(dtype: np.dtype, shape: tuple[int, ...], refs: tuple[int, ...]) -> int:
    """Return the deflated size of an ``Array`` with chunk index list ``refs``."""
    body = {
        "dtype": _dtype_name(dtype),
        "shape": list(shape),
        "stype": _STYPE_NUMPY,
        "arraychunk_ids": list(refs),
    }
    return _object_bytes("Array", max(refs) + 1, len(json.dumps(body).encode("utf-8")))


def _chunk_size(chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = int(os.environ.get(FLWR_CHUNK_SIZE_ENV, FLWR_DEFAULT_CHUNK_SIZE))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return chunk_size


def _array_wire_bytes(arr: np.ndarray, chunk_size: int | None = None) -> int:
    """Return the serialized size of one ``Array`` and its chunks (chunks assumed distinct)."""
    size = _chunk_size(chunk_size)
    header, data = _npy_parts(arr)
    total = len(header) + data.nbytes
    n_chunks = -(-total // size)
    last = total - (n_chunks - 1) * size
    chunk_bytes = (n_chunks - 1) * _object_bytes("ArrayChunk", 0, size)
    chunk_bytes += _object_bytes("ArrayChunk", 0, last)
    return _array_object_bytes(arr.dtype, arr.shape, tuple(range(n_chunks))) + chunk_bytes


_SMALL_CHUNK: Final = 4096
"""Chunks up to this many bytes are compared by content, larger ones by sha256."""


def _chunk_key(header: bytes, data: np.ndarray, start: int, end: int) -> object:
    """Return a key equal for two chunks iff bytes ``[start, end)`` of ``header + data`` are."""
    hlen = len(header)
    head = header[start : min(end, hlen)] if start < hlen else b""
    lo, hi = max(start - hlen, 0), max(end - hlen, 0)
    body = data.view(np.uint8)[lo:hi]
    if end - start <= _SMALL_CHUNK:
        return (head, body.tobytes())
    digest = hashlib.sha256(head)
    digest.update(body.data)  # no copy of the chunk
    return (end - start, digest.digest())


def wire_size(payload: Mapping[str, np.ndarray], *, chunk_size: int | None = None) -> int:
    """Exact byte size of Flower 1.42's serialization of ``ArrayRecord(payload)``.

    Flower sends a message as the unique objects of its tree, each deflated to
    ``f"{ClassName} {child ids} {len(body)}"`` + a NUL byte + ``body`` (child ids are
    comma-joined 64-char sha256 hex digests). Here the tree is one ``ArrayRecord`` (body
    ``json.dumps({name: array_id})``), one ``Array`` per distinct array (body: JSON of dtype,
    shape, stype and chunk indices; children: its distinct chunks) and one ``ArrayChunk`` per
    distinct slice of ``chunk_size`` bytes of the array's ``np.save`` bytes. Identical objects
    (equal arrays under different names, repeated chunks such as the zeros of a large tensor)
    count once, as in ``flwr.supercore.inflatable.get_all_nested_objects``. Chunk contents are
    compared (large ones by sha256, as Flower's object ids) only when chunks share a length.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        Arrays as they would be wrapped with ``Array(ndarray)`` into an ``ArrayRecord``.
    chunk_size : int, optional
        Flower's array chunk size; default ``$FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` or 5 MiB.

    Returns
    -------
    int
        ``sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())``.

    Raises
    ------
    ValueError
        If a value is not a numpy array that ``np.save`` can write without pickle.
    """
    size = _chunk_size(chunk_size)
    parts: list[tuple[np.ndarray, bytes, np.ndarray, int]] = []
    length_counts: Counter[int] = Counter()
    for key, arr in payload.items():
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"payload key {key!r} must be a numpy array, got {type(arr)}")
        header, data = _npy_parts(arr)
        total = len(header) + data.nbytes
        parts.append((arr, header, data, total))
        n_full, last = divmod(total, size)
        length_counts[size] += n_full
        if last:
            length_counts[last] += 1

    unique_chunks: set[object] = set()
    unique_arrays: set[object] = set()
    nbytes = 0
    for i, (arr, header, data, total) in enumerate(parts):
        starts = range(0, total, size)
        keys: list[object] = []
        for start in starts:
            end = min(start + size, total)
            if length_counts[end - start] == 1:
                keys.append((i, start))  # no other chunk has this length: unique content
            else:
                keys.append(_chunk_key(header, data, start, end))
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
