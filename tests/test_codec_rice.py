"""Issue 14's stream kinds: Golomb-coded positions, int4 and ternary codes, the one-array blob."""

import math
import zlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune import codec
from fedprune.codec import CodecConfig
from fedprune.codec.container import pack_blob, unpack_blob
from fedprune.codec.encode import _select_topk
from fedprune.codec.rice import (
    _bit_length,
    _golomb_m_array,
    _prefix_bits,
    _prefixes,
    entropy_bits,
    golomb_m,
    rice_decode,
    rice_encode,
    rice_max_bytes,
    rice_plan,
    rice_rows_decode,
    rice_rows_encode,
    rice_rows_max_bytes,
    rice_rows_plan,
    row_segments,
)
from fedprune.masks import topk_flat

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


# -- Golomb code of positions --------------------------------------------------------------------
def _m_by_integers(n_ones: int, n_bits: int) -> int:
    """:func:`golomb_m` with Python's exact integers (1 where there is nothing to code)."""
    if n_ones <= 0 or n_ones >= n_bits:
        return 1
    return max(1, (710 * n_bits + 187 * n_ones) // (1024 * n_ones))


def _section_bits(values: list[int], ms: list[int]) -> str:
    """Reference writer of one section: textbook truncated binary, then the layout's order.

    A remainder ``r < u`` is ``r`` in ``b - 1`` bits, else ``r + u`` in ``b`` bits; the first
    ``b - 1`` bits are the prefix, a ``b``-th bit the extra. Prefixes, extras, unary, padding.
    """
    prefixes, extras, unary = [], [], []
    for v, m in zip(values, ms, strict=True):
        q, r = divmod(v, m)
        b = (m - 1).bit_length()
        u = (1 << b) - m
        if b:
            code = format(r, f"0{b - 1}b") if r < u else format(r + u, f"0{b}b")
            prefixes.append(code[: b - 1])
            extras.append(code[b - 1 :])
        unary.append("1" * q + "0")
    bits = "".join(prefixes) + "".join(extras) + "".join(unary)
    return bits + "0" * (-len(bits) % 8)


def _to_bytes(bits: str) -> np.ndarray:
    return np.array([int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)], np.uint8)


def _gaps(positions: list[int], counts: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Gaps of sorted flat positions, per segment, and each gap's parameter."""
    gaps, ms, start, at = [], [], 0, 0
    for n, size in counts:
        prev = -1
        for p in positions[at : at + n]:
            gaps.append(p - start - prev - 1)
            ms.append(_m_by_integers(n, size))
            prev = p - start
        at += n
        start += size
    return gaps, ms


def _reference(positions: list[int], counts: list[tuple[int, int]]) -> np.ndarray:
    """A slow, pure-Python :func:`rice_encode` from the set positions."""
    return _to_bytes(_section_bits(*_gaps(positions, counts)))


def _reference_rows(bits: np.ndarray, segments: list[tuple[int, int, int]]) -> np.ndarray:
    """A slow, pure-Python :func:`rice_rows_encode`: the row counts' section, then positions."""
    row_counts, ms, counts, start = [], [], [], 0
    for n, size, rows in segments:
        if rows > 1:
            mine = [int(c) for c in bits[start : start + size].reshape(rows, -1).sum(axis=1)]
            row_counts += mine
            ms += [_m_by_integers(rows, n + rows)] * rows
            counts += [(c, size // rows) for c in mine]
        else:
            counts.append((n, size))
        start += size
    positions = np.flatnonzero(bits).tolist()
    return _to_bytes(_section_bits(row_counts, ms) + _section_bits(*_gaps(positions, counts)))


def test_golomb_by_hand_m3_and_m5() -> None:
    counts = [(2, 10), (2, 16)]
    assert [golomb_m(*c) for c in counts] == [3, 5]
    bits = np.zeros(26, dtype=bool)
    bits[[0, 5, 10 + 1, 10 + 11]] = True
    # M = 3 (b = 2, u = 1, 1-bit prefixes): gap 0 -> r 0 < u: prefix "0"; gap 4 -> q 1, r 1:
    # r + u = 2 = "10": prefix "1", extra "0".
    # M = 5 (b = 3, u = 3, 2-bit prefixes): gap 1 -> r 1 < u: prefix "01"; gap 9 -> q 1, r 4:
    # r + u = 7 = "111": prefix "11", extra "1".
    # Prefixes "0" "1" "01" "11", extras "0" "1", unary "0" "10" "0" "10", 2 padding bits:
    # 010111 01 010010 00.
    stream = rice_encode(bits, counts)
    np.testing.assert_array_equal(stream, [0b01011101, 0b01001000])
    np.testing.assert_array_equal(rice_decode("s", stream, counts), [0, 5, 11, 21])
    np.testing.assert_array_equal(stream, _reference([0, 5, 11, 21], counts))


def test_rice_by_hand() -> None:
    """M = 2 = 2 ** 1 is the Rice code: no prefix bits, the remainder is the extra bit."""
    bits = np.array([0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    # M = (710 * 8 + 187 * 2) // 2048 = 2; gaps 2 and 4 -> (q, r) = (1, 0), (2, 0).
    # Extras "0" "0", then unary "10" "110", then one padding bit: 0010 1100.
    assert golomb_m(2, 8) == 2
    stream = rice_encode(bits, [(2, 8)])
    np.testing.assert_array_equal(stream, [0b00101100])
    np.testing.assert_array_equal(rice_decode("s", stream, [(2, 8)]), [2, 7])


def test_golomb_prefixes_wider_than_25_bits() -> None:
    """M = 93,061,120 (b = 27): 26-bit prefixes take the reader's 8-byte word path.

    The stream comes from the reference writer: the decoder never builds the 2**28 bits.
    """
    counts = [(0, 7), (1, 1 << 27), (2, 1 << 28), (1, 5)]
    assert golomb_m(1, 1 << 27) == golomb_m(2, 1 << 28) == 710 << 17
    # u = 2**27 - M = 41,156,608; the first two gaps have r < u, the third r = M - 1 (extra bit).
    at = [7 + (1 << 27) - 12345]
    at += [7 + (1 << 27) + 60_000_000, 7 + (1 << 27) + 60_000_001 + (710 << 17) - 1]
    at += [7 + (1 << 27) + (1 << 28) + 4]
    stream = _reference(at, counts)
    assert stream.size <= rice_max_bytes(counts)
    np.testing.assert_array_equal(rice_decode("s", stream, counts), at)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 57), st.integers(0, 2**57 - 1)), max_size=40))
def test_prefix_writer_and_reader_are_inverse(fields: list[tuple[int, int]]) -> None:
    """Prefixes of 0 to 57 bits at every bit offset, both word sizes of the reader."""
    width = np.array([w for w, _ in fields], np.int64)
    value = np.array([v & ((1 << w) - 1) for w, v in fields], np.int64)
    want = "".join(format(int(v), f"0{w}b") if w else "" for w, v in zip(width, value, strict=True))
    got = _prefix_bits(value, width)
    assert "".join("1" if b else "0" for b in got) == want
    packed = np.packbits(got)
    for word in (np.uint32, np.uint64):
        if word is np.uint32 and width.size and width.max() > 25:
            continue
        read = _prefixes(packed, width.astype(word), len(want))
        assert read.tolist() == value.tolist()


def test_golomb_m_by_hand() -> None:
    # p = 0.01, 0.05, 0.2, 0.34, 0.5: the best M for geometric gaps, ceil(log(2 - p) / -log(1 - p))
    assert [golomb_m(n, 100) for n in (0, 1, 5, 20, 34, 50, 99, 100)] == [1, 69, 14, 3, 2, 1, 1, 1]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_golomb_m_is_exact(a: int, b: int) -> None:
    """The vectorised parameter (int64, Python integers from 2**52 bits) equals the exact one."""
    n, size = min(a, b), max(a, b)
    pairs = [(n, size), (1, size), (n, n + 1), (size % 1000 + 1, (1 << 52) - 1 - size % 7)]
    pairs += [(1, 1 << 52), (size % 1000 + 1, (1 << 52) + size % 7), (n % 2**40, size)]
    ones = np.array([p[0] for p in pairs], np.int64)
    bits = np.array([p[1] for p in pairs], np.int64)
    assert _golomb_m_array(ones, bits).tolist() == [_m_by_integers(*p) for p in pairs]
    assert [golomb_m(*p) for p in pairs] == [_m_by_integers(*p) for p in pairs]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), max_size=20))
def test_bit_length_is_exact(values: list[int]) -> None:
    values += [0, 1, 2, 3, 2**62, 2**63 - 1]
    got = _bit_length(np.array(values, np.int64))
    assert got.tolist() == [v.bit_length() for v in values]


def _golomb_bits(m: int, p: float) -> float:
    """Expected bits per position of the Golomb code ``m`` on geometric gaps of density ``p``."""
    t = (1 - p) ** m  # P(gap >= m)
    if m == 1:
        return 1 / p
    b = (m - 1).bit_length()
    u = (1 << b) - m
    return 1 + t / (1 - t) + b - 1 + ((1 - p) ** u - t) / (1 - t)


def test_golomb_m_is_near_the_best_m_on_geometric_gaps() -> None:
    """The docstring's claim: within 0.1 % of the best integer M for p from 0.001 to 0.5."""
    n_bits = 10**8
    worst = 0.0
    for p in np.geomspace(0.001, 0.5, 2000):
        n = round(p * n_bits)
        p = n / n_bits
        best = math.ceil(math.log(2 - p) / -math.log(1 - p))  # Gallager and van Voorhis
        cost = min(_golomb_bits(m, p) for m in (max(best - 1, 1), best, best + 1))
        worst = max(worst, _golomb_bits(golomb_m(n, n_bits), p) / cost - 1)
    assert worst < 0.001, worst


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        hnp.arrays(np.bool_, st.integers(0, 300), elements=st.booleans()), min_size=0, max_size=4
    )
)
def test_rice_round_trip(segments: list[np.ndarray]) -> None:
    counts = [(int(s.sum()), s.size) for s in segments]
    bits = np.concatenate(segments) if segments else np.zeros(0, bool)
    stream = rice_encode(bits, counts)
    np.testing.assert_array_equal(stream, _reference(np.flatnonzero(bits).tolist(), counts))
    assert stream.size <= rice_max_bytes(counts)
    assert rice_plan(bits, counts).nbytes == stream.size  # what the entropy stage compares
    np.testing.assert_array_equal(rice_decode("s", stream, counts), np.flatnonzero(bits))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 400), st.integers(0, 2**16))
def test_max_bytes_bound_the_longest_streams(n_bits: int, n_ones: int, seed: int) -> None:
    """Streams built to be long: every remainder ``M - 1`` (an extra bit each) and the rest of
    the segment in the last gap, or every position at the end; never above the bound."""
    n = min(n_ones, n_bits)
    m = golomb_m(n, n_bits)
    counts = [(n, n_bits)]
    spread = min(m - 1, (n_bits - n) // max(n - 1, 1)) if n > 1 else 0
    long_gaps = [i * (spread + 1) for i in range(n - 1)] + [n_bits - 1]
    at_end = list(range(n_bits - n, n_bits))
    rng = np.random.default_rng(seed)
    random = np.sort(rng.choice(n_bits, n, replace=False)).tolist()
    for positions in (long_gaps, at_end, random):
        assert len(set(positions)) == n
        stream = _reference(positions, counts)
        assert stream.size <= rice_max_bytes(counts)
        np.testing.assert_array_equal(rice_decode("s", stream, counts), positions)


@pytest.mark.parametrize("density", [0.01, 0.03, 0.05, 0.3])
def test_rice_is_near_the_entropy_of_random_positions(density: float) -> None:
    rng = np.random.default_rng(0)
    bits = rng.random(200_000) < density
    counts = [(int(bits.sum()), bits.size)]
    ratio = 8 * rice_encode(bits, counts).size / entropy_bits(*counts[0])
    assert 1.0 <= ratio < 1.015, ratio


def _rice_m(n_ones: int, n_bits: int) -> int:
    """The Rice parameter this code replaces: ``2 ** floor(log2(mean gap))``, 1 if no gap."""
    if n_ones <= 0 or n_ones >= n_bits:
        return 1
    return 1 << max(0, ((n_bits - n_ones) // n_ones).bit_length() - 1)


def test_golomb_is_smaller_than_the_rice_code_it_replaces() -> None:
    """Bernoulli(0.03): M = 23 where the Rice code had 32; 4858 against 4924 B whole (1.3 %),
    4965 against 4997 B per row (0.6 %: the rows' densities spread around 2 ** -5)."""
    rng = np.random.default_rng(0)
    bits = rng.random((200, 1000)) < 0.03
    n = int(bits.sum())
    positions = np.flatnonzero(bits).tolist()
    gaps, ms = _gaps(positions, [(n, bits.size)])
    assert set(ms) == {23} and _rice_m(n, bits.size) == 32
    rice = _to_bytes(_section_bits(gaps, [32] * n)).size
    golomb = rice_encode(bits.reshape(-1), [(n, bits.size)]).size
    assert golomb < 0.99 * rice, (golomb, rice)
    rows = [(int(r.sum()), r.size) for r in bits]
    gaps, _ = _gaps(positions, rows)
    rice_ms = [_rice_m(c, size) for c, size in rows for _ in range(c)]
    counts = [c for c, _ in rows]
    rice_rows = _section_bits(counts, [_rice_m(200, n + 200)] * 200) + _section_bits(gaps, rice_ms)
    golomb_rows = rice_rows_encode(bits.reshape(-1), row_segments([(n, bits.size)], [200])).size
    assert golomb_rows < _to_bytes(rice_rows).size, (golomb_rows, _to_bytes(rice_rows).size)


def test_entropy_bits_by_hand() -> None:
    assert entropy_bits(0, 8) == entropy_bits(8, 8) == 0.0
    assert entropy_bits(4, 8) == pytest.approx(8.0)
    assert entropy_bits(1, 4) == pytest.approx(
        4 * -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    )


# 10 positions of 50 at 1, 3, ..., 19 (M = 3): gaps of 1, each prefix "1" and extra "0", unary
# "0": 10 prefix bits, 10 extra bits, 10 unary bits, 2 padding bits.
_TEN = np.array([0xFF, 0xC0, 0x00, 0x00], np.uint8)


@pytest.mark.parametrize(
    ("stream", "counts", "message"),
    [
        (np.zeros(1, np.int8), [(1, 8)], "not a 1-D uint8"),
        (np.zeros((1, 1), np.uint8), [(1, 8)], "not a 1-D uint8"),
        (np.full(40, 0xFF, np.uint8), [(2, 8)], "longer than its counts allow"),
        # M = 11: prefix "111" (>= u = 5), extra "1", then no terminating zero
        (np.array([0b11111111], np.uint8), [(1, 16)], "ends after 0 of 1 positions"),
        # 10 positions 0..9 of 1000 take 9 bytes (M = 69, 6-bit prefixes); the counts allow 12
        (
            np.concatenate([rice_encode(np.arange(1000) < 10, [(10, 1000)]), [0]]).astype(np.uint8),
            [(10, 1000)],
            "trailing bytes",
        ),
        (np.array([0b00101101], np.uint8), [(2, 8)], "padding bits"),
        # gaps 2 and 6: the second position (9) lies past the 8 entries
        (np.array([0b00101110], np.uint8), [(2, 8)], "past the end"),
        (np.zeros(0, np.uint8), [(1, 8)], "ends inside its prefixes"),
        (_TEN[:1], [(10, 50)], "ends inside its prefixes"),
        (_TEN[:2], [(10, 50)], "ends inside its extra bits"),
        (_TEN[:3], [(10, 50)], "ends after 4 of 10 positions"),
        (np.array([0xFF, 0xC0, 0x00, 0x01], np.uint8), [(10, 50)], "padding bits"),
        (np.concatenate([_TEN, [0]]).astype(np.uint8), [(10, 50)], "trailing bytes"),
        # positions 0 and 8 of 9 (M = 3): prefixes "0" "1", extra "0", unary "0" "110" is
        # 0100 1100; its extra bit set makes the gap 8, position 9
        (np.array([0b01101100], np.uint8), [(2, 9)], "past the end"),
    ],
)
def test_rice_refuses_malformed_streams(stream: np.ndarray, counts: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rice_decode("s", stream, counts)


def test_malformed_examples_are_valid_streams_before_the_damage() -> None:
    np.testing.assert_array_equal(rice_decode("s", _TEN, [(10, 50)]), np.arange(1, 20, 2))
    np.testing.assert_array_equal(
        rice_decode("s", np.array([0b01001100], np.uint8), [(2, 9)]), [0, 8]
    )


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=24),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 200)), max_size=4),
    st.integers(1, 4),
)
def test_arbitrary_bytes_decode_to_valid_positions_or_a_value_error(
    raw: bytes, pairs: list[tuple[int, int]], rows: int
) -> None:
    """Whatever the bytes: positions sorted and inside their segments, or a ValueError."""
    counts = [(min(n, size), size) for n, size in pairs]
    stream = np.frombuffer(raw, np.uint8)
    try:
        got = rice_decode("s", stream, counts)
    except ValueError:
        pass
    else:
        want = np.zeros(sum(size for _, size in counts), bool)
        want[got] = True
        assert (np.diff(got) > 0).all() and want.sum() == sum(n for n, _ in counts)
        np.testing.assert_array_equal(rice_encode(want, counts), stream)
    segments = [(n, size * rows, rows) for n, size in counts]
    try:
        got = rice_rows_decode("s", stream, segments)
    except ValueError:
        return
    bits = np.zeros(sum(size for _, size, _ in segments), bool)
    bits[got] = True
    assert (np.diff(got) > 0).all() and bits.sum() == sum(n for n, _, _ in segments)
    np.testing.assert_array_equal(rice_rows_encode(bits, segments), stream)


def _update(seed: int = 0, shape: tuple[int, int] = (40, 50)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal(shape).astype(np.float32),
        "b": rng.standard_normal(shape[0]).astype(np.float32),
    }


def test_selection_is_rice_coded_when_smaller() -> None:
    update = _update()
    payload = codec.encode(update, CodecConfig(entropy=True, topk=0.03))
    assert payload["meta"][1] & codec.FLAG_SELECT_RICE
    plain = codec.encode(update, CodecConfig(entropy=False, topk=0.03))
    assert codec.wire_size(payload) < codec.wire_size(plain)
    np.testing.assert_array_equal(codec.decode(payload)["w"], codec.decode(plain)["w"])


def test_mask_is_rice_coded_and_read_back() -> None:
    update = _update()
    rng = np.random.default_rng(1)
    masks = {"w": rng.random((40, 50)) < 0.05}
    payload = codec.encode(update, CodecConfig(entropy=True), masks=masks)
    assert payload["meta"][1] & codec.FLAG_MASK_RICE
    np.testing.assert_array_equal(codec.payload_masks(payload)["w"], masks["w"])


def _flag(payload: dict[str, np.ndarray], flag: int, on: bool) -> dict[str, np.ndarray]:
    out = dict(payload)
    meta = payload["meta"].copy()
    meta[1] = meta[1] | flag if on else meta[1] & ~flag
    out["meta"] = meta
    return out


def test_decode_refuses_malformed_rice_payloads() -> None:
    payload = codec.encode(_update(), CodecConfig(entropy=True, topk=0.03))
    both = _flag(payload, codec.FLAG_SELECT_ZLIB, True)
    with pytest.raises(ValueError, match="both zlib and Rice"):
        codec.decode(both)
    longer = dict(payload, select=np.concatenate([payload["select"], np.full(500, 255, np.uint8)]))
    with pytest.raises(ValueError, match="longer than its counts allow"):
        codec.decode(longer)
    short = dict(payload, select=payload["select"][:-3])
    with pytest.raises(ValueError, match="Rice"):
        codec.decode(short)
    # The same stream read as a plain bitmap has the wrong length.
    with pytest.raises(ValueError, match="entries, expected"):
        codec.decode(_flag(payload, codec.FLAG_SELECT_RICE, False))
    dense = codec.encode(_update(), CodecConfig(entropy=True))
    with pytest.raises(ValueError, match="nothing selected"):
        codec.decode(_flag(dense, codec.FLAG_SELECT_RICE, True))
    with pytest.raises(ValueError, match="no mask sent"):
        codec.decode(_flag(dense, codec.FLAG_MASK_RICE, True))


def test_more_positions_than_declared_are_refused() -> None:
    update = _update()
    payload = codec.encode(update, CodecConfig(topk=0.03, entropy=True))
    meta = payload["meta"].copy()
    meta[4] -= 1  # w: one transmitted value fewer than the stream holds positions for
    bad = dict(payload, meta=meta)
    with pytest.raises(ValueError):
        codec.decode(bad)


# -- Row-segmented Golomb code ------------------------------------------------------------------
def test_rice_rows_by_hand() -> None:
    bits = np.array([0, 1, 0, 0, 1, 1, 0, 1], dtype=bool)
    segments = row_segments([(4, 8)], [2])
    # Row counts 1 and 3 with M = golomb_m(2, 6) = 2 (no prefix bits, u = 0, an extra bit
    # each): extras "1" "1", unary "0" "10" -> 1101 0000.
    # Rows: (1 of 4) M = 2, gap 1 -> extra "1", unary "0"; (3 of 4) M = 1, gaps 0 0 1 -> unary
    # "0" "0" "10". Extras first ("1"), then unary "0" "0" "0" "10" -> 1000 1000.
    assert [golomb_m(2, 6), golomb_m(1, 4), golomb_m(3, 4)] == [2, 2, 1]
    stream = rice_rows_encode(bits, segments)
    np.testing.assert_array_equal(stream, [0b11010000, 0b10001000])
    np.testing.assert_array_equal(stream, _reference_rows(bits, segments))
    np.testing.assert_array_equal(rice_rows_decode("s", stream, segments), [1, 4, 5, 7])


@st.composite
def _row_segmented(draw: st.DrawFn) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    parts, segments = [], []
    for _ in range(draw(st.integers(0, 4))):
        rows, cols = draw(st.integers(1, 6)), draw(st.integers(0, 40))
        density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
        seed = draw(st.integers(0, 2**16))
        bits = np.random.default_rng(seed).random(rows * cols) < density
        parts.append(bits)
        segments.append((int(bits.sum()), bits.size, rows))
    return (np.concatenate(parts) if parts else np.zeros(0, bool)), segments


@settings(max_examples=200, deadline=None)
@given(_row_segmented())
def test_rice_rows_round_trip(case: tuple[np.ndarray, list[tuple[int, int, int]]]) -> None:
    bits, segments = case
    stream = rice_rows_encode(bits, segments)
    np.testing.assert_array_equal(stream, _reference_rows(bits, segments))
    assert stream.size <= rice_rows_max_bytes(segments)
    assert rice_rows_plan(bits, segments).nbytes == stream.size
    np.testing.assert_array_equal(rice_rows_decode("s", stream, segments), np.flatnonzero(bits))


def test_rice_rows_beats_one_segment_on_rows_of_unequal_density() -> None:
    """Rows at 1 %, 5 % and 20 %: per-row parameters come near the rows' summed entropy."""
    rng = np.random.default_rng(0)
    density = np.repeat([0.01, 0.05, 0.2], 100)[:, None]
    bits = (rng.random((300, 784)) < density).reshape(-1)
    n = int(bits.sum())
    whole = 8 * rice_encode(bits, [(n, bits.size)]).size
    per_row = 8 * rice_rows_encode(bits, row_segments([(n, bits.size)], [300])).size
    rows_entropy = sum(entropy_bits(int(r.sum()), r.size) for r in bits.reshape(300, -1))
    assert per_row < 0.9 * whole, (per_row, whole)  # entropies: 85.4 k against 100.0 k bits
    assert per_row < 1.08 * rows_entropy, (per_row, rows_entropy)


def test_row_segments_refuses_rows_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="3 rows do not divide a segment of 8 bits"):
        row_segments([(2, 8)], [3])


_BY_HAND_ROWS = np.array([0b11010000, 0b10001000], np.uint8)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (np.zeros(1, np.int8), "not a 1-D uint8"),
        (np.full(64, 0xFF, np.uint8), "longer than its counts allow"),
        (np.zeros(0, np.uint8), "ends inside its extra bits"),
        # counts 1 and 1 (extras "1" "1", unary "0" "0"): 2 positions, 4 declared
        (np.array([0b11000000, 0], np.uint8), "row counts do not fit"),
        # counts 1 and 5 (unary "0" "110"): 5 positions in a row of 4
        (np.array([0b11011000, 0], np.uint8), "row counts do not fit"),
        (np.array([0b11010001, 0b10001000], np.uint8), "padding bits"),
        # a trailing byte: the rows' positions take at most 3 + 4 bits (M = 2 and M = 1)
        (np.concatenate([_BY_HAND_ROWS, [0]]).astype(np.uint8), "longer than its counts allow"),
        (_BY_HAND_ROWS[:1], "Rice stream ends"),
        # row 0's gap 3 + 1 fits, row 1's last gap of 2 (unary "110") passes its end
        (np.array([0b11010000, 0b10001100], np.uint8), "past the end"),
    ],
)
def test_rice_rows_refuses_malformed_streams(stream: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rice_rows_decode("s", stream, row_segments([(4, 8)], [2]))


def _rows_update(seed: int = 0) -> dict[str, np.ndarray]:
    """An update whose rows differ in scale, as a layer's output units do."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal((60, 1)))
    return {
        "w": (rng.standard_normal((60, 80)) * scale).astype(np.float32),
        "b": rng.standard_normal(60).astype(np.float32),
    }


def test_selection_is_coded_per_row_when_smaller() -> None:
    update = _rows_update()
    config = CodecConfig(entropy=True, topk=0.05, quant="ternary")
    payload = codec.encode(update, config)
    rows = codec.FLAG_SELECT_RICE | codec.FLAG_SELECT_ROWS
    assert payload["meta"][1] & rows == rows
    plain = codec.encode(update, CodecConfig(entropy=False, topk=0.05, quant="ternary"))
    assert codec.wire_size(payload) < codec.wire_size(plain)
    np.testing.assert_array_equal(codec.decode(payload)["w"], codec.decode(plain)["w"])
    # read back as one segment per tensor, the same bytes are malformed
    with pytest.raises(ValueError, match="Rice"):
        codec.decode(_flag(payload, codec.FLAG_SELECT_ROWS, False))
    with pytest.raises(ValueError, match="row-segmented but not Rice"):
        codec.decode(_flag(payload, codec.FLAG_SELECT_RICE, False))


def test_mask_is_coded_per_row_and_read_back() -> None:
    rng = np.random.default_rng(2)
    masks = {"w": rng.random((60, 80)) < np.repeat([0.01, 0.2], 30)[:, None]}
    payload = codec.encode(_rows_update(), CodecConfig(entropy=True), masks=masks)
    rows = codec.FLAG_MASK_RICE | codec.FLAG_MASK_ROWS
    assert payload["meta"][1] & rows == rows
    np.testing.assert_array_equal(codec.payload_masks(payload)["w"], masks["w"])
    with pytest.raises(ValueError, match="row-segmented but not Rice"):
        codec.decode(_flag(payload, codec.FLAG_MASK_RICE, False), masks=None)


def test_a_selection_under_a_mask_stays_one_segment() -> None:
    """Candidates under a mask are not whole rows: the tensor's select segment is not split."""
    rng = np.random.default_rng(3)
    masks = {"w": rng.random((60, 80)) < 0.5}
    payload = codec.encode(
        _rows_update(), CodecConfig(entropy=True, topk=0.05, quant="ternary"), masks=masks
    )
    got = codec.decode(payload)
    plain = codec.encode(
        _rows_update(), CodecConfig(entropy=False, topk=0.05, quant="ternary"), masks=masks
    )
    np.testing.assert_array_equal(got["w"], codec.decode(plain)["w"])


# -- Top-k over the whole model ------------------------------------------------------------------
def test_model_scope_topk_by_hand() -> None:
    x = {
        "a": np.array([6.0, -5.0], np.float32),
        "b": np.array([[3.0, -4.0], [0.5, 2.0]], np.float32),
    }
    # k = ceil(0.5 * 6) = 3: |6|, |-5|, |-4|: both entries of a, one of b.
    config = CodecConfig(quant="none", topk=0.5, topk_scope="model", entropy=True)
    got = codec.decode(codec.encode(x, config))
    np.testing.assert_array_equal(got["a"], [6.0, -5.0])
    np.testing.assert_array_equal(got["b"], [[0.0, -4.0], [0.0, 0.0]])
    # Per tensor: one of a's two entries, two of b's four.
    per_tensor = codec.decode(codec.encode(x, CodecConfig(quant="none", topk=0.5)))
    np.testing.assert_array_equal(per_tensor["a"], [6.0, 0.0])
    np.testing.assert_array_equal(per_tensor["b"], [[3.0, -4.0], [0.0, 0.0]])


def test_model_scope_ties_go_to_the_earlier_tensor() -> None:
    x = {"a": np.full(3, 2.0, np.float32), "b": np.full(3, -2.0, np.float32)}
    got = codec.decode(codec.encode(x, CodecConfig(quant="none", topk=0.5, topk_scope="model")))
    np.testing.assert_array_equal(got["a"], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(got["b"], [0.0, 0.0, 0.0])


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=finite),
    hnp.arrays(np.float32, st.integers(1, 12), elements=finite),
    st.sampled_from([0.05, 0.3, 0.9]),
    st.booleans(),
)
def test_model_scope_sends_the_largest_entries_of_all_tensors(
    w: np.ndarray, b: np.ndarray, topk: float, masked: bool
) -> None:
    x = {"w": w, "b": b}
    masks = {"w": np.arange(w.size).reshape(w.shape) % 3 != 0} if masked else None
    config = CodecConfig(quant="none", topk=topk, topk_scope="model", entropy=True)
    got = codec.decode(codec.encode(x, config, masks=masks))
    candidates = np.concatenate([np.abs(w[masks["w"]] if masks else w).ravel(), np.abs(b)])
    k = math.ceil(topk * candidates.size)
    threshold = np.sort(candidates)[::-1][k - 1]
    sent = np.concatenate([got["w"].ravel(), got["b"]])
    original = np.concatenate([w.ravel(), b])
    nonzero = sent != 0
    np.testing.assert_array_equal(sent[nonzero], original[nonzero])
    assert np.count_nonzero(original[nonzero]) <= k
    # Every entry sent is at least the k-th magnitude; every larger one was sent.
    assert (np.abs(original[nonzero]) >= threshold).all()
    unmasked = np.concatenate(
        [(masks["w"] if masks else np.ones_like(w, bool)).ravel(), [True] * b.size]
    )
    assert (nonzero | (np.abs(original) <= threshold) | ~unmasked).all()


def test_model_scope_may_leave_a_tensor_without_entries() -> None:
    rng = np.random.default_rng(4)
    x = {"w": rng.standard_normal((40, 50)).astype(np.float32), "b": np.full(40, 1e-6, np.float32)}
    for quant in ("ternary", "int4-channel", "int8-channel"):
        config = CodecConfig(quant=quant, topk=0.05, topk_scope="model", entropy=True)
        payload = codec.encode(x, config)
        got = codec.decode(payload)
        np.testing.assert_array_equal(got["b"], np.zeros(40, np.float32))
        assert np.count_nonzero(got["w"]) == 102  # ceil(0.05 * 2040), all in w
        np.testing.assert_array_equal(codec.residual(x, payload)["b"], x["b"])


# -- Selection blocks ----------------------------------------------------------------------------
def test_selection_blocks_by_hand() -> None:
    x = {
        "w": np.array([[1.0, -2.0, 9.0, -9.0, 0.1, 0.2]], np.float32),
        "b": np.array([0.0, 0.0, 0.0, 0.0, 5.0], np.float32),
    }
    config = CodecConfig(quant="none", topk=0.34, topk_block=2)
    payload = codec.encode(x, config)
    # w: block sums 3, 18, 0.3 -> the top ceil(0.34 * 3) = 2 are blocks 0 and 1: bits 110.
    # b: block sums 0, 0, 5 (the last block is one entry) -> blocks 2 and (a tie) 0: bits 101;
    # 3 values, the zeros of block 0 among them. Select stream 110 101 00.
    np.testing.assert_array_equal(payload["select"], [0b11010100])
    assert payload["meta"][1] >> codec.SELECT_BLOCK_SHIFT & 0b1111 == 1
    got = codec.decode(payload)
    np.testing.assert_array_equal(got["w"], [[1.0, -2.0, 9.0, -9.0, 0.0, 0.0]])
    np.testing.assert_array_equal(got["b"], x["b"])
    assert payload["values"].size == 4 + 3


def _reference_blocks(
    x: dict[str, np.ndarray], masks: dict | None, topk: float, block: int, scope: str
) -> dict[str, np.ndarray]:
    """Which candidates a block top-k sends, computed the slow way."""
    cands = {n: (v[masks[n]] if masks and n in masks else v.reshape(-1)) for n, v in x.items()}
    sums = {
        n: np.array([np.abs(c[i : i + block]).sum() for i in range(0, c.size, block)], np.float32)
        for n, c in cands.items()
    }
    if scope == "model":
        every = np.concatenate(list(sums.values()))
        picked = np.split(
            topk_flat(every, math.ceil(topk * every.size)),
            np.cumsum([s.size for s in sums.values()])[:-1],
        )
        chosen = dict(zip(sums, picked, strict=True))
    else:
        chosen = {n: topk_flat(s, math.ceil(topk * s.size)) for n, s in sums.items()}
    return {n: np.repeat(chosen[n], block)[: cands[n].size] for n in x}


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 13)), elements=finite),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([0.05, 0.3, 0.9]),
    st.sampled_from(["none", "ternary", "int8-channel", "int4-channel"]),
    st.sampled_from(["tensor", "model"]),
    st.booleans(),
    st.booleans(),
)
def test_selection_blocks_round_trip(
    w: np.ndarray, block: int, topk: float, quant: str, scope: str, masked: bool, blob: bool
) -> None:
    x = {"w": w, "b": w[0].copy()}
    masks = {"w": np.arange(w.size).reshape(w.shape) % 3 != 1} if masked else None
    config = CodecConfig(
        quant=quant,  # type: ignore[arg-type]
        topk=topk,
        topk_block=block,
        topk_scope=scope,  # type: ignore[arg-type]
        entropy=True,
        container="blob" if blob else "arrays",
    )
    got = codec.decode(codec.encode(x, config, masks=masks))
    want = _reference_blocks(x, masks, topk, block, scope)
    for name, value in x.items():
        keep = masks[name] if masks and name in masks else np.ones(value.shape, bool)
        sent = np.zeros(value.size, bool)
        sent[np.flatnonzero(keep)[want[name]]] = True
        out = got[name].reshape(-1)
        assert not out[~sent].any()  # nothing outside the chosen blocks
        if quant == "none":
            np.testing.assert_array_equal(out[sent], value.reshape(-1)[sent])


def test_selection_blocks_cost_a_block_share_of_position_bits() -> None:
    rng = np.random.default_rng(5)
    x = {"w": rng.standard_normal((200, 784)).astype(np.float32)}
    size = {}
    for block in (1, 4):
        config = CodecConfig(quant="ternary", topk=0.05, topk_block=block, entropy=True)
        payload = codec.encode(x, config)
        assert np.count_nonzero(codec.decode(payload)["w"]) == 7840
        size[block] = payload["select"].nbytes
    assert 3.5 * size[4] < size[1] < 4.5 * size[4], size


def test_malformed_selection_blocks_are_refused() -> None:
    x = {"w": np.arange(1.0, 11.0, dtype=np.float32).reshape(2, 5)}
    payload = codec.encode(x, CodecConfig(topk=0.5, topk_block=4, entropy=True))
    meta = payload["meta"].copy()
    meta[4] -= 1  # w: 4 + 2 values (blocks 1 and the short last) -> 5
    codes = payload["codes"][:-1]
    with pytest.raises(ValueError, match="not whole blocks of 4"):
        codec.decode(dict(payload, meta=meta, codes=codes))
    dense = codec.encode(x, CodecConfig())
    meta = dense["meta"].copy()
    meta[1] |= 2 << codec.SELECT_BLOCK_SHIFT
    with pytest.raises(ValueError, match="selection blocks of 4 flagged but nothing selected"):
        codec.decode(dict(dense, meta=meta))
    with pytest.raises(ValueError, match="topk_block must be a power of two"):
        CodecConfig(topk_block=3)
    with pytest.raises(ValueError, match="topk_block must be a power of two"):
        CodecConfig(topk_block=1 << 16)


def test_topk_scope_is_checked() -> None:
    with pytest.raises(ValueError, match="topk_scope must be one of"):
        CodecConfig(topk_scope="layer")  # type: ignore[arg-type]


# -- int4 and ternary codes ----------------------------------------------------------------------
def test_int4_by_hand() -> None:
    x = {"w": np.array([[7.0, -3.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)}
    payload = codec.encode(x, CodecConfig(quant="int4-channel"))
    # Row 0: step 7 / 7 = 1 -> codes 7, -4 (rint(-3.5) = -4, half to even), 0, 1;
    # row 1: all zero, step 0 -> codes 0. Nibbles 7 C 0 1 0 0 0 0 (two's complement).
    np.testing.assert_array_equal(payload["codes"], [0x7C, 0x01, 0x00, 0x00])
    assert payload["scale"].dtype == np.float16
    np.testing.assert_array_equal(payload["scale"], np.array([1.0, 0.0], np.float16))
    got = codec.decode(payload)["w"]
    np.testing.assert_array_equal(got, [[7.0, -4.0, 0.0, 1.0], [0, 0, 0, 0]])


def test_ternary_by_hand() -> None:
    x = {"w": np.array([[3.0, -1.0, 0.5], [-4.0, 2.0, 0.1]], np.float32)}
    payload = codec.encode(x, CodecConfig(quant="ternary", topk=0.5))
    # Top 3 by |x|: 3 (row 0), -4 and 2 (row 1). Signs + - +, row magnitudes 3 and 3.
    np.testing.assert_array_equal(payload["codes"], [0b01000000])
    np.testing.assert_array_equal(payload["scale"], np.array([3.0, 3.0], np.float16))
    assert payload["meta"][1] & codec.FLAG_TERNARY
    got = codec.decode(payload)["w"]
    np.testing.assert_array_equal(got, [[3.0, 0, 0], [-3.0, 3.0, 0]])


def test_scales_only_for_rows_that_carry_entries() -> None:
    x = {"w": np.zeros((6, 10), np.float32)}
    x["w"][2, 3] = 5.0
    x["w"][4, 1] = -2.0
    payload = codec.encode(x, CodecConfig(quant="ternary", topk=2 / 60))
    assert payload["scale"].size == 2
    np.testing.assert_array_equal(codec.decode(payload)["w"], x["w"])


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=finite),
    st.sampled_from(["int4-channel", "ternary"]),
    st.sampled_from([1.0, 0.5, 0.1]),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["float16", "log8"]),
)
# Subnormal rows, whose float32 step is 0 (found by hypothesis)
@example(np.array([[1e-45, 0.0]], np.float32), "ternary", 1.0, False, False, "log8")
@example(np.array([[1e-45]], np.float32), "int4-channel", 1.0, False, False, "log8")
def test_lowbit_round_trip(
    w: np.ndarray, quant: str, topk: float, entropy: bool, blob: bool, scales: str
) -> None:
    config = CodecConfig(
        quant=quant,  # type: ignore[arg-type]
        topk=topk,
        entropy=entropy,
        container="blob" if blob else "arrays",
        scales=scales,  # type: ignore[arg-type]
    )
    tensors = {"w": w, "b": w[0].copy()}
    payload = codec.encode(tensors, config)
    got = codec.decode(payload)
    assert codec.wire_size(payload) > 0
    if scales == "log8":
        _check_log8_round_trip(tensors, got, quant, topk)
        return
    for name, x in tensors.items():
        sent = _select_topk(name, x, None, topk, 1).reshape(x.shape)
        assert not (got[name][~sent]).any()  # nothing outside the selection
        rows = x.reshape(x.shape[0] if x.ndim == 2 else 1, -1)
        out = got[name].reshape(rows.shape)
        chosen = sent.reshape(rows.shape)
        for r in range(rows.shape[0]):
            if not chosen[r].any():
                continue
            v = rows[r][chosen[r]]
            d = out[r][chosen[r]]
            if quant == "int4-channel":
                step = float(np.float16(np.abs(v).max() / 7))
                assert np.abs(d - v).max() <= step / 2 + 1e-3 * np.abs(v).max() + 1e-6
            else:
                magnitude = float(np.float16(np.abs(v).mean(dtype=np.float32)))
                np.testing.assert_allclose(np.abs(d), magnitude, rtol=1e-6)
                nonzero = d != 0  # a magnitude below float16's range decodes to 0
                nonzero &= v != 0  # a sign code sends 0 as +magnitude
                assert (np.sign(d[nonzero]) == np.sign(v[nonzero])).all()


_LOG8_REL = 2 ** (1 / (2 * codec.LOG8_STEPS)) - 1
"""Largest relative error of a log8 step within the scale's range (half a code)."""


def _row_steps(x: np.ndarray, sent: np.ndarray, quant: str) -> list[tuple[int, float]]:
    """``(row, float32 step before rounding)`` of every row of ``x`` with a sent entry."""
    rows = x.reshape(x.shape[0] if x.ndim == 2 else 1, -1)
    chosen = sent.reshape(rows.shape)
    out = []
    for r in range(rows.shape[0]):
        if chosen[r].any():
            v = np.abs(rows[r][chosen[r]])
            out.append((r, float(v.max() / 7 if quant == "int4-channel" else v.mean())))
    return out


def _check_log8_round_trip(
    tensors: dict[str, np.ndarray], got: dict[str, np.ndarray], quant: str, topk: float
) -> None:
    """Every decoded row is ``code * step`` with the step within half a log8 code of its own."""
    steps = {
        name: _row_steps(x, _select_topk(name, x, None, topk, 1), quant)
        for name, x in tensors.items()
    }
    ref = max((s for rows in steps.values() for _, s in rows), default=0.0)
    smallest = ref * 2 ** (-(codec.LOG8_ZERO - 1) / codec.LOG8_STEPS)
    for name, x in tensors.items():
        sent = _select_topk(name, x, None, topk, 1).reshape(x.shape)
        assert not (got[name][~sent]).any()
        rows = x.reshape(x.shape[0] if x.ndim == 2 else 1, -1)
        out = got[name].reshape(rows.shape)
        chosen = sent.reshape(rows.shape)
        for r, step in steps[name]:
            d, v = out[r][chosen[r]], rows[r][chosen[r]]
            if step < smallest * 1.01:  # below the log scale's range: 0 or its smallest step
                assert np.abs(d).max() <= 7 * smallest * (1 + _LOG8_REL) + 1e-30
                continue
            if step < np.finfo(np.float32).tiny:  # subnormal: float32 arithmetic may give 0
                assert np.abs(d - v).max() <= 8 * np.finfo(np.float32).tiny
                continue
            if quant == "ternary":
                np.testing.assert_allclose(np.abs(d), step, rtol=_LOG8_REL + 1e-5)
                nonzero = v != 0  # a sign code sends 0 as +magnitude
                assert (np.sign(d[nonzero]) == np.sign(v[nonzero])).all()
            else:  # the rounded step is at most 2.2 % off: codes within half a step, or clipped
                rounded = step * (1 + _LOG8_REL)
                assert np.abs(d - v).max() <= rounded / 2 + _LOG8_REL * 7 * step + 1e-6 * step


def test_log8_scales_by_hand() -> None:
    x = {"w": np.array([[3.0, -3.0], [-1.5, 1.5], [0.0, 0.0], [1e-9, 1e-9]], np.float32)}
    payload = codec.encode(x, CodecConfig(quant="ternary", scales="log8"))
    # Row steps 3, 1.5, 0 and 1e-9 (below 3 * 2 ** -15.9): reference 3.0 (float32 bytes), then
    # codes 0, 16 (one octave), 255 (zero) and 255 (nearer to 0 than to the smallest step).
    assert payload["meta"][1] & codec.FLAG_SCALES_LOG8
    want = np.concatenate([np.frombuffer(np.float32(3.0).tobytes(), np.uint8), [0, 16, 255, 255]])
    np.testing.assert_array_equal(payload["scale"], want.astype(np.uint8))
    got = codec.decode(payload)["w"]
    np.testing.assert_array_equal(got, [[3.0, -3.0], [-1.5, 1.5], [0.0, 0.0], [0.0, 0.0]])
    int4 = codec.encode(
        {"w": np.array([[7.0, -7.0], [3.5, 1.0]], np.float32)},
        CodecConfig(quant="int4-channel", scales="log8"),
    )
    # Steps 1 and 0.5 (codes 0, 16); codes against them: 7 -7 | 7 2.
    np.testing.assert_array_equal(codec.decode(int4)["w"], [[7.0, -7.0], [3.5, 1.0]])
    assert (
        codec.encode(
            {"w": np.zeros((0, 3), np.float32)}, CodecConfig(quant="ternary", scales="log8")
        )["scale"].size
        == 0
    )


def test_log8_halves_the_scales_and_keeps_the_residual() -> None:
    update = _update()
    half = codec.encode(update, CodecConfig(quant="ternary", topk=0.05))
    log8 = codec.encode(update, CodecConfig(quant="ternary", topk=0.05, scales="log8"))
    assert log8["scale"].nbytes == half["scale"].size + 4
    for name in update:  # the residual carries the rounding of the steps
        got = codec.decode(log8)[name] + codec.residual(update, log8)[name]
        np.testing.assert_allclose(got, update[name], rtol=1e-6, atol=1e-6)


def test_log8_config_is_validated() -> None:
    with pytest.raises(ValueError, match="log8 scales need"):
        CodecConfig(quant="int8-channel", scales="log8")
    with pytest.raises(ValueError, match="scales must be one of"):
        CodecConfig(quant="ternary", scales="float8")  # type: ignore[arg-type]


def test_decode_refuses_malformed_log8_scales() -> None:
    p = codec.encode(_update(shape=(4, 5)), CodecConfig(quant="ternary", topk=0.5, scales="log8"))
    with pytest.raises(ValueError, match="1-D uint8 array with log8"):
        codec.decode(dict(p, scale=p["scale"].view(np.int8)))
    with pytest.raises(ValueError, match="rows carry"):
        codec.decode(dict(p, scale=p["scale"][:-1]))
    with pytest.raises(ValueError, match="rows carry"):
        codec.decode(dict(p, scale=np.append(p["scale"], np.uint8(0))))
    for ref in (np.nan, np.inf, 0.0, -1.0, 3e38):
        bad = p["scale"].copy()
        bad[:4] = np.frombuffer(np.float32(ref).tobytes(), np.uint8)
        with pytest.raises(ValueError, match="log8 reference"):
            codec.decode(dict(p, scale=bad))
    with pytest.raises(ValueError, match="1-D float16"):  # float16 steps are not log8 codes
        codec.decode(_flag(p, codec.FLAG_SCALES_LOG8, False))
    int8 = codec.encode(_update(shape=(4, 5)), CodecConfig(quant="int8", topk=0.5))
    with pytest.raises(ValueError, match="log8 scales flagged outside"):
        codec.decode(_flag(int8, codec.FLAG_SCALES_LOG8, True))
    blob = codec.encode(
        _update(shape=(4, 5)),
        CodecConfig(quant="ternary", topk=0.5, scales="log8", container="blob"),
    )
    streams = unpack_blob(blob)
    with pytest.raises(ValueError, match="rows carry"):
        codec.decode(pack_blob(dict(streams, scale=streams["scale"][:-2])))


def test_scales_deflate_as_byte_planes() -> None:
    # 200 rows whose float16 steps share their high bytes: the planes deflate, the rows do not.
    steps = np.float16(1.0) + np.arange(200, dtype=np.float16) * np.float16(2**-10)
    x = {"w": np.repeat(steps.astype(np.float32)[:, None], 3, axis=1)}
    x["w"][:, 1] *= -1
    for scales in ("float16", "log8"):
        config = CodecConfig(quant="ternary", entropy=True, scales=scales)
        payload = codec.encode(x, config)
        plain = codec.encode(x, CodecConfig(quant="ternary", scales=scales))
        assert payload["meta"][1] & codec.FLAG_SCALE_ZLIB
        assert payload["scale"].dtype == np.uint8
        assert payload["scale"].nbytes < plain["scale"].nbytes
        want = np.frombuffer(
            plain["scale"].astype(plain["scale"].dtype.newbyteorder("<")), np.uint8
        )
        planes = want.reshape(-1, plain["scale"].itemsize).T.reshape(-1)
        assert zlib.decompress(payload["scale"].tobytes()) == planes.tobytes()
        got, want_dense = codec.decode(payload), codec.decode(plain)
        for name in x:
            np.testing.assert_array_equal(got[name], want_dense[name])


def test_decode_refuses_malformed_compressed_scales() -> None:
    x = {"w": np.repeat(np.linspace(1, 2, 200, dtype=np.float32)[:, None], 3, axis=1)}
    p = codec.encode(x, CodecConfig(quant="ternary", entropy=True))
    assert p["meta"][1] & codec.FLAG_SCALE_ZLIB
    with pytest.raises(ValueError, match="'scale': corrupt zlib"):
        codec.decode(dict(p, scale=p["scale"][::-1].copy()))
    short = np.frombuffer(zlib.compress(zlib.decompress(p["scale"].tobytes())[:-2]), np.uint8)
    with pytest.raises(ValueError, match="does not expand"):
        codec.decode(dict(p, scale=short))
    longer = np.frombuffer(zlib.compress(zlib.decompress(p["scale"].tobytes()) + b"\0\0"), np.uint8)
    with pytest.raises(ValueError, match="does not expand"):
        codec.decode(dict(p, scale=longer))
    with pytest.raises(ValueError, match="trailing bytes"):
        codec.decode(dict(p, scale=np.append(p["scale"], np.uint8(0))))
    with pytest.raises(ValueError, match="1-D float16"):  # compressed bytes read as steps
        codec.decode(_flag(p, codec.FLAG_SCALE_ZLIB, False))
    int8 = codec.encode(_update(shape=(4, 5)), CodecConfig(quant="int8", topk=0.5))
    with pytest.raises(ValueError, match="compressed scales flagged outside"):
        codec.decode(_flag(int8, codec.FLAG_SCALE_ZLIB, True))


def test_stochastic_int4_is_unbiased() -> None:
    x = {"w": np.full((1, 20_000), 0.3, np.float32)}
    x["w"][0, 0] = 7.0  # step 1: 0.3 rounds to 0 or 1
    rng = np.random.default_rng(0)
    got = codec.decode(
        codec.encode(x, CodecConfig(quant="int4-channel", rounding="stochastic"), rng=rng)
    )
    assert got["w"][0, 1:].mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="stochastic rounding does not apply"):
        CodecConfig(quant="ternary", rounding="stochastic")


def test_error_feedback_carries_what_ternary_drops() -> None:
    update = _update()
    payload = codec.encode(update, CodecConfig(quant="ternary", topk=0.05))
    res = codec.residual(update, payload)
    got = codec.decode(payload)
    for name in update:
        np.testing.assert_allclose(got[name] + res[name], update[name], rtol=1e-6, atol=1e-6)


def _lowbit(ternary: bool) -> dict[str, np.ndarray]:
    return codec.encode(
        _update(shape=(4, 5)), CodecConfig(quant="ternary" if ternary else "int4-channel", topk=0.5)
    )


def test_decode_refuses_malformed_lowbit_payloads() -> None:
    p = _lowbit(False)
    codes = p["codes"].copy()
    codes[0] = 0x80  # first nibble 8: the int4 code -8
    with pytest.raises(ValueError, match="int4 code -8"):
        codec.decode(dict(p, codes=codes))
    with pytest.raises(ValueError, match="entries, expected"):
        codec.decode(dict(p, codes=p["codes"][:-1]))
    with pytest.raises(ValueError, match="float16"):
        codec.decode(dict(p, scale=p["scale"].astype(np.float32)))
    with pytest.raises(ValueError, match="rows carry"):
        codec.decode(dict(p, scale=p["scale"][:-1]))
    bad = p["scale"].copy()
    bad[0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        codec.decode(dict(p, scale=bad))
    bad[0] = -1
    with pytest.raises(ValueError, match="negative"):
        codec.decode(dict(p, scale=bad))
    t = _lowbit(True)
    codes = t["codes"].copy()
    codes[-1] |= 1  # a padding bit (11 signs in 2 bytes)
    with pytest.raises(ValueError, match="padding"):
        codec.decode(dict(t, codes=codes))
    int8 = codec.encode(_update(shape=(4, 5)), CodecConfig(quant="int8", topk=0.5))
    with pytest.raises(ValueError, match="ternary flagged outside"):
        codec.decode(_flag(int8, codec.FLAG_TERNARY, True))


def test_odd_int4_padding_nibble_is_refused() -> None:
    p = codec.encode(
        {"b": np.array([1.0, -2.0, 3.0], np.float32)}, CodecConfig(quant="int4-channel")
    )
    codes = p["codes"].copy()
    codes[-1] |= 0x01
    with pytest.raises(ValueError, match="padding nibble"):
        codec.decode(dict(p, codes=codes))


# -- the one-array container ---------------------------------------------------------------------
def test_blob_is_one_array_and_smaller_on_the_wire() -> None:
    update = _update()
    arrays = codec.encode(update, CodecConfig(quant="ternary", topk=0.05, entropy=True))
    blob = codec.encode(
        update, CodecConfig(quant="ternary", topk=0.05, entropy=True, container="blob")
    )
    assert list(blob) == [codec.KEY_BLOB]
    assert codec.wire_size(blob) < codec.wire_size(arrays)
    for name, x in codec.decode(arrays).items():
        np.testing.assert_array_equal(codec.decode(blob)[name], x)
    assert codec.bits_breakdown(blob)["positions"] == codec.bits_breakdown(arrays)["positions"]
    streams = unpack_blob(blob)
    assert list(streams) == list(arrays)
    for key, arr in arrays.items():
        np.testing.assert_array_equal(streams[key], arr)
        assert streams[key].dtype == arr.dtype


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), max_size=40))
def test_meta_travels_as_varints(meta: list[int]) -> None:
    blob = pack_blob({"meta": np.array(meta, np.int64)})[codec.KEY_BLOB]
    # 7 bits per byte: 0..127 take one byte, 128..16383 two, ...
    assert blob.size == 6 + sum(max(1, -(-v.bit_length() // 7)) for v in meta)
    back = unpack_blob({codec.KEY_BLOB: blob})["meta"]
    assert back.dtype == np.int64 and back.tolist() == meta


def test_varints_by_hand() -> None:
    blob = pack_blob({"meta": np.array([3, 300, 0, 128], np.int64)})[codec.KEY_BLOB]
    # 300 = 0b10_0101100: low 7 bits 0x2C with the high bit, then 0b10; 128 = 0x80 0x01.
    assert blob.tobytes() == _header(0, 1, 6) + bytes([3, 0xAC, 0x02, 0, 0x80, 0x01])
    negative = pack_blob({"meta": np.array([-1], np.int64)})[codec.KEY_BLOB]
    assert negative.tobytes() == _header(0, 0, 1) + (-1).to_bytes(8, "little", signed=True)


def _header(key: int, code: int, count: int) -> bytes:
    return bytes([key, code]) + count.to_bytes(4, "little")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_header(0, 1, 3)[:4], "truncated stream header"),
        (_header(9, 2, 0), "unknown or out of order"),
        (_header(1, 2, 0) + _header(0, 0, 0), "unknown or out of order"),
        (_header(1, 2, 0) + _header(1, 2, 0), "unknown or out of order"),
        (_header(0, 7, 0), "unknown dtype code"),
        (_header(1, 1, 0), "unknown dtype code"),  # varints are for meta only
        (_header(0, 1, 2) + bytes([0x83, 0x80]), "runs past the end"),
        (_header(0, 1, 10) + bytes([0xFF] * 9 + [0x01]), "more than 9 bytes"),
        (_header(0, 1, 3) + bytes([0x05, 0x80, 0x00]), "shortest form"),
        (_header(0, 0, 2) + bytes(15), "runs past the blob"),
        (_header(1, 2, 4_000_000_000), "runs past the blob"),
    ],
)
def test_unpack_blob_refuses_malformed_blobs(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_blob({codec.KEY_BLOB: np.frombuffer(raw, np.uint8)})


def test_blob_payload_refuses_extra_keys_and_wrong_dtype() -> None:
    empty: dict[str, np.ndarray] = {
        "meta": np.array([3, 0, 0], np.int64),
        "names": np.zeros(0, np.uint8),
        "values": np.zeros(0, np.float32),
    }
    blob = pack_blob(empty)
    with pytest.raises(ValueError, match="one key"):
        codec.decode({**blob, "meta": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="1-D uint8"):
        codec.decode({codec.KEY_BLOB: blob[codec.KEY_BLOB].view(np.int8)})
    assert codec.decode(blob) == {}


def test_bits_breakdown_adds_up_to_the_wire_size() -> None:
    payload = codec.encode(
        _update(), CodecConfig(quant="ternary", topk=0.05, entropy=True, container="blob")
    )
    parts = codec.bits_breakdown(payload)
    n_params = 40 * 50 + 40
    total = sum(parts[p] for p in ("positions", "values", "scales", "framing"))
    assert total * n_params == pytest.approx(8 * codec.wire_size(payload))
    assert parts["entropy"] * n_params == pytest.approx(
        entropy_bits(math.ceil(0.05 * 2000), 2000) + entropy_bits(2, 40)
    )
