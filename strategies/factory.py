"""Build the server strategy for a :class:`~fedprune.config.RunConfig`.

The composition, outermost first::

    WireAccounting(FedPrune(inner, codec, mask policy, reply limits))  # "compressed"
    WireAccounting(FedPrune(inner, reply limits))                      # "fedavg": float32 both ways

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

from boundary.records import scalar
from fedprune import keys
from fedprune.channels import ChannelPruning
from fedprune.config import RunConfig
from fedprune.masks import ReconcileConfig
from strategies.accounting import WireAccounting
from strategies.masking import DensitySchedule, MaskPolicy
from strategies.sampling import StableSampling
from strategies.strategy import FedPrune
from strategies.validation import ReplyLimits


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
    """The strategy to start, with handles on the parts the results writer reads."""

    strategy: WireAccounting
    fedprune: FedPrune
    masking: MaskPolicy | None


def build_strategy(
    cfg: RunConfig, *, prunable: Sequence[str], channels: ChannelPruning | None = None
) -> BuiltStrategy:
    """Compose the wrappers for ``cfg`` around its inner strategy.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    prunable : Sequence[str]
        Names of the model's prunable tensors (Linear/Conv weights).
    channels : ChannelPruning, optional
        Channel pruning of the model (``prune-granularity = "channel"``).
    """
    inner = build_inner(cfg)
    if cfg.fraction_train < 1.0:  # reproducible: by partition id and seed (strategies/sampling.py)
        inner = StableSampling(
            inner, fraction=cfg.fraction_train, min_nodes=cfg.min_train_nodes, seed=cfg.seed
        )
    limits = ReplyLimits(
        min_replies=cfg.min_train_nodes,
        examples_ratio=cfg.max_examples_ratio,
        norm_ratio=cfg.max_norm_ratio,
        max_update_norm=cfg.clip_update_norm,
    )
    if not cfg.compressed:
        fedprune = FedPrune(inner, limits=limits)
        return BuiltStrategy(WireAccounting(fedprune), fedprune, None)
    masking: MaskPolicy | None = None
    if cfg.target_density < 1.0:
        masking = MaskPolicy(
            prunable,
            DensitySchedule(
                initial=cfg.initial_density,
                final=cfg.target_density,
                start_round=cfg.prune_start_round,
                end_round=cfg.prune_end_round,
            ),
            ReconcileConfig(rule=cfg.reconcile_rule, threshold=cfg.vote_threshold),
            server_scores=cfg.prune_method == "magnitude",
            channels=channels,
        )
    fedprune = FedPrune(
        inner,
        limits=limits,
        codec_config=cfg.codec(),
        update_codec=cfg.downlink_update_codec(),
        delta_downlink=cfg.delta_downlink,
        masking=masking,
    )
    return BuiltStrategy(WireAccounting(fedprune), fedprune, masking)
