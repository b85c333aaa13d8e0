"""Reconcile the clients' pruning masks into one global mask and enforce it.

:class:`MaskReconciliation` works on decoded float32 replies (it sits *inside*
:class:`~strategies.payload.CompressedPayload`). Each round it

1. computes the scheduled density (Zhu & Gupta polynomial schedule) and, when that is below the
   current global density, asks the clients for a vote (a mask, or their scores for top-k);
2. attaches the current global mask to the outgoing messages (the payload wrapper encodes under
   it and decides per node whether the mask bits must travel);
3. after the inner strategy aggregated, reconciles the votes into a new global mask (monotone:
   never outside the old one), bumps the mask version, and zeroes the pruned entries of the
   aggregated model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprune import keys
from fedprune.channels import ChannelPruning
from fedprune.masks import ReconcileConfig, mask_density, reconcile
from fedprune.pruning import polynomial_density
from strategies.records import from_record, scalar, to_record
from strategies.wrapper import StrategyWrapper


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


class MaskReconciliation(StrategyWrapper):
    """Keep a global pruning mask, reconcile client votes into it, enforce it.

    Parameters
    ----------
    strategy : Strategy
        The aggregating strategy; it sees replies without their mask votes.
    prunable : Sequence[str]
        Names of the prunable tensors (Linear/Conv weights).
    schedule : DensitySchedule
        Density per server round.
    reconcile_config : ReconcileConfig
        Rule and threshold; its density is replaced by the scheduled density each round.
    server_scores : bool
        Magnitude pruning: score each client by |w| of the model it sent (already decoded here)
        instead of asking it to upload scores or a mask — the same ranking, for no bytes.
        Sensitivity scores need the client's data, so they are uploaded as votes.
    channels : ChannelPruning or None
        Channel pruning (``prune-granularity = "channel"``): votes, reconciliation and the
        downlink mask are per channel (:mod:`fedprune.channels`); ``self.mask`` stays the
        expanded element mask over every parameter.
    """

    def __init__(
        self,
        strategy: Strategy,
        prunable: Sequence[str],
        schedule: DensitySchedule,
        reconcile_config: ReconcileConfig,
        *,
        server_scores: bool = False,
        channels: ChannelPruning | None = None,
    ) -> None:
        super().__init__(strategy)
        self.prunable = list(prunable)
        self.schedule = schedule
        self.reconcile_config = reconcile_config
        self.server_scores = server_scores
        self.channels = channels
        self.mask: dict[str, np.ndarray] | None = None
        self.version = 0
        self._round_density: dict[int, float] = {}
        self._prunes: set[int] = set()

    @property
    def vote_kind(self) -> str:
        """What a client sends as its vote: scores for top-k, a mask otherwise."""
        return "scores" if self.reconcile_config.rule == "topk" else "mask"

    @property
    def density(self) -> float:
        """Density of the current global mask (1.0 before any pruning)."""
        return 1.0 if self.mask is None else mask_density(self.mask)

    def _initial_mask(self, arrays: ArrayRecord) -> None:
        """Magnitude top-k mask of the initial model at the initial density (all ones at 1.0)."""
        weights = from_record(arrays)
        if self.channels is not None:  # channel hook
            self.mask = self.channels.initial_mask(weights, self.schedule.initial)
            self.version = 1
            return
        scores = {name: np.abs(weights[name]) for name in self.prunable}
        config = ReconcileConfig(rule="topk", density=self.schedule.initial)
        self.mask = reconcile([scores], [1.0], config)
        self.version = 1

    def _attach(self, server_round: int, messages: Iterable[Message], vote: str) -> list[Message]:
        out = list(messages)
        if self.mask is not None:
            record = to_record(self.mask)
            for message in out:
                message.content[keys.GLOBAL_MASK] = record
            if self.channels is not None:  # channel hook: one bit per channel on the wire
                bits = to_record(self.channels.wire_mask(self.mask))
                for message in out:
                    message.content[keys.CHANNEL_MASK] = bits
        density = self._round_density.get(server_round)
        if density is None:
            density = self.density  # a pass over the whole mask: once, not per message
        for message in out:
            config = message.content.config_records.get(keys.CONFIG)
            if config is not None:
                config[keys.DENSITY] = density
                config[keys.VOTE] = vote
                config[keys.MASK_VERSION] = self.version
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Schedule this round's density, ask for votes when it drops, attach the mask."""
        if self.mask is None:
            self._initial_mask(arrays)
        target = self.schedule(server_round)
        prunes = target < self.density - 1e-12
        vote = self.vote_kind if prunes and not self.server_scores else "none"
        self._round_density[server_round] = target
        if prunes:
            self._prunes.add(server_round)
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return self._attach(server_round, messages, vote)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Attach the global mask to evaluation messages (no votes)."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self._attach(server_round, messages, "none")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the inner strategy, reconcile the votes, enforce the mask."""
        got = list(replies)
        density = self._round_density.get(server_round, self.density)
        votes, weights = self._collect_votes(server_round, got, density)
        arrays, metrics = self.strategy.aggregate_train(server_round, got)
        if arrays is not None and votes:
            config = ReconcileConfig(
                rule=self.reconcile_config.rule,
                threshold=self.reconcile_config.threshold,
                density=density,
            )
            if self.channels is not None:  # channel hook
                self.mask = self.channels.reconcile(
                    votes,
                    weights,
                    rule=config.rule,
                    threshold=config.threshold,
                    density=density,
                    prior=self.mask,
                )
            else:
                self.mask = reconcile(votes, weights, config, prior=self.mask)
            self.version += 1
            log(
                INFO,
                "round %d: global mask v%d at density %.4f",
                server_round,
                self.version,
                self.density,
            )
        if arrays is not None and self.mask is not None:
            arrays = self._enforce(arrays)
        metrics = MetricRecord() if metrics is None else metrics
        metrics[keys.DENSITY] = self.density
        return arrays, metrics

    def _collect_votes(
        self, server_round: int, replies: list[Message], density: float
    ) -> tuple[list[dict[str, np.ndarray]], list[float]]:
        """Take the clients' votes out of the replies (or score their models, server-side)."""
        votes: list[dict[str, np.ndarray]] = []
        weights: list[float] = []
        for reply in replies:
            content = reply.content
            if reply.has_error():
                continue
            if self.channels is not None:  # channel hook
                vote = self._channel_vote(server_round, reply, density)
                if vote is None:
                    continue
            elif keys.MASK_VOTE in content.array_records:
                vote = from_record(content.array_records[keys.MASK_VOTE])
                del content[keys.MASK_VOTE]
            elif self.server_scores and server_round in self._prunes:
                model = from_record(content.array_records[keys.ARRAYS])
                vote = {name: np.abs(model[name]) for name in self.prunable}
                if self.reconcile_config.rule != "topk":  # the client's own top-k mask
                    own = ReconcileConfig(rule="topk", density=density)
                    vote = reconcile([vote], [1.0], own, prior=self.mask)
            else:
                continue
            votes.append(vote)
            metrics = content.metric_records.get(keys.METRICS, MetricRecord())
            weights.append(scalar(metrics, keys.NUM_EXAMPLES, float))
        return votes, weights

    def _channel_vote(
        self, server_round: int, reply: Message, density: float
    ) -> dict[str, np.ndarray] | None:
        """Return a reply's channel vote (uploaded or scored here); ``None``: none or malformed."""
        assert self.channels is not None
        content = reply.content
        rule = self.reconcile_config.rule
        if keys.CHANNEL_VOTE in content.array_records:
            raw = from_record(content.array_records[keys.CHANNEL_VOTE])
            del content[keys.CHANNEL_VOTE]
            try:
                if server_round not in self._prunes or self.server_scores:
                    raise ValueError("reply carries a channel vote that was not asked for")
                return self.channels.read_vote(raw, rule, density)
            except ValueError as err:
                log(
                    WARNING,
                    "round %d: rejected channel vote from node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    err,
                )
                return None
        if self.server_scores and server_round in self._prunes:
            model = from_record(content.array_records[keys.ARRAYS])
            return self.channels.own_vote(
                self.channels.scores(model), rule=rule, density=density, prior=self.mask
            )
        return None

    def _enforce(self, arrays: ArrayRecord) -> ArrayRecord:
        """Zero the entries of ``arrays`` that the global mask prunes."""
        assert self.mask is not None
        weights = from_record(arrays)
        for name, keep in self.mask.items():
            weights[name] = np.where(keep, weights[name], np.float32(0.0)).astype(np.float32)
        return to_record(weights)

    def own_state(self) -> dict[str, Any]:
        """Return the global mask and its version."""
        state: dict[str, Any] = {"version": self.version, "names": None}
        if self.mask is not None:
            state["names"] = list(self.mask)
            state.update({f"mask/{k}": m for k, m in self.mask.items()})
        return state

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Restore the global mask and its version."""
        self.version = int(state["version"])
        names = state["names"]
        self.mask = None if names is None else {k: state[f"mask/{k}"].astype(bool) for k in names}

    def summary(self) -> None:
        """Log the schedule and rule, then the inner strategy."""
        log(INFO, "\t├──> Mask reconciliation: %s, %s", self.schedule, self.reconcile_config)
        self.strategy.summary()
