"""Where a payload's bytes go: positions, values, scales and framing, against H(p)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from fedprune.codec.container import is_blob, unpack_blob
from fedprune.codec.decode import _check_keys, _parse_layout
from fedprune.codec.format import (
    KEY_CODES,
    KEY_MASK,
    KEY_SCALE,
    KEY_SELECT,
    KEY_VALUES,
)
from fedprune.codec.rice import entropy_bits
from fedprune.codec.wire import wire_size

BREAKDOWN_KEYS: Final = ("positions", "entropy", "values", "scales", "framing")
"""Keys of :func:`bits_breakdown`, in table order."""


def bits_breakdown(payload: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Return the bits of each part of a payload on the wire, per parameter of the model.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        An encoded payload (arrays or blob container).

    Returns
    -------
    dict[str, float]
        ``positions``: the ``mask`` and ``select`` streams; ``entropy``: their information
        content if the positions were i.i.d., ``sum n_bits * H(n_ones / n_bits)`` per segment
        (what no position code can beat on average); ``values``: the code or value stream;
        ``scales``: the step sizes; ``framing``: everything else of :func:`wire_size`
        (``meta``, names and Flower's objects). Every figure is divided by the
        number of model parameters (the sum of the tensor sizes).

    Raises
    ------
    ValueError
        If the payload is malformed (as :func:`~fedprune.codec.decode`).
    """
    streams = unpack_blob(payload) if is_blob(payload) else payload
    _check_keys(streams)
    layout = _parse_layout(streams)
    n_params = sum(entry.size for entry in layout.entries) or 1

    def nbits(key: str) -> int:
        return 8 * streams[key].nbytes if key in streams else 0

    positions = nbits(KEY_MASK) + nbits(KEY_SELECT)
    entropy = 0.0
    for key in (KEY_MASK, KEY_SELECT):
        if key in streams:
            entropy += sum(entropy_bits(n, size) for n, size in layout.position_counts(key))
    values = nbits(KEY_CODES) + nbits(KEY_VALUES)
    scales = nbits(KEY_SCALE)
    framing = 8 * wire_size(payload) - positions - values - scales
    return {
        "positions": positions / n_params,
        "entropy": entropy / n_params,
        "values": values / n_params,
        "scales": scales / n_params,
        "framing": framing / n_params,
    }
