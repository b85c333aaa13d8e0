"""The main job: compare strategies on a scenario and print the results table.

    python -m simulations.compare                          # the "demo" scenario (digits)
    python -m simulations.compare --scenario fashion-mnist
    python -m simulations.compare --rows fedavg-fp32,d0.3-int8 --rounds 5

Each row runs in Flower's Ray simulation with the scenario's seed and partition. Outputs go to
``<out>/<scenario>/``: ``summary.csv``, ``summary.md`` (also printed), ``accuracy_vs_mb.png``,
and one folder per row with its ``rounds.csv``, ``summary.json`` and compact ``model.npz``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulations.report import Outcome, plot_accuracy_vs_mb, summary_rows, write_summary
from simulations.scenarios import FEDAVG, SCENARIOS, Scenario
from simulations.simulate import simulate


class _DropKnownNotices(logging.Filter):
    """Drop Flower's notices that say nothing about this run (one per row otherwise)."""

    NOTICES = ("DEPRECATED FEATURE", "Federated evaluation will be skipped")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def quiet_flower_logs() -> None:
    """Show only Flower's warnings and errors, minus the known notices, under the progress bar."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropKnownNotices) for f in logger.filters):
        logger.addFilter(_DropKnownNotices())


def compare(
    scenario: Scenario,
    out: Path,
    *,
    rows: Sequence[str] | None = None,
    rounds: int | None = None,
    console: Console | None = None,
) -> list[Outcome]:
    """Run the rows of ``scenario`` and write the comparison into ``out / scenario.name``.

    Parameters
    ----------
    scenario : Scenario
        What to compare.
    out : Path
        Results root.
    rows : Sequence[str], optional
        Row names to run (default: all); the FedAvg baseline always runs, as the ratio needs it.
    rounds : int, optional
        Override the scenario's number of rounds.
    console : Console, optional
        Where the progress bar and the table go.

    Returns
    -------
    list[Outcome]
        One per row, in scenario order.
    """
    console = console or Console()
    known = [r.name for r in scenario.rows]
    unknown = sorted(set(rows or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; scenario {scenario.name!r} has {known}")
    selected = [r for r in scenario.rows if rows is None or r.name in rows or r.name == FEDAVG]
    directory = out / scenario.name
    configs = [scenario.config(row, str(directory), rounds) for row in selected]
    outcomes: list[Outcome] = []
    quiet_flower_logs()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    total = sum(c.num_server_rounds for c in configs)
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=total)
        for row, cfg in zip(selected, configs, strict=True):
            progress.update(task, description=f"{scenario.name}: {row.name}")
            summary = simulate(
                cfg,
                num_supernodes=scenario.num_clients,
                on_round_end=lambda _traffic: progress.advance(task),
                quiet=True,
            )
            outcomes.append(Outcome.load(row.name, summary, directory / row.name))
    table_rows = summary_rows(outcomes, baseline=FEDAVG, target_accuracy=scenario.target_accuracy)
    table = write_summary(directory, table_rows)
    plot_accuracy_vs_mb(
        directory / "accuracy_vs_mb.png",
        outcomes,
        f"{scenario.description}, {configs[0].num_server_rounds} rounds",
    )
    console.print(f"\n{scenario.name}: {scenario.description}\n", soft_wrap=True)
    console.print(table, soft_wrap=True, markup=False, highlight=False)
    console.print(
        f"target accuracy for bytes_to_target: {scenario.target_accuracy}; outputs in {directory}/"
    )
    return outcomes


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__)
    parser.add_argument("--scenario", default="demo", choices=sorted(SCENARIOS))
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root")
    args = parser.parse_args(argv)
    compare(
        SCENARIOS[args.scenario],
        args.out.resolve(),
        rows=args.rows.split(",") if args.rows else None,
        rounds=args.rounds,
    )


if __name__ == "__main__":
    main()
