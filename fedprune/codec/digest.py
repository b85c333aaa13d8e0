"""A digest of a model's weights: what a seeded start sends instead of the model."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np


def weights_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """Return the sha256 hex digest of named float32 tensors (names, shapes and bytes, in order).

    Two models have the same digest iff they have the same tensor names, shapes and float32
    values in the same order (up to sha256 collisions).
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        arr = np.ascontiguousarray(np.asarray(tensor, dtype="<f4"))
        digest.update(f"{name}\n{arr.shape}\n".encode())
        digest.update(arr.data)
    return digest.hexdigest()
