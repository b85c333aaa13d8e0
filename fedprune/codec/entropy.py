"""The entropy stage: zlib, or a Golomb code (whole or per row) for bit streams, where smaller."""

from __future__ import annotations

import zlib

import numpy as np
from numpy.typing import NDArray

from fedprune.codec.format import ZLIB_LEVEL, _label
from fedprune.codec.rice import RicePlan, rice_plan, rice_rows_plan, row_segments
from fedprune.codec.wire import _array_wire_bytes


def _byte_planes(stream: np.ndarray) -> bytes:
    """Return the little-endian bytes of ``stream`` split into byte planes.

    Byte 0 of every entry, then byte 1, ...: the sign and exponent bytes of floats sit together
    and deflate well.
    """
    raw = np.ascontiguousarray(stream.astype(stream.dtype.newbyteorder("<"), copy=False))
    if raw.dtype.itemsize == 1:
        return raw.tobytes()
    return raw.view(np.uint8).reshape(-1, raw.dtype.itemsize).T.tobytes()


def _from_byte_planes(raw: bytes, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_byte_planes` (``len(raw)`` a multiple of the itemsize)."""
    little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    planes = np.frombuffer(raw, np.uint8)
    if dtype.itemsize == 1:
        return planes.view(little)
    return np.ascontiguousarray(planes.reshape(dtype.itemsize, -1).T).view(little).reshape(-1)


def _maybe_deflate(stream: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return ``(zlib stream as uint8, True)`` if that serializes smaller, else the input.

    A stream of multi-byte entries is deflated as byte planes (:func:`_byte_planes`).
    """
    packed = np.frombuffer(zlib.compress(_byte_planes(stream), ZLIB_LEVEL), np.uint8)
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


def _smallest_positions(
    bits: NDArray[np.uint8], n_bits: int, counts: list[tuple[int, int]], rows: list[int]
) -> tuple[NDArray[np.uint8], str]:
    """Return the smallest of a packed bit stream, its zlib and its Golomb codes on the wire.

    ``counts`` holds ``(n_ones, n_bits)`` per segment and ``rows`` the rows each segment
    splits into (:func:`fedprune.codec.format._position_rows`). The kind is ``"raw"``,
    ``"zlib"``, ``"rice"`` or ``"rice-rows"`` (one segment per row, the row counts first).
    zlib at level 6 is slow on sparse bitmaps (long match chains of zero bytes), so it runs only
    where the fast level 1 already beats the Golomb code, i.e. where the positions have structure
    that gap coding does not see (whole rows never selected, ...). Each Golomb code is sized from
    its plan, and only the smallest is written.
    """
    flat = np.unpackbits(bits, count=n_bits).view(np.bool_)
    plans: dict[str, RicePlan] = {"rice": rice_plan(flat, counts)}
    if any(r > 1 for r in rows):
        plans["rice-rows"] = rice_rows_plan(flat, row_segments(counts, rows))
    options: list[tuple[int, int, str]] = [(_array_wire_bytes(bits), 0, "raw")]
    options += [
        (_array_wire_bytes(np.empty(plan.nbytes, np.uint8)), 2 + i, kind)
        for i, (kind, plan) in enumerate(plans.items())
    ]
    fast = zlib.compress(np.ascontiguousarray(bits).data, 1)
    packed = None
    if len(fast) < plans["rice"].nbytes:
        packed, compressed = _maybe_deflate(bits)
        if compressed:
            options.append((_array_wire_bytes(packed), 1, "zlib"))
    _, _, kind = min(options)
    if kind == "raw":
        return bits, kind
    if kind == "zlib":
        assert packed is not None
        return packed, kind
    return plans[kind].stream(), kind
