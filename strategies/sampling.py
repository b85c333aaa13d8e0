"""Reproducible client sampling: nodes chosen by their partition id and the run seed.

Flower's strategies sample ``fraction-train`` of the connected nodes with ``random.sample``
over node ids, which are random per run (and new after a restart): two runs with the same seed,
or a run and its resumed continuation, train different clients. :class:`StableSampling` asks
each node once for its stable identity (its ``partition-id``, a ``query.partition`` message the
ClientApp answers from its node config) and picks the round's clients as

    rng = numpy.random.default_rng([seed, server_round])
    chosen = rng.choice(sorted(partition ids), size=max(int(n * fraction), min_nodes))

so the same seed trains the same partitions in every round of a fresh, a repeated and a resumed
run. The inner Flower strategy is set to sample every node (``fraction_train = 1``) and its
messages are kept only for the chosen ones; nothing else changes. The queries (one per node and
run, a few hundred bytes) are not counted in the run's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprune import keys
from strategies.wrapper import StrategyWrapper

QUERY_TYPE = f"{MessageType.QUERY}.{keys.PARTITION_QUERY}"
"""The message that asks a node for its partition id (the ClientApp answers it with
:func:`clients.client_app.partition_reply`)."""
QUERY_TIMEOUT_S = 120.0
"""How long the server waits for the nodes' identities."""


def sample_partitions(
    partitions: Iterable[int], fraction: float, min_nodes: int, seed: int, server_round: int
) -> list[int]:
    """Return the partition ids that train in ``server_round``, sorted.

    Parameters
    ----------
    partitions : Iterable[int]
        The partition ids of the connected nodes.
    fraction : float
        ``fraction-train``, in ``(0, 1]``.
    min_nodes : int
        At least this many are chosen (all, if fewer are connected).
    seed : int
        The run seed.
    server_round : int
        The round, ``>= 1``.

    Returns
    -------
    list[int]
        The chosen partition ids.

    Raises
    ------
    ValueError
        If ``fraction`` is not in ``(0, 1]`` or ``server_round`` is below 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if server_round < 1:
        raise ValueError(f"server_round={server_round} must be >= 1")
    pool = sorted(set(partitions))
    size = min(len(pool), max(int(len(pool) * fraction), min_nodes))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(pool, size=size, replace=False))


class StableSampling(StrategyWrapper):
    """Sample the nodes that train each round by partition id and seed, reproducibly.

    Parameters
    ----------
    strategy : Strategy
        A Flower strategy with a ``fraction_train`` attribute (set to 1 here: it builds the
        messages for every node, and this wrapper keeps those of the chosen ones).
    fraction : float
        ``fraction-train``, in ``(0, 1]``.
    min_nodes : int
        ``min-train-nodes``.
    seed : int
        The run seed.
    """

    def __init__(self, strategy: Strategy, *, fraction: float, min_nodes: int, seed: int) -> None:
        if not hasattr(strategy, "fraction_train"):
            raise ValueError(f"{type(strategy).__name__} has no fraction_train to take over")
        sample_partitions([0], fraction, 1, seed, 1)  # validates fraction
        super().__init__(strategy)
        strategy.fraction_train = 1.0
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.seed = seed
        self.partition_of: dict[int, int] = {}
        """Node id -> partition id, learnt from the nodes (node ids change between runs)."""
        self.chosen: dict[int, list[int]] = {}
        """Round -> the partition ids chosen for it."""

    def _learn(self, node_ids: Iterable[int], grid: Grid) -> None:
        unknown = [n for n in node_ids if n not in self.partition_of]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type=QUERY_TYPE) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not give its partition id: %s", node, reply.error.reason)
                continue
            partition = reply.content.config_records[keys.CONFIG][keys.PARTITION_ID]
            if not isinstance(partition, int):
                log(WARNING, "node %d: partition id %r is not an integer", node, partition)
                continue
            for stale in [n for n, p in self.partition_of.items() if p == partition]:
                log(WARNING, "partition %d moved from node %d to node %d", partition, stale, node)
                del self.partition_of[stale]  # a node that reconnected under a new id
            self.partition_of[node] = partition

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Build every node's message with the inner strategy, keep the chosen nodes'."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._learn((m.metadata.dst_node_id for m in messages), grid)
        known = {
            self.partition_of[m.metadata.dst_node_id]
            for m in messages
            if m.metadata.dst_node_id in self.partition_of
        }
        chosen = sample_partitions(known, self.fraction, self.min_nodes, self.seed, server_round)
        self.chosen[server_round] = chosen
        log(INFO, "round %d: partitions %s train (of %d)", server_round, chosen, len(known))
        keep = set(chosen)
        return [m for m in messages if self.partition_of.get(m.metadata.dst_node_id) in keep]
