"""Conversions between Flower records and plain ``dict[str, np.ndarray]``.

The numerics in :mod:`fedprune` work on plain dicts of numpy arrays; these two functions are the
only place where such a dict becomes an ``ArrayRecord`` or comes back from one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedprune import codec


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap ``arrays`` in an ``ArrayRecord`` of npy arrays, keeping key order.

    For anything Flower itself reads (models its strategies average, state); a codec payload
    goes through :func:`payload_record`.
    """
    return ArrayRecord({name: Array(np.require(a, requirements="C")) for name, a in arrays.items()})


def payload_record(payload: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap a codec payload in an ``ArrayRecord`` of raw arrays (no npy header).

    See :mod:`fedprune.codec.raw`; :func:`fedprune.codec.wire_size` is this record's size.
    """
    arrays = {}
    for name, a in payload.items():
        dtype, shape, data = codec.raw_fields(a)
        arrays[name] = Array(dtype=dtype, shape=shape, stype=codec.STYPE_RAW, data=data)
    return ArrayRecord(arrays)


def _numpy(array: Array) -> np.ndarray:
    """Return the numpy array of an npy or raw ``Array`` (a raw one as a read-only view)."""
    if array.stype == codec.STYPE_RAW:
        return codec.from_raw(array.dtype, array.shape, array.data)
    return array.numpy()


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the arrays of ``record`` (npy or raw) as numpy arrays, in key order."""
    return {name: _numpy(array) for name, array in record.items()}


_Scalar = TypeVar("_Scalar", int, float, str)


def scalar(
    record: ConfigRecord | MetricRecord,
    key: str,
    kind: type[_Scalar],
    default: _Scalar | None = None,
) -> _Scalar:
    """Return ``record[key]`` as a scalar of type ``kind``, validated.

    Parameters
    ----------
    record : ConfigRecord or MetricRecord
        Where to look.
    key : str
        The (kebab-case) key.
    kind : {int, float, str}
        The expected type; an ``int`` is accepted where a ``float`` is expected.
    default : optional
        Returned when ``key`` is absent; without it an absent key is an error.

    Raises
    ------
    ValueError
        If the key is absent without a default, or its value has another type (``bool`` is
        never accepted as a number).
    """
    if key not in record:
        if default is None:
            raise ValueError(f"record lacks the key '{key}'")
        return default
    value: Any = record[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (
        (kind is str and isinstance(value, str))
        or (kind is int and number and isinstance(value, int))
        or (kind is float and number)
    )
    if not ok:
        raise ValueError(f"'{key}' must be a {kind.__name__}, got {value!r}")
    result: Any = float(value) if kind is float else value
    return result
