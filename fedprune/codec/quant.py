"""Quantization kernels: int8 per tensor or per output channel, int4 and ternary per row."""

from __future__ import annotations

import math
from typing import Final, get_args

import numpy as np
from numpy.typing import NDArray

from fedprune.codec.format import (
    _BLOCK,
    _F32_ONE,
    _F32_QMAX,
    _F32_TINY,
    _MAX_SCALE,
    _QUANT_CHANNEL,
    _QUANT_TENSOR,
    LOG8_STEPS,
    LOG8_ZERO,
    QMAX4,
    RoundingMode,
    ScaleFormat,
    _as_float32,
    _n_scales,
)


def _scales_from_absmax(
    absmax: NDArray[np.float32],
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return ``(scale, 1 / scale)`` for per-group absolute maxima.

    ``scale = absmax / 127``; a group whose scale would be zero or subnormal (all zeros, no
    entries, or magnitudes below ``127 * tiny``) gets ``1.0``, so every scale is a finite,
    normal, positive float32 and ``1 / scale`` is finite. Near the top of the float32 range the
    scale is capped (by an ulp) so that ``127 * scale`` stays finite.
    """
    scale = np.divide(absmax, _F32_QMAX, dtype=np.float32)
    scale[~(scale >= _F32_TINY)] = _F32_ONE
    np.minimum(scale, _MAX_SCALE, out=scale)
    return scale, np.divide(_F32_ONE, scale, dtype=np.float32)


def _check_absmax(name: str, absmax: NDArray[np.float32]) -> None:
    """Raise if a reduction met NaN or inf (both propagate into the maxima)."""
    if absmax.size and not np.isfinite(absmax).all():
        raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")


def _absmax_rows(x2d: NDArray[np.float32]) -> NDArray[np.float32]:
    """Per-row ``max |x|`` of a C-ordered 2-D array (two read-only SIMD reductions)."""
    if x2d.shape[1] == 0:
        return np.zeros(x2d.shape[0], dtype=np.float32)
    return np.maximum(x2d.max(axis=1), -x2d.min(axis=1))


def _absmax_segments(values: NDArray[np.float32], bounds: NDArray[np.int64]) -> NDArray[np.float32]:
    """Per-segment ``max |values|``; segment ``c`` is ``values[bounds[c]:bounds[c + 1]]``."""
    n_seg = bounds.size - 1
    absmax = np.zeros(n_seg, dtype=np.float32)
    filled = bounds[1:] > bounds[:-1]
    starts = bounds[:-1][filled]
    if starts.size:
        # Empty segments are dropped from ``starts`` so that consecutive starts delimit
        # exactly the non-empty segments (``reduceat`` misreads repeated indices).
        absmax[filled] = np.maximum(
            np.maximum.reduceat(values, starts), -np.minimum.reduceat(values, starts)
        )
    return absmax


def _round_to_int8(
    v: NDArray[np.float32],
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    out: NDArray[np.int8],
) -> None:
    """Round the flat scaled values ``v`` (overwritten) to int8 codes in ``[-127, 127]``.

    With nearest rounding ``|v| <= 127 * (1 + 3 eps)`` by construction of the scales, so
    ``rint`` never leaves the range. Stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``, is
    unbiased and is clipped (the clip only touches ``|v|`` within a few ulp of 127). The codes
    are written into ``out`` (same length as ``v``), e.g. a slice of the payload's stream.
    """
    if rounding == "nearest":
        np.rint(v, out=out, casting="unsafe")  # one pass, no float32 intermediate
        return
    if rng is None:
        raise ValueError("rng is required for stochastic rounding")
    v += rng.random(v.shape, dtype=np.float32)
    np.floor(v, out=v)
    np.clip(v, -_F32_QMAX, _F32_QMAX, out=v)
    np.copyto(out, v, casting="unsafe")


def _rows_per_block(per_row: int) -> int:
    """Rows of ``per_row`` entries that make one block of about :data:`_BLOCK` entries."""
    return max(1, _BLOCK // max(per_row, 1))


def _quantize_dense(
    name: str,
    x: NDArray[np.float32],
    per_channel: bool,
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    codes: NDArray[np.int8],
    scales: NDArray[np.float32],
) -> None:
    """Quantize a whole tensor into ``codes`` (flat, C order) and ``scales``.

    ``x`` is not modified; ``codes`` has ``x.size`` entries and ``scales`` ``x.shape[0]`` per
    channel, else 1. Scaling and rounding run block by block, so the float32 temporary stays
    in cache.
    """
    rows = x.shape[0] if per_channel else 1
    per_row = math.prod(x.shape[1:]) if per_channel else x.size
    x2d = x.reshape(rows, per_row)
    absmax = _absmax_rows(x2d)
    if not per_channel:
        absmax = absmax.max(keepdims=True) if absmax.size else np.zeros(1, np.float32)
    _check_absmax(name, absmax)
    scale, inv = _scales_from_absmax(absmax)
    scales[...] = scale
    if per_channel:
        codes2d = codes.reshape(rows, per_row)
        step = _rows_per_block(per_row)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            v = np.multiply(x2d[r0:r1], inv[r0:r1, None], dtype=np.float32)
            _round_to_int8(v.reshape(-1), rounding, rng, codes2d[r0:r1].reshape(-1))
    else:
        flat = x2d.reshape(-1)
        for start in range(0, flat.size, _BLOCK):
            v = np.multiply(flat[start : start + _BLOCK], inv[0], dtype=np.float32)
            _round_to_int8(v, rounding, rng, codes[start : start + _BLOCK])


def _quantize_masked_channels(
    name: str,
    x: NDArray[np.float32],
    mask: NDArray[np.bool_],
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    codes: NDArray[np.int8],
    scales: NDArray[np.float32],
) -> None:
    """Quantize the kept entries of ``x`` (``ndim >= 2``) per output channel into ``codes``.

    Runs over blocks of whole rows: gather the kept entries, per-row absmax, scale and round,
    so the indices and the gathered values of a block stay in cache. ``codes`` has
    ``mask.sum()`` entries, ``scales`` ``x.shape[0]``.
    """
    rows, per_row = x.shape[0], math.prod(x.shape[1:])
    x2d = x.reshape(rows, per_row)
    m2d = mask.reshape(rows, per_row)
    step = _rows_per_block(per_row)
    edges = np.arange(step + 1, dtype=np.int64) * per_row
    offset = 0
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        flat_idx = np.flatnonzero(m2d[r0:r1])
        kept = x2d[r0:r1].reshape(-1).take(flat_idx)  # a fresh buffer, ours to overwrite
        bounds = np.searchsorted(flat_idx, edges[: r1 - r0 + 1]).astype(np.int64, copy=False)
        absmax = _absmax_segments(kept, bounds)
        _check_absmax(name, absmax)
        scale, inv = _scales_from_absmax(absmax)
        scales[r0:r1] = scale
        kept *= np.repeat(inv, np.diff(bounds))
        _round_to_int8(kept, rounding, rng, codes[offset : offset + kept.size])
        offset += kept.size


def _quantize_masked_tensor(
    name: str,
    x: NDArray[np.float32],
    mask: NDArray[np.bool_],
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    codes: NDArray[np.int8],
    scales: NDArray[np.float32],
) -> None:
    """Quantize the kept entries of ``x`` with one step size into ``codes`` and ``scales``."""
    kept = x.reshape(-1).take(np.flatnonzero(mask))  # a fresh buffer, ours to overwrite
    absmax = np.zeros(1, np.float32)
    if kept.size:
        absmax[0] = np.maximum(kept.max(), -kept.min())  # NaN propagates
    _check_absmax(name, absmax)
    scale, inv = _scales_from_absmax(absmax)
    scales[...] = scale
    kept *= inv[0]
    _round_to_int8(kept, rounding, rng, codes)


def quantize_int8(
    x: np.ndarray,
    *,
    per_channel: bool,
    rounding: RoundingMode = "nearest",
    rng: np.random.Generator | None = None,
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Symmetric int8 quantization of a dense tensor.

    Parameters
    ----------
    x : np.ndarray
        Real-valued tensor (converted to float32). All entries must be finite.
    per_channel : bool
        One step size per output channel (axis 0). Tensors with ``ndim < 2`` are quantized per
        tensor regardless.
    rounding : {"nearest", "stochastic"}
        Round to nearest or unbiased stochastic rounding.
    rng : np.random.Generator, optional
        Source of the stochastic rounding noise (required for ``"stochastic"``).

    Returns
    -------
    codes : np.ndarray
        int8 codes with the shape of ``x``, in ``[-127, 127]``.
    scales : np.ndarray
        float32 step sizes, shape ``(x.shape[0],)`` per channel else ``(1,)``; finite and
        ``> 0`` (``1.0`` for an all-zero channel). ``x ≈ codes * scales``.

    Raises
    ------
    ValueError
        If ``x`` has NaN/inf entries or a non-real dtype, or ``rng`` is missing when needed.
    """
    if rounding not in get_args(RoundingMode):
        raise ValueError(f"rounding must be one of {get_args(RoundingMode)}, got {rounding!r}")
    arr = _as_float32("x", x)
    mode = _QUANT_CHANNEL if per_channel and arr.ndim >= 2 else _QUANT_TENSOR
    codes = np.empty(arr.size, dtype=np.int8)
    scales = np.empty(_n_scales(mode, arr.shape), dtype=np.float32)
    _quantize_dense("x", arr, mode == _QUANT_CHANNEL, rounding, rng, codes, scales)
    return codes.reshape(arr.shape), scales


def dequantize_int8(
    codes: np.ndarray, scales: np.ndarray, *, per_channel: bool
) -> NDArray[np.float32]:
    """Inverse of :func:`quantize_int8`: ``codes * scales`` as float32.

    Parameters
    ----------
    codes : np.ndarray
        int8 codes.
    scales : np.ndarray
        float32 step sizes: ``(codes.shape[0],)`` when ``per_channel`` and ``codes.ndim >= 2``,
        else ``(1,)``.
    per_channel : bool
        Whether ``scales`` holds one step size per output channel (axis 0).

    Returns
    -------
    np.ndarray
        float32 tensor with the shape of ``codes``.

    Raises
    ------
    ValueError
        If a dtype or the number of scales is wrong, or a scale is not finite and positive.
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8:
        raise ValueError(f"codes must be an int8 array, got {getattr(codes, 'dtype', codes)}")
    channel = per_channel and codes.ndim >= 2
    checked = _check_scales("scales", scales, codes.shape[0] if channel else 1)
    return _dequantize(codes, checked, codes.shape, channel)


def _dequantize(
    codes: NDArray[np.int8],
    scales: NDArray[np.float32],
    shape: tuple[int, ...],
    per_channel: bool,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Return ``codes * scales`` as a float32 array of ``shape`` (codes in C order).

    Written into ``out`` (flat, float32, ``codes.size`` entries) if given, else fresh memory.
    """
    # A SIMD int8 -> float32 conversion, then an in-place multiply, is about twice as fast as a
    # mixed-dtype ``np.multiply(codes, scales, dtype=np.float32)``; done a block of rows at a
    # time, the multiply reads the converted block from cache (12 M codes in rows of 4608: 7.6
    # against 8.4 ms).
    if out is None:
        out = np.empty(codes.size, dtype=np.float32)
    rows = shape[0] if per_channel else 1
    per_row = codes.size // rows if rows else 0
    src = codes.reshape(rows, per_row)
    dst = out.reshape(rows, per_row)
    step = _rows_per_block(per_row)
    for start in range(0, rows, step):
        block = dst[start : start + step]
        np.copyto(block, src[start : start + step], casting="unsafe")
        block *= scales[start : start + step, None] if per_channel else scales[0]
    return out.reshape(shape)


def _check_scales(label: str, scales: object, expected: int) -> NDArray[np.float32]:
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.ndim != 1:
        raise ValueError(f"{label} must be a 1-D float32 array")
    if scales.size != expected:
        raise ValueError(f"{label} has {scales.size} scales, expected {expected}")
    if not ((scales > 0) & (scales <= _MAX_SCALE)).all():  # also rejects NaN
        raise ValueError(
            f"{label} has a non-finite or non-positive scale (or one so large that code 127 "
            "overflows float32)"
        )
    return scales


# -- Low-bit modes: int4 per row, ternary (sign x per-row magnitude), float16 or log8 scales ----
_F16_MAX: Final = np.float32(np.finfo(np.float16).max)
_F32_QMAX4: Final = np.float32(QMAX4)
_LOG8_TABLE: Final = np.append(
    (2.0 ** (-np.arange(LOG8_ZERO, dtype=np.float64) / LOG8_STEPS)).astype(np.float32),
    np.float32(0.0),
)
"""``2 ** (-code / LOG8_STEPS)`` per log-scale code; code :data:`LOG8_ZERO` is 0."""
_LOG8_MAX_REF: Final = np.float32(np.finfo(np.float32).max / 8)


def _lowbit_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, entries per row)`` of a tensor in low-bit mode (0-d and 1-D: one row)."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _row_counts(flat_idx: NDArray[np.int64] | None, shape: tuple[int, ...]) -> NDArray[np.int64]:
    """Return the transmitted entries per row (``flat_idx``: sorted flat indices; ``None``: all)."""
    rows, per_row = _lowbit_rows(shape)
    if flat_idx is None:
        return np.full(rows, per_row, dtype=np.int64)
    edges = np.arange(rows + 1, dtype=np.int64) * per_row
    return np.diff(np.searchsorted(flat_idx, edges)).astype(np.int64)


def _lowbit_magnitudes(
    name: str, x: NDArray[np.float32], mask: NDArray[np.bool_] | None, ternary: bool
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Return the entries of ``x`` under ``mask`` (all without), their per-row counts and steps.

    ``counts`` has one entry per row that carries at least one entry; the float32 step of such
    a row is the mean ``|x|`` (ternary: the least-squares magnitude of a sign code) or
    ``max |x| / 7`` (int4), before the step is rounded to its wire format.
    """
    flat = x.reshape(-1)
    flat_idx = None if mask is None else np.flatnonzero(mask)
    vals = flat.copy() if flat_idx is None else flat.take(flat_idx)
    if not np.isfinite(vals).all():
        raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")
    counts = _row_counts(flat_idx, x.shape)
    filled = counts[counts > 0]
    if not filled.size:
        return vals, filled, np.zeros(0, dtype=np.float32)
    starts = np.concatenate(([0], np.cumsum(filled)[:-1]))
    magnitude = np.abs(vals)
    if ternary:
        steps = np.add.reduceat(magnitude, starts, dtype=np.float32) / filled.astype(np.float32)
    else:
        steps = np.maximum.reduceat(magnitude, starts) / _F32_QMAX4
    return vals, filled, steps.astype(np.float32, copy=False)


def _lowbit_codes(
    vals: NDArray[np.float32],
    filled: NDArray[np.int64],
    step: NDArray[np.float32],
    ternary: bool,
    rounding: RoundingMode,
    rng: np.random.Generator | None,
    codes: NDArray[np.int8],
) -> None:
    """Write the int4 codes (``[-7, 7]``) or signs (``{-1, 1}``) of ``vals`` into ``codes``.

    ``step``: the rounded step of each row with entries (``filled`` entries each); int4 codes
    are computed against it, so ``decode = code * step`` is what the encoder assumed. A zero
    step makes its row's codes 0 (the row decodes to zeros; error feedback carries it).
    """
    if ternary:
        codes[...] = np.where(vals < 0, np.int8(-1), np.int8(1))
        return
    if not filled.size:
        return
    inv = np.divide(_F32_ONE, step, out=np.zeros_like(step), where=step > 0)
    vals *= np.repeat(inv, filled)
    if rounding == "nearest":
        np.rint(vals, out=vals)
    else:
        if rng is None:
            raise ValueError("rng is required for stochastic rounding")
        vals += rng.random(vals.shape, dtype=np.float32)
        np.floor(vals, out=vals)
    np.clip(vals, -_F32_QMAX4, _F32_QMAX4, out=vals)
    np.copyto(codes, vals, casting="unsafe")


def _round_steps(
    steps: NDArray[np.float32], fmt: ScaleFormat
) -> tuple[NDArray[np.float16] | NDArray[np.uint8], NDArray[np.float32]]:
    """Return the ``scale`` stream of the low-bit steps of a payload and the steps it decodes to.

    ``"float16"``: a step that would overflow float16 is capped at its largest finite value,
    one that underflows becomes 0. ``"log8"`` (:data:`~fedprune.codec.format.FLAG_SCALES_LOG8`):
    the reference is the largest step (capped so that ``7 * step`` stays finite), each step the
    nearest code on the log scale; a step below the scale's range becomes the smallest step, or 0
    when it is nearer to 0.
    """
    if fmt == "float16":
        half = np.minimum(steps, _F16_MAX).astype(np.float16)
        return half, half.astype(np.float32)
    if not steps.size:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.float32)
    ref = np.float32(min(float(steps.max()), float(_LOG8_MAX_REF)))
    if not ref > 0:
        ref = _F32_ONE  # every step is 0: all codes LOG8_ZERO
    with np.errstate(divide="ignore"):
        octaves = -np.log2(steps.astype(np.float64) / float(ref))
    code = np.clip(np.rint(LOG8_STEPS * octaves), 0, LOG8_ZERO - 1)
    smallest = float(ref) * float(_LOG8_TABLE[LOG8_ZERO - 1])
    code[steps < smallest / 2] = LOG8_ZERO
    codes = code.astype(np.uint8)
    stream = np.concatenate((np.frombuffer(ref.astype("<f4").tobytes(), np.uint8), codes))
    return stream, _log8_steps(ref, codes)


def _log8_steps(ref: np.float32, codes: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Decode log-scale codes against the reference: ``ref * 2 ** (-code / LOG8_STEPS)``."""
    return np.multiply(_LOG8_TABLE[codes], ref, dtype=np.float32)


def _read_steps(label: str, scales: object, expected: int, fmt: ScaleFormat) -> NDArray[np.float32]:
    """Validate a low-bit ``scale`` stream of ``expected`` rows; return its float32 steps."""
    if fmt == "float16":
        return _check_scales16(label, scales, expected).astype(np.float32)
    if not isinstance(scales, np.ndarray) or scales.dtype != np.uint8 or scales.ndim != 1:
        raise ValueError(f"{label} must be a 1-D uint8 array with log8 scales")
    want = 4 + expected if expected else 0
    if scales.size != want:
        raise ValueError(
            f"{label} has {scales.size} bytes, but {expected} rows carry transmitted entries "
            f"(log8: a 4-byte reference and a byte per row, expected {want})"
        )
    if not expected:
        return np.zeros(0, dtype=np.float32)
    ref = np.frombuffer(scales[:4].tobytes(), dtype="<f4")[0]
    if not 0 < ref <= _LOG8_MAX_REF:  # also rejects NaN
        raise ValueError(
            f"{label} has a log8 reference {ref} outside (0, {_LOG8_MAX_REF}] (non-finite, "
            "non-positive, or so large that code 7 overflows float32)"
        )
    return _log8_steps(np.float32(ref), scales[4:])


def _dequantize_lowbit(
    codes: NDArray[np.int8], counts: NDArray[np.int64], steps: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Return the transmitted entries as float32: ``code * step of its row``.

    ``counts`` are the transmitted entries per row (rows without any have no step).
    """
    values = codes.astype(np.float32)
    values *= np.repeat(steps, counts[counts > 0])
    return values


def _check_scales16(label: str, scales: object, expected: int) -> NDArray[np.float16]:
    """Validate a low-bit scale stream: 1-D float16, ``expected`` entries, finite, ``>= 0``."""
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float16 or scales.ndim != 1:
        raise ValueError(f"{label} must be a 1-D float16 array in low-bit mode")
    if scales.size != expected:
        raise ValueError(
            f"{label} has {scales.size} scales, but {expected} rows carry transmitted entries"
        )
    if not ((scales >= 0) & np.isfinite(scales)).all():
        raise ValueError(f"{label} has a negative or non-finite scale")
    return scales
