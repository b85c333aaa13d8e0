"""A finished run's results: ``rounds.csv``, ``summary.json`` and their tables."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulations.deploy.common import COMPLETED


@dataclass(frozen=True)
class RunResult:
    """A finished ``flwr run`` and what its ServerApp wrote."""

    run_id: int
    status: str
    path: Path
    """``<results-dir>/<run-name>``."""
    rounds: list[dict[str, str]]
    summary: dict[str, Any]
    log: Path
    """The streamed run log."""

    @property
    def ok(self) -> bool:
        """Whether the run completed and wrote its results."""
        return self.status == COMPLETED and bool(self.rounds) and bool(self.summary)


def read_results(path: str | os.PathLike[str]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Read ``rounds.csv`` and ``summary.json`` of a run directory (empty if missing)."""
    run_dir = Path(path)
    rounds: list[dict[str, str]] = []
    summary: dict[str, Any] = {}
    if (run_dir / "rounds.csv").exists():
        with (run_dir / "rounds.csv").open(newline="", encoding="utf-8") as file:
            rounds = list(csv.DictReader(file))
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    return rounds, summary


def results_tables(result: RunResult) -> list[Table]:
    """Return rich tables of a run: its rounds and its summary."""
    rounds = Table(title=f"run {result.run_id}: {result.path}", title_justify="left")
    columns = list(result.rounds[0]) if result.rounds else []
    for column in columns:
        rounds.add_column(column, justify="right")
    for row in result.rounds:
        rounds.add_row(*(row[c] for c in columns))
    summary = Table(title="summary", title_justify="left", show_header=False)
    summary.add_column("key")
    summary.add_column("value", justify="right")
    summary.add_row("status", result.status)
    for key, value in result.summary.items():
        if not isinstance(value, dict | list):
            summary.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    return [rounds, summary]


def print_results(result: RunResult, out: Console | None = None) -> None:
    """Print :func:`results_tables` (to stdout by default)."""
    out = out or Console(highlight=False)
    for table in results_tables(result):
        out.print(table)
