"""Payload codec: int8 quantization, bit-packed pruning masks, sparse payloads, wire size.

A *payload* is a flat ``dict[str, np.ndarray]`` that maps 1:1 onto a Flower ``ArrayRecord``
(wrap each value in ``Array``). Every tensor ``<name>`` contributes the keys
``<name>/<field>`` for the fields below, in this order:

``meta`` (int64, always)
    ``[FORMAT_VERSION, flags, n_values, ndim, *shape]``. ``flags`` holds the quantization
    mode actually used (:data:`QUANT_BITS`) and the ``FLAG_*`` bits; ``n_values`` is the number
    of transmitted entries (the mask popcount for a sparse tensor, else the tensor size).
``codes`` (int8, or uint8 when zlib-compressed; int8 modes)
    The codes of the kept entries in C order, in ``[-127, 127]``; ``decode = code * scale``.
``scale`` (float32; int8 modes)
    Step sizes, finite and ``> 0``: one per output channel (axis 0) in ``"int8-channel"``
    mode for tensors with ``ndim >= 2``, else one for the whole tensor. 0-d and 1-D tensors
    (biases, norm parameters) are therefore quantized per tensor in ``"int8-channel"`` mode;
    their ``meta`` records that. A channel with no kept entry or only zeros has scale ``1.0``.
``values`` (float32, or uint8 when zlib-compressed; ``quant="none"``)
    The kept entries themselves.
``mask`` (uint8; sparse tensors encoded with ``send_masks=True``)
    ``np.packbits`` of the flattened boolean mask (shape in ``meta``), possibly zlib-compressed.

For one :class:`CodecConfig`, one set of masked tensor names and one ``send_masks`` flag every
encoder produces the same key set, whatever the values (only dtypes and lengths of the streams
may differ, e.g. compressed vs not). The entropy stage compresses each code/value stream and each
mask stream with zlib and keeps the result only when the stream's serialized size shrinks.

:func:`wire_size` reproduces the byte count of Flower 1.41's serialization of the payload's
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

__all__ = [
    "FIELD_CODES",
    "FIELD_MASK",
    "FIELD_META",
    "FIELD_SCALE",
    "FIELD_VALUES",
    "FLAG_CODES_ZLIB",
    "FLAG_MASKED",
    "FLAG_MASK_SENT",
    "FLAG_MASK_ZLIB",
    "FLWR_CHUNK_SIZE_ENV",
    "FLWR_DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KEY_SEP",
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
KEY_SEP: Final = "/"
"""Separator between the tensor name and the field name in a payload key."""
FIELD_META: Final = "meta"
FIELD_CODES: Final = "codes"
FIELD_SCALE: Final = "scale"
FIELD_VALUES: Final = "values"
FIELD_MASK: Final = "mask"
_FIELDS: Final = frozenset({FIELD_META, FIELD_CODES, FIELD_SCALE, FIELD_VALUES, FIELD_MASK})

FORMAT_VERSION: Final = 1
"""First entry of every ``meta`` array; bumped on any incompatible layout change."""
QMAX: Final = 127
"""Largest int8 code magnitude (symmetric range, ``-128`` is never produced)."""

# ``meta`` = [FORMAT_VERSION, flags, n_values, ndim, *shape]
_META_HEAD: Final = 4
QUANT_BITS: Final = 0b11
"""``flags & QUANT_BITS``: 0 = float32 values, 1 = int8 per tensor, 2 = int8 per channel."""
_QUANT_NONE: Final = 0
_QUANT_TENSOR: Final = 1
_QUANT_CHANNEL: Final = 2
FLAG_MASKED: Final = 1 << 2
"""The tensor is sparse: only entries under its mask are transmitted."""
FLAG_MASK_SENT: Final = 1 << 3
"""The mask bits are in the payload (else the receiver must supply the mask)."""
FLAG_CODES_ZLIB: Final = 1 << 4
"""The ``codes`` / ``values`` stream is zlib-compressed (uint8)."""
FLAG_MASK_ZLIB: Final = 1 << 5
"""The ``mask`` stream is zlib-compressed."""
_KNOWN_FLAGS: Final = QUANT_BITS | FLAG_MASKED | FLAG_MASK_SENT | FLAG_CODES_ZLIB | FLAG_MASK_ZLIB

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
"""Byte layout of compressed ``values`` streams (little-endian float32)."""

# -- Flower 1.41 serialization constants (flwr.common.constant, flwr.supercore.constant) ------
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
        Run the lossless zlib stage on every code and mask stream (kept per stream only when
        it makes that stream smaller).
    """

    quant: QuantMode = "int8-channel"
    rounding: RoundingMode = "nearest"
    entropy: bool = False

    def __post_init__(self) -> None:
        if self.quant not in get_args(QuantMode):
            raise ValueError(f"quant must be one of {get_args(QuantMode)}, got {self.quant!r}")
        if self.rounding not in get_args(RoundingMode):
            raise ValueError(
                f"rounding must be one of {get_args(RoundingMode)}, got {self.rounding!r}"
            )
        if not isinstance(self.entropy, bool):
            raise ValueError(f"entropy must be a bool, got {self.entropy!r}")


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
    v: NDArray[np.float32], rounding: RoundingMode, rng: np.random.Generator | None
) -> NDArray[np.int8]:
    """Round the scaled values ``v`` (overwritten) to int8 codes in ``[-127, 127]``.

    With nearest rounding ``|v| <= 127 * (1 + 3 eps)`` by construction of the scales, so
    ``rint`` never leaves the range. Stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``, is
    unbiased and is clipped (the clip only touches ``|v|`` within a few ulp of 127).
    """
    if rounding == "nearest":
        codes = np.empty(v.shape, dtype=np.int8)
        np.rint(v, out=codes, casting="unsafe")  # one pass, no float32 intermediate
        return codes
    if rng is None:
        raise ValueError("rng is required for stochastic rounding")
    v += rng.random(v.shape, dtype=np.float32)
    np.floor(v, out=v)
    np.clip(v, -_F32_QMAX, _F32_QMAX, out=v)
    return v.astype(np.int8)


def _quantize_dense(
    name: str,
    x: NDArray[np.float32],
    per_channel: bool,
    rounding: RoundingMode,
    rng: np.random.Generator | None,
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Quantize a whole tensor; codes are returned flat in C order. ``x`` is not modified."""
    rows = x.shape[0] if per_channel else 1
    x2d = x.reshape(rows, math.prod(x.shape[1:]) if per_channel else x.size)
    absmax = _absmax_rows(x2d)
    if not per_channel:
        absmax = absmax.max(keepdims=True) if absmax.size else np.zeros(1, np.float32)
    _check_absmax(name, absmax)
    scale, inv = _scales_from_absmax(absmax)
    v = np.multiply(x2d, inv[:, None] if per_channel else inv[0], dtype=np.float32)
    return _round_to_int8(v.reshape(-1), rounding, rng), scale


def _quantize_sparse(
    name: str,
    values: NDArray[np.float32],
    bounds: NDArray[np.int64] | None,
    rounding: RoundingMode,
    rng: np.random.Generator | None,
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Quantize gathered kept values (overwritten); per channel when ``bounds`` is given."""
    if bounds is None:
        absmax = np.zeros(1, np.float32)
        if values.size:
            absmax[0] = np.maximum(values.max(), -values.min())  # NaN propagates
        _check_absmax(name, absmax)
        scale, inv = _scales_from_absmax(absmax)
        values *= inv[0]
    else:
        absmax = _absmax_segments(values, bounds)
        _check_absmax(name, absmax)
        scale, inv = _scales_from_absmax(absmax)
        values *= np.repeat(inv, np.diff(bounds))
    return _round_to_int8(values, rounding, rng), scale


def _channel_bounds(flat_idx: NDArray[np.int64], shape: tuple[int, ...]) -> NDArray[np.int64]:
    """Offsets of each output channel's run in the (sorted) flat indices of kept entries."""
    channels = shape[0]
    per_row = math.prod(shape[1:])
    edges = np.arange(channels + 1, dtype=np.int64) * per_row
    return np.searchsorted(flat_idx, edges).astype(np.int64, copy=False)


def _effective_quant(quant: QuantMode, ndim: int) -> int:
    if quant == "none":
        return _QUANT_NONE
    if quant == "int8-channel" and ndim >= 2:
        return _QUANT_CHANNEL
    return _QUANT_TENSOR


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
    channel = per_channel and arr.ndim >= 2
    codes, scales = _quantize_dense("x", arr, channel, rounding, rng)
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
        If ``bits`` is not a 1-D uint8 array of the right length.
    """
    size = math.prod(shape)
    _check_stream("bits", bits, np.dtype(np.uint8), (size + 7) // 8)
    return np.unpackbits(bits, count=size).view(np.bool_).reshape(shape)


def _check_mask(name: str, mask: object, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"mask of {name!r} must be a bool array, got {got}")
    if mask.shape != shape:
        raise ValueError(f"mask of {name!r} has shape {mask.shape}, the tensor has {shape}")
    return mask


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


def _inflate(name: str, field: str, stream: np.ndarray, nbytes: int) -> bytes:
    """Decompress a zlib stream that must expand to exactly ``nbytes`` bytes."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(np.ascontiguousarray(stream).data, nbytes + 1)
    except zlib.error as err:
        raise ValueError(f"{_label(name, field)}: corrupt zlib stream") from err
    if len(raw) != nbytes or not inflater.eof or inflater.unused_data:
        raise ValueError(
            f"{_label(name, field)}: zlib stream does not expand to the expected {nbytes} bytes"
        )
    return raw


# ==============================================================================================
# Encode
# ==============================================================================================
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
        finite; pruned entries are never read.
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
        ``{"<name>/<field>": array}``, tensors in input order.

    Raises
    ------
    ValueError
        On a kept NaN/inf entry, a non-real dtype, a mask that is not bool, has the wrong
        shape or names an unknown tensor, or a missing ``rng``.
    """
    if not isinstance(config, CodecConfig):
        raise ValueError(f"config must be a CodecConfig, got {type(config).__name__}")
    if config.rounding == "stochastic" and config.quant != "none" and rng is None:
        raise ValueError("rng is required for stochastic rounding")
    masks = {} if masks is None else masks
    unknown = [name for name in masks if name not in tensors]
    if unknown:
        raise ValueError(f"masks name tensors that are not encoded: {sorted(unknown)}")
    payload: Payload = {}
    for name, tensor in tensors.items():
        mask = masks.get(name)
        _encode_tensor(payload, name, tensor, mask, config, send_masks, rng)
    return payload


def _encode_tensor(
    payload: Payload,
    name: str,
    tensor: np.ndarray,
    mask: np.ndarray | None,
    config: CodecConfig,
    send_masks: bool,
    rng: np.random.Generator | None,
) -> None:
    """Append the fields of one tensor to ``payload``."""
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r}")
    x = _as_float32(name, tensor)
    shape = x.shape
    mode = _effective_quant(config.quant, x.ndim)
    flags = mode
    stream: np.ndarray
    scale: NDArray[np.float32] | None = None
    if mask is None:
        n_values = x.size
        if mode == _QUANT_NONE:
            stream = np.array(x.reshape(-1), dtype=np.float32, copy=True)
            if not np.isfinite(stream).all():
                raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")
        else:
            stream, scale = _quantize_dense(name, x, mode == _QUANT_CHANNEL, config.rounding, rng)
    else:
        m = _check_mask(name, mask, shape)
        flags |= FLAG_MASKED
        flat_idx = np.flatnonzero(m)
        n_values = flat_idx.size
        kept = x.reshape(-1).take(flat_idx)  # a fresh float32 buffer, ours to overwrite
        if mode == _QUANT_NONE:
            if kept.size and not np.isfinite(kept).all():
                raise ValueError(f"tensor {name!r} has non-finite (NaN or inf) entries")
            stream = kept
        else:
            bounds = _channel_bounds(flat_idx, shape) if mode == _QUANT_CHANNEL else None
            stream, scale = _quantize_sparse(name, kept, bounds, config.rounding, rng)

    if config.entropy:
        stream, compressed = _maybe_deflate(stream)
        if compressed:
            flags |= FLAG_CODES_ZLIB
    bits: np.ndarray | None = None
    if mask is not None and send_masks:
        flags |= FLAG_MASK_SENT
        bits = np.packbits(mask.reshape(-1))
        if config.entropy:
            bits, compressed = _maybe_deflate(bits)
            if compressed:
                flags |= FLAG_MASK_ZLIB

    prefix = name + KEY_SEP
    payload[prefix + FIELD_META] = np.array(
        [FORMAT_VERSION, flags, n_values, x.ndim, *shape], dtype=np.int64
    )
    if scale is None:
        payload[prefix + FIELD_VALUES] = stream
    else:
        payload[prefix + FIELD_CODES] = stream
        payload[prefix + FIELD_SCALE] = scale
    if bits is not None:
        payload[prefix + FIELD_MASK] = bits


# ==============================================================================================
# Decode
# ==============================================================================================
@dataclass(frozen=True)
class _Meta:
    flags: int
    n_values: int
    shape: tuple[int, ...]

    @property
    def mode(self) -> int:
        return self.flags & QUANT_BITS

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _group(payload: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Split ``payload`` keys into ``{tensor name: {field: array}}``, keeping order."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a mapping, got {type(payload).__name__}")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        if not isinstance(key, str):
            raise ValueError(f"payload keys must be str, got {key!r}")
        name, sep, field = key.rpartition(KEY_SEP)
        if not sep or field not in _FIELDS:
            raise ValueError(
                f"payload key {key!r} is not '<tensor>{KEY_SEP}<field>' with field in "
                f"{sorted(_FIELDS)}"
            )
        if not isinstance(value, np.ndarray):
            raise ValueError(f"payload key {key!r} must be a numpy array, got {type(value)}")
        groups.setdefault(name, {})[field] = value
    return groups


def _parse_meta(name: str, fields: Mapping[str, np.ndarray]) -> _Meta:
    key = f"{name}{KEY_SEP}{FIELD_META}"
    if FIELD_META not in fields:
        raise ValueError(f"payload is missing key {key!r}")
    meta = fields[FIELD_META]
    if meta.dtype != np.int64 or meta.ndim != 1 or meta.size < _META_HEAD:
        raise ValueError(
            f"payload key {key!r} must be a 1-D int64 array of >= {_META_HEAD} entries, "
            f"got {meta.dtype} {meta.shape}"
        )
    version, flags, n_values, ndim = (int(v) for v in meta[:_META_HEAD])
    if version != FORMAT_VERSION:
        raise ValueError(f"payload key {key!r}: format version {version} != {FORMAT_VERSION}")
    if ndim < 0 or meta.size != _META_HEAD + ndim:
        raise ValueError(f"payload key {key!r}: ndim {ndim} does not match its length")
    shape = tuple(int(v) for v in meta[_META_HEAD:])
    if any(d < 0 for d in shape):
        raise ValueError(f"payload key {key!r}: negative dimension in shape {shape}")
    if flags & ~_KNOWN_FLAGS or (flags & QUANT_BITS) > _QUANT_CHANNEL:
        raise ValueError(f"payload key {key!r}: unknown flags {flags:#x}")
    if flags & FLAG_MASK_SENT and not flags & FLAG_MASKED:
        raise ValueError(f"payload key {key!r}: mask sent for a dense tensor")
    if flags & FLAG_MASK_ZLIB and not flags & FLAG_MASK_SENT:
        raise ValueError(f"payload key {key!r}: compressed mask flagged but no mask sent")
    if (flags & QUANT_BITS) == _QUANT_CHANNEL and ndim < 2:
        raise ValueError(f"payload key {key!r}: per-channel scales need ndim >= 2")
    parsed = _Meta(flags=flags, n_values=n_values, shape=shape)
    if not 0 <= n_values <= parsed.size or (not flags & FLAG_MASKED and n_values != parsed.size):
        raise ValueError(
            f"payload key {key!r}: {n_values} values for a tensor of {parsed.size} entries"
        )
    return parsed


def _label(name: str, field: str) -> str:
    return f"payload key '{name}{KEY_SEP}{field}'"


def _check_stream(label: str, arr: object, dtype: np.dtype, length: int) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
        raise ValueError(
            f"{label} must be a 1-D {dtype} array, got "
            f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
        )
    if arr.size != length:
        raise ValueError(f"{label} has {arr.size} entries, expected {length}")


def _read_stream(
    name: str,
    field: str,
    arr: np.ndarray,
    dtype: np.dtype,
    length: int,
    compressed: bool,
) -> np.ndarray:
    """Validate one stream (decompressing it if flagged) and return it as ``dtype``."""
    if not compressed:
        _check_stream(_label(name, field), arr, dtype, length)
        return arr
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{_label(name, field)} is flagged zlib but is not a 1-D uint8 array")
    raw = _inflate(name, field, arr, length * dtype.itemsize)
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


def _tensor_mask(
    name: str,
    meta: _Meta,
    fields: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray] | None,
) -> NDArray[np.bool_]:
    """Return the mask of a sparse tensor: from the payload if sent, else from ``masks``."""
    if meta.flags & FLAG_MASK_SENT:
        bits = _read_stream(
            name,
            FIELD_MASK,
            fields[FIELD_MASK],
            np.dtype(np.uint8),
            (meta.size + 7) // 8,
            bool(meta.flags & FLAG_MASK_ZLIB),
        )
        return np.unpackbits(bits, count=meta.size).view(np.bool_).reshape(meta.shape)
    if masks is None or name not in masks:
        raise ValueError(
            f"tensor {name!r} was encoded without its mask bits; pass masks={{{name!r}: ...}}"
        )
    return _check_mask(name, masks[name], meta.shape)


def _decode_tensor(
    name: str, fields: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None
) -> NDArray[np.float32]:
    """Validate the fields of one tensor and decode it into fresh float32 memory."""
    meta = _parse_meta(name, fields)
    expected = {FIELD_META}
    expected |= {FIELD_VALUES} if meta.mode == _QUANT_NONE else {FIELD_CODES, FIELD_SCALE}
    if meta.flags & FLAG_MASK_SENT:
        expected.add(FIELD_MASK)
    missing = expected - fields.keys()
    if missing:
        raise ValueError(f"payload is missing keys {sorted(name + KEY_SEP + f for f in missing)}")
    extra = fields.keys() - expected
    if extra:
        raise ValueError(f"payload has unexpected keys {sorted(name + KEY_SEP + f for f in extra)}")

    flat_idx: NDArray[np.int64] | None = None
    if meta.flags & FLAG_MASKED:
        mask = _tensor_mask(name, meta, fields, masks)
        flat_idx = np.flatnonzero(mask)
        if flat_idx.size != meta.n_values:
            raise ValueError(
                f"tensor {name!r}: {meta.n_values} transmitted values but the mask keeps "
                f"{flat_idx.size}"
            )
    compressed = bool(meta.flags & FLAG_CODES_ZLIB)
    values: NDArray[np.float32]
    if meta.mode == _QUANT_NONE:
        raw = _read_stream(
            name, FIELD_VALUES, fields[FIELD_VALUES], _VALUES_DTYPE, meta.n_values, compressed
        )
        if not np.isfinite(raw).all():
            raise ValueError(f"{_label(name, FIELD_VALUES)} has NaN or inf")
        # Copy: the result must not alias (possibly read-only) payload memory.
        values = raw.astype(np.float32, copy=flat_idx is None)
    else:
        codes = _read_stream(
            name, FIELD_CODES, fields[FIELD_CODES], np.dtype(np.int8), meta.n_values, compressed
        )
        if codes.size and codes.min() < -QMAX:
            raise ValueError(f"{_label(name, FIELD_CODES)} has the code -128")
        per_channel = meta.mode == _QUANT_CHANNEL
        scales = _check_scales(
            _label(name, FIELD_SCALE), fields[FIELD_SCALE], meta.shape[0] if per_channel else 1
        )
        if flat_idx is not None:
            # Scatter in the int8 domain (pruned codes are 0, hence exactly 0.0 below).
            dense = np.zeros(meta.size, dtype=np.int8)
            dense[flat_idx] = codes
            codes = dense
        return _dequantize(codes, scales, meta.shape, per_channel)
    if flat_idx is None:
        return values.reshape(meta.shape)
    out = np.zeros(meta.size, dtype=np.float32)
    out[flat_idx] = values
    return out.reshape(meta.shape)


def decode(
    payload: Mapping[str, np.ndarray], *, masks: Mapping[str, np.ndarray] | None = None
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

    Returns
    -------
    dict[str, np.ndarray]
        float32 tensors in payload order; pruned entries are exactly ``0.0``. The arrays are
        fresh memory (never views of the payload).

    Raises
    ------
    ValueError
        If the payload is malformed: an unknown or missing key, a wrong dtype or length, codes
        that do not match the mask popcount, a non-finite or non-positive scale, a corrupt zlib
        stream, or a missing or wrongly shaped mask.
    """
    groups = _group(payload)
    return {name: _decode_tensor(name, fields, masks) for name, fields in groups.items()}


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
        If a ``meta`` array or a mask stream is malformed.
    """
    out: dict[str, NDArray[np.bool_]] = {}
    for name, fields in _group(payload).items():
        meta = _parse_meta(name, fields)
        if meta.flags & FLAG_MASK_SENT:
            if FIELD_MASK not in fields:
                raise ValueError(f"payload is missing key '{name}{KEY_SEP}{FIELD_MASK}'")
            out[name] = _tensor_mask(name, meta, fields, None)
    return out


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
# Wire size (Flower 1.41 inflatable-object serialization, reproduced without importing flwr)
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
    """Exact byte size of Flower 1.41's serialization of ``ArrayRecord(payload)``.

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
