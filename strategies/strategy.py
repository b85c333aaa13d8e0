"""FedPrune: compressed payloads, a global pruning mask and bounded replies around any strategy.

Like Flower's DP wrappers, :class:`FedPrune` composes over an inner Message-API strategy
(FedAvg, FedAvgM, FedAdam, FedProx, FedMedian, FedTrimmedAvg, Krum, ...) and changes only what
travels and what the inner strategy is given. One round, in order:

``configure_train``
    The global model is decoded once into a :class:`~strategies.state.RoundState`; the mask
    policy (if the run prunes) schedules the round's density and the vote to ask for; the inner
    strategy configures its messages; :class:`~strategies.downlink.Downlink` replaces their
    float32 arrays by encoded payloads (with the codec on).
``aggregate_train``
    Error replies are counted as failures and dropped. Every other reply is read once, inside
    one exception boundary, into plain numpy (:mod:`strategies.replies`): whatever goes wrong
    while reading a client's bytes rejects that reply with its reason, and the round goes on.
    The accepted replies are bounded (:mod:`strategies.validation`: example weight, update
    norm), their votes collected, and each is handed to the inner strategy in one fixed form
    (records ``arrays`` and ``metrics``, the same metric keys in every reply), so Flower's
    consistency checks can never end the run. A weighted-mean strategy (FedAvg, FedProx, and
    FedAvgM/FedOpt, which step from the mean) gets the mean instead, summed from the replies'
    transmitted entries (:func:`aggregates_weighted_mean`). Fewer than ``min_replies``
    accepted replies, or a non-finite aggregate, skip the round: the model, the mask and the
    inner strategy's state stay as they were. Otherwise the votes are reconciled into the new
    global mask, which the aggregate is made to respect.
``configure_evaluate`` / ``aggregate_evaluate``
    The same downlink encoding, and the same boundary and normal form for the replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, TypeGuard

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.supercore import log

from boundary.records import from_record, to_record
from fedprune import codec, keys
from strategies.downlink import Downlink
from strategies.masking import MaskPolicy
from strategies.replies import (
    TrainReply,
    common_metrics,
    read_evaluate_reply,
    read_train_reply,
)
from strategies.state import RoundState
from strategies.validation import ReplyLimits, bound_examples, bound_updates
from strategies.wrapper import StrategyWrapper, load_strategy_state, strategy_state

WEIGHTED_MEAN_STRATEGIES: tuple[type[FedAvg], ...] = (
    FedAvg,
    FedAvgM,
    FedProx,
    FedAdam,
    FedAdagrad,
    FedYogi,
)
"""Inner strategies whose aggregate is the weighted mean of the replies' models (FedAvgM and
the FedOpt family then take a server optimizer step from it, in ``FedAvg.aggregate_train``'s
result). Exact types only: a subclass may aggregate otherwise."""


STATELESS_MEAN_STRATEGIES: tuple[type[FedAvg], ...] = (FedAvg, FedProx)
"""Those whose aggregate is the weighted mean itself (no server state, no server step)."""


def aggregates_weighted_mean(strategy: Strategy) -> TypeGuard[FedAvg]:
    """Return whether ``strategy`` aggregates by the mean weighted by ``num-examples``."""
    return (
        type(strategy) in WEIGHTED_MEAN_STRATEGIES
        and getattr(strategy, "weighted_by_key", None) == keys.NUM_EXAMPLES
    )


def _normal_metrics(read: TrainReply, common: Sequence[str]) -> MetricRecord:
    """Return the one form of metrics the inner strategy sees: the weight, then ``common``."""
    weight: int | float = read.num_examples if read.weight == read.num_examples else read.weight
    normal = MetricRecord({keys.NUM_EXAMPLES: weight})
    for key in common:
        normal[key] = read.metrics[key]
    return normal


def _aggregate_mean(
    strategy: FedAvg,
    server_round: int,
    accepted: Sequence[tuple[Message, TrainReply]],
    weights: Mapping[str, np.ndarray],
    normal: Sequence[MetricRecord],
) -> tuple[dict[str, np.ndarray] | None, MetricRecord]:
    """Aggregate with a weighted-mean strategy, without materialising any reply's model.

    The example-weighted mean of the replies' models is the global model plus the weighted
    sum of their updates, summed from each update's transmitted entries only. That mean *is*
    FedAvg's (and FedProx's) aggregate; a strategy that steps from it (FedAvgM, the FedOpt
    family) aggregates one reply holding it (the weighted mean of one model is that model),
    so its server optimizer applies as usual. The strategy's own metrics function aggregates
    the metrics of all the replies.
    """
    total = sum(read.weight for _, read in accepted)
    mean: dict[str, np.ndarray]
    if all(read.sent_model is not None for _, read in accepted):
        # Plain float32 models: Flower's own sum (aggregate_arrayrecords), bit for bit.
        mean = {}
        for _, read in accepted:
            assert read.sent_model is not None
            for name in weights:
                term = read.sent_model[name] * (read.weight / total)
                mean[name] = term if name not in mean else np.add(mean[name], term, out=mean[name])
    else:
        mean = {name: np.zeros(g.shape, dtype=np.float32) for name, g in weights.items()}
        for _, read in accepted:
            for name, update in read.update.items():
                update.add_into(mean[name], read.weight / total)
        for name, g in weights.items():
            mean[name] += g
    contents = [RecordDict({keys.METRICS: metrics}) for metrics in normal]
    metrics = strategy.train_metrics_aggr_fn(contents, strategy.weighted_by_key)
    if type(strategy) in STATELESS_MEAN_STRATEGIES:
        return mean, metrics
    reply = accepted[0][0]
    reply.content = RecordDict(
        {keys.ARRAYS: to_record(mean), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})}
    )
    arrays, _ = strategy.aggregate_train(server_round, [reply])
    return (None if arrays is None else from_record(arrays)), metrics


class FedPrune(StrategyWrapper):
    """Wrap a strategy: encoded payloads on the wire, bounded float32 replies to aggregate.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy. It sees float32 models keyed by parameter name, never codes, and
        only replies that passed the boundary.
    limits : ReplyLimits, optional
        What a reply may claim and how far it may move the aggregate.
    codec_config : codec.CodecConfig, optional
        Encode the downlink with it, and read replies as encoded deltas. ``None``: plain
        float32 models both ways.
    update_codec : codec.CodecConfig, optional
        How a downlink change is encoded with ``delta_downlink``.
    delta_downlink : bool
        See :class:`~strategies.downlink.Downlink`.
    masking : MaskPolicy, optional
        Keep and enforce a global pruning mask (needs ``codec_config``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        limits: ReplyLimits | None = None,
        codec_config: codec.CodecConfig | None = None,
        update_codec: codec.CodecConfig | None = None,
        delta_downlink: bool = False,
        masking: MaskPolicy | None = None,
    ) -> None:
        super().__init__(strategy)
        if masking is not None and codec_config is None:
            raise ValueError("a mask policy needs a codec (the mask travels in the payload)")
        self.limits = limits or ReplyLimits()
        self.downlink = (
            None
            if codec_config is None
            else Downlink(codec_config, update_codec=update_codec, delta_downlink=delta_downlink)
        )
        self.masking = masking
        self._train: RoundState | None = None
        self._prunes = False
        self.rejected: dict[int, list[str]] = {}
        """Per round: why each rejected reply was rejected."""
        self.bounded: dict[int, list[str]] = {}
        """Per round: which replies the bounds lowered (example weight, update norm)."""

    # -- downlink ---------------------------------------------------------------------------
    def _state(
        self, server_round: int, weights: dict[str, np.ndarray], density: float, vote_kind: str
    ) -> RoundState:
        if self.masking is None:
            return RoundState(server_round, weights)
        return RoundState(
            server_round,
            weights,
            mask=self.masking.mask,
            mask_version=self.masking.version,
            density=density,
            vote_kind=vote_kind,
            vote_record=self.masking.vote_record,
            vote_rule=self.masking.reconcile_config.rule,
            channels=self.masking.channels,
        )

    def _encode(self, messages: Iterable[Message], state: RoundState, train: bool) -> list[Message]:
        if self.downlink is None:
            return list(messages)
        return self.downlink.encode(messages, state, train=train)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Schedule the round's density and vote, configure with the inner, encode."""
        weights = from_record(arrays)  # the global model, decoded once for the whole round
        density, self._prunes, vote_kind = 1.0, False, "none"
        if self.masking is not None:
            density, self._prunes = self.masking.begin_round(server_round, weights)
            vote_kind = self.masking.vote_request(self._prunes)
        self._train = self._state(server_round, weights, density, vote_kind)
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return self._encode(messages, self._train, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the inner strategy, then encode the downlink."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        messages = list(messages)
        if not messages or self.downlink is None:
            return messages
        density = 1.0 if self.masking is None else self.masking.density
        state = self._state(server_round, from_record(arrays), density, "none")
        return self._encode(messages, state, train=False)

    # -- uplink -----------------------------------------------------------------------------
    def _reject(self, server_round: int, node: int, err: Exception, reasons: list[str]) -> None:
        reason = (
            f"node {node}: {err}"
            if isinstance(err, ValueError)
            else (f"node {node}: {type(err).__name__}: {err}")
        )
        reasons.append(reason)
        log(WARNING, "round %d: rejected reply: %s", server_round, reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read, bound and normalise every reply; aggregate with the inner; update the mask."""
        state = self._train
        if state is None or state.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) before configure_train")
        accepted: list[tuple[Message, TrainReply]] = []
        seen: set[int] = set()
        reasons: list[str] = []
        failures = 0
        for reply in replies:
            if reply.has_error():
                failures += 1
                continue
            node = reply.metadata.src_node_id
            try:  # the one boundary around everything derived from a client's bytes
                if node in seen:
                    raise ValueError("duplicate reply from the same node")
                read = read_train_reply(
                    reply,
                    state,
                    max_num_examples=self.limits.max_num_examples,
                    compressed=self.downlink is not None,
                )
            except Exception as err:  # any failure rejects the reply, not the run
                self._reject(server_round, node, err, reasons)
                continue
            seen.add(node)
            accepted.append((reply, read))
        # By what the replies say, not by their bytes: float32 sums depend on their order, and
        # under top-k with error feedback a last-bit difference grows into other selections
        # within a few rounds. The wire's canonical order (content hashes) already makes a run
        # reproducible; this order also leaves the model bit-identical when only the encoding
        # of the same updates changes (a lossless codec change, another container).
        # Each norm is computed once: the order and the norm bound both use it.
        ranked = sorted((read.num_examples, read.norm(), i) for i, (_, read) in enumerate(accepted))
        accepted = [accepted[i] for _, _, i in ranked]
        norms = [norm for _, norm, _ in ranked]
        reads = [read for _, read in accepted]
        if self.downlink is not None:
            for read in reads:
                self.downlink.delivered(read.node)
        notes = bound_examples(reads, self.limits.examples_ratio)
        notes += bound_updates(reads, norms, self.limits.norm_ratio, self.limits.max_update_norm)
        for note in notes:
            log(INFO, "round %d: bounded %s", server_round, note)
        self.rejected[server_round] = reasons
        self.bounded[server_round] = notes
        log(
            INFO,
            "round %d: %d replies accepted, %d rejected, %d failed",
            server_round,
            len(reads),
            len(reasons),
            failures,
        )
        if len(reads) < self.limits.min_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies, %d needed; the global model is unchanged",
                server_round,
                len(reads),
                self.limits.min_replies,
            )
            return None, self._metrics(MetricRecord(), reads, reasons)
        votes = (
            [self.masking.vote_of(read, state.weights, state.density) for read in reads]
            if self.masking is not None and self._prunes
            else []
        )
        common = sorted(common_metrics([read.metrics for read in reads]))
        normal = [_normal_metrics(read, common) for read in reads]
        # Stateful inner strategies (FedAvgM's momentum, FedAdam's moments) update while they
        # aggregate: a skipped round must leave them as they were.
        before = strategy_state(self.strategy)
        aggregated: dict[str, np.ndarray] | None
        inner_metrics: MetricRecord | None
        if aggregates_weighted_mean(self.strategy):
            aggregated, inner_metrics = _aggregate_mean(
                self.strategy, server_round, accepted, state.weights, normal
            )
        else:
            for (reply, read), metrics in zip(accepted, normal, strict=True):
                model = to_record(read.model(state.weights))
                reply.content = RecordDict({keys.ARRAYS: model, keys.METRICS: metrics})
            arrays, inner_metrics = self.strategy.aggregate_train(
                server_round, [reply for reply, _ in accepted]
            )
            aggregated = None if arrays is None else from_record(arrays)
        metrics = MetricRecord() if inner_metrics is None else inner_metrics
        if aggregated is None:
            return None, self._metrics(metrics, reads, reasons)
        if not all(np.isfinite(a).all() for a in aggregated.values()):
            log(WARNING, "round %d skipped: the aggregate is not finite", server_round)
            load_strategy_state(self.strategy, before)
            return None, self._metrics(MetricRecord(), reads, reasons)
        if self.masking is not None:
            if votes:
                self.masking.update(
                    server_round, votes, [read.weight for read in reads], state.density
                )
            aggregated = self.masking.enforce(aggregated)
        return to_record(aggregated), self._metrics(metrics, reads, reasons)

    def _metrics(
        self, metrics: MetricRecord, reads: list[TrainReply], reasons: list[str]
    ) -> MetricRecord:
        """Add the round's rejections, density and ε to the inner strategy's metrics.

        ε is the largest any accepted reply reports, also in a skipped round: the clients
        trained (and spent privacy budget) even though their round was skipped.
        """
        metrics[keys.NUM_REJECTED] = len(reasons)
        epsilons = [read.metrics[keys.EPSILON] for read in reads if keys.EPSILON in read.metrics]
        if epsilons:
            metrics[keys.EPSILON] = max(epsilons)
        if self.masking is not None:
            metrics[keys.DENSITY] = self.masking.density
        breakdowns = [read.bits for read in reads if read.bits is not None]
        for part in codec.BREAKDOWN_KEYS if breakdowns else ():
            mean = sum(bits[part] for bits in breakdowns) / len(breakdowns)
            metrics[f"{keys.UPLINK_BITS}-{part}"] = mean
        return metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Read and normalise every evaluate reply, then aggregate with the inner strategy."""
        accepted = []
        reasons: list[str] = []
        for reply in replies:
            if reply.has_error():
                continue
            try:  # the same boundary as for train replies
                read = read_evaluate_reply(
                    reply, server_round, max_num_examples=self.limits.max_num_examples
                )
            except Exception as err:
                self._reject(server_round, reply.metadata.src_node_id, err, reasons)
                continue
            accepted.append((reply, read))
        if not accepted:
            return None
        common = sorted(common_metrics([read.metrics for _, read in accepted]))
        for reply, read in accepted:
            metrics = MetricRecord({keys.NUM_EXAMPLES: read.num_examples})
            for key in common:
                metrics[key] = read.metrics[key]
            reply.content = RecordDict({keys.METRICS: metrics})
        return self.strategy.aggregate_evaluate(server_round, [reply for reply, _ in accepted])

    # -- checkpoints and logs -----------------------------------------------------------------
    def own_state(self) -> dict[str, Any]:
        """Return the global mask and its version."""
        return {} if self.masking is None else self.masking.state()

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Restore the global mask and its version."""
        if self.masking is not None:
            self.masking.load_state(state)

    def summary(self) -> None:
        """Log the settings, then the inner strategy."""
        log(INFO, "\t├──> FedPrune: %s, %s, %s", self.limits, self.downlink, self.masking)
        self.strategy.summary()
