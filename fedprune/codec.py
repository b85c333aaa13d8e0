"""Payload codec: int8 quantization, bit-packed pruning masks, sparse payloads, wire size.

A *payload* is a flat ``dict[str, np.ndarray]`` that maps 1:1 onto a Flower ``ArrayRecord``
(wrap each value in ``Array``). It holds a **fixed, small set of arrays whatever the number of
tensors**: one array per field, the tensors' data concatenated in tensor order. Flower frames
every array with a few hundred bytes (npy header, ``Array`` and ``ArrayChunk`` objects with
64-hex ids, an ``ArrayRecord`` entry), so one array per tensor and field would cost 10-25 % of a
sparse int8 payload of a small model. The keys, in this order:

``meta`` (int64, always)
    ``[FORMAT_VERSION, flags, n_tensors]`` followed, per tensor, by
    ``[tensor_flags, n_values, ndim, *shape]``. ``flags`` holds the payload's quantization mode
    (``flags & QUANT_BITS``: the :class:`CodecConfig` ``quant``) and the entropy-stage bits
    :data:`FLAG_CODES_ZLIB` / :data:`FLAG_MASK_ZLIB`; ``tensor_flags`` holds the mode actually
    used for the tensor (:data:`QUANT_BITS`) and :data:`FLAG_MASKED` /
    :data:`FLAG_MASK_SENT`; ``n_values`` is the number of transmitted entries (the mask
    popcount for a sparse tensor, else the tensor size).
``names`` (uint8, always)
    The UTF-8 tensor names joined by a newline (:data:`NAME_SEP`; names may not contain it):
    exactly ``n_tensors`` distinct names, validated against ``meta`` on decode.
``codes`` (int8, or uint8 when zlib-compressed; int8 modes)
    All tensors' codes of the kept entries, each tensor in C order, concatenated; in
    ``[-127, 127]``; ``decode = code * scale``.
``scale`` (float32; int8 modes)
    All step sizes concatenated, finite and ``> 0``: one per output channel (axis 0) in
    ``"int8-channel"`` mode for tensors with ``ndim >= 2``, else one for the whole tensor. 0-d
    and 1-D tensors (biases, norm parameters) are therefore quantized per tensor in
    ``"int8-channel"`` mode; their ``tensor_flags`` record that. A channel with no kept entry or
    only zeros has scale ``1.0``.
``values`` (float32, or uint8 when zlib-compressed; ``quant="none"``)
    All tensors' kept entries themselves, concatenated.
``select`` (uint8; only with ``CodecConfig.topk < 1``)
    Top-k update sparsification: for every tensor, a bit per *candidate* entry (its kept entries
    if masked, else all entries) saying whether it is transmitted; the tensor's entry in
    ``meta`` then ends with the candidate count and carries :data:`FLAG_SELECTED`. Bits are
    concatenated like the mask bits, possibly zlib-compressed (:data:`FLAG_SELECT_ZLIB`).
``mask`` (uint8; only when at least one tensor has :data:`FLAG_MASK_SENT`)
    ``np.packbits`` of the concatenation of the flattened (C order) boolean masks of the sparse
    tensors encoded with ``send_masks=True``, in tensor order (bits are not byte-aligned per
    tensor; the last byte is zero padded), possibly zlib-compressed.

For one :class:`CodecConfig`, one set of masked tensor names and one ``send_masks`` flag every
encoder produces the same key set, whatever the values: ``meta``, ``names``, then ``codes`` and
``scale`` (int8 modes) or ``values``, then ``select`` iff ``topk < 1``, then ``mask`` iff a
masked tensor is sent with its bits
(only dtypes and lengths of the streams may differ, e.g. compressed vs not). The entropy stage
compresses the whole code/value stream and the whole mask stream with zlib and keeps each result
only when that stream's serialized size shrinks.

:func:`wire_size` reproduces the byte count of Flower 1.42's serialization of the payload's
``ArrayRecord`` without importing Flower. This module is pure numpy and never imports ``flwr``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal, TypeAlias, get_args

import numpy as np
from numpy.typing import NDArray

from fedprune.masks import topk_flat

__all__ = [
    "FLAG_CODES_ZLIB",
    "FLAG_MASKED",
    "FLAG_MASK_SENT",
    "FLAG_MASK_ZLIB",
    "FLAG_SELECTED",
    "FLAG_SELECT_ZLIB",
    "FLWR_CHUNK_SIZE_ENV",
    "FLWR_DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KEY_CODES",
    "KEY_MASK",
    "KEY_META",
    "KEY_NAMES",
    "KEY_SCALE",
    "KEY_SELECT",
    "KEY_VALUES",
    "NAME_SEP",
    "QMAX",
    "QUANT_BITS",
    "ZLIB_LEVEL",
    "CodecConfig",
    "Payload",
    "QuantMode",
    "RoundingMode",
    "decode",
    "dequantize_int8",
    "encode",
    "pack_mask",
    "payload_masks",
    "quantize_int8",
    "residual",
    "unpack_mask",
    "wire_size",
]

QuantMode = Literal["none", "int8", "int8-channel"]
RoundingMode = Literal["nearest", "stochastic"]
Payload: TypeAlias = dict[str, np.ndarray]

# -- Payload layout ----------------------------------------------------------------------------
KEY_META: Final = "meta"
KEY_NAMES: Final = "names"
KEY_CODES: Final = "codes"
KEY_SCALE: Final = "scale"
KEY_VALUES: Final = "values"
KEY_SELECT: Final = "select"
KEY_MASK: Final = "mask"
_KEY_ORDER: Final = (KEY_META, KEY_NAMES, KEY_CODES, KEY_SCALE, KEY_VALUES, KEY_SELECT, KEY_MASK)
"""Every payload key, in the order :func:`encode` writes them."""
NAME_SEP: Final = "\n"
"""Separator of the tensor names in the ``names`` array (never part of a name)."""

FORMAT_VERSION: Final = 2
"""First entry of every ``meta`` array; bumped on any incompatible layout change."""
QMAX: Final = 127
"""Largest int8 code magnitude (symmetric range, ``-128`` is never produced)."""

# ``meta`` = [FORMAT_VERSION, flags, n_tensors, *per tensor [tensor_flags, n_values, ndim, *shape]]
_META_HEAD: Final = 3
_TENSOR_HEAD: Final = 3
QUANT_BITS: Final = 0b11
"""Quantization mode bits: 0 = float32 values, 1 = int8 per tensor, 2 = int8 per channel."""
_QUANT_NONE: Final = 0
_QUANT_TENSOR: Final = 1
_QUANT_CHANNEL: Final = 2
_QUANT_OF: Final[dict[str, int]] = {
    "none": _QUANT_NONE,
    "int8": _QUANT_TENSOR,
    "int8-channel": _QUANT_CHANNEL,
}
FLAG_MASKED: Final = 1 << 2
"""Tensor flag: the tensor is sparse, only entries under its mask are transmitted."""
FLAG_MASK_SENT: Final = 1 << 3
"""Tensor flag: the mask bits are in the ``mask`` stream (else the receiver supplies the mask)."""
FLAG_CODES_ZLIB: Final = 1 << 4
"""Payload flag: the ``codes`` / ``values`` stream is zlib-compressed (uint8)."""
FLAG_MASK_ZLIB: Final = 1 << 5
"""Payload flag: the ``mask`` stream is zlib-compressed."""
FLAG_SELECTED: Final = 1 << 6
"""The tensor is top-k sparsified: ``select`` holds a bit per candidate entry."""
FLAG_SELECT_ZLIB: Final = 1 << 7
"""The ``select`` stream is zlib-compressed."""
_PAYLOAD_FLAGS: Final = QUANT_BITS | FLAG_CODES_ZLIB | FLAG_MASK_ZLIB | FLAG_SELECT_ZLIB
_TENSOR_FLAGS: Final = QUANT_BITS | FLAG_MASKED | FLAG_MASK_SENT | FLAG_SELECTED

ZLIB_LEVEL: Final = 6
"""zlib compression level of the entropy stage."""
_F32_TINY: Final = np.float32(np.finfo(np.float32).tiny)
_F32_QMAX: Final = np.float32(QMAX)
_F32_ONE: Final = np.float32(1.0)


def _largest_scale() -> np.float32:
    """Return the largest float32 step whose code 127 still decodes to a finite float32."""
    scale = np.float32(np.finfo(np.float32).max) / _F32_QMAX
    with np.errstate(over="ignore"):
        while not np.isfinite(scale * _F32_QMAX):
            scale = np.nextafter(scale, np.float32(0))
    return np.float32(scale)


_MAX_SCALE: Final = _largest_scale()
_VALUES_DTYPE: Final = np.dtype("<f4")
_BLOCK: Final = 1 << 17
"""Entries per block of the blocked encode kernels (their temporaries stay in L2 cache)."""
"""Byte layout of compressed ``values`` streams (little-endian float32)."""

# -- Flower 1.42 serialization constants (flwr.common.constant, flwr.supercore.constant) ------
FLWR_CHUNK_SIZE_ENV: Final = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"
FLWR_DEFAULT_CHUNK_SIZE: Final = 5 * 1024 * 1024
_OBJECT_ID_LEN: Final = 64  # sha256 hex digest
_STYPE_NUMPY: Final = "numpy.ndarray"


@dataclass(frozen=True)
class CodecConfig:
    """How tensors are encoded.

    Parameters
    ----------
    quant : {"int8-channel", "int8", "none"}
        ``"int8-channel"``: symmetric int8 with one float32 step size per output channel
        (axis 0) for tensors with ``ndim >= 2`` and per tensor otherwise; ``"int8"``: one
        step size per tensor; ``"none"``: float32 values pass through (still sparse).
    rounding : {"nearest", "stochastic"}
        Round to nearest (error ``<= scale / 2`` up to float32 rounding) or unbiased stochastic
        rounding (``E[decode] == x``; needs an ``rng`` in :func:`encode`).
    entropy : bool
        Run the lossless zlib stage on the code (or value) stream and on the mask and select
        streams (kept per stream only when it makes that stream smaller).
    topk : float
        Fraction in ``(0, 1]`` of each tensor's candidate entries (its kept entries if masked,
        else all) that is transmitted: the ``ceil(topk * n)`` largest in magnitude, the rest
        decodes as ``0.0``. For updates, with error feedback (:func:`residual`) carrying what
        was not sent; ``1.0`` sends every candidate and adds no ``select`` stream.
    """

    quant: QuantMode = "int8-channel"
    rounding: RoundingMode = "nearest"
    entropy: bool = False
    topk: float = 1.0

    def __post_init__(self) -> None:
        if self.quant not in get_args(QuantMode):
            raise ValueError(f"quant must be one of {get_args(QuantMode)}, got {self.quant!r}")
        if self.rounding not in get_args(RoundingMode):
            raise ValueError(
                f"rounding must be one of {get_args(RoundingMode)}, got {self.rounding!r}"
            )
        if not isinstance(self.entropy, bool):
            raise ValueError(f"entropy must be a bool, got {self.entropy!r}")
        if not (isinstance(self.topk, (int, float)) and 0.0 < self.topk <= 1.0):
            raise ValueError(f"topk must be in (0, 1], got {self.topk!r}")


# ==============================================================================================
# Quantization kernels (float32 throughout)
# ==============================================================================================
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


def _effective_quant(quant: int, ndim: int) -> int:
    """Mode used for a tensor of ``ndim`` dimensions under the payload mode ``quant``."""
    if quant == _QUANT_CHANNEL and ndim < 2:
        return _QUANT_TENSOR
    return quant


def _n_scales(mode: int, shape: tuple[int, ...]) -> int:
    """Return the number of step sizes of a tensor in ``mode`` (none for float32 values)."""
    if mode == _QUANT_NONE:
        return 0
    return shape[0] if mode == _QUANT_CHANNEL else 1


def _as_float32(name: str, x: object) -> NDArray[np.float32]:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"tensor {name!r} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


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
    codes: NDArray[np.int8], scales: NDArray[np.float32], shape: tuple[int, ...], per_channel: bool
) -> NDArray[np.float32]:
    """Return ``codes * scales`` as a fresh float32 array of ``shape`` (codes in C order)."""
    # A SIMD int8 -> float32 conversion, then an in-place multiply, is about twice as fast as a
    # mixed-dtype ``np.multiply(codes, scales, dtype=np.float32)``.
    out = codes.astype(np.float32).reshape(shape)
    if per_channel:
        out.reshape(shape[0], math.prod(shape[1:]))[...] *= scales[:, None]
    else:
        out *= scales[0]
    return out


# ==============================================================================================
# Masks
# ==============================================================================================
def pack_mask(mask: np.ndarray) -> NDArray[np.uint8]:
    """Bit-pack a boolean mask (flattened in C order) with ``np.packbits``.

    Parameters
    ----------
    mask : np.ndarray
        Boolean array of any shape.

    Returns
    -------
    np.ndarray
        uint8 array of ``ceil(mask.size / 8)`` bytes (big-endian bit order, zero padded).

    Raises
    ------
    ValueError
        If ``mask`` is not a boolean array.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got {getattr(mask, 'dtype', mask)}")
    return np.packbits(mask.reshape(-1))


def unpack_mask(bits: np.ndarray, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """Inverse of :func:`pack_mask`.

    Parameters
    ----------
    bits : np.ndarray
        uint8 array of exactly ``ceil(prod(shape) / 8)`` bytes.
    shape : tuple of int
        Shape of the mask.

    Returns
    -------
    np.ndarray
        Boolean mask of the given shape.

    Raises
    ------
    ValueError
        If ``bits`` is not a 1-D uint8 array of the right length, or a padding bit is set.
    """
    size = math.prod(shape)
    _check_stream("bits", bits, np.dtype(np.uint8), (size + 7) // 8)
    _check_padding("bits", bits, size)
    return np.unpackbits(bits, count=size).view(np.bool_).reshape(shape)


def _check_mask(name: str, mask: object, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"mask of {name!r} must be a bool array, got {got}")
    if mask.shape != shape:
        raise ValueError(f"mask of {name!r} has shape {mask.shape}, the tensor has {shape}")
    return mask


def _pack_bits_at(out: NDArray[np.uint8], bitpos: int, flat: NDArray[np.bool_]) -> int:
    """Write the bits of ``flat`` into ``out`` from bit ``bitpos`` on; return the end position.

    ``out`` must be zero from bit ``bitpos`` on. Bits are big-endian within a byte, as
    ``np.packbits``; a run that starts mid-byte first completes that byte, the rest is packed
    byte-aligned straight from ``flat`` (no concatenated boolean copy of all masks).
    """
    n = flat.size
    byte, offset = divmod(bitpos, 8)
    head = 0
    if offset and n:
        head = min(8 - offset, n)
        out[byte] |= np.packbits(flat[:head])[0] >> offset
    if n > head:
        packed = np.packbits(flat[head:])
        start = (bitpos + head) // 8  # byte-aligned here
        out[start : start + packed.size] = packed
    return bitpos + n


def _unpack_bits_at(bits: NDArray[np.uint8], bitpos: int, count: int) -> NDArray[np.bool_]:
    """Return ``count`` bits of ``bits`` from bit ``bitpos`` on as a fresh bool array."""
    if count == 0:
        return np.zeros(0, dtype=np.bool_)
    byte, offset = divmod(bitpos, 8)
    raw = np.unpackbits(bits[byte : (bitpos + count + 7) // 8], count=offset + count)
    return raw[offset:].view(np.bool_)


# ==============================================================================================
# Entropy stage
# ==============================================================================================
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


# ==============================================================================================
# Encode
# ==============================================================================================
@dataclass(frozen=True)
class _Entry:
    """One tensor of a payload: its ``meta`` entry and where its data lies in the streams."""

    name: str
    flags: int
    n_values: int
    shape: tuple[int, ...]
    value_start: int
    """Offset of the tensor's codes (or values) in the code (or value) stream."""
    scale_start: int
    """Offset of the tensor's step sizes in the ``scale`` stream."""
    bit_start: int
    """Bit offset of the tensor's mask in the ``mask`` stream (if its bits are sent)."""
    n_candidates: int = 0
    """Entries the selection chose from (only with :data:`FLAG_SELECTED`)."""
    select_start: int = 0
    """Bit offset of the tensor's selection in the ``select`` stream."""

    @property
    def mode(self) -> int:
        return self.flags & QUANT_BITS

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_scales(self) -> int:
        return _n_scales(self.mode, self.shape)

    @property
    def n_bits(self) -> int:
        return self.size if self.flags & FLAG_MASK_SENT else 0

    @property
    def n_select_bits(self) -> int:
        return self.n_candidates if self.flags & FLAG_SELECTED else 0

    @property
    def meta(self) -> list[int]:
        """Return the tensor's entry in ``meta``."""
        tail = [self.n_candidates] if self.flags & FLAG_SELECTED else []
        return [self.flags, self.n_values, len(self.shape), *self.shape, *tail]


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r}")
    if NAME_SEP in name:
        raise ValueError(f"tensor name {name!r} contains the name separator {NAME_SEP!r}")
    return name


def _names_array(names: list[str]) -> NDArray[np.uint8]:
    try:
        blob = NAME_SEP.join(names).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"tensor names must be valid UTF-8 text: {err}") from err
    return np.frombuffer(bytearray(blob), dtype=np.uint8)  # writable, owns its memory


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
            selection = _select_topk(name, x, mask, config.topk)
            flags |= FLAG_SELECTED
            kept = int(np.count_nonzero(selection))
        entry = _Entry(name, flags, kept, x.shape, n_values, n_scales, n_bits, candidates, n_select)
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
    scales: NDArray[np.float32] | None = None
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
            sent = _selected_mask(x.shape, mask, selection)
        out = stream[entry.value_start : entry.value_start + entry.n_values]
        if scales is None:
            _copy_values(entry.name, x, sent, out)
        else:
            scale_out = scales[entry.scale_start : entry.scale_start + entry.n_scales]
            _quantize_into(entry, x, sent, config.rounding, rng, out, scale_out)
        if bits is not None and mask is not None:
            _pack_bits_at(bits, entry.bit_start, mask.reshape(-1))

    flags = quant
    if config.entropy:
        stream, compressed = _maybe_deflate(stream)
        flags |= FLAG_CODES_ZLIB if compressed else 0
        if bits is not None:
            bits, compressed = _maybe_deflate(bits)
            flags |= FLAG_MASK_ZLIB if compressed else 0
        if select is not None:
            select, compressed = _maybe_deflate(select)
            flags |= FLAG_SELECT_ZLIB if compressed else 0

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
    return payload


def _select_topk(
    name: str, x: NDArray[np.float32], mask: NDArray[np.bool_] | None, topk: float
) -> NDArray[np.bool_]:
    """Return, per candidate entry of ``x`` (C order), whether it is among the top-k by |x|."""
    candidates = x.reshape(-1) if mask is None else x.reshape(-1)[mask.reshape(-1)]
    magnitude = np.abs(candidates)
    if not np.isfinite(magnitude).all():
        raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")
    # Linear-time selection; equal magnitudes go to the lower index, the same on every machine.
    return topk_flat(magnitude, math.ceil(topk * magnitude.size))


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


# ==============================================================================================
# Decode
# ==============================================================================================
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

    def expected_keys(self) -> list[str]:
        """Return the key set these flags and tensors imply, in :func:`encode` order."""
        keys = [KEY_META, KEY_NAMES]
        keys += [KEY_VALUES] if self.quant == _QUANT_NONE else [KEY_CODES, KEY_SCALE]
        if any(entry.flags & FLAG_SELECTED for entry in self.entries):
            keys.append(KEY_SELECT)
        if any(entry.flags & FLAG_MASK_SENT for entry in self.entries):
            keys.append(KEY_MASK)
        return keys


def _label(key: str) -> str:
    return f"payload key {key!r}"


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
    if flags & ~_PAYLOAD_FLAGS or (flags & QUANT_BITS) > _QUANT_CHANNEL:
        raise ValueError(f"{label}: unknown payload flags {flags:#x}")
    if not 0 <= n_tensors <= (len(meta) - _META_HEAD) // _TENSOR_HEAD:
        raise ValueError(f"{label}: {n_tensors} tensors do not fit its {len(meta)} entries")
    names = _parse_names(payload, n_tensors)
    quant = flags & QUANT_BITS
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
        elif not 0 <= kept <= size or (not tflags & FLAG_MASKED and kept != size):
            raise ValueError(f"{where}: {kept} values for a tensor of {size} entries")
        entry = _Entry(name, tflags, kept, shape, n_values, n_scales, n_bits, candidates, n_select)
        entries.append(entry)
        n_values += kept
        n_scales += entry.n_scales
        n_bits += entry.n_bits
        n_select += entry.n_select_bits
    if pos != len(meta):
        raise ValueError(f"{label} has {len(meta) - pos} trailing entries")
    if flags & FLAG_MASK_ZLIB and not any(e.flags & FLAG_MASK_SENT for e in entries):
        raise ValueError(f"{label}: compressed mask flagged but no mask sent")
    selected = [bool(e.flags & FLAG_SELECTED) for e in entries]
    if any(selected) and not all(selected):
        raise ValueError(f"{label}: top-k selection flagged for some tensors only")
    if flags & FLAG_SELECT_ZLIB and not any(selected):
        raise ValueError(f"{label}: compressed selection flagged but nothing selected")
    layout = _Layout(flags, entries, n_values, n_scales, n_bits, n_select)
    expected = layout.expected_keys()
    missing = [key for key in expected if key not in payload]
    if missing:
        raise ValueError(f"payload is missing keys {missing}")
    extra = [key for key in payload if key not in expected]
    if extra:
        raise ValueError(f"payload has unexpected keys {extra}")
    return layout


def _check_padding(label: str, bits: NDArray[np.uint8], n_bits: int) -> None:
    """Refuse set bits after the last of ``n_bits`` (a packed mask must unpack one way only)."""
    pad = -n_bits % 8
    if pad and bits[-1] & ((1 << pad) - 1):
        raise ValueError(f"{label} has non-zero padding bits")


def _check_stream(label: str, arr: object, dtype: np.dtype, length: int) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
        raise ValueError(
            f"{label} must be a 1-D {dtype} array, got "
            f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
        )
    if arr.size != length:
        raise ValueError(f"{label} has {arr.size} entries, expected {length}")


def _read_stream(
    key: str, arr: np.ndarray, dtype: np.dtype, length: int, compressed: bool
) -> np.ndarray:
    """Validate one stream (decompressing it if flagged) and return it as ``dtype``."""
    if not compressed:
        _check_stream(_label(key), arr, dtype, length)
        return arr
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{_label(key)} is flagged zlib but is not a 1-D uint8 array")
    raw = _inflate(key, arr, length * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype)


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


def _read_bits(
    payload: Mapping[str, np.ndarray], key: str, n_bits: int, compressed: bool
) -> NDArray[np.uint8] | None:
    """Validate a bit stream (``mask`` or ``select``); ``None`` when the payload has none."""
    if key not in payload:
        return None
    bits = _read_stream(key, payload[key], np.dtype(np.uint8), (n_bits + 7) // 8, compressed)
    _check_padding(_label(key), bits, n_bits)
    return bits


def _tensor_mask(
    entry: _Entry, bits: NDArray[np.uint8] | None, masks: Mapping[str, np.ndarray] | None
) -> NDArray[np.bool_]:
    """Return the mask of a sparse tensor: from the payload if sent, else from ``masks``."""
    if entry.flags & FLAG_MASK_SENT:
        assert bits is not None  # the key set was checked
        return _unpack_bits_at(bits, entry.bit_start, entry.size).reshape(entry.shape)
    if masks is None or entry.name not in masks:
        raise ValueError(
            f"tensor {entry.name!r} was encoded without its mask bits; "
            f"pass masks={{{entry.name!r}: ...}}"
        )
    return _check_mask(entry.name, masks[entry.name], entry.shape)


def _decode_entry(
    entry: _Entry,
    stream: np.ndarray,
    scales: NDArray[np.float32] | None,
    bits: NDArray[np.uint8] | None,
    masks: Mapping[str, np.ndarray] | None,
    select: NDArray[np.uint8] | None = None,
) -> NDArray[np.float32]:
    """Decode one tensor from its slices of the (validated) streams into fresh float32 memory."""
    data = stream[entry.value_start : entry.value_start + entry.n_values]
    flat_idx: NDArray[np.int64] | None = None
    if entry.flags & FLAG_MASKED:
        flat_idx = np.flatnonzero(_tensor_mask(entry, bits, masks))
    if entry.flags & FLAG_SELECTED:
        assert select is not None  # the key set was checked
        candidates = entry.size if flat_idx is None else flat_idx.size
        if candidates != entry.n_candidates:
            raise ValueError(
                f"tensor {entry.name!r}: selection over {entry.n_candidates} candidates but the "
                f"mask keeps {candidates}"
            )
        chosen = np.flatnonzero(_unpack_bits_at(select, entry.select_start, candidates))
        flat_idx = chosen if flat_idx is None else flat_idx[chosen]
    if flat_idx is not None and flat_idx.size != entry.n_values:
        raise ValueError(
            f"tensor {entry.name!r}: {entry.n_values} transmitted values but the mask "
            f"{'and selection ' if entry.flags & FLAG_SELECTED else ''}keeps {flat_idx.size}"
        )
    if scales is None:
        if flat_idx is None:
            # Copy: the result must not alias (possibly read-only) payload memory.
            return data.astype(np.float32, copy=True).reshape(entry.shape)
        out = np.zeros(entry.size, dtype=np.float32)
        out[flat_idx] = data
        return out.reshape(entry.shape)
    if flat_idx is not None:
        # Scatter in the int8 domain (pruned codes are 0, hence exactly 0.0 below).
        dense = np.zeros(entry.size, dtype=np.int8)
        dense[flat_idx] = data
        data = dense
    step = scales[entry.scale_start : entry.scale_start + entry.n_scales]
    return _dequantize(data, step, entry.shape, entry.mode == _QUANT_CHANNEL)


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
    _check_keys(payload)
    layout = _parse_layout(payload)
    if shapes is not None:
        got = [(entry.name, entry.shape) for entry in layout.entries]
        want = [(name, tuple(shape)) for name, shape in shapes.items()]
        if got != want:
            raise ValueError(f"payload tensors {got} differ from the expected {want}")
    compressed = bool(layout.flags & FLAG_CODES_ZLIB)
    scales: NDArray[np.float32] | None = None
    if layout.quant == _QUANT_NONE:
        stream = _read_stream(
            KEY_VALUES, payload[KEY_VALUES], _VALUES_DTYPE, layout.n_values, compressed
        )
        if not np.isfinite(stream).all():
            raise ValueError(f"{_label(KEY_VALUES)} has NaN or inf")
    else:
        stream = _read_stream(
            KEY_CODES, payload[KEY_CODES], np.dtype(np.int8), layout.n_values, compressed
        )
        if stream.size and stream.min() < -QMAX:
            raise ValueError(f"{_label(KEY_CODES)} has the code -128")
        scales = _check_scales(_label(KEY_SCALE), payload[KEY_SCALE], layout.n_scales)
    bits = _read_bits(payload, KEY_MASK, layout.n_bits, bool(layout.flags & FLAG_MASK_ZLIB))
    select = _read_bits(payload, KEY_SELECT, layout.n_select, bool(layout.flags & FLAG_SELECT_ZLIB))
    return {
        entry.name: _decode_entry(entry, stream, scales, bits, masks, select)
        for entry in layout.entries
    }


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
    _check_keys(payload)
    layout = _parse_layout(payload)
    bits = _read_bits(payload, KEY_MASK, layout.n_bits, bool(layout.flags & FLAG_MASK_ZLIB))
    return {
        entry.name: _tensor_mask(entry, bits, None)
        for entry in layout.entries
        if entry.flags & FLAG_MASK_SENT
    }


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


# ==============================================================================================
# Wire size (Flower 1.42 inflatable-object serialization, reproduced without importing flwr)
# ==============================================================================================
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
