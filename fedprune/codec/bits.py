"""Bit packing: pruning masks and selections as big-endian bit streams."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray


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


def _pack_codes(codes: NDArray[np.int8], *, ternary: bool) -> NDArray[np.uint8]:
    """Pack low-bit codes: signs one bit each (1 = negative), or int4 two per byte.

    int4 codes are stored as 4-bit two's complement, the first of a pair in the high nibble; an
    odd count leaves a zero low nibble.
    """
    if ternary:
        return np.packbits(codes < 0)
    nibbles = (codes.astype(np.uint8) & np.uint8(0x0F)).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.concatenate((nibbles, np.zeros(1, np.uint8)))
    return ((nibbles[0::2] << np.uint8(4)) | nibbles[1::2]).astype(np.uint8)


def _packed_codes_len(n: int, *, ternary: bool) -> int:
    """Bytes of ``n`` packed low-bit codes."""
    return (n + 7) // 8 if ternary else (n + 1) // 2


def _unpack_codes(
    label: str, packed: NDArray[np.uint8], n: int, *, ternary: bool
) -> NDArray[np.int8]:
    """Inverse of :func:`_pack_codes` (``packed`` already checked to hold the right length).

    Raises
    ------
    ValueError
        On the int4 code ``-8`` or set padding bits.
    """
    if ternary:
        _check_padding(label, packed, n)
        sign = np.unpackbits(packed, count=n).view(np.int8)
        return (np.int8(1) - np.int8(2) * sign).astype(np.int8)
    if n % 2 and packed.size and packed[-1] & 0x0F:
        raise ValueError(f"{label} has a non-zero padding nibble")
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed >> np.uint8(4)
    nibbles[1::2] = packed & np.uint8(0x0F)
    nibbles = nibbles[:n]
    if (nibbles == 8).any():
        raise ValueError(f"{label} has the int4 code -8")
    return ((nibbles.astype(np.int8) ^ np.int8(8)) - np.int8(8)).astype(np.int8)
