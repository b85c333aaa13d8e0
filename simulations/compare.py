"""The main job: compare strategies on a scenario and print the results table.

    python -m simulations.compare                          # scenarios/demo.toml (digits)
    python -m simulations.compare --scenario fashion-mnist # scenarios/fashion-mnist.toml
    python -m simulations.compare --scenario my.toml --seeds 3
    python -m simulations.compare --rows fedavg-fp32,d0.3-int8-zlib --rounds 5
    python -m simulations.compare --export-row d0.3-int8-zlib > row.toml  # for flwr run

A scenario is a TOML file (see :mod:`simulations.scenarios`). Each row runs in Flower's Ray
simulation with the scenario's seed and partition; ``--seeds N`` runs every row with seeds
``seed, seed + 1, ...`` (each seed drives the partition, the initialisation and every client's
batch sampling and DP noise). Outputs go to ``<out>/<scenario>/``: ``runs.csv`` (one line per
run), ``summary.csv`` and ``summary.md`` (one line per row: mean ± sd over seeds and the paired
difference to the baseline; also printed), ``accuracy_vs_mb.png``, and one folder per run with
its ``rounds.csv``, ``summary.json`` and compact ``model.npz``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedprune.checkpoint import run_dir
from fedprune.config import RunConfig
from fedprune.results import RunSummary, load_summary
from simulations.report import Outcome, plot_accuracy_vs_mb, run_rows, write_summary
from simulations.scenarios import (
    DEFAULT_SCENARIO,
    Scenario,
    ScenarioError,
    available,
    export_config,
    load_scenario,
)
from simulations.simulate import simulate
from strategies.accounting import RoundTraffic

ATTEMPTS = 3
"""Runs of a row and seed before the harness gives up on failed replies."""


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


def finished_run(cfg: RunConfig, num_clients: int) -> RunSummary | None:
    """Return the summary of a finished run of exactly ``cfg`` on ``num_clients`` nodes, if any."""
    path = run_dir(cfg.results_dir, cfg.run_name) / "summary.json"
    if not path.is_file():
        return None
    summary = load_summary(path)
    same = summary.config == cfg.to_mapping() and summary.num_clients == num_clients
    return summary if same and summary.rounds == cfg.num_server_rounds else None


def run_whole(
    cfg: RunConfig,
    num_clients: int,
    cpus: int | None,
    console: Console,
    progress: Progress,
    task: TaskID,
) -> RunSummary:
    """Run ``cfg`` until no reply failed in any round (at most :data:`ATTEMPTS` times).

    A failed reply (e.g. a Ray worker killed when the machine runs low on memory) leaves a
    round with fewer clients, or skipped: such a run does not measure the row, so it is run
    again from the start. A run that keeps failing raises, and its folder is removed.

    Raises
    ------
    RuntimeError
        If every attempt had failed replies.
    """
    for attempt in range(1, ATTEMPTS + 1):
        failures: list[int] = []

        def round_end(traffic: RoundTraffic, failures: list[int] = failures) -> None:
            failures.append(traffic.failures)
            progress.advance(task)

        summary = simulate(
            cfg, num_supernodes=num_clients, on_round_end=round_end, num_cpus=cpus, quiet=True
        )
        if not any(failures):
            return summary
        progress.update(task, advance=-len(failures))
        console.print(
            f"{cfg.run_name}: {sum(failures)} failed replies in rounds "
            f"{[i + 1 for i, f in enumerate(failures) if f]} (attempt {attempt} of {ATTEMPTS}); "
            "see the log above"
        )
    shutil.rmtree(run_dir(cfg.results_dir, cfg.run_name), ignore_errors=True)
    raise RuntimeError(f"run {cfg.run_name!r} had failed replies in each of {ATTEMPTS} attempts")


def compare(
    scenario: Scenario,
    out: Path,
    *,
    rows: Sequence[str] | None = None,
    rounds: int | None = None,
    seeds: int = 1,
    reuse: bool = False,
    cpus: int | None = None,
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
        Row names to run (default: all); the baseline row always runs, as the ratio and the
        paired differences need it.
    rounds : int, optional
        Override the scenario's number of rounds.
    seeds : int
        Run every row with this many seeds (base seed + 0, 1, ...); one run each when 1.
    reuse : bool
        Do not rerun a run whose ``summary.json`` is already in the output folder with exactly
        the config it would run with (e.g. to add rows or seeds to a comparison).
    cpus : int, optional
        CPUs Ray may use, one client at a time per CPU (default: all of this machine's).
    console : Console, optional
        Where the progress bar and the table go.

    Returns
    -------
    list[Outcome]
        One per run, seed by seed, in scenario order within a seed.
    """
    console = console or Console()
    for name in rows or ():
        scenario.row(name)  # raises, naming the rows there are
    selected = [
        r for r in scenario.rows if rows is None or r.name in rows or r.name == scenario.baseline
    ]
    directory = out / scenario.name
    seed_list = scenario.seeds(seeds)
    runs = [
        (row, scenario.config(row, str(directory), rounds, seed))
        for seed in seed_list
        for row in selected
    ]
    outcomes: list[Outcome] = []
    quiet_flower_logs()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    total = sum(cfg.num_server_rounds for _, cfg in runs)
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=total)
        for row, cfg in runs:
            progress.update(task, description=f"{scenario.name}: {cfg.run_name}")
            summary = finished_run(cfg, scenario.num_clients) if reuse else None
            if summary is not None:
                progress.advance(task, cfg.num_server_rounds)
            else:
                summary = run_whole(cfg, scenario.num_clients, cpus, console, progress, task)
            outcomes.append(Outcome.load(row.name, cfg.seed, summary, directory / cfg.run_name))
    table = write_summary(
        directory,
        run_rows(outcomes, baseline=scenario.baseline, target_accuracy=scenario.target_accuracy),
        baseline=scenario.baseline,
    )
    num_rounds = runs[0][1].num_server_rounds
    spread = f", mean ± sd over {seeds} seeds" if seeds > 1 else f", seed {seed_list[0]}"
    plot_accuracy_vs_mb(
        directory / "accuracy_vs_mb.png",
        outcomes,
        f"{scenario.description}, {num_rounds} rounds{spread}",
    )
    console.print(f"\n{scenario.name}: {scenario.description}{spread}\n", soft_wrap=True)
    console.print(table, soft_wrap=True, markup=False, highlight=False)
    console.print(
        f"target accuracy for bytes_to_target: {scenario.target_accuracy}; outputs in {directory}/"
    )
    return outcomes


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        help=f"a scenario .toml file, or a built-in one: {', '.join(available())}",
    )
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root")
    parser.add_argument(
        "--cpus",
        type=int,
        help="CPUs for Ray: clients trained at once (default: all; fewer use less memory)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs already in --out with exactly the same config instead of rerunning them",
    )
    parser.add_argument(
        "--export-row",
        metavar="NAME",
        help="print row NAME's full run config as TOML (for flwr run --run-config) and exit",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="with --export-row: the run of this seed, as --seeds N runs it",
    )
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        for name in args.rows.split(",") if args.rows else ():
            scenario.row(name)
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if args.cpus is not None and args.cpus < 1:
            raise ValueError(f"--cpus must be >= 1, got {args.cpus}")
        if args.seed is not None and not args.export_row:
            raise ValueError("--seed goes with --export-row; use --seeds N to run N seeds")
        if args.export_row:
            cfg = scenario.config(
                scenario.row(args.export_row),
                str(args.out.resolve() / scenario.name),
                args.rounds,
                args.seed,
            )
    except (ScenarioError, ValueError) as err:  # ConfigError is a ValueError
        parser.error(str(err))
    if args.export_row:
        print(export_config(cfg, scenario.num_clients), end="")
        return
    compare(
        scenario,
        args.out.resolve(),
        rows=args.rows.split(",") if args.rows else None,
        rounds=args.rounds,
        seeds=args.seeds,
        reuse=args.reuse,
        cpus=args.cpus,
    )


if __name__ == "__main__":
    main()
