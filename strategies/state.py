"""What the server sent in the current round: the one state object the round's stages share.

The downlink encoder, the reply reader, the bounds and the mask policy all read the round from
a :class:`RoundState` built once per round by :class:`~strategies.strategy.FedPrune`; nothing
about the round travels between them inside messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedprune import keys
from fedprune.channels import ChannelPruning


@dataclass
class RoundState:
    """The global model and mask of one round, as the server sent them.

    Parameters
    ----------
    server_round : int
        The round.
    weights : dict[str, np.ndarray]
        The global float32 model the round sent (decoded from its ``ArrayRecord`` once).
    mask : dict[str, np.ndarray], optional
        The global pruning mask (bool, prunable tensors only); ``None`` when nothing is pruned.
    mask_version : int
        Version of ``mask`` (0: none).
    density : float
        The scheduled density of this round (what a mask vote must keep).
    vote_kind : {"none", "mask", "scores"}
        What a train reply must carry as its mask vote.
    vote_record : str
        The record that vote travels in (``mask-vote``, or ``channel-vote``).
    vote_rule : str
        The reconciliation rule (channel votes are read by it).
    channels : ChannelPruning, optional
        Channel pruning: the mask travels as one bit per channel, votes are per channel.
    """

    server_round: int
    weights: dict[str, np.ndarray]
    mask: dict[str, np.ndarray] | None = None
    mask_version: int = 0
    density: float = 1.0
    vote_kind: str = "none"
    vote_record: str = keys.MASK_VOTE
    vote_rule: str = "topk"
    channels: ChannelPruning | None = None
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    """The model's tensor names and shapes, in order."""
    max_reply_bytes: int = field(init=False)
    """No valid reply is larger than the dense float32 model plus its bit streams."""

    def __post_init__(self) -> None:
        self.shapes = {name: w.shape for name, w in self.weights.items()}
        self.max_reply_bytes = 2 * sum(w.nbytes for w in self.weights.values()) + 2**20
