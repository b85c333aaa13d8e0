"""Compact model export: the pruned global model as a sparse int8 file, and back.

The file is an uncompressed ``.npz`` holding a :mod:`fedprune.codec` payload of the weights:
int8 codes of the kept entries with per-channel scales, bit-packed masks, and the codec's zlib
stage wherever it pays. It loads with ``np.load(allow_pickle=False)`` (no pickle anywhere) and
decodes to float32 weights that drop straight into the model (``fedprune.models.set_weights``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedprune import codec

EXPORT_CODEC = codec.CodecConfig(quant="int8-channel", entropy=True)
"""How exported weights are encoded, whatever the run's wire settings were."""


def save_compact(
    path: Path, weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None
) -> int:
    """Write ``weights`` (pruned under ``masks``) as a compact file; return its size in bytes.

    Parameters
    ----------
    path : Path
        Destination (``.npz``); parent directories are created.
    weights : Mapping[str, np.ndarray]
        float32 weights in ``state_dict`` order.
    masks : Mapping[str, np.ndarray] or None
        The global pruning mask (``None`` for a dense model).
    """
    payload = codec.encode(weights, EXPORT_CODEC, masks=masks, send_masks=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, allow_pickle=False, **payload)
    return path.stat().st_size


def load_compact(path: Path) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save_compact` back into float32 weights.

    Raises
    ------
    ValueError
        If the file is not a valid compact model.
    """
    with np.load(path, allow_pickle=False) as data:
        payload = {name: data[name] for name in data.files}
    return codec.decode(payload)
