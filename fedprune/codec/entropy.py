"""The zlib entropy stage: deflate a stream when that makes it smaller on the wire."""

from __future__ import annotations

import zlib

import numpy as np

from fedprune.codec.format import ZLIB_LEVEL, _label
from fedprune.codec.wire import _array_wire_bytes


def _maybe_deflate(stream: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return ``(zlib stream as uint8, True)`` if that serializes smaller, else the input."""
    raw = stream.astype(stream.dtype.newbyteorder("<"), copy=False)  # no-op on little-endian
    packed = np.frombuffer(zlib.compress(np.ascontiguousarray(raw).data, ZLIB_LEVEL), np.uint8)
    if _array_wire_bytes(packed) < _array_wire_bytes(stream):
        return packed, True
    return stream, False


def _inflate(key: str, stream: np.ndarray, nbytes: int) -> bytes:
    """Decompress a zlib stream that must expand to exactly ``nbytes`` bytes."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(np.ascontiguousarray(stream).data, nbytes + 1)
    except zlib.error as err:
        raise ValueError(f"{_label(key)}: corrupt zlib stream") from err
    if len(raw) != nbytes or not inflater.eof:
        raise ValueError(
            f"{_label(key)}: zlib stream does not expand to the expected {nbytes} bytes"
        )
    if inflater.unused_data:
        raise ValueError(f"{_label(key)}: trailing bytes after the zlib stream")
    return raw
