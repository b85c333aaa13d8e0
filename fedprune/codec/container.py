"""One array per payload: the streams of a payload packed into a single uint8 array.

Flower frames every ``Array`` of a record with its own objects (an ``Array`` and an
``ArrayChunk``, each with 64-hex ids and a JSON body): about 300 B each. A blob payload is
``{KEY_BLOB: uint8 array}``; the array is the payload's streams back to back, each preceded by a
6-byte header ``[key index (u8), dtype code (u8), entry count (u32 little-endian)]``, keys in
:data:`~fedprune.codec.format._KEY_ORDER` order. ``meta`` is stored as int32 when every entry
fits (it is read back as int64). :func:`unpack_blob` refuses anything else with a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from fedprune.codec.format import _KEY_ORDER, KEY_BLOB, KEY_META, Payload, _label

_DTYPES: Final = (
    np.dtype("<i8"),
    np.dtype("<i4"),
    np.dtype("u1"),
    np.dtype("i1"),
    np.dtype("<f4"),
    np.dtype("<f2"),
)
"""Stream dtypes by code; ``<i4`` only for ``meta``."""
_HEAD: Final = 6
_I32: Final = np.iinfo(np.int32)


def pack_blob(payload: Mapping[str, np.ndarray]) -> Payload:
    """Pack a payload (keys in encode order) into ``{KEY_BLOB: uint8 array}``."""
    parts: list[bytes] = []
    for key, arr in payload.items():
        data = np.ascontiguousarray(arr).reshape(-1)
        if key == KEY_META and data.size and _I32.min <= data.min() and data.max() <= _I32.max:
            data = data.astype("<i4")
        dtype = data.dtype.newbyteorder("<") if data.dtype.itemsize > 1 else data.dtype
        code = _DTYPES.index(dtype)
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
        if code >= len(_DTYPES) or (code == 1 and key != KEY_META):
            raise ValueError(f"{label}: unknown dtype code {code} for stream {key!r}")
        dtype = _DTYPES[code]
        end = pos + count * dtype.itemsize
        if end > len(raw):
            raise ValueError(f"{label}: stream {key!r} of {count} entries runs past the blob")
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=pos)
        out[key] = arr.astype(np.int64) if code == 1 else arr
        pos = end
    return out
