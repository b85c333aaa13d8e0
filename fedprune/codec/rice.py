"""Positions near their entropy: a vectorised Golomb-Rice code of the gaps between set bits.

A bit stream (``mask`` or ``select``) is a concatenation of *segments*, one per tensor, each
``n_bits`` long with ``n_ones`` set bits; both counts are known to the decoder from ``meta``. For
i.i.d. bits of density ``p = n_ones / n_bits`` the gaps (zeros before each set bit) are
geometric, and a Rice code with parameter ``k`` (quotient ``gap >> k`` in unary, remainder in
``k`` bits) comes within a few percent of ``H(p)`` bits per position. ``k`` follows from the
counts alone (:func:`rice_k`), so the stream carries no parameters.

Layout (bits big-endian within a byte, as ``np.packbits``): first every remainder, ``k_t`` bits
each, segments in order; then every quotient in unary (``q`` ones and a terminating zero); then
zero padding to a byte. The remainder section has a length known from the counts; the unary
section ends after the ``sum(n_ones)``-th zero. Both sections are written and read with numpy
array operations, no Python loop per position.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

__all__ = ["entropy_bits", "rice_decode", "rice_encode", "rice_k", "rice_max_bytes"]


def rice_k(n_ones: int, n_bits: int) -> int:
    """Rice parameter of a segment: ``floor(log2(mean gap))`` in integer arithmetic (0 if none).

    Close to the optimum ``ceil(log2(log(phi - 1) / log(1 - p)))`` for geometric gaps, and
    computed without floating point, so encoder and decoder agree on every machine.
    """
    if n_ones <= 0 or n_ones >= n_bits:
        return 0
    return max(0, ((n_bits - n_ones) // n_ones).bit_length() - 1)


def entropy_bits(n_ones: int, n_bits: int) -> float:
    """``n_bits * H(n_ones / n_bits)``: the information content of a random such segment."""
    if n_ones <= 0 or n_ones >= n_bits:
        return 0.0
    p = n_ones / n_bits
    return n_bits * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _segments(counts: list[tuple[int, int]]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Per segment ``(k, n_ones)`` as arrays."""
    k = np.array([rice_k(n, size) for n, size in counts], dtype=np.int64)
    n = np.array([n for n, _ in counts], dtype=np.int64)
    return k, n


def rice_max_bytes(counts: list[tuple[int, int]]) -> int:
    """Largest valid stream for these segments (``(n_ones, n_bits)`` each), in bytes.

    The quotients of a segment sum to at most ``n_bits >> k``; a longer stream is malformed and
    is refused before anything is unpacked.
    """
    total = 0
    for n, size in counts:
        k = rice_k(n, size)
        total += n * (k + 1) + (size >> k)
    return (total + 7) // 8


def rice_encode(bits: NDArray[np.bool_], counts: list[tuple[int, int]]) -> NDArray[np.uint8]:
    """Rice-code the concatenated segments of ``bits``.

    Parameters
    ----------
    bits : np.ndarray
        Flat bool array, the segments back to back (``sum(n_bits)`` entries).
    counts : list of (int, int)
        ``(n_ones, n_bits)`` per segment, matching ``bits``.

    Returns
    -------
    np.ndarray
        The uint8 stream.
    """
    k_seg, n_seg = _segments(counts)
    sizes = np.array([size for _, size in counts], dtype=np.int64)
    seg_start = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    pos = np.flatnonzero(bits).astype(np.int64)
    seg = np.repeat(np.arange(len(counts), dtype=np.int64), n_seg)
    local = pos - seg_start[seg]
    first = np.concatenate(([0], np.cumsum(n_seg)[:-1])).astype(np.int64)
    prev = np.empty_like(local)
    prev[1:] = local[:-1]
    prev[first[n_seg > 0]] = -1
    gap = local - prev - 1
    k = k_seg[seg]
    q = gap >> k
    r = gap - (q << k)
    n_rem = int(k.sum())
    out = np.zeros(n_rem + int(q.sum()) + pos.size, dtype=np.bool_)
    rem_start = np.cumsum(k) - k
    for j in range(int(k.max()) if k.size else 0):
        has = k > j
        out[rem_start[has] + j] = ((r[has] >> (k[has] - 1 - j)) & 1).astype(np.bool_)
    unary = out[n_rem:]
    unary[:] = True
    unary[np.cumsum(q + 1) - 1] = False
    return np.packbits(out)


def _remainders(stream: NDArray[np.uint8], k: NDArray[np.int64], n_rem: int) -> NDArray[np.int64]:
    """Read every position's ``k``-bit remainder (MSB first, packed back to back from bit 0).

    A remainder lies within the 4 bytes (8 when ``k > 25``) from the byte its first bit is
    in: the big-endian word that starts at every byte of the stream is built once, then each
    remainder is one gather and a shift, with no loop over bits or positions.
    """
    if not k.size:
        return np.zeros(0, dtype=np.int64)
    k_max = int(k.max())
    if k_max > 57:
        raise ValueError("Rice parameter above 57 (a segment of more than 2**57 entries)")
    width = 4 if k_max <= 25 else 8
    n_bytes = (n_rem + 7) // 8
    padded = np.concatenate((stream[:n_bytes], np.zeros(width, dtype=np.uint8)))
    words = np.zeros(n_bytes + 1, dtype=np.int64)
    for i in range(width):
        byte = padded[i : i + n_bytes + 1].astype(np.int64)
        words = np.bitwise_or(words, np.left_shift(byte, 8 * (width - 1 - i)))
    start = np.cumsum(k) - k
    shift = 8 * width - (start & 7) - k
    # int64 words hold 8 bytes with the top bit possibly set: shift as unsigned.
    picked = np.right_shift(words[start >> 3].view(np.uint64), shift.astype(np.uint64))
    mask = np.left_shift(np.ones_like(k), k) - 1
    return np.bitwise_and(picked.view(np.int64), mask)


def rice_decode(label: str, stream: np.ndarray, counts: list[tuple[int, int]]) -> NDArray[np.int64]:
    """Inverse of :func:`rice_encode`: the set positions of the concatenated segments.

    Returns the sorted flat positions (into the concatenation of all segments) of the set
    bits, without building the bit array itself.

    Raises
    ------
    ValueError
        If the stream is not a 1-D uint8 array, longer than :func:`rice_max_bytes` allows, ends
        before every position is read, has set padding bits or trailing bytes, or places a
        position past the end of its segment.
    """
    if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise ValueError(f"{label} is flagged Rice-coded but is not a 1-D uint8 array")
    if stream.size > rice_max_bytes(counts):
        raise ValueError(
            f"{label}: Rice stream of {stream.size} B is longer than its counts allow "
            f"({rice_max_bytes(counts)} B)"
        )
    k_seg, n_seg = _segments(counts)
    sizes = np.array([size for _, size in counts], dtype=np.int64)
    n_total = int(n_seg.sum())
    k = np.repeat(k_seg, n_seg)
    n_rem = int(k.sum())
    raw = np.unpackbits(stream).view(np.bool_)
    if raw.size < n_rem:
        raise ValueError(f"{label}: Rice stream ends inside its remainders")
    r = _remainders(stream, k, n_rem)
    zeros = np.flatnonzero(~raw[n_rem:])
    if zeros.size < n_total:
        raise ValueError(f"{label}: Rice stream ends after {zeros.size} of {n_total} positions")
    ends = zeros[:n_total]
    used = n_rem + (int(ends[-1]) + 1 if n_total else 0)
    if (used + 7) // 8 != stream.size:
        raise ValueError(f"{label}: trailing bytes after the Rice stream")
    if raw[used:].any():
        raise ValueError(f"{label} has non-zero padding bits")
    q = np.diff(ends, prepend=-1) - 1
    gap = (q << k) | r
    # Positions within each segment: a cumulative sum of (gap + 1) restarted at each segment.
    step = gap + 1
    csum = np.cumsum(step)
    first = np.concatenate(([0], np.cumsum(n_seg)[:-1])).astype(np.int64)
    seg = np.repeat(np.arange(len(counts), dtype=np.int64), n_seg)
    base = np.zeros(len(counts), dtype=np.int64)
    nonempty = n_seg > 0
    base[nonempty] = csum[first[nonempty]] - step[first[nonempty]]
    local = csum - base[seg] - 1
    if n_total:
        last = first[nonempty] + n_seg[nonempty] - 1
        if (local[last] >= sizes[nonempty]).any():
            raise ValueError(f"{label}: a Rice-coded position lies past the end of its tensor")
    seg_start = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return seg_start[seg] + local
