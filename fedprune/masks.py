"""Server-side reconciliation of the clients' pruning-mask votes into one global mask.

Every client that is asked for a vote sends, for each prunable tensor, either a proposed ``bool``
mask (rules ``"majority"``, ``"intersection"``, ``"union"``) or ``float`` scores (rule
``"topk"``). :func:`reconcile` turns the votes and the clients' example counts into one global
``bool`` mask; it is a pure function of its inputs.

Rules
-----
``"majority"``
    Keep an entry if the example-weighted share of clients that keep it is at least
    ``config.threshold`` (a tie with the threshold keeps the entry).
``"intersection"``
    Keep an entry only if every client keeps it.
``"union"``
    Keep an entry if any client keeps it.
``"topk"``
    Average the clients' scores with their example weights and keep exactly
    ``k = round(config.density * N)`` entries globally, across all tensors, where ``N`` is the
    total number of prunable entries (Python's ``round``: halves go to the even integer).

Monotone pruning
----------------
When ``prior`` (the current global mask) is given, nothing outside it is ever kept. For
``"topk"`` that means the ``k`` entries are drawn from the prior's kept entries; if the prior keeps
fewer than ``k`` entries the result is the prior itself.

Determinism
-----------
The result is bit-identical for any order of the votes:

* ``bool`` votes are summed in float64 in ascending order of weight (stable). The terms are the
  weights themselves, so the sum for an entry depends only on the multiset of weights that keep
  it; integer weights (example counts, below ``2**53``) are summed exactly.
* ``float`` scores are summed in float64 in a canonical client order: ascending weight, then a
  content digest of the client's scores. Clients that tie on both have identical contributions.
* Top-k ties are broken by position: tensors are ordered by sorted name, entries within a tensor
  by C-order flat index, and the lower position wins.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

__all__ = [
    "ReconcileConfig",
    "ReconcileRule",
    "mask_density",
    "reconcile",
    "topk_flat",
    "weighted_score_sum",
]

ReconcileRule = Literal["majority", "intersection", "union", "topk"]
"""How client votes become the global mask (see the module docstring)."""

_RULES: tuple[str, ...] = get_args(ReconcileRule)
_MASK_RULES: frozenset[str] = frozenset({"majority", "intersection", "union"})


@dataclass(frozen=True)
class ReconcileConfig:
    """How to reconcile the clients' mask votes.

    Parameters
    ----------
    rule : {"majority", "intersection", "union", "topk"}
        The reconciliation rule.
    threshold : float
        ``"majority"`` only: keep an entry if the example-weighted share of clients keeping it is
        ``>= threshold``; in ``(0, 1]``.
    density : float or None
        ``"topk"`` only: fraction of all prunable entries to keep, in ``(0, 1]``. It may be left
        ``None`` in a run-level config and filled in per round (``dataclasses.replace``);
        :func:`reconcile` requires it for ``"topk"``.

    Raises
    ------
    ValueError
        If a field is out of range.
    """

    rule: ReconcileRule = "topk"
    threshold: float = 0.5
    density: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}")
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.density is not None and not (
            math.isfinite(self.density) and 0.0 < self.density <= 1.0
        ):
            raise ValueError(f"density must be in (0, 1] or None, got {self.density!r}")


def mask_density(masks: Mapping[str, npt.NDArray[np.bool_]]) -> float:
    """Fraction of kept entries over all tensors of a mask.

    Parameters
    ----------
    masks : Mapping[str, numpy.ndarray]
        ``name -> bool array``.

    Returns
    -------
    float
        ``kept / total`` over all tensors together.

    Raises
    ------
    ValueError
        If ``masks`` is empty, holds no entries, or holds a non-``bool`` array.
    """
    if not masks:
        raise ValueError("masks must not be empty")
    kept = 0
    total = 0
    for name, mask in masks.items():
        arr = np.asarray(mask)
        if arr.dtype != np.bool_:
            raise ValueError(f"masks[{name!r}] must be a bool array, got dtype {arr.dtype}")
        kept += int(np.count_nonzero(arr))
        total += arr.size
    if total == 0:
        raise ValueError("masks hold no entries")
    return kept / total


def reconcile(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    weights: Sequence[float] | npt.NDArray[np.number],
    config: ReconcileConfig,
    *,
    prior: Mapping[str, npt.NDArray[np.bool_]] | None = None,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Reconcile the clients' mask votes into one global mask.

    Parameters
    ----------
    votes : Sequence[Mapping[str, numpy.ndarray]]
        One vote per client, each ``name -> array`` over the same names and shapes: ``bool`` masks
        for the mask rules, finite floating-point scores (higher is more important) for ``"topk"``.
    weights : Sequence[float] or numpy.ndarray
        One positive, finite weight per vote (the client's number of examples).
    config : ReconcileConfig
        The rule and its parameters.
    prior : Mapping[str, numpy.ndarray] or None
        The current global mask over the same names and shapes; nothing outside it is kept.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``name -> bool array``, in the key order of ``prior`` if given, else of ``votes[0]``. The
        result is bit-identical for any permutation of ``(votes, weights)`` pairs.

    Raises
    ------
    ValueError
        If there are no votes, votes differ in names or shapes, a vote has the wrong dtype for the
        rule or non-finite scores, the weights are not one positive finite number per vote,
        ``prior`` does not match the votes, or ``config.density`` is missing for ``"topk"``.
    """
    if len(votes) == 0:
        raise ValueError("votes must not be empty")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != len(votes):
        raise ValueError(
            f"weights must be a 1-D sequence with one entry per vote ({len(votes)}), "
            f"got shape {w.shape}"
        )
    if not (np.all(np.isfinite(w)) and np.all(w > 0.0)):
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")

    shapes = _check_votes(votes, config.rule)
    order = list(shapes) if prior is None else list(prior)
    if prior is not None:
        _check_prior(prior, shapes)

    if config.rule == "topk":
        if config.density is None:
            raise ValueError("config.density is required for rule 'topk'")
        result = _topk(votes, w, shapes, config.density, prior)
    elif config.rule == "majority":
        result = _majority(votes, w, shapes, config.threshold)
    elif config.rule == "intersection":
        result = _reduce_bool(votes, shapes, np.logical_and, start=True)
    else:
        result = _reduce_bool(votes, shapes, np.logical_or, start=False)

    if prior is not None and config.rule != "topk":  # top-k already drew from the prior
        for name in result:
            np.logical_and(result[name], prior[name], out=result[name])
    return {name: result[name] for name in order}


# -- validation ------------------------------------------------------------------------------


def _check_votes(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]], rule: str
) -> dict[str, tuple[int, ...]]:
    """Check names, shapes and dtypes of the votes; return ``name -> shape`` of the first vote."""
    first = votes[0]
    if len(first) == 0:
        raise ValueError("votes[0] must not be empty")
    shapes = {name: tuple(np.shape(arr)) for name, arr in first.items()}
    want_bool = rule in _MASK_RULES
    for i, vote in enumerate(votes):
        if set(vote) != set(shapes):
            raise ValueError(
                f"votes[{i}] has names {sorted(vote)}, expected the names of votes[0] "
                f"{sorted(shapes)}"
            )
        for name, arr in vote.items():
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"votes[{i}][{name!r}] must be a numpy array, got {type(arr)}")
            if arr.shape != shapes[name]:
                raise ValueError(
                    f"votes[{i}][{name!r}] has shape {arr.shape}, expected {shapes[name]}"
                )
            if want_bool:
                if arr.dtype != np.bool_:
                    raise ValueError(
                        f"votes[{i}][{name!r}] must be a bool mask for rule {rule!r}, "
                        f"got dtype {arr.dtype}"
                    )
            else:
                if not np.issubdtype(arr.dtype, np.floating):
                    raise ValueError(
                        f"votes[{i}][{name!r}] must be floating-point scores for rule {rule!r}, "
                        f"got dtype {arr.dtype}"
                    )
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"votes[{i}][{name!r}] has non-finite scores")
    return shapes


def _check_prior(
    prior: Mapping[str, npt.NDArray[np.bool_]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Check that ``prior`` is a bool mask over the votes' names and shapes."""
    if set(prior) != set(shapes):
        raise ValueError(
            f"prior has names {sorted(prior)}, expected the votes' names {sorted(shapes)}"
        )
    for name, arr in prior.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_:
            raise ValueError(f"prior[{name!r}] must be a bool numpy array")
        if arr.shape != shapes[name]:
            raise ValueError(f"prior[{name!r}] has shape {arr.shape}, expected {shapes[name]}")


# -- rules -----------------------------------------------------------------------------------


def _reduce_bool(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    shapes: Mapping[str, tuple[int, ...]],
    op: np.ufunc,
    *,
    start: bool,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Fold the bool votes with a commutative, associative logical ufunc."""
    out: dict[str, npt.NDArray[np.bool_]] = {}
    for name, shape in shapes.items():
        acc = np.full(shape, start, dtype=np.bool_)
        for vote in votes:
            op(acc, vote[name], out=acc)
        out[name] = acc
    return out


def _majority(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    w: npt.NDArray[np.float64],
    shapes: Mapping[str, tuple[int, ...]],
    threshold: float,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Example-weighted vote: keep where the kept weight is ``>= threshold * total weight``."""
    order = np.argsort(w, kind="stable")
    total = 0.0
    for i in order:  # same sequential order as the per-entry sums below
        total += float(w[i])
    bar = threshold * total
    out: dict[str, npt.NDArray[np.bool_]] = {}
    for name, shape in shapes.items():
        acc = np.zeros(shape, dtype=np.float64)
        term = np.empty(shape, dtype=np.float64)
        for i in order:
            # term is exactly w[i] or 0.0, and acc + 0.0 == acc: the sum per entry is the
            # sequential sum of the weights of the clients keeping it, in ascending order.
            np.multiply(votes[i][name], w[i], out=term)
            acc += term
        out[name] = acc >= bar
    return out


def _canonical_order(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    w: npt.NDArray[np.float64],
    names: Sequence[str],
) -> list[int]:
    """Vote indices sorted by (weight, digest of the scores): independent of the input order."""
    keys: list[tuple[float, bytes]] = []
    for i, vote in enumerate(votes):
        h = hashlib.blake2b(digest_size=16)
        for name in names:
            arr = np.ascontiguousarray(vote[name])
            h.update(arr.dtype.str.encode())
            if arr.size:  # a zero-size buffer cannot be cast, and adds no bytes
                h.update(arr.data.cast("B"))
        keys.append((float(w[i]), h.digest()))
    return sorted(range(len(votes)), key=keys.__getitem__)


def _topk(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    w: npt.NDArray[np.float64],
    shapes: Mapping[str, tuple[int, ...]],
    density: float,
    prior: Mapping[str, npt.NDArray[np.bool_]] | None,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Weighted score sum, then exactly ``round(density * N)`` entries kept globally."""
    names = sorted(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    offsets = np.cumsum([0, *sizes])
    n_total = int(offsets[-1])
    acc = np.zeros(n_total, dtype=np.float64)
    scratch = np.empty(n_total, dtype=np.float64)
    views = [slice(int(a), int(b)) for a, b in itertools.pairwise(offsets)]
    for i in _canonical_order(votes, w, names):
        wi = np.float64(w[i])
        for name, sl in zip(names, views, strict=True):
            np.multiply(votes[i][name].reshape(-1), wi, out=scratch[sl], dtype=np.float64)
        acc += scratch
    # The ranking of the weighted sum equals that of the weighted average (division by the total
    # weight is monotone), so no division is needed.

    k = round(density * n_total)
    if prior is not None:
        allowed = np.concatenate([prior[n].reshape(-1) for n in names])
        k = min(k, int(np.count_nonzero(allowed)))
        acc[~allowed] = -np.inf
    keep = topk_flat(acc, k)
    return {name: keep[sl].reshape(shapes[name]) for name, sl in zip(names, views, strict=True)}


def weighted_score_sum(
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    weights: Sequence[float] | npt.NDArray[np.number],
    names: Sequence[str],
) -> dict[str, npt.NDArray[np.float64]]:
    """Example-weighted sum of score votes, bit-identical for any order of the votes.

    The terms are summed in float64 in the canonical client order (ascending weight, then a
    digest of the client's scores), as rule ``"topk"`` of :func:`reconcile` does.

    Parameters
    ----------
    votes : Sequence[Mapping[str, numpy.ndarray]]
        One ``name -> finite scores`` per client, over (at least) ``names``, same shapes.
    weights : Sequence[float] or numpy.ndarray
        One positive, finite weight per vote.
    names : Sequence[str]
        The score tensors to sum.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``name -> float64 weighted sum``, in the order of ``names``.

    Raises
    ------
    ValueError
        If there are no votes, the weights are not one positive finite number per vote, or a
        vote lacks a name, has another shape or holds non-finite or non-float scores.
    """
    if len(votes) == 0:
        raise ValueError("votes must not be empty")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != len(votes) or not np.all(np.isfinite(w) & (w > 0.0)):
        raise ValueError(f"weights must be one positive finite number per vote, got {w.tolist()}")
    _check_votes([{n: v[n] for n in names if n in v} for v in votes], "topk")
    order = sorted(names)
    out = {n: np.zeros(np.shape(votes[0][n]), dtype=np.float64) for n in names}
    for i in _canonical_order(votes, w, order):
        for n in order:
            out[n] += np.multiply(votes[i][n], w[i], dtype=np.float64)
    return {n: out[n] for n in names}


def topk_flat(scores: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.bool_]:
    """Mask of the ``k`` largest ``scores``; among equal scores the lower index wins.

    ``k`` must not exceed the number of finite scores (``-inf`` marks excluded entries).
    """
    n = scores.size
    if k <= 0:
        return np.zeros(n, dtype=np.bool_)
    if k >= n:
        return np.ones(n, dtype=np.bool_)
    kth = np.partition(scores, n - k)[n - k]  # the k-th largest score
    keep = scores > kth
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(scores == kth)[:need]] = True
    return keep
