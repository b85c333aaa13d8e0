"""How a payload's arrays travel in a Flower ``Array``: their raw bytes, no npy header.

``Array(ndarray)`` stores ``np.save`` bytes, whose header is padded to 64-byte alignment: 128 B
for a 1-D array, about 1.3 % of a 100x-compressed payload of the Fashion-MNIST MLP. The codec's
payloads therefore travel as ``Array(dtype=str(dtype), shape=shape, stype=STYPE_RAW,
data=bytes)``: the C-order little-endian bytes of the array and nothing else; dtype and shape
are the ``Array``'s own fields. :func:`from_raw` reads one back, checking the dtype against a
short list of plain numeric types and the byte count against the shape before anything is
allocated (the result is a read-only view of the received bytes).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

STYPE_RAW: Final = "raw"
"""Flower ``Array.stype`` of a payload array: raw little-endian C-order bytes."""
RAW_DTYPES: Final = frozenset(
    np.dtype(t).name for t in (np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64)
)
"""The dtypes a raw array may declare (``Array.dtype``, numpy names)."""


def check_raw_dtype(dtype: np.dtype) -> None:
    """Raise ``ValueError`` unless arrays of ``dtype`` can travel raw (:data:`RAW_DTYPES`)."""
    if dtype.name not in RAW_DTYPES:
        raise ValueError(f"dtype {dtype} cannot travel as a raw array ({sorted(RAW_DTYPES)})")


def raw_fields(arr: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """Return ``(dtype, shape, data)`` of ``arr`` as a raw ``Array`` holds them.

    Raises
    ------
    ValueError
        If the dtype is not in :data:`RAW_DTYPES`.
    """
    check_raw_dtype(arr.dtype)
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return arr.dtype.name, tuple(int(d) for d in arr.shape), little.tobytes()


def from_raw(dtype: object, shape: object, data: object) -> np.ndarray:
    """Return the array of a raw ``Array``'s fields, as a read-only view of ``data``.

    Raises
    ------
    ValueError
        If ``dtype`` is not in :data:`RAW_DTYPES`, ``shape`` is not a sequence of non-negative
        ints, ``data`` is not bytes, or its length differs from what the shape declares.
    """
    if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
        raise ValueError(f"raw array dtype {dtype!r} not accepted ({sorted(RAW_DTYPES)})")
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"raw array shape {shape!r} is not a sequence of non-negative ints")
    if not isinstance(data, bytes):
        raise ValueError("raw array data is not bytes")
    kind = np.dtype(dtype).newbyteorder("<")
    count = math.prod(shape)
    if len(data) != count * kind.itemsize:
        raise ValueError(
            f"raw array declares {list(shape)} {dtype} ({count * kind.itemsize} B) "
            f"but {len(data)} B were sent"
        )
    return np.frombuffer(data, dtype=kind, count=count).reshape(tuple(shape))
