"""The comparison's outputs: ``summary.csv``, ``summary.md`` and ``accuracy_vs_mb.png``.

Every figure comes from a run's own files (``rounds.csv``, ``summary.json``, ``model.npz``):
bytes counted from the serialized messages, accuracy on the held-out test split, ε from the
clients' accountants. Cells that were not measured (ε without DP, bytes to a target accuracy
never reached) are left empty.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedprune.results import RunSummary, read_rounds

SUMMARY_COLUMNS = (
    "strategy",
    "dataset",
    "num_clients",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "bytes_up",
    "bytes_down",
    "bytes_total",
    "ratio_vs_fedavg",
    "bytes_to_target",
    "epsilon",
    "wall_s",
    "density",
    "model_bytes_compact",
    "params_compact",
    "macs_per_example",
    "latency_ms_per_example",
)

Cell = str | int | float | None


@dataclass(frozen=True)
class Outcome:
    """One row's run: its summary and its per-round curve."""

    strategy: str
    summary: RunSummary
    accuracy: list[float]
    cumulative_bytes: list[int]

    @classmethod
    def load(cls, strategy: str, summary: RunSummary, run_dir: Path) -> Outcome:
        """Read the per-round curve of a run from its ``rounds.csv``."""
        rows = read_rounds(run_dir)
        cumulative, total = [], 0
        for row in rows:
            total += int(row["bytes_up"]) + int(row["bytes_down"])
            cumulative.append(total)
        return cls(strategy, summary, [float(r["accuracy"]) for r in rows], cumulative)

    def bytes_to(self, target: float) -> int | None:
        """Bytes sent (both directions) until test accuracy first reached ``target``."""
        for accuracy, sent in zip(self.accuracy, self.cumulative_bytes, strict=True):
            if accuracy >= target:
                return sent
        return None


def summary_rows(
    outcomes: Sequence[Outcome], *, baseline: str, target_accuracy: float
) -> list[dict[str, Cell]]:
    """Return one dict per outcome with exactly :data:`SUMMARY_COLUMNS`.

    ``ratio_vs_fedavg`` is the baseline row's ``bytes_total`` over this row's.
    """
    by_name = {o.strategy: o for o in outcomes}
    if baseline not in by_name:
        raise ValueError(f"baseline row {baseline!r} is not among {sorted(by_name)}")
    base_total = by_name[baseline].summary.bytes_total
    rows: list[dict[str, Cell]] = []
    for o in outcomes:
        s = o.summary
        rows.append(
            {
                "strategy": o.strategy,
                "dataset": s.dataset,
                "num_clients": s.num_clients,
                "rounds": s.rounds,
                "final_accuracy": round(s.final_accuracy, 4),
                "best_accuracy": round(s.best_accuracy, 4),
                "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down,
                "bytes_total": s.bytes_total,
                "ratio_vs_fedavg": round(base_total / s.bytes_total, 2),
                "bytes_to_target": o.bytes_to(target_accuracy),
                "epsilon": None if s.epsilon is None else round(s.epsilon, 3),
                "wall_s": round(s.wall_s, 1),
                "density": round(s.density, 4),
                "model_bytes_compact": s.model_bytes_compact,
                "params_compact": s.params_compact,
                "macs_per_example": s.macs_per_example,
                "latency_ms_per_example": round(s.latency_ms_per_example, 3),
            }
        )
    return rows


def _text(cell: Cell) -> str:
    return "" if cell is None else str(cell)


def markdown_table(rows: Sequence[dict[str, Cell]]) -> str:
    """Render rows as a GitHub Markdown table (empty cells for unmeasured values)."""
    lines = [
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_text(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(directory: Path, rows: Sequence[dict[str, Cell]]) -> str:
    """Write ``summary.csv`` and ``summary.md`` into ``directory``; return the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([[_text(r[c]) for c in SUMMARY_COLUMNS] for r in rows])
    table = markdown_table(rows)
    (directory / "summary.md").write_text(table)
    return table


def plot_accuracy_vs_mb(path: Path, outcomes: Sequence[Outcome], title: str) -> None:
    """Plot test accuracy against cumulative megabytes sent (log x), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for o in outcomes:
        mb = [b / 1e6 for b in o.cumulative_bytes]
        ax.plot(mb, o.accuracy, marker="o", markersize=3, label=o.strategy)
    ax.set_xscale("log")
    ax.set_xlabel("megabytes sent, up + down (cumulative, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
