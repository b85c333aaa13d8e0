"""A decoded tensor as its transmitted entries: flat positions and float32 values.

:func:`~fedprune.codec.decode_sparse` returns one :class:`SparseTensor` per tensor, so a
receiver that only sums or measures updates (the server's weighted mean, an update's norm)
never materialises the zeros of a top-k or pruned payload. :func:`~fedprune.codec.decode` is
the same decode followed by :meth:`SparseTensor.dense`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class SparseTensor:
    """A float32 tensor given by the values at a sorted set of flat (C order) positions.

    Parameters
    ----------
    shape : tuple[int, ...]
        The tensor's shape.
    index : np.ndarray or None
        Sorted, distinct int64 flat positions of ``values``; ``None``: ``values`` holds every
        entry of the tensor in C order.
    values : np.ndarray
        1-D float32, owned by this object (never a view of a payload). Every entry not in
        ``index`` is exactly ``0.0``.
    """

    shape: tuple[int, ...]
    index: NDArray[np.int64] | None
    values: NDArray[np.float32]

    @classmethod
    def from_dense(cls, x: NDArray[np.float32]) -> SparseTensor:
        """Wrap a float32 array (its values are taken over, not copied)."""
        return cls(tuple(x.shape), None, x.reshape(-1))

    @property
    def size(self) -> int:
        """Return the number of entries of the tensor (zeros included)."""
        return math.prod(self.shape)

    def dense(self, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Return the tensor as a float32 array (fresh memory when ``index`` is set).

        Given ``out`` (flat, float32, :attr:`size` entries), the tensor is written there.
        """
        if out is None:
            if self.index is None:
                return self.values.reshape(self.shape)
            out = np.zeros(self.size, dtype=np.float32)
        elif self.index is None:
            np.copyto(out, self.values)
            return out.reshape(self.shape)
        else:
            out.fill(0.0)
        out[self.index] = self.values
        return out.reshape(self.shape)

    def squared_norm(self) -> float:
        """Return the sum of the squared entries."""
        return float(np.vdot(self.values, self.values))

    def scale(self, factor: float) -> None:
        """Multiply every entry by ``factor`` in place (float32)."""
        np.multiply(self.values, np.float32(factor), out=self.values)

    def add_into(self, out: NDArray[np.float32], factor: float = 1.0) -> None:
        """``out += factor * self`` in place (``out``: C-contiguous float32 of :attr:`shape`)."""
        if tuple(out.shape) != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"cannot add a {self.shape} tensor into this {tuple(out.shape)} array")
        scaled = self.values * np.float32(factor) if factor != 1.0 else self.values
        flat = out.reshape(-1)
        if self.index is None:
            flat += scaled
        else:
            np.add.at(flat, self.index, scaled)
