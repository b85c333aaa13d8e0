"""Per-run results in ``<results-dir>/<run-name>/``: ``rounds.csv``, ``clients.csv``, summary.

Only measured values are written: accuracy and loss from the server's evaluation on the held-out
test split, bytes from the serialized messages, density from the global mask, ε from the
clients' accountants (empty when DP is off), ``wall_s`` the seconds from sending a round's
training messages to the end of their aggregation (the server's evaluation not included).
``clients.csv`` has one line per node and round: the bytes of the messages the server sent it
and of its replies, and the ε it reported.
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
    "wall_s",
    "num_failed",
    "num_rejected",
    "num_bounded",
    "rejected",
    *(f"uplink_bits_{part}" for part in BREAKDOWN_KEYS),
)
"""The uplink_bits_* columns: mean uplink bits per parameter of the round's replies, by payload
part (:func:`fedprune.codec.bits_breakdown`; empty for uncompressed runs)."""
CLIENT_COLUMNS = ("round", "node_id", "bytes_up", "bytes_down", "epsilon")


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
    num_failed: int = 0
    """Error replies (a client that raised, a node that went away)."""
    rejections: tuple[str, ...] = ()
    """Why each rejected reply was rejected ("node N: reason")."""
    bounded: tuple[str, ...] = ()
    """Which accepted replies the bounds lowered (example weight, update norm)."""

    uplink_bits: dict[str, float] = field(default_factory=dict)
    """Mean uplink bits per parameter of the round's replies, by payload part."""


@dataclass(frozen=True)
class ClientRecord:
    """One node in one server round, as the server saw it."""

    round: int
    node_id: int
    bytes_up: int
    bytes_down: int
    epsilon: float | None


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
    num_failed: int = 0
    num_rejected: int = 0
    rejections: dict[str, list[str]] | None = None
    """Per round (as a string key) with any rejection: the reasons."""
    params_compact: int = 0
    """Parameters of the exported network (fewer only with channel pruning)."""
    macs_per_example: int = 0
    """Multiply-accumulates of the exported network for one example."""
    latency_ms_per_example: float = 0.0
    """Median CPU latency of the exported network for one example (batch 1, one thread)."""

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
    *,
    params_compact: int = 0,
    macs_per_example: int = 0,
    latency_ms_per_example: float = 0.0,
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
        num_failed=sum(r.num_failed for r in records),
        num_rejected=sum(len(r.rejections) for r in records),
        rejections={str(r.round): list(r.rejections) for r in records if r.rejections},
        params_compact=params_compact,
        macs_per_example=macs_per_example,
        latency_ms_per_example=latency_ms_per_example,
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
                    f"{r.wall_s:.3f}",
                    r.num_failed,
                    len(r.rejections),
                    len(r.bounded),
                    " | ".join(r.rejections),
                    *(
                        f"{r.uplink_bits[part]:.5f}" if part in r.uplink_bits else ""
                        for part in BREAKDOWN_KEYS
                    ),
                ]
            )
    body = asdict(summary) | {"bytes_total": summary.bytes_total}
    (directory / "summary.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def write_clients(directory: Path, records: Sequence[ClientRecord]) -> None:
    """Write ``clients.csv`` into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "clients.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CLIENT_COLUMNS)
        for r in records:
            epsilon = "" if r.epsilon is None else f"{r.epsilon:.6f}"
            writer.writerow([r.round, r.node_id, r.bytes_up, r.bytes_down, epsilon])


def read_clients(directory: Path) -> list[ClientRecord]:
    """Read ``clients.csv`` back (empty when the run has none yet)."""
    path = directory / "clients.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            ClientRecord(
                round=int(row["round"]),
                node_id=int(row["node_id"]),
                bytes_up=int(row["bytes_up"]),
                bytes_down=int(row["bytes_down"]),
                epsilon=float(row["epsilon"]) if row["epsilon"] else None,
            )
            for row in csv.DictReader(f)
        ]


def load_summary(path: Path) -> RunSummary:
    """Read a ``summary.json`` written by :func:`write_run` back into a :class:`RunSummary`."""
    body = json.loads(path.read_text())
    body.pop("bytes_total", None)
    return RunSummary(**body)


def read_rounds(directory: Path) -> list[dict[str, str]]:
    """Read ``rounds.csv`` back as a list of rows (strings, as written)."""
    with (directory / "rounds.csv").open(newline="") as f:
        return list(csv.DictReader(f))
