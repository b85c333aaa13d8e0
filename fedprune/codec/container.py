"""One array per payload: the streams of a payload packed into a single uint8 array.

Flower frames every ``Array`` of a record with its own objects (an ``Array`` and an
``ArrayChunk``, each with 64-hex ids and a JSON body): about 300 B each. A blob payload is
``{KEY_BLOB: uint8 array}``; the array is the payload's streams back to back, each preceded by a
6-byte header ``[key index (u8), dtype code (u8), entry count (u32 little-endian)]``, keys in
:data:`~fedprune.codec.format._KEY_ORDER` order. ``meta`` (small non-negative integers: flags,
counts, shapes) is stored as unsigned LEB128 varints (dtype code 1, the count in bytes; 7 bits
per byte, the high bit set on every byte but a number's last): 54 B instead of 144 as int32 for
the Fashion-MNIST MLP's six tensors. It is read back as int64; a varint that runs past its
stream, is longer than 9 bytes (63 bits) or is not in its shortest form is refused.
:func:`unpack_blob` refuses anything else with a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from fedprune.codec.format import _KEY_ORDER, KEY_BLOB, KEY_META, Payload, _label

_DTYPES: Final[dict[int, np.dtype]] = {
    0: np.dtype("<i8"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<f4"),
    5: np.dtype("<f2"),
}
"""Stream dtypes by code; code 1 (:data:`_VARINT`) is varint bytes, only for ``meta``."""
_CODES: Final = {dtype: code for code, dtype in _DTYPES.items()}
_VARINT: Final = 1
_HEAD: Final = 6
_VARINT_MAX_BYTES: Final = 9
"""A non-negative int64 takes at most 63 bits: 9 varint bytes."""


def _varint_encode(values: np.ndarray) -> bytes:
    """Return the unsigned LEB128 bytes of non-negative int64 ``values``, back to back."""
    v = values.astype(np.uint64)
    n = np.ones(v.size, dtype=np.int64)
    for i in range(1, _VARINT_MAX_BYTES):
        n += v >= np.uint64(1 << (7 * i))
    owner = np.repeat(np.arange(v.size), n)
    pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    low = (v[owner] >> (7 * pos).astype(np.uint64)) & np.uint64(0x7F)
    more = (pos < n[owner] - 1).astype(np.uint64) << np.uint64(7)
    return (low | more).astype(np.uint8).tobytes()


def _varint_decode(label: str, data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_varint_encode` on uint8 ``data``; refuses malformed varints."""
    if not data.size:
        return np.zeros(0, dtype=np.int64)
    if data[-1] & 0x80:
        raise ValueError(f"{label}: a varint runs past the end of its stream")
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if (lengths > _VARINT_MAX_BYTES).any():
        raise ValueError(f"{label}: a varint of more than {_VARINT_MAX_BYTES} bytes")
    if ((lengths > 1) & (data[ends] == 0)).any():
        raise ValueError(f"{label}: a varint is not in its shortest form")
    pos = np.arange(data.size) - np.repeat(starts, lengths)
    low = (data & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(low, starts).astype(np.int64)  # 9 * 7 = 63 bits: no overflow


def pack_blob(payload: Mapping[str, np.ndarray]) -> Payload:
    """Pack a payload (keys in encode order) into ``{KEY_BLOB: uint8 array}``."""
    parts: list[bytes] = []
    for key, arr in payload.items():
        data = np.ascontiguousarray(arr).reshape(-1)
        if key == KEY_META and (not data.size or data.min() >= 0):
            varints = _varint_encode(data)
            parts.append(bytes([_KEY_ORDER.index(key), _VARINT]))
            parts.append(len(varints).to_bytes(4, "little"))
            parts.append(varints)
            continue
        dtype = data.dtype.newbyteorder("<") if data.dtype.itemsize > 1 else data.dtype
        code = _CODES.get(dtype)
        if code is None:
            raise ValueError(f"stream {key!r} of dtype {dtype} has no blob dtype code")
        parts.append(bytes([_KEY_ORDER.index(key), code]))
        parts.append(int(data.size).to_bytes(4, "little"))
        parts.append(data.astype(dtype, copy=False).tobytes())
    return {KEY_BLOB: np.frombuffer(bytearray(b"".join(parts)), dtype=np.uint8)}


def is_blob(payload: Mapping[str, object]) -> bool:
    """Whether ``payload`` is a packed blob (its only key is :data:`KEY_BLOB`)."""
    return KEY_BLOB in payload


def unpack_blob(payload: Mapping[str, object]) -> Payload:
    """Inverse of :func:`pack_blob`: the payload's streams as read-only views of the blob.

    Raises
    ------
    ValueError
        If the payload has keys besides the blob, the blob is not a 1-D uint8 array, a header is
        truncated, names an unknown key or dtype, repeats a key or breaks the key order, a
        stream runs past the end of the blob, or bytes trail the last stream.
    """
    label = _label(KEY_BLOB)
    if set(payload) != {KEY_BLOB}:
        raise ValueError(f"a blob payload has the one key {KEY_BLOB!r}, got {sorted(payload)}")
    blob = payload[KEY_BLOB]
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"{label} must be a 1-D uint8 array")
    raw = np.ascontiguousarray(blob).tobytes()
    out: Payload = {}
    pos, last = 0, -1
    while pos < len(raw):
        if pos + _HEAD > len(raw):
            raise ValueError(f"{label}: truncated stream header at byte {pos}")
        index, code = raw[pos], raw[pos + 1]
        count = int.from_bytes(raw[pos + 2 : pos + _HEAD], "little")
        pos += _HEAD
        if index >= len(_KEY_ORDER) or index <= last:
            raise ValueError(f"{label}: stream key index {index} is unknown or out of order")
        last = index
        key = _KEY_ORDER[index]
        if code not in _DTYPES and (code != _VARINT or key != KEY_META):
            raise ValueError(f"{label}: unknown dtype code {code} for stream {key!r}")
        dtype = _DTYPES.get(code, np.dtype("u1"))  # varints: their bytes
        end = pos + count * dtype.itemsize
        if end > len(raw):
            raise ValueError(f"{label}: stream {key!r} of {count} entries runs past the blob")
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=pos)
        out[key] = _varint_decode(f"{label} {key!r}", arr) if code == _VARINT else arr
        pos = end
    return out
