"""Build the server strategy for a :class:`~fedprune.config.RunConfig`.

The composition, outermost first::

    WireAccounting(CompressedPayload(ReplyValidation(MaskReconciliation(inner))))  # "compressed"
    WireAccounting(ReplyValidation(inner))                                         # "fedavg"

where ``inner`` is wrapped in :class:`UpdateClipping` when ``clip-update-norm > 0``.

``inner`` is any Message-API strategy from ``flwr.serverapp.strategy`` (FedAvg, FedAvgM, FedAdam,
FedProx, FedMedian, FedTrimmedAvg, Krum). It only ever sees float32 weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedprune import keys
from fedprune.config import RunConfig
from fedprune.masks import ReconcileConfig
from strategies.accounting import WireAccounting
from strategies.clipping import UpdateClipping
from strategies.masking import DensitySchedule, MaskReconciliation
from strategies.payload import CompressedPayload
from strategies.records import scalar
from strategies.validation import ReplyLimits, ReplyValidation


def aggregate_train_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted average of client metrics, except ε: the maximum over clients.

    The privacy guarantee of a round is the weakest client's, so the server records the largest
    cumulative ε any client reported.
    """
    metrics = aggregate_metricrecords(contents, weighted_by_key)
    epsilons = [
        scalar(record, keys.EPSILON, float)
        for content in contents
        for record in content.metric_records.values()
        if keys.EPSILON in record
    ]
    if epsilons:
        metrics[keys.EPSILON] = max(epsilons)
    return metrics


def build_inner(cfg: RunConfig) -> Strategy:
    """Return the aggregating strategy named by ``cfg.inner_strategy``."""
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_train_nodes if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_train_nodes,
        "weighted_by_key": keys.NUM_EXAMPLES,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    name = cfg.inner_strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(
            **common, server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum
        )
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common)
    if name == "krum":
        return Krum(**common)
    raise ValueError(f"unknown inner strategy {name!r}")  # pragma: no cover (validated)


@dataclass
class BuiltStrategy:
    """The strategy to start, with handles on the wrappers the results writer reads."""

    strategy: WireAccounting
    payload: CompressedPayload | None
    masking: MaskReconciliation | None


def build_strategy(cfg: RunConfig, *, prunable: Sequence[str]) -> BuiltStrategy:
    """Compose the wrappers for ``cfg`` around its inner strategy.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    prunable : Sequence[str]
        Names of the model's prunable tensors (Linear/Conv weights).
    """
    inner = build_inner(cfg)
    if cfg.clip_update_norm > 0:
        inner = UpdateClipping(inner, cfg.clip_update_norm)
    limits = ReplyLimits(min_replies=cfg.min_train_nodes)
    if not cfg.compressed:
        return BuiltStrategy(WireAccounting(ReplyValidation(inner, limits)), None, None)
    masking: MaskReconciliation | None = None
    if cfg.target_density < 1.0:
        masking = MaskReconciliation(
            inner,
            prunable,
            DensitySchedule(
                initial=cfg.initial_density,
                final=cfg.target_density,
                start_round=cfg.prune_start_round,
                end_round=cfg.prune_end_round,
            ),
            ReconcileConfig(rule=cfg.reconcile_rule, threshold=cfg.vote_threshold),
            server_scores=cfg.prune_method == "magnitude",
        )
        inner = masking
    payload = CompressedPayload(
        ReplyValidation(inner, limits),
        cfg.codec(),
        update_codec=cfg.downlink_update_codec(),
        delta_downlink=cfg.delta_downlink,
    )
    return BuiltStrategy(WireAccounting(payload), payload, masking)
