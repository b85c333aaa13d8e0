"""Bytes on the wire, counted from Flower's own serialization of every message.

Flower 1.42 moves a message as a tree of *inflatable objects* (Message -> RecordDict ->
records -> Arrays -> ArrayChunks), each deflated to bytes; a receiver pulls each distinct object
of a message once. The size of a message on the wire is therefore the sum of the deflated sizes
of the distinct objects in its tree. :class:`WireAccounting` wraps any strategy and counts every
message it sends (downlink) and every reply it receives (uplink), train and evaluate alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
)

from fedprune import keys
from strategies.wrapper import StrategyWrapper


def object_tree_bytes(obj: InflatableObject) -> int:
    """Return the deflated size in bytes of the distinct objects in ``obj``'s tree."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def message_wire_sizes(messages: Iterable[Message]) -> list[int]:
    """Return the bytes each of ``messages`` occupies on the wire, one receiver per message.

    Each message is counted in full (each destination node pulls its whole tree: the Message,
    its RecordDict, and the distinct objects of every record). A record shared by several
    messages (one encoded payload broadcast to many nodes) is deflated and sized once: its
    objects' sizes are cached by the record's identity.
    """
    sizes = []
    record_objects: dict[int, dict[str, int]] = {}
    for message in messages:
        own = len(message.deflate())
        if message.has_content():
            content = message.content
            own += len(content.deflate())
            objects: dict[str, int] = {}
            for record in content.values():
                key = id(record)
                if key not in record_objects:
                    record_objects[key] = {
                        object_id: len(o.deflate())
                        for object_id, o in get_all_nested_objects(record).items()
                    }
                objects.update(record_objects[key])
            own += sum(objects.values())
        sizes.append(own)
    return sizes


def message_wire_bytes(messages: Iterable[Message]) -> int:
    """Return the bytes that ``messages`` occupy on the wire (:func:`message_wire_sizes`)."""
    return sum(message_wire_sizes(messages))


def reported_epsilon(reply: Message) -> float | None:
    """Return the ε a reply's metrics report, if any."""
    if reply.has_error():
        return None
    for record in reply.content.metric_records.values():
        if keys.EPSILON in record:
            return float(cast(float, record[keys.EPSILON]))
    return None


def canonical_order(replies: Iterable[Message]) -> list[Message]:
    """Return ``replies`` sorted by content hash (error replies last, by error code).

    Two replies with the same hash carry the same content, so their relative order does not
    change any aggregate.
    """

    def key(reply: Message) -> tuple[int, str]:
        if reply.has_error():
            return 1, str(reply.error.code)
        return 0, reply.content.object_id

    return sorted(replies, key=key)


@dataclass
class NodeTraffic:
    """What travelled to and from one node in one server round, and the ε it reported."""

    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: float | None = None


@dataclass
class RoundTraffic:
    """What travelled in one server round (in all, and per node id)."""

    server_round: int
    bytes_up: int = 0
    bytes_down: int = 0
    replies: int = 0
    failures: int = 0
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0
    nodes: dict[int, NodeTraffic] = field(default_factory=dict)

    def node(self, node_id: int) -> NodeTraffic:
        """Return the traffic of node ``node_id`` (created empty)."""
        return self.nodes.setdefault(node_id, NodeTraffic())


class WireAccounting(StrategyWrapper):
    """Count the serialized bytes of every message a strategy sends and receives.

    Composes over any Message-API strategy (it is the outermost wrapper, so it sees exactly
    what travels). The per-round counts are added to the aggregated train metrics as
    ``bytes-up`` and ``bytes-down`` and kept in :attr:`rounds`.

    Parameters
    ----------
    strategy : Strategy
        The strategy whose traffic is counted.
    on_round_end : Callable[[RoundTraffic], None], optional
        Called after each round's training aggregation (e.g. to drive a progress bar).
    """

    def __init__(
        self,
        strategy: Strategy,
        on_round_end: Callable[[RoundTraffic], None] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.on_round_end = on_round_end
        self.rounds: dict[int, RoundTraffic] = {}

    def _round(self, server_round: int) -> RoundTraffic:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundTraffic(server_round)
        return self.rounds[server_round]

    def _count_down(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        traffic = self._round(server_round)
        for message, size in zip(out, message_wire_sizes(out), strict=True):
            traffic.bytes_down += size
            traffic.node(message.metadata.dst_node_id).bytes_down += size
        return out

    def _count_up(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        got = list(replies)
        traffic = self._round(server_round)
        for reply, size in zip(got, message_wire_sizes(got), strict=True):
            traffic.bytes_up += size
            node = traffic.node(reply.metadata.src_node_id)
            node.bytes_up += size
            epsilon = reported_epsilon(reply)
            node.epsilon = node.epsilon if epsilon is None else epsilon
        traffic.replies += sum(not r.has_error() for r in got)
        traffic.failures += sum(r.has_error() for r in got)
        return canonical_order(got)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training with the inner strategy and count the downlink."""
        self._round(server_round).started = time.perf_counter()
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return self._count_down(server_round, messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the uplink, aggregate with the inner strategy, add the byte counts."""
        got = self._count_up(server_round, replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, got)
        traffic = self._round(server_round)
        traffic.wall_s = time.perf_counter() - traffic.started
        metrics = MetricRecord() if metrics is None else metrics
        metrics[keys.BYTES_UP] = traffic.bytes_up
        metrics[keys.BYTES_DOWN] = traffic.bytes_down
        log(
            INFO,
            "round %d: %d B up, %d B down (%d replies, %d failures)",
            server_round,
            traffic.bytes_up,
            traffic.bytes_down,
            traffic.replies,
            traffic.failures,
        )
        if self.on_round_end is not None:
            self.on_round_end(traffic)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure federated evaluation with the inner strategy and count the downlink."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self._count_down(server_round, messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Count the uplink and aggregate evaluation metrics with the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, self._count_up(server_round, replies))

    def summary(self) -> None:
        """Log the wrapper and the inner strategy."""
        log(INFO, "\t├──> Wire accounting (bytes of deflated message object trees)")
        self.strategy.summary()
