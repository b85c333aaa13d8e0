"""Encode named tensors into a payload."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from fedprune.codec.bits import _pack_bits_at, _pack_codes
from fedprune.codec.container import pack_blob
from fedprune.codec.entropy import _maybe_deflate, _smallest_positions
from fedprune.codec.format import (
    _QUANT_CHANNEL,
    _QUANT_LOWBIT,
    _QUANT_NONE,
    _QUANT_OF,
    _STREAM_FLAGS,
    FLAG_CODES_ZLIB,
    FLAG_MASK_SENT,
    FLAG_MASKED,
    FLAG_SCALE_ZLIB,
    FLAG_SCALES_LOG8,
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
    CodecConfig,
    Payload,
    RoundingMode,
    _as_float32,
    _block_flags,
    _check_mask,
    _check_name,
    _effective_quant,
    _Entry,
    _names_array,
    _position_counts,
    _position_rows,
)
from fedprune.codec.quant import (
    _lowbit_codes,
    _lowbit_magnitudes,
    _quantize_dense,
    _quantize_masked_channels,
    _quantize_masked_tensor,
    _round_steps,
)
from fedprune.masks import topk_flat


def encode(
    tensors: Mapping[str, np.ndarray],
    config: CodecConfig,
    *,
    masks: Mapping[str, np.ndarray] | None = None,
    send_masks: bool = True,
    rng: np.random.Generator | None = None,
) -> Payload:
    """Encode named tensors into a flat payload (see the module docstring for the layout).

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray]
        Real-valued tensors (converted to float32) in wire order. Entries that are kept must be
        finite; pruned entries are never read. Names may not contain a newline.
    config : CodecConfig
        Quantization mode, rounding and entropy stage.
    masks : Mapping[str, np.ndarray], optional
        Boolean masks (``True`` = kept) for a subset of ``tensors``, same shapes. Those tensors
        are sent sparse: only the kept entries, in C order.
    send_masks : bool
        Put the bit-packed masks into the payload. With ``False`` the receiver must pass the
        same masks to :func:`decode`.
    rng : np.random.Generator, optional
        Noise for stochastic rounding; required when ``config.rounding == "stochastic"`` and
        ``config.quant != "none"``.

    Returns
    -------
    Payload
        ``{"meta", "names", "codes", "scale" | "values", ["mask"]: array}``: a fixed set of
        arrays whatever the number of tensors.

    Raises
    ------
    ValueError
        On a kept NaN/inf entry, a non-real dtype, a tensor name that is not a ``str`` or
        contains a newline, a mask that is not bool, has the wrong shape or names an unknown
        tensor, or a missing ``rng``.
    """
    if not isinstance(config, CodecConfig):
        raise ValueError(f"config must be a CodecConfig, got {type(config).__name__}")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping, got {type(tensors).__name__}")
    if config.rounding == "stochastic" and config.quant != "none" and rng is None:
        raise ValueError("rng is required for stochastic rounding")
    masks = {} if masks is None else masks
    unknown = [name for name in masks if name not in tensors]
    if unknown:
        raise ValueError(f"masks name tensors that are not encoded: {sorted(unknown)}")
    quant = _QUANT_OF[config.quant]
    ternary = config.quant == "ternary"

    block = config.topk_block
    model_topk = (
        _select_topk_model(tensors, masks, config.topk, block)
        if config.topk < 1.0 and config.topk_scope == "model"
        else None
    )

    # Pass 1: validate, and lay the tensors out in the streams (popcounts are cheap).
    entries: list[_Entry] = []
    arrays: list[NDArray[np.float32]] = []
    tensor_masks: list[NDArray[np.bool_] | None] = []
    selections: list[NDArray[np.bool_] | None] = []
    n_values = n_scales = n_bits = n_select = 0
    for name, tensor in tensors.items():
        x = _as_float32(_check_name(name), tensor)
        flags = _effective_quant(quant, x.ndim)
        mask = masks.get(name)
        if mask is None:
            kept = x.size
        else:
            mask = _check_mask(name, mask, x.shape)
            flags |= FLAG_MASKED | (FLAG_MASK_SENT if send_masks else 0)
            kept = int(np.count_nonzero(mask))
        candidates, selection = kept, None
        if config.topk < 1.0:
            if model_topk is not None:
                selection = model_topk[name]
            else:
                selection = _select_topk(name, x, mask, config.topk, block)
            flags |= FLAG_SELECTED
            kept = _block_entries(selection, block, candidates)
        entry = _Entry(
            name, flags, kept, x.shape, n_values, n_scales, n_bits, candidates, n_select, block
        )
        entries.append(entry)
        arrays.append(x)
        tensor_masks.append(mask)
        selections.append(selection)
        n_values += entry.n_values
        n_scales += entry.n_scales
        n_bits += entry.n_bits
        n_select += entry.n_select_bits

    # Pass 2: quantize (or copy) every tensor straight into its slice of the streams.
    stream: np.ndarray
    scales: np.ndarray | None = None
    lowbit: list[tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int8]]] = []
    lowbit_steps: list[NDArray[np.float32]] = []
    if quant == _QUANT_NONE:
        stream = np.empty(n_values, dtype=np.float32)
    else:
        stream = np.empty(n_values, dtype=np.int8)
        scales = np.empty(n_scales, dtype=np.float32)
    bits = np.zeros((n_bits + 7) // 8, dtype=np.uint8) if send_masks and masks else None
    select = np.zeros((n_select + 7) // 8, dtype=np.uint8) if config.topk < 1.0 else None
    for entry, x, mask, selection in zip(entries, arrays, tensor_masks, selections, strict=True):
        sent = mask
        if selection is not None:
            assert select is not None
            _pack_bits_at(select, entry.select_start, selection)
            chosen = np.repeat(selection, block)[: entry.n_candidates] if block > 1 else selection
            sent = _selected_mask(x.shape, mask, chosen)
        out = stream[entry.value_start : entry.value_start + entry.n_values]
        if scales is None:
            _copy_values(entry.name, x, sent, out)
        elif quant == _QUANT_LOWBIT:
            vals, filled, steps = _lowbit_magnitudes(entry.name, x, sent, ternary)
            lowbit.append((vals, filled, out))
            lowbit_steps.append(steps)
        else:
            scale_out = scales[entry.scale_start : entry.scale_start + entry.n_scales]
            _quantize_into(entry, x, sent, config.rounding, rng, out, scale_out)
        if bits is not None and mask is not None:
            _pack_bits_at(bits, entry.bit_start, mask.reshape(-1))

    flags = quant | (_block_flags(block) if config.topk < 1.0 else 0)
    if quant == _QUANT_LOWBIT:
        # The steps of every row are rounded together (log8 scales share one reference), then
        # the codes are computed against the rounded steps.
        steps = np.concatenate(lowbit_steps) if lowbit_steps else np.zeros(0, np.float32)
        scales, rounded = _round_steps(steps, config.scales)
        start = 0
        for vals, filled, out in lowbit:
            step = rounded[start : start + filled.size]
            _lowbit_codes(vals, filled, step, ternary, config.rounding, rng, out)
            start += filled.size
        flags |= FLAG_TERNARY if ternary else 0
        flags |= FLAG_SCALES_LOG8 if config.scales == "log8" else 0
        stream = _pack_codes(stream, ternary=ternary)
        if config.entropy:
            scales, compressed = _maybe_deflate(scales)
            flags |= FLAG_SCALE_ZLIB if compressed else 0
    if config.entropy:
        stream, compressed = _maybe_deflate(stream)
        flags |= FLAG_CODES_ZLIB if compressed else 0
        if bits is not None:
            counts = _position_counts(entries, KEY_MASK)
            rows = _position_rows(entries, KEY_MASK)
            bits, kind = _smallest_positions(bits, n_bits, counts, rows)
            flags |= _STREAM_FLAGS[KEY_MASK][kind]
        if select is not None:
            counts = _position_counts(entries, KEY_SELECT)
            rows = _position_rows(entries, KEY_SELECT)
            select, kind = _smallest_positions(select, n_select, counts, rows)
            flags |= _STREAM_FLAGS[KEY_SELECT][kind]

    meta: list[int] = [FORMAT_VERSION, flags, len(entries)]
    for entry in entries:
        meta += entry.meta
    payload: Payload = {
        KEY_META: np.array(meta, dtype=np.int64),
        KEY_NAMES: _names_array([entry.name for entry in entries]),
    }
    if scales is None:
        payload[KEY_VALUES] = stream
    else:
        payload[KEY_CODES] = stream
        payload[KEY_SCALE] = scales
    if select is not None:
        payload[KEY_SELECT] = select
    if bits is not None:
        payload[KEY_MASK] = bits
    return pack_blob(payload) if config.container == "blob" else payload


def _candidate_magnitudes(
    name: str, x: NDArray[np.float32], mask: NDArray[np.bool_] | None, block: int
) -> NDArray[np.float32]:
    """Return ``|x|`` of a tensor's candidates (C order), summed over blocks of ``block``."""
    candidates = x.reshape(-1) if mask is None else x.reshape(-1)[mask.reshape(-1)]
    magnitude = np.abs(candidates)
    if not np.isfinite(magnitude).all():
        raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")
    if block == 1:
        return magnitude
    return (
        np.add.reduceat(magnitude, np.arange(0, magnitude.size, block))
        if magnitude.size
        else magnitude
    )


def _block_entries(selection: NDArray[np.bool_], block: int, candidates: int) -> int:
    """Return the candidates that the selected blocks hold (the last block may be short)."""
    n = int(np.count_nonzero(selection)) * block
    if selection.size and selection[-1] and candidates % block:
        n -= block - candidates % block
    return n


def _select_topk(
    name: str, x: NDArray[np.float32], mask: NDArray[np.bool_] | None, topk: float, block: int
) -> NDArray[np.bool_]:
    """Return, per candidate block of ``x`` (C order), whether it is among the top-k."""
    magnitude = _candidate_magnitudes(name, x, mask, block)
    # Linear-time selection; equal magnitudes go to the lower index, the same on every machine.
    return topk_flat(magnitude, math.ceil(topk * magnitude.size))


def _select_topk_model(
    tensors: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], topk: float, block: int
) -> dict[str, NDArray[np.bool_]]:
    """Return per tensor which candidate blocks are among the top-k of all tensors' blocks.

    Called before the per-tensor checks of :func:`encode`, so it validates what it reads.
    """
    names, magnitudes = [], []
    for name, tensor in tensors.items():
        x = _as_float32(_check_name(name), tensor)
        mask = masks.get(name)
        if mask is not None:
            mask = _check_mask(name, mask, x.shape)
        names.append(name)
        magnitudes.append(_candidate_magnitudes(name, x, mask, block))
    every = np.concatenate(magnitudes) if magnitudes else np.zeros(0, np.float32)
    chosen = topk_flat(every, math.ceil(topk * every.size))
    ends = np.cumsum([m.size for m in magnitudes])
    return dict(zip(names, np.split(chosen, ends[:-1]), strict=True))


def _selected_mask(
    shape: tuple[int, ...], mask: NDArray[np.bool_] | None, selection: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Expand a selection over candidate entries to a mask over the whole tensor."""
    if mask is None:
        return selection.reshape(shape)
    out = np.zeros(math.prod(shape), dtype=np.bool_)
    out[np.flatnonzero(mask)[selection]] = True
    return out.reshape(shape)


def _copy_values(
    name: str, x: NDArray[np.float32], mask: NDArray[np.bool_] | None, out: NDArray[np.float32]
) -> None:
    """Copy the kept entries of ``x`` (all of them without a mask) into ``out``."""
    if mask is None:
        out[...] = x.reshape(-1)
    else:
        # mode="clip": indices are in range by construction, and "raise" would buffer ``out``.
        np.take(x.reshape(-1), np.flatnonzero(mask), out=out, mode="clip")
    if not np.isfinite(out).all():
        raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")


def _quantize_into(
    entry: _Entry,
    x: NDArray[np.float32],
    mask: NDArray[np.bool_] | None,
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    codes: NDArray[np.int8],
    scales: NDArray[np.float32],
) -> None:
    """Quantize one tensor (its kept entries under ``mask``) into its stream slices."""
    per_channel = entry.mode == _QUANT_CHANNEL
    if mask is None:
        _quantize_dense(entry.name, x, per_channel, rounding, rng, codes, scales)
    elif per_channel:
        _quantize_masked_channels(entry.name, x, mask, rounding, rng, codes, scales)
    else:
        _quantize_masked_tensor(entry.name, x, mask, rounding, rng, codes, scales)
