"""Bounds on what one client can do to the aggregate, applied to replies already read.

A reply that passed :mod:`strategies.replies` is well-formed, but a well-formed reply can still
take over the model: by claiming a huge example count (FedAvg weighs it by that count) or by
sending a huge update. The server cannot verify either, so it bounds both against the round's
own replies, by default:

- **example count**: a reply's weight is at most ``examples_ratio`` times the round's (lower)
  median claim. A client claiming ten million examples weighs like ``examples_ratio`` typical
  clients, not like the whole federation;
- **update norm**: an update whose L2 norm exceeds ``norm_ratio`` times the round's (lower)
  median update norm is scaled down to that norm (and to ``max_update_norm``, a fixed bound,
  when set). A ×10⁶ update moves the model like ``norm_ratio`` typical ones.

The *lower* median is used so that with two replies the bound is the smaller one's: one
honest client of two still bounds the other. Both bounds clip rather than reject: an honest
client that is merely larger than the rest loses some weight, not its whole contribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from strategies.replies import TrainReply


@dataclass(frozen=True)
class ReplyLimits:
    """What a valid reply may claim, and how far one reply may move the aggregate.

    Parameters
    ----------
    min_replies : int
        Fewer valid replies than this and the round is skipped (the model stays).
    max_num_examples : int
        A hard cap on ``num-examples``; a reply claiming more is rejected.
    examples_ratio : float
        A reply's weight is at most this multiple of the round's lower-median claim
        (``0``: no bound).
    norm_ratio : float
        An update's L2 norm is clipped to this multiple of the round's lower-median update
        norm (``0``: no bound).
    max_update_norm : float
        A fixed bound on every update's L2 norm (``0``: none), as ``clip-update-norm``.
    """

    min_replies: int = 1
    max_num_examples: int = 10_000_000
    examples_ratio: float = 4.0
    norm_ratio: float = 3.0
    max_update_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("examples_ratio", "norm_ratio", "max_update_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("examples_ratio", "norm_ratio"):
            value = getattr(self, name)
            if 0 < value < 1:
                raise ValueError(f"{name} must be 0 (off) or >= 1, got {value!r}")


def lower_median(values: Sequence[float]) -> float:
    """Return the lower median of ``values`` (the smaller middle value for an even count)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def bound_examples(replies: Sequence[TrainReply], ratio: float) -> list[str]:
    """Lower each reply's weight to ``ratio`` times the lower-median claim; say whose."""
    if ratio <= 0 or not replies:
        return []
    cap = ratio * lower_median([r.num_examples for r in replies])
    notes = []
    for reply in replies:
        if reply.num_examples > cap:
            reply.weight = cap
            notes.append(f"node {reply.node}: num-examples {reply.num_examples} weighed as {cap:g}")
    return notes


def bound_updates(
    replies: Sequence[TrainReply], norms: Sequence[float], ratio: float, max_norm: float
) -> list[str]:
    """Scale each update whose norm exceeds the round's bound down to it; say whose.

    ``norms`` are the replies' update norms (:meth:`TrainReply.norm`, computed once by the
    caller). The bound is ``ratio`` times the lower-median norm (if ``ratio > 0``), and at most
    ``max_norm`` (if ``max_norm > 0``).
    """
    if not replies or (ratio <= 0 and max_norm <= 0):
        return []
    bound = math.inf
    if ratio > 0:
        bound = ratio * lower_median(norms)
    if max_norm > 0:
        bound = min(bound, max_norm)
    notes = []
    for reply, norm in zip(replies, norms, strict=True):
        if norm > bound:
            for u in reply.update.values():
                u.scale(bound / norm)
            reply.sent_model = None  # the model is now the global one plus the scaled update
            notes.append(f"node {reply.node}: update norm {norm:.4g} clipped to {bound:.4g}")
    return notes
