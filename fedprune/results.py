"""Per-run results: ``rounds.csv`` and ``summary.json`` under ``<results-dir>/<run-name>/``.

Only measured values are written: accuracy and loss from the server's evaluation on the held-out
test split, bytes from the serialized messages, density from the global mask, ε from the
clients' accountants (empty when DP is off).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedprune.codec import BREAKDOWN_KEYS

ROUND_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "bytes_up",
    "bytes_down",
    "density",
    "epsilon",
    *(f"uplink_bits_{part}" for part in BREAKDOWN_KEYS),
)
"""The last columns: mean uplink bits per parameter of the round's replies, by payload part
(:func:`fedprune.codec.bits_breakdown`; empty for uncompressed runs)."""


@dataclass(frozen=True)
class RoundRecord:
    """One server round as measured."""

    round: int
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    density: float
    epsilon: float | None
    wall_s: float
    uplink_bits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """A whole run as measured."""

    run_name: str
    dataset: str
    num_clients: int
    rounds: int
    final_accuracy: float
    best_accuracy: float
    bytes_up: int
    bytes_down: int
    epsilon: float | None
    wall_s: float
    density: float
    model_bytes_compact: int
    compact_accuracy: float
    round_wall_s: list[float]
    config: dict[str, Any]

    @property
    def bytes_total(self) -> int:
        """Bytes sent in both directions over the run."""
        return self.bytes_up + self.bytes_down


def summarize(
    run_name: str,
    config: dict[str, Any],
    num_clients: int,
    records: Sequence[RoundRecord],
    wall_s: float,
    model_bytes_compact: int,
    compact_accuracy: float,
) -> RunSummary:
    """Fold per-round records into a :class:`RunSummary`."""
    if not records:
        raise ValueError("no rounds were recorded")
    epsilons = [r.epsilon for r in records if r.epsilon is not None]
    return RunSummary(
        run_name=run_name,
        dataset=str(config.get("dataset", "")),
        num_clients=num_clients,
        rounds=len(records),
        final_accuracy=records[-1].accuracy,
        best_accuracy=max(r.accuracy for r in records),
        bytes_up=sum(r.bytes_up for r in records),
        bytes_down=sum(r.bytes_down for r in records),
        epsilon=max(epsilons) if epsilons else None,
        wall_s=wall_s,
        density=records[-1].density,
        model_bytes_compact=model_bytes_compact,
        compact_accuracy=compact_accuracy,
        round_wall_s=[r.wall_s for r in records],
        config=config,
    )


def write_run(directory: Path, records: Sequence[RoundRecord], summary: RunSummary) -> None:
    """Write ``rounds.csv`` and ``summary.json`` into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "rounds.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ROUND_COLUMNS)
        for r in records:
            writer.writerow(
                [
                    r.round,
                    f"{r.accuracy:.6f}",
                    f"{r.loss:.6f}",
                    r.bytes_up,
                    r.bytes_down,
                    f"{r.density:.6f}",
                    "" if r.epsilon is None else f"{r.epsilon:.6f}",
                    *(
                        f"{r.uplink_bits[part]:.5f}" if part in r.uplink_bits else ""
                        for part in BREAKDOWN_KEYS
                    ),
                ]
            )
    body = asdict(summary) | {"bytes_total": summary.bytes_total}
    (directory / "summary.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_rounds(directory: Path) -> list[dict[str, str]]:
    """Read ``rounds.csv`` back as a list of rows (strings, as written)."""
    with (directory / "rounds.csv").open(newline="") as f:
        return list(csv.DictReader(f))
