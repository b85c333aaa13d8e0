"""Decode a payload: parse and validate its layout, then every tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedprune.codec.bits import (
    _check_padding,
    _check_stream,
    _packed_codes_len,
    _unpack_codes,
)
from fedprune.codec.container import is_blob, unpack_blob
from fedprune.codec.entropy import _from_byte_planes, _inflate
from fedprune.codec.format import (
    _KEY_ORDER,
    _META_HEAD,
    _PAYLOAD_FLAGS,
    _QUANT_CHANNEL,
    _QUANT_LOWBIT,
    _QUANT_NONE,
    _STREAM_FLAGS,
    _TENSOR_FLAGS,
    _TENSOR_HEAD,
    _VALUES_DTYPE,
    FLAG_CODES_ZLIB,
    FLAG_MASK_RICE,
    FLAG_MASK_ROWS,
    FLAG_MASK_SENT,
    FLAG_MASK_ZLIB,
    FLAG_MASKED,
    FLAG_SCALE_ZLIB,
    FLAG_SCALES_LOG8,
    FLAG_SELECT_RICE,
    FLAG_SELECT_ROWS,
    FLAG_SELECT_ZLIB,
    FLAG_SELECTED,
    FLAG_TERNARY,
    FORMAT_VERSION,
    KEY_CODES,
    KEY_MASK,
    KEY_META,
    KEY_NAMES,
    KEY_SCALE,
    KEY_SELECT,
    KEY_VALUES,
    NAME_SEP,
    QMAX,
    QUANT_BITS,
    ScaleFormat,
    _as_float32,
    _block_of,
    _check_mask,
    _effective_quant,
    _Entry,
    _label,
    _position_counts,
    _position_rows,
)
from fedprune.codec.quant import (
    _check_scales,
    _dequantize,
    _dequantize_lowbit,
    _read_steps,
    _row_counts,
)
from fedprune.codec.rice import rice_decode, rice_rows_decode, row_segments
from fedprune.codec.sparse import SparseTensor


@dataclass(frozen=True)
class _Layout:
    """A parsed and validated ``meta`` + ``names``: the payload flags and its tensors."""

    flags: int
    entries: list[_Entry]
    n_values: int
    n_scales: int
    n_bits: int
    n_select: int = 0

    @property
    def quant(self) -> int:
        return self.flags & QUANT_BITS

    def position_counts(self, key: str) -> list[tuple[int, int]]:
        """Return ``(set bits, bits)`` per tensor segment of a bit stream."""
        return _position_counts(self.entries, key)

    def expected_keys(self) -> list[str]:
        """Return the key set these flags and tensors imply, in :func:`encode` order."""
        keys = [KEY_META, KEY_NAMES]
        keys += [KEY_VALUES] if self.quant == _QUANT_NONE else [KEY_CODES, KEY_SCALE]
        if any(entry.flags & FLAG_SELECTED for entry in self.entries):
            keys.append(KEY_SELECT)
        if any(entry.flags & FLAG_MASK_SENT for entry in self.entries):
            keys.append(KEY_MASK)
        return keys


def _check_keys(payload: Mapping[str, np.ndarray]) -> None:
    """Every key is a known payload key and every value a numpy array."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a mapping, got {type(payload).__name__}")
    unknown = [key for key in payload if key not in _KEY_ORDER]
    if unknown:
        raise ValueError(f"payload has unknown keys {unknown}; payload keys are {list(_KEY_ORDER)}")
    for key, value in payload.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{_label(key)} must be a numpy array, got {type(value)}")


def _parse_names(payload: Mapping[str, np.ndarray], n_tensors: int) -> list[str]:
    if KEY_NAMES not in payload:
        raise ValueError(f"payload is missing key {KEY_NAMES!r}")
    arr = payload[KEY_NAMES]
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(
            f"{_label(KEY_NAMES)} must be a 1-D uint8 array, got {arr.dtype} {arr.shape}"
        )
    try:
        text = arr.tobytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{_label(KEY_NAMES)} is not valid UTF-8") from err
    names = text.split(NAME_SEP) if n_tensors else ([] if not text else [text])
    if len(names) != n_tensors:
        raise ValueError(
            f"{_label(KEY_NAMES)} holds {len(names)} names, but {KEY_META!r} describes "
            f"{n_tensors} tensors"
        )
    if len(set(names)) != len(names):
        dup = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{_label(KEY_NAMES)} repeats tensor names {dup}")
    return names


def _parse_layout(payload: Mapping[str, np.ndarray]) -> _Layout:
    """Validate ``meta`` and ``names`` and compute every tensor's place in the streams."""
    if KEY_META not in payload:
        raise ValueError(f"payload is missing key {KEY_META!r}")
    label = _label(KEY_META)
    arr = payload[KEY_META]
    if arr.dtype != np.int64 or arr.ndim != 1 or arr.size < _META_HEAD:
        raise ValueError(
            f"{label} must be a 1-D int64 array of >= {_META_HEAD} entries, "
            f"got {arr.dtype} {arr.shape}"
        )
    meta: list[int] = arr.tolist()
    version, flags, n_tensors = meta[:_META_HEAD]
    if version != FORMAT_VERSION:
        raise ValueError(f"{label}: format version {version} != {FORMAT_VERSION}")
    if flags & ~_PAYLOAD_FLAGS:
        raise ValueError(f"{label}: unknown payload flags {flags:#x}")
    if flags & FLAG_TERNARY and flags & QUANT_BITS != _QUANT_LOWBIT:
        raise ValueError(f"{label}: ternary flagged outside the low-bit mode")
    if flags & FLAG_SCALES_LOG8 and flags & QUANT_BITS != _QUANT_LOWBIT:
        raise ValueError(f"{label}: log8 scales flagged outside the low-bit mode")
    if flags & FLAG_SCALE_ZLIB and flags & QUANT_BITS != _QUANT_LOWBIT:
        raise ValueError(f"{label}: compressed scales flagged outside the low-bit mode")
    for zlib_flag, rice_flag, rows_flag, key in (
        (FLAG_MASK_ZLIB, FLAG_MASK_RICE, FLAG_MASK_ROWS, KEY_MASK),
        (FLAG_SELECT_ZLIB, FLAG_SELECT_RICE, FLAG_SELECT_ROWS, KEY_SELECT),
    ):
        if flags & zlib_flag and flags & rice_flag:
            raise ValueError(f"{label}: stream {key!r} flagged both zlib and Rice")
        if flags & rows_flag and not flags & rice_flag:
            raise ValueError(f"{label}: stream {key!r} flagged row-segmented but not Rice")
    if not 0 <= n_tensors <= (len(meta) - _META_HEAD) // _TENSOR_HEAD:
        raise ValueError(f"{label}: {n_tensors} tensors do not fit its {len(meta)} entries")
    names = _parse_names(payload, n_tensors)
    quant = flags & QUANT_BITS
    block = _block_of(flags)
    entries: list[_Entry] = []
    pos = _META_HEAD
    n_values = n_scales = n_bits = n_select = 0
    for name in names:
        where = f"{label}, tensor {name!r}"
        if pos + _TENSOR_HEAD > len(meta):
            raise ValueError(f"{where}: truncated entry")
        tflags, kept, ndim = meta[pos : pos + _TENSOR_HEAD]
        pos += _TENSOR_HEAD
        if ndim < 0 or pos + ndim > len(meta):
            raise ValueError(f"{where}: ndim {ndim} does not match the length of {KEY_META!r}")
        shape = tuple(meta[pos : pos + ndim])
        pos += ndim
        if any(d < 0 for d in shape):
            raise ValueError(f"{where}: negative dimension in shape {shape}")
        if tflags & ~_TENSOR_FLAGS:
            raise ValueError(f"{where}: unknown tensor flags {tflags:#x}")
        if (tflags & QUANT_BITS) != _effective_quant(quant, ndim):
            raise ValueError(
                f"{where}: quantization mode {tflags & QUANT_BITS} does not follow the "
                f"payload's mode {quant} for ndim {ndim}"
            )
        if tflags & FLAG_MASK_SENT and not tflags & FLAG_MASKED:
            raise ValueError(f"{where}: mask sent for a dense tensor")
        size = math.prod(shape)
        candidates = 0
        if tflags & FLAG_SELECTED:
            if pos >= len(meta):
                raise ValueError(f"{where}: truncated entry (no candidate count)")
            candidates = meta[pos]
            pos += 1
            if not 0 <= kept <= candidates <= size:
                raise ValueError(
                    f"{where}: {kept} values selected from {candidates} candidates of "
                    f"{size} entries"
                )
            if not tflags & FLAG_MASKED and candidates != size:
                raise ValueError(f"{where}: {candidates} candidates for a dense tensor")
            if kept % block not in (0, candidates % block):
                raise ValueError(
                    f"{where}: {kept} values are not whole blocks of {block} of {candidates} "
                    "candidates"
                )
        elif not 0 <= kept <= size or (not tflags & FLAG_MASKED and kept != size):
            raise ValueError(f"{where}: {kept} values for a tensor of {size} entries")
        entry = _Entry(
            name, tflags, kept, shape, n_values, n_scales, n_bits, candidates, n_select, block
        )
        entries.append(entry)
        n_values += kept
        n_scales += entry.n_scales
        n_bits += entry.n_bits
        n_select += entry.n_select_bits
    if pos != len(meta):
        raise ValueError(f"{label} has {len(meta) - pos} trailing entries")
    if flags & (FLAG_MASK_ZLIB | FLAG_MASK_RICE) and not any(
        e.flags & FLAG_MASK_SENT for e in entries
    ):
        raise ValueError(f"{label}: compressed mask flagged but no mask sent")
    selected = [bool(e.flags & FLAG_SELECTED) for e in entries]
    if any(selected) and not all(selected):
        raise ValueError(f"{label}: top-k selection flagged for some tensors only")
    if flags & (FLAG_SELECT_ZLIB | FLAG_SELECT_RICE) and not any(selected):
        raise ValueError(f"{label}: compressed selection flagged but nothing selected")
    if block > 1 and not any(selected):
        raise ValueError(f"{label}: selection blocks of {block} flagged but nothing selected")
    layout = _Layout(flags, entries, n_values, n_scales, n_bits, n_select)
    expected = layout.expected_keys()
    missing = [key for key in expected if key not in payload]
    if missing:
        raise ValueError(f"payload is missing keys {missing}")
    extra = [key for key in payload if key not in expected]
    if extra:
        raise ValueError(f"payload has unexpected keys {extra}")
    return layout


def _read_stream(
    key: str, arr: np.ndarray, dtype: np.dtype, length: int, compressed: bool
) -> np.ndarray:
    """Validate one stream (decompressing it if flagged) and return it as ``dtype``."""
    if not compressed:
        _check_stream(_label(key), arr, dtype, length)
        return arr
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{_label(key)} is flagged zlib but is not a 1-D uint8 array")
    return _from_byte_planes(_inflate(key, arr, length * dtype.itemsize), dtype)


@dataclass(frozen=True)
class _Positions:
    """The set bits of a decoded ``mask`` or ``select`` stream, read per tensor segment.

    A bitmap stays unpacked (``bitmap``) and each segment is searched on its own; a Rice code
    decodes straight to the sorted flat positions of every segment (``flat``).
    """

    bitmap: NDArray[np.bool_] | None = None
    flat: NDArray[np.int64] | None = None

    def segment(self, start: int, count: int) -> NDArray[np.int64]:
        """Return the set positions in ``[start, start + count)``, relative to ``start``."""
        if self.bitmap is not None:
            return np.flatnonzero(self.bitmap[start : start + count])
        assert self.flat is not None
        lo, hi = np.searchsorted(self.flat, (start, start + count))
        return self.flat[lo:hi] - start


def _read_positions(
    payload: Mapping[str, np.ndarray], key: str, layout: _Layout
) -> _Positions | None:
    """Validate a bit stream (``mask`` or ``select``) and return its set bits.

    ``None`` when the payload has none. A Rice-coded stream is decoded straight into sorted
    positions (at most the declared number of bits), a bitmap is unpacked once.
    """
    if key not in payload:
        return None
    kinds = _STREAM_FLAGS[key]
    n_bits = layout.n_bits if key == KEY_MASK else layout.n_select
    if layout.flags & kinds["rice-rows"] == kinds["rice-rows"]:
        rows = _position_rows(layout.entries, key)
        segments = row_segments(layout.position_counts(key), rows)
        return _Positions(flat=rice_rows_decode(_label(key), payload[key], segments))
    if layout.flags & kinds["rice"]:
        return _Positions(flat=rice_decode(_label(key), payload[key], layout.position_counts(key)))
    compressed = bool(layout.flags & kinds["zlib"])
    bits = _read_stream(key, payload[key], np.dtype(np.uint8), (n_bits + 7) // 8, compressed)
    _check_padding(_label(key), bits, n_bits)
    return _Positions(bitmap=np.unpackbits(bits, count=n_bits).view(np.bool_))


def _mask_index(
    entry: _Entry, bits: _Positions | None, masks: Mapping[str, np.ndarray] | None
) -> NDArray[np.int64]:
    """Return the kept flat indices of a sparse tensor: from the payload if sent, else ``masks``."""
    if entry.flags & FLAG_MASK_SENT:
        assert bits is not None  # the key set was checked
        return bits.segment(entry.bit_start, entry.size)
    if masks is None or entry.name not in masks:
        raise ValueError(
            f"tensor {entry.name!r} was encoded without its mask bits; "
            f"pass masks={{{entry.name!r}: ...}}"
        )
    return np.flatnonzero(_check_mask(entry.name, masks[entry.name], entry.shape))


def _decode_entry(
    entry: _Entry,
    stream: np.ndarray,
    scales: NDArray[np.float32] | None,
    bits: _Positions | None,
    masks: Mapping[str, np.ndarray] | None,
    select: _Positions | None = None,
    out: NDArray[np.float32] | None = None,
) -> SparseTensor:
    """Decode one tensor from its slices of the (validated) streams into fresh float32 memory.

    With ``out`` (flat float32 of the tensor's size) the tensor is written there, dense. A
    sparse int8 tensor is then dequantized with its zeros: its codes are scattered into a
    dense int8 array (a quarter of a float32 scatter's memory traffic) and multiplied by the
    steps row by row, without expanding the steps to every entry.
    """
    data = stream[entry.value_start : entry.value_start + entry.n_values]
    flat_idx = _positions(entry, bits, masks, select)
    if scales is None:
        # Copy: the result must not alias (possibly read-only) payload memory.
        return _placed(SparseTensor(entry.shape, flat_idx, data.astype(np.float32)), out)
    step = scales[entry.scale_start : entry.scale_start + entry.n_scales]
    channel = entry.mode == _QUANT_CHANNEL
    if flat_idx is None:
        return SparseTensor.from_dense(_dequantize(data, step, entry.shape, channel, out=out))
    if out is not None:
        codes = np.zeros(entry.size, dtype=np.int8)
        codes[flat_idx] = data
        return SparseTensor.from_dense(_dequantize(codes, step, entry.shape, channel, out=out))
    values = data.astype(np.float32)
    if values.size and channel:
        values *= np.repeat(step, _row_counts(flat_idx, entry.shape))
    elif values.size:
        values *= step[0]
    return SparseTensor(entry.shape, flat_idx, values)


def _placed(tensor: SparseTensor, out: NDArray[np.float32] | None) -> SparseTensor:
    """Return ``tensor``, or, given ``out``, the tensor written densely into ``out``."""
    return tensor if out is None else SparseTensor.from_dense(tensor.dense(out=out))


def _outputs(entries: list[_Entry]) -> list[NDArray[np.float32]]:
    """One fresh float32 buffer for every tensor of a dense decode, a flat view per tensor.

    One large allocation is backed by huge pages where the kernel allows it: writing it costs
    about half as much as writing a fresh array per tensor (ResNet-18: 6.7 against 12.6 ms).
    """
    buffer = np.empty(sum(entry.size for entry in entries), dtype=np.float32)
    ends = np.cumsum([entry.size for entry in entries], dtype=np.int64).tolist()
    return [buffer[end - entry.size : end] for entry, end in zip(entries, ends, strict=True)]


def _positions(
    entry: _Entry,
    bits: _Positions | None,
    masks: Mapping[str, np.ndarray] | None,
    select: _Positions | None,
) -> NDArray[np.int64] | None:
    """Return the sorted flat indices of a tensor's transmitted entries (``None``: all)."""
    flat_idx: NDArray[np.int64] | None = None
    if entry.flags & FLAG_MASKED:
        flat_idx = _mask_index(entry, bits, masks)
    if entry.flags & FLAG_SELECTED:
        assert select is not None  # the key set was checked
        candidates = entry.size if flat_idx is None else flat_idx.size
        if candidates != entry.n_candidates:
            raise ValueError(
                f"tensor {entry.name!r}: selection over {entry.n_candidates} candidates but the "
                f"mask keeps {candidates}"
            )
        chosen = select.segment(entry.select_start, entry.n_select_bits)
        if entry.block > 1:
            chosen = (chosen[:, None] * entry.block + np.arange(entry.block)).reshape(-1)
            chosen = chosen[chosen < candidates]
        flat_idx = chosen if flat_idx is None else flat_idx[chosen]
    if flat_idx is not None and flat_idx.size != entry.n_values:
        raise ValueError(
            f"tensor {entry.name!r}: {entry.n_values} transmitted values but the mask "
            f"{'and selection ' if entry.flags & FLAG_SELECTED else ''}keeps {flat_idx.size}"
        )
    return flat_idx


def decode(
    payload: Mapping[str, np.ndarray],
    *,
    masks: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """Decode a payload produced by :func:`encode` into float32 tensors.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        The payload (e.g. read back from a Flower ``ArrayRecord``).
    masks : Mapping[str, np.ndarray], optional
        Boolean masks of the sparse tensors whose mask bits the payload does not carry
        (``send_masks=False``). Masks carried by the payload take precedence; masks of tensors
        the payload sends dense are ignored.
    shapes : Mapping[str, tuple[int, ...]], optional
        The tensors the receiver expects, in order. When given, the payload's names and shapes
        must match exactly, checked before anything is allocated (a payload cannot make the
        receiver allocate more than the model it expects).

    Returns
    -------
    dict[str, np.ndarray]
        float32 tensors in payload order; pruned entries are exactly ``0.0``. The arrays are
        fresh memory (never views of the payload).

    Raises
    ------
    ValueError
        If the payload is malformed: an unknown or missing key, a wrong dtype or length, names
        that do not match ``meta``, codes that do not match the mask popcount, the code
        ``-128``, a non-finite or non-positive scale, a corrupt zlib stream or trailing bytes, or
        a missing or wrongly shaped mask.
    """
    decoded = _decode(payload, masks, shapes, dense=True)
    return {name: tensor.dense() for name, tensor in decoded.items()}  # dense already: reshapes


def decode_sparse(
    payload: Mapping[str, np.ndarray],
    *,
    masks: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, SparseTensor]:
    """Decode a payload into its transmitted entries, one :class:`SparseTensor` per tensor.

    The same checks and arguments as :func:`decode` (which is this followed by
    :meth:`SparseTensor.dense`); the zeros of a pruned or top-k tensor are never allocated.
    """
    return _decode(payload, masks, shapes, dense=False)


def _decode(
    payload: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray] | None,
    shapes: Mapping[str, tuple[int, ...]] | None,
    *,
    dense: bool,
) -> dict[str, SparseTensor]:
    """:func:`decode_sparse`; ``dense``: every tensor comes back dense, in one fresh buffer."""
    payload = _open(payload)
    layout = _parse_layout(payload)
    if shapes is not None:
        got = [(entry.name, entry.shape) for entry in layout.entries]
        want = [(name, tuple(shape)) for name, shape in shapes.items()]
        if got != want:
            raise ValueError(f"payload tensors {got} differ from the expected {want}")
    compressed = bool(layout.flags & FLAG_CODES_ZLIB)
    scales: NDArray[np.float32] | None = None
    outs: list[NDArray[np.float32] | None] = [None] * len(layout.entries)
    if dense:
        outs = list(_outputs(layout.entries))
    if layout.quant == _QUANT_NONE:
        stream = _read_stream(
            KEY_VALUES, payload[KEY_VALUES], _VALUES_DTYPE, layout.n_values, compressed
        )
        if not np.isfinite(stream).all():
            raise ValueError(f"{_label(KEY_VALUES)} has NaN or inf")
    elif layout.quant == _QUANT_LOWBIT:
        return _decode_lowbit(payload, layout, masks, outs)
    else:
        stream = _read_stream(
            KEY_CODES, payload[KEY_CODES], np.dtype(np.int8), layout.n_values, compressed
        )
        if stream.size and stream.min() < -QMAX:
            raise ValueError(f"{_label(KEY_CODES)} has the code -128")
        scales = _check_scales(_label(KEY_SCALE), payload[KEY_SCALE], layout.n_scales)
    bits = _read_positions(payload, KEY_MASK, layout)
    select = _read_positions(payload, KEY_SELECT, layout)
    return {
        entry.name: _decode_entry(entry, stream, scales, bits, masks, select, out)
        for entry, out in zip(layout.entries, outs, strict=True)
    }


def _open(payload: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Check the key set; unpack a blob payload into its streams."""
    if isinstance(payload, Mapping) and is_blob(payload):
        payload = unpack_blob(payload)
    _check_keys(payload)
    return payload


def _decode_lowbit(
    payload: Mapping[str, np.ndarray],
    layout: _Layout,
    masks: Mapping[str, np.ndarray] | None,
    outs: list[NDArray[np.float32] | None],
) -> dict[str, SparseTensor]:
    """Decode an int4 or ternary payload: positions first, then codes and per-row scales."""
    ternary = bool(layout.flags & FLAG_TERNARY)
    label = _label(KEY_CODES)
    packed = _read_stream(
        KEY_CODES,
        payload[KEY_CODES],
        np.dtype(np.uint8),
        _packed_codes_len(layout.n_values, ternary=ternary),
        bool(layout.flags & FLAG_CODES_ZLIB),
    )
    codes = _unpack_codes(label, packed, layout.n_values, ternary=ternary)
    bits = _read_positions(payload, KEY_MASK, layout)
    select = _read_positions(payload, KEY_SELECT, layout)
    placed = []
    n_rows = 0
    for entry in layout.entries:
        flat_idx = _positions(entry, bits, masks, select)
        counts = _row_counts(flat_idx, entry.shape)
        placed.append((entry, flat_idx, counts, n_rows))
        n_rows += int(np.count_nonzero(counts))
    fmt: ScaleFormat = "log8" if layout.flags & FLAG_SCALES_LOG8 else "float16"
    scale_stream = payload[KEY_SCALE]
    if layout.flags & FLAG_SCALE_ZLIB:
        dtype: np.dtype = np.dtype(np.float16 if fmt == "float16" else np.uint8)
        length = n_rows if fmt == "float16" else (4 + n_rows if n_rows else 0)
        scale_stream = _read_stream(KEY_SCALE, scale_stream, dtype, length, compressed=True)
    scales = _read_steps(_label(KEY_SCALE), scale_stream, n_rows, fmt)
    out: dict[str, SparseTensor] = {}
    for (entry, flat_idx, counts, start), dense_out in zip(placed, outs, strict=True):
        step = scales[start : start + int(np.count_nonzero(counts))]
        data = codes[entry.value_start : entry.value_start + entry.n_values]
        values = _dequantize_lowbit(data, counts, step)
        out[entry.name] = _placed(SparseTensor(entry.shape, flat_idx, values), dense_out)
    return out


def payload_masks(payload: Mapping[str, np.ndarray]) -> dict[str, NDArray[np.bool_]]:
    """Return the masks carried in a payload (tensors encoded sparse with ``send_masks``).

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        An encoded payload.

    Returns
    -------
    dict[str, np.ndarray]
        ``name -> bool mask`` in payload order; empty when no mask bits were sent.

    Raises
    ------
    ValueError
        If the key set, ``meta``, ``names`` or the mask stream is malformed.
    """
    payload = _open(payload)
    layout = _parse_layout(payload)
    bits = _read_positions(payload, KEY_MASK, layout)
    masks: dict[str, NDArray[np.bool_]] = {}
    for entry in layout.entries:
        if entry.flags & FLAG_MASK_SENT:
            mask = np.zeros(entry.size, dtype=np.bool_)
            mask[_mask_index(entry, bits, None)] = True
            masks[entry.name] = mask.reshape(entry.shape)
    return masks


def residual(
    update: Mapping[str, np.ndarray],
    payload: Mapping[str, np.ndarray],
    *,
    masks: Mapping[str, np.ndarray] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """Error-feedback residual ``update - decode(payload)`` (float32).

    Parameters
    ----------
    update : Mapping[str, np.ndarray]
        The tensors that were encoded into ``payload``.
    payload : Mapping[str, np.ndarray]
        ``encode(update, ...)``.
    masks : Mapping[str, np.ndarray], optional
        Passed to :func:`decode` (needed when the mask bits were not sent).

    Returns
    -------
    dict[str, np.ndarray]
        Per tensor, ``update - decode(payload)``; at pruned entries this is the update itself.

    Raises
    ------
    ValueError
        If the tensor names or shapes of ``update`` and ``payload`` differ, or the payload is
        malformed.
    """
    decoded = decode(payload, masks=masks)
    if list(decoded) != list(update):
        raise ValueError(f"update tensors {list(update)} differ from the payload's {list(decoded)}")
    out: dict[str, NDArray[np.float32]] = {}
    for name, dec in decoded.items():
        u = _as_float32(name, update[name])
        if u.shape != dec.shape:
            raise ValueError(f"update {name!r} has shape {u.shape}, payload has {dec.shape}")
        out[name] = np.subtract(u, dec, out=dec)
    return out
