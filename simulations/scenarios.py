"""Named comparison scenarios: one dataset and federation, several strategy rows.

Every row of a scenario shares the scenario's base config (same seed, same partition, same
rounds); a row only changes how the model is compressed, pruned or privatised. Every compressed
row uses error feedback and, unless its name says otherwise, the zlib stage (which is kept only
where it makes a stream smaller). Run one with::

    python -m simulations.compare --scenario fashion-mnist
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedprune.config import RunConfig


@dataclass(frozen=True)
class Row:
    """One strategy of a comparison: a name and the config keys it changes."""

    name: str
    changes: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """A dataset, a federation and the strategies compared on it."""

    name: str
    description: str
    num_clients: int
    target_accuracy: float
    base: dict[str, Any]
    rows: tuple[Row, ...] = field(default_factory=tuple)

    def config(self, row: Row, results_dir: str, rounds: int | None = None) -> RunConfig:
        """Return the validated config of ``row`` (``rounds`` overrides the round count)."""
        values = {**self.base, **row.changes, "run-name": row.name, "results-dir": results_dir}
        if rounds is not None:
            values["num-server-rounds"] = rounds
            values["prune-end-round"] = min(int(values.get("prune-end-round", 1)), rounds)
        return RunConfig.from_mapping(values)


FEDAVG = "fedavg-fp32"
"""The baseline row every scenario starts with (stock FedAvg, dense float32)."""

_DENSE_FP32 = {
    "strategy": "fedavg",
    "target-density": 1.0,
    "error-feedback": False,
    "entropy": False,
}


def _prune(end: int) -> dict[str, Any]:
    """Return the pruning schedule of every pruned row: top-k reconciliation, ends at ``end``."""
    return {"prune-start-round": 1, "prune-end-round": end, "reconcile-rule": "topk"}


def _d03_int8(prune_end: int) -> dict[str, Any]:
    """Return the changes of row ``d0.3-int8-zlib`` (the plain twin of the distilled row)."""
    return {**_prune(prune_end), "quant": "int8-channel", "target-density": 0.3}


def _rows(prune_end: int, dp_epsilon: float) -> tuple[Row, ...]:
    """Return the standard rows, pruning on a schedule that reaches its density at ``prune_end``."""
    prune = _prune(prune_end)
    return (
        Row(FEDAVG, _DENSE_FP32),
        Row("fedavg-int8", {"quant": "int8-channel", "target-density": 1.0, "entropy": False}),
        Row("d0.3-fp32", {**prune, "quant": "none", "target-density": 0.3, "entropy": False}),
        Row("d0.3-int8-zlib", _d03_int8(prune_end)),
        Row("d0.1-int8-zlib", {**prune, "quant": "int8-channel", "target-density": 0.1}),
        Row(
            "int8-topk0.05-delta",
            {
                "quant": "int8-channel",
                "target-density": 1.0,
                "update-topk": 0.05,
                "delta-downlink": True,
            },
        ),
        Row(
            f"d0.3-int8-dp-eps{dp_epsilon:g}",
            {
                **_d03_int8(prune_end),
                "dp": True,
                "target-epsilon": dp_epsilon,
                "max-grad-norm": 1.0,
            },
        ),
    )


KD_SUFFIX = "-kd"
"""A distilled row is named like its plain twin (same model, density and codec) plus this."""


def _distill_rows(prune_end: int) -> tuple[Row, ...]:
    """Return distilled students (issue 8) and, where the standard rows lack it, their twins.

    Each ``*-kd`` row equals its twin except ``distill = true``: every client also trains a
    private ``mlp-large`` teacher (784-512-512-10 on 28x28 inputs, never sent) by mutual
    distillation, so the two rows send the same student, pruned and int8, at the same bytes
    (up to zlib on different values). The twin of ``d0.3-int8-zlib-kd`` is the standard
    ``d0.3-int8-zlib``; ``small-*`` rows use the compact ``mlp-small`` student (784-64-64-10).
    """
    kd = {"distill": True, "teacher-model": "mlp-large"}
    d03 = _d03_int8(prune_end)
    small = {**d03, "model": "mlp-small"}
    return (
        Row(f"d0.3-int8-zlib{KD_SUFFIX}", {**d03, **kd}),
        Row("small-d0.3-int8-zlib", small),
        Row(f"small-d0.3-int8-zlib{KD_SUFFIX}", {**small, **kd}),
    )


SCENARIOS: dict[str, Scenario] = {
    "demo": Scenario(
        name="demo",
        description="digits (bundled), 10 clients, Dirichlet 0.5, MLP 64-200-200-10",
        num_clients=10,
        target_accuracy=0.85,
        base={
            "dataset": "digits",
            "model": "mlp",
            "partitioning": "dirichlet",
            "alpha": 0.5,
            "num-server-rounds": 20,
            "local-epochs": 1,
            "batch-size": 16,
            "lr": 0.1,
            "momentum": 0.9,
            "error-feedback": True,
            "seed": 0,
        },
        rows=_rows(prune_end=10, dp_epsilon=8.0),
    ),
    "fashion-mnist": Scenario(
        name="fashion-mnist",
        description="Fashion-MNIST, 10 clients, Dirichlet 0.5, MLP 784-200-200-10",
        num_clients=10,
        target_accuracy=0.80,
        base={
            "dataset": "fashion-mnist",
            "model": "mlp",
            "partitioning": "dirichlet",
            "alpha": 0.5,
            "num-server-rounds": 30,
            "local-epochs": 1,
            "batch-size": 32,
            "lr": 0.05,
            "momentum": 0.0,
            "error-feedback": True,
            "seed": 0,
        },
        rows=(*_rows(prune_end=4, dp_epsilon=8.0), *_distill_rows(prune_end=4)),
    ),
    # Channel pruning (issue 17): one seed, few rounds, 3 of 10 clients per round (CPU-sized).
    "fashion-mnist-cnn-channels": Scenario(
        name="fashion-mnist-cnn-channels",
        description="Fashion-MNIST, 10 clients (3 per round), Dirichlet 0.5, CNN 32-64",
        num_clients=10,
        target_accuracy=0.80,
        base={
            "dataset": "fashion-mnist",
            "model": "cnn",
            "partitioning": "dirichlet",
            "alpha": 0.5,
            "num-server-rounds": 6,
            "fraction-train": 0.3,
            "min-train-nodes": 3,
            "local-epochs": 1,
            "batch-size": 32,
            "lr": 0.05,
            "momentum": 0.0,
            "error-feedback": True,
            "seed": 0,
        },
        rows=(
            Row(FEDAVG, _DENSE_FP32),
            Row("dense-int8-zlib", {"quant": "int8-channel", "target-density": 1.0}),
            Row("d0.3-element-int8-zlib", _d03_int8(3)),
            Row("d0.3-channel-int8-zlib", {**_d03_int8(3), "prune-granularity": "channel"}),
        ),
    ),
}
