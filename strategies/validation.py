"""Validate every reply before it is aggregated; skip a round rather than poison the model.

Flower's stock aggregation averages whatever arrives: NaN, wrong shapes, absurd example counts.
:class:`ReplyValidation` sits directly outside the aggregating strategy (inside the payload
codec, so it sees decoded float32 models) and

- drops a reply whose arrays do not match the global model (keys, shapes, float32 dtype) or are
  not finite, whose ``num-examples`` is not a positive integer under a cap, that claims another
  round, or that repeats a node already heard from this round — logging the reason and counting
  it in the round's ``num-rejected``;
- skips the round (the global model stays as it was) when fewer than ``min_replies`` valid
  replies remain, or when the aggregate is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprune import keys
from strategies.records import from_record, scalar
from strategies.wrapper import StrategyWrapper, load_strategy_state, strategy_state


@dataclass(frozen=True)
class ReplyLimits:
    """What a valid reply may claim."""

    min_replies: int = 1
    """Fewer valid replies than this and the round is skipped."""
    max_num_examples: int = 10_000_000
    """An upper bound on ``num-examples`` (a client claiming more would dominate the average)."""


class ReplyValidation(StrategyWrapper):
    """Drop invalid replies before the inner strategy aggregates; never accept a NaN model.

    Parameters
    ----------
    strategy : Strategy
        The aggregating strategy.
    limits : ReplyLimits
        Bounds a reply must respect.
    """

    def __init__(self, strategy: Strategy, limits: ReplyLimits) -> None:
        super().__init__(strategy)
        self.limits = limits
        self._global: dict[str, np.ndarray] = {}
        self.rejected: dict[int, list[str]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies must match, then configure as the inner."""
        self._global = from_record(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def check(self, server_round: int, reply: Message) -> None:
        """Raise ``ValueError`` naming the first problem of ``reply``, if any."""
        content = reply.content
        if keys.ARRAYS not in content.array_records:
            raise ValueError(f"no '{keys.ARRAYS}' ArrayRecord")
        if keys.METRICS not in content.metric_records:
            raise ValueError(f"no '{keys.METRICS}' MetricRecord")
        metrics = content.metric_records[keys.METRICS]
        num_examples = scalar(metrics, keys.NUM_EXAMPLES, int)
        if not 0 < num_examples <= self.limits.max_num_examples:
            raise ValueError(
                f"'{keys.NUM_EXAMPLES}'={num_examples} not in [1, {self.limits.max_num_examples}]"
            )
        if keys.EPSILON in metrics:
            epsilon = scalar(metrics, keys.EPSILON, float)
            if not (math.isfinite(epsilon) and epsilon >= 0.0):
                raise ValueError(f"'{keys.EPSILON}'={epsilon} is not a finite number >= 0")
        claimed = scalar(metrics, keys.SERVER_ROUND, int, server_round)
        if claimed != server_round:
            raise ValueError(f"stale reply: it claims round {claimed}, this is {server_round}")
        record = content.array_records[keys.ARRAYS]
        if list(record.keys()) != list(self._global):
            raise ValueError(f"arrays {list(record.keys())} differ from the model's")
        for name, array in record.items():
            expected = self._global[name]
            if tuple(array.shape) != expected.shape or array.dtype != str(expected.dtype):
                raise ValueError(
                    f"'{name}' is {array.dtype}{list(array.shape)}, "
                    f"expected {expected.dtype}{list(expected.shape)}"
                )
            if not np.isfinite(array.numpy()).all():
                raise ValueError(f"'{name}' has non-finite values")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies, or skip the round if too few remain."""
        valid: list[Message] = []
        seen: set[int] = set()
        reasons: list[str] = []
        for reply in replies:
            if reply.has_error():
                valid.append(reply)  # the inner strategy logs and ignores error replies
                continue
            node = reply.metadata.src_node_id
            try:
                if node in seen:
                    raise ValueError("duplicate reply from the same node")
                self.check(server_round, reply)
            except ValueError as err:
                reasons.append(f"node {node}: {err}")
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, err)
                continue
            seen.add(node)
            valid.append(reply)
        self.rejected[server_round] = reasons
        if len(seen) < self.limits.min_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies, %d needed; the global model is unchanged",
                server_round,
                len(seen),
                self.limits.min_replies,
            )
            return None, _skipped(valid, len(reasons))
        # Stateful inner strategies (FedAvgM's momentum, FedAdam's moments, the mask) update
        # while they aggregate: a skipped round must leave them as they were.
        before = strategy_state(self.strategy)
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        metrics = MetricRecord() if metrics is None else metrics
        metrics[keys.NUM_REJECTED] = len(reasons)
        if arrays is not None and not all(np.isfinite(a.numpy()).all() for a in arrays.values()):
            log(WARNING, "round %d skipped: the aggregate is not finite", server_round)
            load_strategy_state(self.strategy, before)
            return None, _skipped(valid, len(reasons))
        log(INFO, "round %d: %d valid replies, %d rejected", server_round, len(seen), len(reasons))
        return arrays, metrics

    def summary(self) -> None:
        """Log the limits and the inner strategy."""
        log(INFO, "\t├──> Reply validation: %s", self.limits)
        self.strategy.summary()


def _skipped(valid: list[Message], rejected: int) -> MetricRecord:
    """Metrics of a skipped round: the rejections, and the largest ε the valid replies report.

    The clients trained (and spent privacy budget) even though their round was skipped.
    """
    metrics = MetricRecord({keys.NUM_REJECTED: rejected})
    epsilons = [
        scalar(reply.content.metric_records[keys.METRICS], keys.EPSILON, float)
        for reply in valid
        if not reply.has_error() and keys.EPSILON in reply.content.metric_records[keys.METRICS]
    ]
    if epsilons:
        metrics[keys.EPSILON] = max(epsilons)
    return metrics
