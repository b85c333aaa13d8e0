"""The comparison's outputs: ``runs.csv``, ``summary.csv``, ``summary.md``, ``accuracy_vs_mb.png``.

Every figure comes from a run's own files (``rounds.csv``, ``summary.json``, ``model.npz``):
bytes counted from the serialized messages, accuracy on the held-out test split, ε from the
clients' accountants. Cells that were not measured (ε without DP, bytes to a target accuracy
never reached, a spread over one seed) are left empty.

``runs.csv`` has one line per run (row and seed). ``summary.csv`` / ``summary.md`` have one
line per row: the mean and the sample standard deviation over the seeds of each metric, and the
paired difference of final accuracy to the baseline row run with the same seed, with a 95 %
Student-t interval over the seeds (``mean ± t(0.975, n-1) · sd / sqrt(n)``).
"""

from __future__ import annotations

import csv
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedprune.results import RunSummary, read_rounds

RUN_COLUMNS = (
    "strategy",
    "seed",
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
METRICS = RUN_COLUMNS[5:]
"""The per-run metrics aggregated over seeds (mean and sd)."""
DIGITS = {
    "final_accuracy": 4,
    "best_accuracy": 4,
    "ratio_vs_fedavg": 2,
    "epsilon": 3,
    "wall_s": 1,
    "density": 4,
    "latency_ms_per_example": 3,
}
"""Decimals of each metric in the tables (absent: integers)."""
DIFF = "d_final_accuracy_pts"
"""Paired difference of final accuracy to the baseline row, in percentage points."""
SUMMARY_COLUMNS = (
    "strategy",
    "dataset",
    "num_clients",
    "rounds",
    "seeds",
    *(f"{m}{suffix}" for m in METRICS for suffix in ("", "_sd")),
    "target_reached",
    DIFF,
    f"{DIFF}_ci95_low",
    f"{DIFF}_ci95_high",
)
T_LEVEL = 0.95
"""Confidence level of the paired intervals."""

Cell = str | int | float | None


@dataclass(frozen=True)
class Outcome:
    """One run (a row with one seed): its summary and its per-round curve."""

    strategy: str
    seed: int
    summary: RunSummary
    accuracy: list[float]
    cumulative_bytes: list[int]

    @classmethod
    def load(cls, strategy: str, seed: int, summary: RunSummary, run_dir: Path) -> Outcome:
        """Read the per-round curve of a run from its ``rounds.csv``."""
        rows = read_rounds(run_dir)
        cumulative, total = [], 0
        for row in rows:
            total += int(row["bytes_up"]) + int(row["bytes_down"])
            cumulative.append(total)
        return cls(strategy, seed, summary, [float(r["accuracy"]) for r in rows], cumulative)

    def bytes_to(self, target: float) -> int | None:
        """Bytes sent (both directions) until test accuracy first reached ``target``."""
        for accuracy, sent in zip(self.accuracy, self.cumulative_bytes, strict=True):
            if accuracy >= target:
                return sent
        return None


def run_rows(
    outcomes: Sequence[Outcome], *, baseline: str, target_accuracy: float
) -> list[dict[str, Cell]]:
    """Return one dict per run with exactly :data:`RUN_COLUMNS`.

    ``ratio_vs_fedavg`` is the baseline row's ``bytes_total`` (same seed) over this run's.

    Raises
    ------
    ValueError
        If a seed has no baseline run.
    """
    base_total = {o.seed: o.summary.bytes_total for o in outcomes if o.strategy == baseline}
    rows: list[dict[str, Cell]] = []
    for o in outcomes:
        if o.seed not in base_total:
            raise ValueError(f"baseline row {baseline!r} has no run with seed {o.seed}")
        s = o.summary
        rows.append(
            {
                "strategy": o.strategy,
                "seed": o.seed,
                "dataset": s.dataset,
                "num_clients": s.num_clients,
                "rounds": s.rounds,
                "final_accuracy": s.final_accuracy,
                "best_accuracy": s.best_accuracy,
                "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down,
                "bytes_total": s.bytes_total,
                "ratio_vs_fedavg": base_total[o.seed] / s.bytes_total,
                "bytes_to_target": o.bytes_to(target_accuracy),
                "epsilon": s.epsilon,
                "wall_s": s.wall_s,
                "density": s.density,
                "model_bytes_compact": s.model_bytes_compact,
                "params_compact": s.params_compact,
                "macs_per_example": s.macs_per_example,
                "latency_ms_per_example": round(s.latency_ms_per_example, 3),
            }
        )
    return rows


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Return the mean and the sample standard deviation (``None`` for one value)."""
    if not values:
        raise ValueError("no values")
    sd = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), sd


def t_quantile(level: float, df: int) -> float:
    """Return the two-sided Student-t quantile ``t((1 + level) / 2, df)``."""
    from scipy.stats import t

    return float(t.ppf((1.0 + level) / 2.0, df))


def paired_interval(
    diffs: Sequence[float], level: float = T_LEVEL
) -> tuple[float, float | None, float | None]:
    """Return the mean of paired differences and its Student-t interval (``None`` for n = 1).

    Parameters
    ----------
    diffs : Sequence[float]
        One difference per seed (row minus baseline, same seed).
    level : float
        Confidence level of the two-sided interval.
    """
    mean, sd = mean_sd(diffs)
    if sd is None:
        return mean, None, None
    half = t_quantile(level, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def aggregate(runs: Sequence[dict[str, Cell]], *, baseline: str) -> list[dict[str, Cell]]:
    """Fold :func:`run_rows` over seeds: one dict per row with exactly :data:`SUMMARY_COLUMNS`.

    Metrics measured in only some runs (bytes to a target some seeds never reached) are
    averaged over those runs; ``target_reached`` says in how many. The paired difference pairs
    each run with the baseline's run of the same seed.
    """
    names = list(dict.fromkeys(str(r["strategy"]) for r in runs))
    accuracy = {(r["strategy"], r["seed"]): float(r["final_accuracy"] or 0.0) for r in runs}
    out: list[dict[str, Cell]] = []
    for name in names:
        mine = [r for r in runs if r["strategy"] == name]
        first = mine[0]
        row: dict[str, Cell] = {
            "strategy": name,
            "dataset": first["dataset"],
            "num_clients": first["num_clients"],
            "rounds": first["rounds"],
            "seeds": len(mine),
        }
        for metric in METRICS:
            values = [float(v) for r in mine if (v := r[metric]) is not None]
            mean, sd = mean_sd(values) if values else (None, None)
            row[metric], row[f"{metric}_sd"] = mean, sd
        reached = sum(r["bytes_to_target"] is not None for r in mine)
        row["target_reached"] = f"{reached}/{len(mine)}"
        diff: tuple[float | None, float | None, float | None] = (None, None, None)
        if name != baseline:
            diffs = [
                100.0 * (accuracy[name, r["seed"]] - accuracy[baseline, r["seed"]]) for r in mine
            ]
            diff = paired_interval(diffs)
        row[DIFF], row[f"{DIFF}_ci95_low"], row[f"{DIFF}_ci95_high"] = diff
        out.append(row)
    return out


def _number(value: Cell, digits: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if digits is None:
        return str(round(value))
    return f"{value:.{digits}f}"


def _csv_cell(column: str, value: Cell) -> str:
    metric = column.removesuffix("_sd")
    if metric in METRICS:
        return _number(value, DIGITS.get(metric))
    if column.startswith(DIFF):
        return _number(value, 2)
    return _number(value, None)


def markdown_table(rows: Sequence[dict[str, Cell]], *, baseline: str) -> str:
    """Render aggregated rows as a Markdown table: ``mean ± sd`` per metric (mean for one seed)."""
    shown = ("final_accuracy", "best_accuracy", "bytes_up", "bytes_total", "ratio_vs_fedavg")
    later = RUN_COLUMNS[RUN_COLUMNS.index("epsilon") :]
    header = [
        "strategy",
        "seeds",
        *shown,
        f"Δ final_accuracy vs {baseline}, points [95 % CI]",
        "bytes_to_target (reached)",
        *later,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:

        def cell(metric: str, r: dict[str, Cell] = r) -> str:
            digits = DIGITS.get(metric)
            mean, sd = _number(r[metric], digits), _number(r[f"{metric}_sd"], digits)
            return f"{mean} ± {sd}" if mean and sd else mean

        diff = _number(r[DIFF], 2)
        if r[f"{DIFF}_ci95_low"] is not None:
            diff += f" [{_number(r[f'{DIFF}_ci95_low'], 2)}, {_number(r[f'{DIFF}_ci95_high'], 2)}]"
        target = cell("bytes_to_target")
        if target and r["target_reached"] != f"{r['seeds']}/{r['seeds']}":
            target += f" ({r['target_reached']})"
        cells = [
            str(r["strategy"]),
            str(r["seeds"]),
            *(cell(m) for m in shown),
            diff,
            target,
            *(cell(m) for m in later),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Cell]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_csv_cell(c, r[c]) for c in columns] for r in rows])


def write_summary(
    directory: Path,
    runs: Sequence[dict[str, Cell]],
    *,
    baseline: str,
) -> str:
    """Write ``runs.csv``, ``summary.csv`` and ``summary.md`` into ``directory``.

    Returns
    -------
    str
        The Markdown table.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _write_csv(directory / "runs.csv", RUN_COLUMNS, runs)
    rows = aggregate(runs, baseline=baseline)
    _write_csv(directory / "summary.csv", SUMMARY_COLUMNS, rows)
    table = markdown_table(rows, baseline=baseline)
    (directory / "summary.md").write_text(table)
    return table


def plot_accuracy_vs_mb(path: Path, outcomes: Sequence[Outcome], title: str) -> None:
    """Plot test accuracy against cumulative megabytes sent (log x), one line per strategy.

    With several seeds a line is the mean over seeds at each round (x: the mean megabytes) and
    its error bars are the standard deviation of accuracy over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    names = list(dict.fromkeys(o.strategy for o in outcomes))
    seeds = 1
    for name in names:
        runs = [o for o in outcomes if o.strategy == name]
        seeds = max(seeds, len(runs))
        rounds = min(len(o.accuracy) for o in runs)
        mb = [statistics.fmean(o.cumulative_bytes[i] / 1e6 for o in runs) for i in range(rounds)]
        stats = [mean_sd([o.accuracy[i] for o in runs]) for i in range(rounds)]
        means = [m for m, _ in stats]
        if len(runs) > 1:
            spread = [sd or 0.0 for _, sd in stats]
            ax.errorbar(mb, means, yerr=spread, marker="o", markersize=3, capsize=2, label=name)
        else:
            ax.plot(mb, means, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("megabytes sent, up + down (cumulative, log scale)")
    ax.set_ylabel("test accuracy" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
