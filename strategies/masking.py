"""Reconcile the clients' pruning masks into one global mask and enforce it.

:class:`MaskPolicy` is the server's pruning state and rules, used by
:class:`~strategies.strategy.FedPrune` at fixed points of each round:

1. :meth:`MaskPolicy.begin_round` computes the scheduled density (Zhu & Gupta polynomial
   schedule) and, when that is below the current global density, says what vote to ask the
   clients for (a mask, or their scores for top-k);
2. :meth:`MaskPolicy.vote_of` takes each accepted reply's vote (or scores the client's decoded
   model by magnitude, server-side);
3. :meth:`MaskPolicy.update` reconciles the votes into a new global mask (monotone: never
   outside the old one) and bumps the mask version; :meth:`MaskPolicy.enforce` zeroes the
   pruned entries of the aggregated model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.supercore import log

from fedprune import keys
from fedprune.channels import ChannelPruning
from fedprune.masks import ReconcileConfig, mask_density, reconcile
from fedprune.pruning import polynomial_density
from strategies.replies import TrainReply


@dataclass(frozen=True)
class DensitySchedule:
    """Polynomial density schedule from ``initial`` to ``final`` over server rounds."""

    initial: float
    final: float
    start_round: int
    end_round: int

    def __call__(self, server_round: int) -> float:
        """Return the scheduled density for ``server_round``."""
        return polynomial_density(
            server_round,
            initial=self.initial,
            final=self.final,
            start_round=self.start_round,
            end_round=self.end_round,
        )


class MaskPolicy:
    """Keep a global pruning mask, reconcile client votes into it, enforce it.

    Parameters
    ----------
    prunable : Sequence[str]
        Names of the prunable tensors (Linear/Conv weights).
    schedule : DensitySchedule
        Density per server round.
    reconcile_config : ReconcileConfig
        Rule and threshold; its density is replaced by the scheduled density each round.
    server_scores : bool
        Magnitude pruning: score each client by |w| of the model it sent (already decoded
        here) instead of asking it to upload scores or a mask — the same ranking, for no
        bytes. Sensitivity scores need the client's data, so they are uploaded as votes.
    channels : ChannelPruning, optional
        Channel pruning (``prune-granularity = "channel"``): votes, reconciliation and the
        downlink mask are per channel (:mod:`fedprune.channels`); :attr:`mask` stays the
        expanded element mask over every parameter.
    """

    def __init__(
        self,
        prunable: Sequence[str],
        schedule: DensitySchedule,
        reconcile_config: ReconcileConfig,
        *,
        server_scores: bool = False,
        channels: ChannelPruning | None = None,
    ) -> None:
        self.prunable = list(prunable)
        self.schedule = schedule
        self.reconcile_config = reconcile_config
        self.server_scores = server_scores
        self.channels = channels
        self.mask: dict[str, np.ndarray] | None = None
        self.version = 0
        self._density = 1.0

    @property
    def vote_kind(self) -> str:
        """What a client sends as its vote: scores for top-k, a mask otherwise."""
        return "scores" if self.reconcile_config.rule == "topk" else "mask"

    @property
    def vote_record(self) -> str:
        """The record a client's vote travels in."""
        return keys.MASK_VOTE if self.channels is None else keys.CHANNEL_VOTE

    @property
    def density(self) -> float:
        """Density of the current global mask (1.0 before any pruning)."""
        return self._density

    def _set_mask(self, mask: dict[str, np.ndarray] | None) -> None:
        self.mask = mask
        self._density = 1.0 if mask is None else mask_density(mask)

    def begin_round(
        self, server_round: int, weights: Mapping[str, np.ndarray]
    ) -> tuple[float, bool]:
        """Return (this round's scheduled density, whether the round prunes).

        The first call sets the initial mask: magnitude top-k of ``weights`` at the initial
        density (all ones at 1.0).
        """
        if self.mask is None:
            if self.channels is not None:
                self._set_mask(self.channels.initial_mask(weights, self.schedule.initial))
            else:
                scores = {name: np.abs(weights[name]) for name in self.prunable}
                config = ReconcileConfig(rule="topk", density=self.schedule.initial)
                self._set_mask(reconcile([scores], [1.0], config))
            self.version = 1
        target = self.schedule(server_round)
        return target, target < self.density - 1e-12

    def vote_request(self, prunes: bool) -> str:
        """Return the vote a round's train replies must carry: 'none', 'mask' or 'scores'."""
        return self.vote_kind if prunes and not self.server_scores else "none"

    def vote_of(
        self, reply: TrainReply, weights: Mapping[str, np.ndarray], density: float
    ) -> dict[str, np.ndarray]:
        """Return ``reply``'s vote: the one it sent, or the magnitude scores of its model."""
        if reply.vote is not None:
            return reply.vote
        if self.channels is not None:
            model = reply.model(weights)
            return self.channels.own_vote(
                self.channels.scores(model),
                rule=self.reconcile_config.rule,
                density=density,
                prior=self.mask,
            )
        model = reply.model({name: weights[name] for name in self.prunable})
        vote = {name: np.abs(m) for name, m in model.items()}
        if self.reconcile_config.rule != "topk":  # the client's own top-k mask
            own = ReconcileConfig(rule="topk", density=density)
            vote = reconcile([vote], [1.0], own, prior=self.mask)
        return vote

    def update(
        self,
        server_round: int,
        votes: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        density: float,
    ) -> None:
        """Reconcile ``votes`` (example-weighted) into the new global mask at ``density``."""
        rule, threshold = self.reconcile_config.rule, self.reconcile_config.threshold
        if self.channels is not None:
            mask = self.channels.reconcile(
                votes, weights, rule=rule, threshold=threshold, density=density, prior=self.mask
            )
        else:
            config = ReconcileConfig(rule=rule, threshold=threshold, density=density)
            mask = reconcile(list(votes), list(weights), config, prior=self.mask)
        self._set_mask(mask)
        self.version += 1
        log(
            INFO,
            "round %d: global mask v%d at density %.4f",
            server_round,
            self.version,
            self.density,
        )

    def enforce(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero, in place, the entries of ``weights`` that the global mask prunes."""
        if self.mask is not None:
            for name, keep in self.mask.items():
                weights[name] = np.where(keep, weights[name], np.float32(0.0)).astype(np.float32)
        return weights

    def state(self) -> dict[str, Any]:
        """Return the global mask and its version (a checkpoint state)."""
        state: dict[str, Any] = {"version": self.version, "names": None}
        if self.mask is not None:
            state["names"] = list(self.mask)
            state.update({f"mask/{k}": m for k, m in self.mask.items()})
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.version = int(state["version"])
        names = state["names"]
        self._set_mask(
            None if names is None else {k: state[f"mask/{k}"].astype(bool) for k in names}
        )

    def __repr__(self) -> str:
        return f"MaskPolicy({self.schedule}, {self.reconcile_config})"
