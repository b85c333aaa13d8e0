"""Positions near their entropy: a vectorised Golomb code of the gaps between set bits.

A bit stream (``mask`` or ``select``) is a concatenation of *segments*, one per tensor, each
``n_bits`` long with ``n_ones`` set bits; both counts are known to the decoder from ``meta``. For
i.i.d. bits of density ``p = n_ones / n_bits`` the gaps (zeros before each set bit) are
geometric, and a Golomb code with parameter ``M`` (quotient ``gap // M`` in unary, remainder
``gap % M`` in truncated binary) is the optimal prefix code of a geometric source for the right
``M``. ``M`` follows from the counts alone (:func:`golomb_m`, integer arithmetic), so the stream
carries no parameters. The names (``rice_*``, ``FLAG_*_RICE``) predate the general parameter: a
Rice code is the Golomb code with ``M = 2 ** k``, which this code takes where that ``M`` is best.

Why Golomb: a Rice parameter only doubles, and between two powers of two the code drifts from
the optimum. On the expected length of geometric gaps (``p`` log-uniform from 0.001 to 0.5) the
Rice code with ``k = floor(log2(mean gap))`` (format version 2) was 1.06 % above ``H(p)`` on
average, this code 0.57 %: 0.47 % fewer bits, up to 6.6 % (``p = 0.33``), never more than
0.05 % more; at ``p = 0.03`` 1.95 % against 0.46 % above ``H(p)``, 1.46 % fewer. Measured on
Bernoulli(0.03) bits of 2000 rows of 5600 (11.2 M bits): 1.46 % fewer bytes whole, 0.95 % per
row (the rows' densities spread around the Rice code's step). On the Fashion-MNIST clients'
uplinks the issue measured 1.1 % of the position bytes (6448 -> 6374 B per message).

Remainders in truncated binary, laid out so that every offset is a cumulative sum: with
``b = bit_length(M - 1)`` and ``u = 2 ** b - M``, a remainder ``r < u`` is its ``b - 1``-bit
*prefix* alone; ``r >= u`` is written as ``r + u`` in ``b`` bits, its top ``b - 1`` bits the
prefix (then ``>= u``) and its low bit an *extra* bit. The prefixes have a fixed width per
segment; the decoder reads them all, then knows which positions carry an extra bit (prefix
``>= u``) and reads those in order. ``M = 1`` has no remainder; ``M = 2 ** k`` has ``u = 0``
and every position an extra bit (the Rice code, its remainders' low bits moved back).

Layout of a section (bits big-endian within a byte, as ``np.packbits``): every prefix, segments
in order; then every extra bit; then every quotient in unary (``q`` ones and a terminating
zero); then zero padding to a byte. The prefix section has a length known from the counts, the
extra section one known from the prefixes, and the unary section ends after the
``sum(n_ones)``-th zero. All three are written and read with numpy array operations, no Python
loop per position.

*Row segments* (:func:`rice_rows_encode`): top-k positions of a weight tensor are far from
i.i.d. over its rows (an output unit whose update is large has many of its entries selected),
so a tensor of ``r`` rows can be coded as ``r`` segments, each with its own parameter. The rows'
counts go first, as a section of the same code of ``r`` integers (parameter :func:`golomb_m` of
``(r, n_ones + r)``, i.e. about ``ln 2 * (n_ones / r + 1)``, known to the decoder), padded to a
byte; then the positions with one segment per row. On the Fashion-MNIST clients'
error-feedback updates this was 4.5-12 % smaller than one segment per tensor, counts included
(``docs/design.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "RicePlan",
    "entropy_bits",
    "golomb_m",
    "rice_decode",
    "rice_encode",
    "rice_max_bytes",
    "rice_plan",
    "rice_rows_decode",
    "rice_rows_encode",
    "rice_rows_max_bytes",
    "rice_rows_plan",
    "row_segments",
]

_M_SCALE: Final = 710
_M_OFFSET: Final = 187
_M_UNIT: Final = 1024
_M_EXACT_BELOW: Final = 1 << 52
"""Segments shorter than this compute ``M`` in int64 (``897 * 2**52 < 2**63``), longer ones
with Python's integers."""
_MAX_WIDTH: Final = 57
"""Widest prefix the reader takes (an 8-byte word holds it at any bit offset)."""


def golomb_m(n_ones: int, n_bits: int) -> int:
    """Golomb parameter of a segment: ``(710 * n_bits + 187 * n_ones) // (1024 * n_ones)``.

    That is ``floor(ln 2 / p + 0.18)`` for ``p = n_ones / n_bits`` (``710 / 1024 ~ ln 2``), at
    least 1, and 1 where there is nothing to code (no set bit, or every bit set). The best ``M``
    for geometric gaps is ``ceil(log(2 - p) / -log(1 - p))`` (Gallager and van Voorhis), i.e.
    ``ln 2 / p`` minus 0.81 to 0.85: the offset 0.18 (not 0.5, a rounding) puts the formula's
    steps next to the best ``M``'s. Measured on the expected code length of geometric gaps for
    ``p`` from 0.001 to 0.5 (20,000 densities): at most 0.07 % above the best integer ``M``,
    0.0001 % on average; rounding (offset 512) was up to 11 % above it (``M = 2`` where 1 is best,
    ``p`` from 0.38 to 0.5). Integer arithmetic only, so encoder and decoder agree on every
    machine.
    """
    one = np.array([n_ones], dtype=np.int64), np.array([n_bits], dtype=np.int64)
    return int(_golomb_m_array(*one)[0])


def entropy_bits(n_ones: int, n_bits: int) -> float:
    """``n_bits * H(n_ones / n_bits)``: the information content of a random such segment."""
    if n_ones <= 0 or n_ones >= n_bits:
        return 0.0
    p = n_ones / n_bits
    return n_bits * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _golomb_m_array(n_ones: NDArray[np.int64], n_bits: NDArray[np.int64]) -> NDArray[np.int64]:
    """:func:`golomb_m` of many segments at once, exact."""
    live = (n_ones > 0) & (n_ones < n_bits)
    small = live & (n_bits < _M_EXACT_BELOW)
    ones = np.where(small, n_ones, 1)
    m = (_M_SCALE * np.where(small, n_bits, 0) + _M_OFFSET * ones) // (_M_UNIT * ones)
    for i in np.flatnonzero(live & ~small).tolist():
        n, size = int(n_ones[i]), int(n_bits[i])
        m[i] = (_M_SCALE * size + _M_OFFSET * n) // (_M_UNIT * n)
    return np.where(live, np.maximum(m, 1), 1)


def _bit_length(x: NDArray[np.int64]) -> NDArray[np.int64]:
    """``int.bit_length`` of non-negative int64 integers, exact (a binary search, no log)."""
    out = np.zeros_like(x)
    v = x
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        out += np.where(big, s, 0)
        v = np.where(big, v >> s, v)
    return out + (v > 0)


@dataclass(frozen=True)
class _Params:
    """A Golomb parameter per segment and its truncated-binary constants."""

    m: NDArray[np.int64]
    width: NDArray[np.int64]
    """Prefix bits, ``max(bit_length(m - 1) - 1, 0)``."""
    u: NDArray[np.int64]
    """Remainders below ``u`` are their prefix alone; ``2 ** b - m``, or 1 for ``m == 1`` (no
    remainder, its zero prefix is below ``u``)."""

    @staticmethod
    def of(m: NDArray[np.int64]) -> _Params:
        """Return the constants of parameters ``m`` (at least 1 each)."""
        width = np.maximum(_bit_length(m - 1) - 1, 0)
        half = np.left_shift(1, width)  # 2 ** (b - 1) where m > 1
        u = np.where(m > 1, (half - m) + half, 1)  # 2 ** b - m without forming 2 ** 63
        return _Params(m, width, u)


def _segments(counts: list[tuple[int, int]]) -> tuple[_Params, NDArray[np.int64]]:
    """Per segment the Golomb parameters and ``n_ones``."""
    n = np.array([n for n, _ in counts], dtype=np.int64).reshape(-1)
    size = np.array([size for _, size in counts], dtype=np.int64).reshape(-1)
    return _Params.of(_golomb_m_array(n, size)), n


def _max_bits(counts: list[tuple[int, int]]) -> NDArray[np.int64]:
    """Most bits a valid section spends on each segment (``(n_ones, n_bits)``), padding aside.

    The gaps of a valid segment sum to at most ``n_bits - n_ones`` (its last position is inside
    it), so its quotients sum to at most ``(n_bits - n_ones) // M``; each position takes at most
    ``b = bit_length(M - 1)`` remainder bits and one terminating zero.
    """
    params, n = _segments(counts)
    size = np.array([size for _, size in counts], dtype=np.int64).reshape(-1)
    b = _bit_length(params.m - 1)
    quotients = np.maximum(size - n, 0) // params.m
    return np.where(n > 0, n * (b + 1) + quotients, 0)


def rice_max_bytes(counts: list[tuple[int, int]]) -> int:
    """Largest valid stream for these segments (``(n_ones, n_bits)`` each), in bytes.

    A longer stream is malformed and is refused before anything is unpacked.
    """
    return (int(_max_bits(counts).sum()) + 7) // 8


@dataclass(frozen=True)
class _Section:
    """One byte-aligned section of integers, split into their fields (nothing written yet)."""

    width: NDArray[np.int64]
    """Prefix bits of each integer."""
    u: NDArray[np.int64]
    r: NDArray[np.int64]
    """Remainders: ``r < u`` is its prefix alone, else ``r + u`` is the prefix and extra bit."""
    has_extra: NDArray[np.bool_]
    n_extra: int
    q: NDArray[np.int64]

    @staticmethod
    def of(values: NDArray[np.int64], params: _Params, n_seg: NDArray[np.int64]) -> _Section:
        """Split non-negative integers, segment ``i``'s ``n_seg[i]`` with ``params``' ``i``-th."""
        u = np.repeat(params.u, n_seg)
        q, r = np.divmod(values, np.repeat(params.m, n_seg))
        has_extra = r >= u
        n_extra = int(np.count_nonzero(has_extra))
        return _Section(np.repeat(params.width, n_seg), u, r, has_extra, n_extra, q)

    @property
    def n_bits(self) -> int:
        """Bits before padding: prefixes, extra bits, unary quotients."""
        return int(self.width.sum()) + self.n_extra + int(self.q.sum()) + self.q.size

    def stream(self) -> NDArray[np.uint8]:
        """Write the section: prefixes (MSB first), extra bits, unary quotients, padding."""
        width = self.width
        shifted = self.r + self.u
        prefix = np.where(self.has_extra, shifted >> 1, self.r)
        n_pre = int(width.sum())
        out = np.zeros(self.n_bits, dtype=np.bool_)
        out[:n_pre] = _prefix_bits(prefix, width)
        n_ext = n_pre + self.n_extra
        out[n_pre:n_ext] = (shifted[self.has_extra] & 1).astype(np.bool_)
        unary = out[n_ext:]
        unary[:] = True
        unary[np.cumsum(self.q + 1) - 1] = False
        return np.packbits(out)


def _prefix_bits(prefix: NDArray[np.int64], width: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Return the ``width`` low bits of each prefix, MSB first, back to back.

    The bits go into big-endian 64-bit words: each prefix (at most 57 bits, :data:`_MAX_WIDTH`)
    starts in one word and may end in the next. The prefixes that start in a word are OR-ed
    together in one ``reduceat`` (they are consecutive), and each spilling prefix adds its tail
    to the next word; then the words are unpacked. No loop over bits or positions.
    """
    if not width.size:
        return np.zeros(0, dtype=np.bool_)
    w = width.view(np.uint64)
    n_pre = int(w.sum())
    start = np.cumsum(w) - w
    word, off = start >> np.uint64(6), start & np.uint64(63)
    top = (prefix.view(np.uint64) << (np.uint64(63) - w)) << np.uint64(1)  # left-aligned
    words = np.zeros((n_pre + 63) // 64 + 1, dtype=np.uint64)
    first = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    words[word[first]] = np.bitwise_or.reduceat(top >> off, first)
    spill = np.flatnonzero(off + w > np.uint64(64))
    words[word[spill] + np.uint64(1)] |= top[spill] << (np.uint64(64) - off[spill])
    return np.unpackbits(words.astype(">u8").view(np.uint8), count=n_pre).view(np.bool_)


@dataclass(frozen=True)
class RicePlan:
    """A Golomb code before it is written: its sections, each integer split into its fields.

    The entropy stage sizes every candidate code from its plan (:attr:`nbytes`, no bits
    written) and writes only the smallest (:meth:`stream`).
    """

    sections: tuple[_Section, ...]
    """Byte-aligned sections, in stream order."""

    @property
    def nbytes(self) -> int:
        """Return the length of :meth:`stream` in bytes."""
        return sum((s.n_bits + 7) // 8 for s in self.sections)

    def stream(self) -> NDArray[np.uint8]:
        """Return the uint8 stream: each section's prefixes, extra bits and unary quotients."""
        parts = [s.stream() for s in self.sections]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _read_section(
    label: str, stream: NDArray[np.uint8], params: _Params, n_seg: NDArray[np.int64]
) -> tuple[NDArray[np.int64], int]:
    """Inverse of :meth:`_Section.stream` on a prefix of ``stream``: the integers and bytes used.

    ``params`` and ``n_seg`` as :meth:`_Section.of` takes them. Prefixes and remainders are
    read as uint32 where they fit (prefixes of at most 25 bits, fewer than ``2**32`` prefix
    bits), else as uint64.

    Raises
    ------
    ValueError
        If the stream ends before every integer is read or has set padding bits.
    """
    n_total = int(n_seg.sum())
    n_pre = int((params.width * n_seg).sum())
    w_max = int(params.width.max()) if params.width.size else 0
    if w_max > _MAX_WIDTH:
        raise ValueError(
            f"{label}: Golomb parameter above 2**58 (a segment of more than 2**58 entries)"
        )
    word = np.uint32 if w_max <= 25 and n_pre < 1 << 32 else np.uint64
    raw = np.unpackbits(stream).view(np.bool_)
    if raw.size < n_pre:
        raise ValueError(f"{label}: Rice stream ends inside its prefixes")
    u = np.repeat(params.u.astype(word), n_seg)
    r = _prefixes(stream, np.repeat(params.width.astype(word), n_seg), n_pre)
    has_extra = np.flatnonzero(r >= u)
    n_ext = n_pre + has_extra.size
    if raw.size < n_ext:
        raise ValueError(f"{label}: Rice stream ends inside its extra bits")
    r[has_extra] = ((r[has_extra] << 1) | raw[n_pre:n_ext]) - u[has_extra]
    zeros = np.flatnonzero(~raw[n_ext:])
    if zeros.size < n_total:
        raise ValueError(f"{label}: Rice stream ends after {zeros.size} of {n_total} positions")
    ends = zeros[:n_total]
    used = n_ext + (int(ends[-1]) + 1 if n_total else 0)
    n_bytes = (used + 7) // 8
    if raw[used : 8 * n_bytes].any():
        raise ValueError(f"{label} has non-zero padding bits")
    q = np.diff(ends, prepend=-1) - 1
    return q * np.repeat(params.m, n_seg) + r.astype(np.int64), n_bytes


def _rice_stream(label: str, stream: object) -> NDArray[np.uint8]:
    """Return ``stream`` if it is a 1-D uint8 array (what a Rice code travels as)."""
    if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise ValueError(f"{label} is flagged Rice-coded but is not a 1-D uint8 array")
    return stream


def rice_encode(bits: NDArray[np.bool_], counts: list[tuple[int, int]]) -> NDArray[np.uint8]:
    """Return the uint8 stream of :func:`rice_plan` (same arguments), written."""
    return rice_plan(bits, counts).stream()


def rice_plan(bits: NDArray[np.bool_], counts: list[tuple[int, int]]) -> RicePlan:
    """Plan the Golomb code of the concatenated segments of ``bits``: each set bit's gap.

    Parameters
    ----------
    bits : np.ndarray
        Flat bool array, the segments back to back (``sum(n_bits)`` entries).
    counts : list of (int, int)
        ``(n_ones, n_bits)`` per segment, matching ``bits``.

    Returns
    -------
    RicePlan
        One section: the gaps, with their segments' parameters.
    """
    params, n_seg = _segments(counts)
    sizes = np.array([size for _, size in counts], dtype=np.int64)
    seg_start = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    pos = np.flatnonzero(bits).astype(np.int64)
    seg = np.repeat(np.arange(len(counts), dtype=np.int64), n_seg)
    local = pos - seg_start[seg]
    first = np.concatenate(([0], np.cumsum(n_seg)[:-1])).astype(np.int64)
    prev = np.empty_like(local)
    prev[1:] = local[:-1]
    prev[first[n_seg > 0]] = -1
    return RicePlan((_Section.of(local - prev - 1, params, n_seg),))


def _prefixes(stream: NDArray[np.uint8], width: NDArray[Any], n_pre: int) -> NDArray[Any]:
    """Read every position's ``width``-bit prefix (MSB first, packed back to back from bit 0).

    ``width`` is uint32 (every width at most 25, ``n_pre < 2**32``) or uint64 (at most 57),
    and so are the prefixes read. A prefix lies within the 4 bytes (8 for uint64) from the byte
    its first bit is in: the big-endian word that starts at every byte of the stream is built
    once, then each prefix is one gather and a shift, with no loop over bits or positions.
    """
    word = width.dtype.type
    size = width.dtype.itemsize
    n_bytes = (n_pre + 7) // 8
    padded = np.concatenate((stream[:n_bytes], np.zeros(size, dtype=np.uint8)))
    words = np.zeros(n_bytes + 1, dtype=word)
    for i in range(size):
        words |= padded[i : i + n_bytes + 1].astype(word) << word(8 * (size - 1 - i))
    start = np.cumsum(width, dtype=word) - width
    picked = words[start >> word(3)] >> (word(8 * size) - (start & word(7)) - width)
    return picked & ((word(1) << width) - word(1))


def rice_decode(label: str, stream: np.ndarray, counts: list[tuple[int, int]]) -> NDArray[np.int64]:
    """Inverse of :func:`rice_encode`: the set positions of the concatenated segments.

    Returns the sorted flat positions (into the concatenation of all segments) of the set
    bits, without building the bit array itself.

    Raises
    ------
    ValueError
        If the stream is not a 1-D uint8 array, longer than :func:`rice_max_bytes` allows, ends
        before every position is read (inside its prefixes, its extra bits or its quotients),
        has set padding bits or trailing bytes, or places a position past the end of its
        segment.
    """
    stream = _rice_stream(label, stream)
    if stream.size > rice_max_bytes(counts):
        raise ValueError(
            f"{label}: Rice stream of {stream.size} B is longer than its counts allow "
            f"({rice_max_bytes(counts)} B)"
        )
    params, n_seg = _segments(counts)
    sizes = np.array([size for _, size in counts], dtype=np.int64)
    gap, n_bytes = _read_section(label, stream, params, n_seg)
    if n_bytes != stream.size:
        raise ValueError(f"{label}: trailing bytes after the Rice stream")
    # Positions within each segment: a cumulative sum of (gap + 1) restarted at each segment.
    n_total = gap.size
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


# -- Row segments --------------------------------------------------------------------------------
def _count_segments(segments: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Return the segments of the count section: ``(rows, n_ones + rows)`` per split tensor."""
    return [(rows, n + rows) for n, _, rows in segments if rows > 1]


def _expand_rows(
    segments: list[tuple[int, int, int]], row_counts: NDArray[np.int64]
) -> list[tuple[int, int]]:
    """One ``(n_ones, n_bits)`` segment per row of each split tensor, per tensor otherwise."""
    out: list[tuple[int, int]] = []
    at = 0
    for n, size, rows in segments:
        if rows > 1:
            out += [(int(c), size // rows) for c in row_counts[at : at + rows].tolist()]
            at += rows
        else:
            out.append((n, size))
    return out


def row_segments(counts: list[tuple[int, int]], rows: list[int]) -> list[tuple[int, int, int]]:
    """Pair ``(n_ones, n_bits)`` segments with their row counts (1: the segment is not split).

    Raises
    ------
    ValueError
        If a row count does not divide its segment.
    """
    out = []
    for (n, size), r in zip(counts, rows, strict=True):
        if r < 1 or size % r:
            raise ValueError(f"{r} rows do not divide a segment of {size} bits")
        out.append((n, size, r))
    return out


def rice_rows_max_bytes(segments: list[tuple[int, int, int]]) -> int:
    """Return an upper bound of a valid row-segmented stream in bytes, whatever the row counts.

    The count section is at most :func:`rice_max_bytes` of its segments. A row of ``L`` bits
    with ``c`` ones has ``M <= L`` (``M <= 0.7 L + 0.2``), so it takes at most
    ``c * (bit_length(L - 1) + 1) + (L - c)`` bits (:func:`rice_max_bytes`' bound); summed over
    the rows, ``n_ones * bit_length(L - 1) + n_bits``.
    """
    whole = [(n, size) for n, size, r in segments if r == 1]
    rows_bits = int(_max_bits(whole).sum()) + sum(
        n * max(size // r - 1, 0).bit_length() + size for n, size, r in segments if r > 1
    )
    return rice_max_bytes(_count_segments(segments)) + (rows_bits + 7) // 8


def rice_rows_encode(
    bits: NDArray[np.bool_], segments: list[tuple[int, int, int]]
) -> NDArray[np.uint8]:
    """Return the uint8 stream of :func:`rice_rows_plan` (same arguments), written.

    The count section, byte-aligned, then the position section.
    """
    return rice_rows_plan(bits, segments).stream()


def rice_rows_plan(bits: NDArray[np.bool_], segments: list[tuple[int, int, int]]) -> RicePlan:
    """Plan the Golomb code of ``bits`` with one segment per row: the row counts, then positions.

    Parameters
    ----------
    bits : np.ndarray
        Flat bool array, the segments back to back.
    segments : list of (int, int, int)
        ``(n_ones, n_bits, rows)`` per segment (:func:`row_segments`); ``rows == 1`` codes the
        segment whole, as :func:`rice_encode` does.

    Returns
    -------
    RicePlan
        Two sections: the row counts, then the positions' gaps.
    """
    row_counts = []
    start = 0
    for _, size, rows in segments:
        if rows > 1:
            row_counts.append(bits[start : start + size].reshape(rows, -1).sum(axis=1))
        start += size
    counts = np.concatenate(row_counts).astype(np.int64) if row_counts else np.zeros(0, np.int64)
    params, n_rows = _segments(_count_segments(segments))
    positions = rice_plan(bits, _expand_rows(segments, counts))
    return RicePlan((_Section.of(counts, params, n_rows), *positions.sections))


def rice_rows_decode(
    label: str, stream: np.ndarray, segments: list[tuple[int, int, int]]
) -> NDArray[np.int64]:
    """Inverse of :func:`rice_rows_encode`: the sorted set positions of the segments.

    Raises
    ------
    ValueError
        Everything :func:`rice_decode` refuses, a stream longer than
        :func:`rice_rows_max_bytes`, and row counts that do not sum to their segment's count or
        exceed their row.
    """
    stream = _rice_stream(label, stream)
    limit = rice_rows_max_bytes(segments)
    if stream.size > limit:
        raise ValueError(
            f"{label}: Rice stream of {stream.size} B is longer than its counts allow ({limit} B)"
        )
    params, n_rows = _segments(_count_segments(segments))
    counts, used = _read_section(label, stream, params, n_rows)
    at = 0
    for n, size, rows in segments:
        if rows > 1:
            mine = counts[at : at + rows]
            if int(mine.sum()) != n or (mine > size // rows).any():
                raise ValueError(
                    f"{label}: row counts do not fit a segment of {n} positions in {rows} rows "
                    f"of {size // rows}"
                )
            at += rows
    return rice_decode(label, stream[used:], _expand_rows(segments, counts))
