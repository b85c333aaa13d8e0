"""Scenario files, row export, aggregation over seeds, and a tiny comparison end to end."""

import csv
import io
import math
import tomllib
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest

from fedprune.config import RunConfig
from fedprune.results import RunSummary
from simulations.compare import main
from simulations.report import (
    DIFF,
    Outcome,
    aggregate,
    markdown_table,
    paired_interval,
    run_rows,
    t_quantile,
    write_summary,
)
from simulations.scenarios import (
    ScenarioError,
    available,
    export_config,
    load_scenario,
)

TWO_ROWS = """
description = "digits, 3 clients, two rows (test)"
num-clients = 3
target-accuracy = 0.5

[base]
dataset = "digits"
num-server-rounds = 2
batch-size = 32
seed = 4

[rows.fedavg]
strategy = "fedavg"
target-density = 1.0
error-feedback = false
entropy = false

[rows."int8-topk0.1"]
quant = "int8-channel"
target-density = 1.0
update-topk = 0.1
"""


def write(tmp_path: Path, text: str, name: str = "two.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_built_in_scenarios_load_and_demo_is_the_default() -> None:
    assert {"demo", "fashion-mnist"} <= set(available())
    demo = load_scenario("demo")
    assert demo.baseline == "fedavg-fp32" and demo.num_clients == 10
    assert [r.name for r in demo.rows][:2] == ["fedavg-fp32", "fedavg-int8"]
    cfg = demo.config(demo.row("d0.3-int8-zlib"), "out")
    assert (cfg.target_density, cfg.prune_end_round, cfg.num_server_rounds) == (0.3, 10, 20)


def test_a_file_loads_with_its_rows_in_order(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, TWO_ROWS))
    assert scenario.name == "two"
    assert [r.name for r in scenario.rows] == ["fedavg", "int8-topk0.1"]
    assert scenario.baseline == "fedavg"  # the first row by default
    assert scenario.seeds(3) == [4, 5, 6]
    cfg = scenario.config(scenario.row("int8-topk0.1"), "out", seed=6)
    assert (cfg.run_name, cfg.seed, cfg.update_topk) == ("int8-topk0.1-seed6", 6, 0.1)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("update-topk = 0.1", "update-topk = 1.5"), "config key 'update-topk'"),
        (
            ("update-topk = 0.1", 'update-topk = 0.1\ninner-strategy = "avg"'),
            "config key 'inner-strategy'",
        ),
        (("seed = 4", "seed = -1"), "config key 'seed'"),
        (("seed = 4", 'seed = 4\nrun-name = "x"'), "'run-name'"),
        (("num-clients = 3", "num-clients = 3\nrounds = 2"), "unknown key(s) ['rounds']"),
        (("num-clients = 3", 'num-clients = "3"'), "key 'num-clients'"),
        (("target-accuracy = 0.5", "target-accuracy = 5"), "key 'target-accuracy'"),
        (("num-clients = 3", 'num-clients = 3\nbaseline = "x"'), "key 'baseline'"),
        (("num-clients = 3", "num-clients = 1"), "config key 'min-train-nodes'"),
        (("[rows.fedavg]", "[rows.fedavg]]"), "not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_row_and_key(
    tmp_path: Path, edit: tuple[str, str], named: str
) -> None:
    text = TWO_ROWS.replace(*edit, 1)
    assert text != TWO_ROWS
    with pytest.raises(ScenarioError) as err:
        load_scenario(write(tmp_path, text))
    assert named in str(err.value)
    assert "two.toml" in str(err.value)


def test_an_unknown_row_key_names_the_row_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"row 'int8-topk0.1'.*'local-epoch'"):
        load_scenario(write(tmp_path, TWO_ROWS + "local-epoch = 2\n"))


def test_the_cli_refuses_a_bad_file_with_the_key(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, TWO_ROWS.replace("update-topk = 0.1", "update-topk = 0"))
    with pytest.raises(SystemExit):
        main(["--scenario", str(path)])
    assert "config key 'update-topk'" in capsys.readouterr().err


@pytest.mark.parametrize("scenario", ["demo", "fashion-mnist"])
def test_every_exported_row_is_the_config_the_harness_runs(scenario: str, tmp_path: Path) -> None:
    loaded = load_scenario(scenario)
    for row in loaded.rows:
        for seed in (None, 7):
            out = io.StringIO()
            args = ["--scenario", scenario, "--export-row", row.name, "--out", str(tmp_path)]
            with redirect_stdout(out):
                main([*args, "--rounds", "5"] + ([] if seed is None else ["--seed", str(seed)]))
            exported = RunConfig.from_mapping(tomllib.loads(out.getvalue()))
            ran = loaded.config(row, str(tmp_path.resolve() / scenario), 5, seed)
            assert exported == ran
            assert f"flwr_run.sh {loaded.num_clients} " in out.getvalue()


def test_export_writes_every_key() -> None:
    cfg = RunConfig(run_name="x", seed=3)
    assert tomllib.loads(export_config(cfg, 4)) == cfg.to_mapping()


def summary(accuracy: float, total: int, epsilon: float | None = None) -> RunSummary:
    return RunSummary(
        run_name="r",
        dataset="digits",
        num_clients=3,
        rounds=2,
        final_accuracy=accuracy,
        best_accuracy=accuracy,
        bytes_up=total // 2,
        bytes_down=total - total // 2,
        epsilon=epsilon,
        wall_s=1.0,
        density=1.0,
        model_bytes_compact=10,
        compact_accuracy=accuracy,
        round_wall_s=[0.5, 0.5],
        config={},
    )


def outcome(name: str, seed: int, accuracy: float, total: int) -> Outcome:
    curve = [accuracy - 0.1, accuracy]
    return Outcome(name, seed, summary(accuracy, total), curve, [total // 2, total])


def test_paired_differences_and_intervals_by_hand() -> None:
    # Baseline 0.90, 0.92, 0.91; row 0.88, 0.91, 0.87 -> differences -2, -1, -4 points.
    outcomes = [
        outcome("base", 0, 0.90, 1000),
        outcome("row", 0, 0.88, 100),
        outcome("base", 1, 0.92, 1000),
        outcome("row", 1, 0.91, 200),
        outcome("base", 2, 0.91, 1000),
        outcome("row", 2, 0.87, 250),
    ]
    runs = run_rows(outcomes, baseline="base", target_accuracy=0.9)
    assert [r["ratio_vs_fedavg"] for r in runs if r["strategy"] == "row"] == [10.0, 5.0, 4.0]
    base, row = aggregate(runs, baseline="base")
    assert base[DIFF] is None and base["final_accuracy_sd"] == pytest.approx(0.01)
    assert row["seeds"] == 3
    assert row["final_accuracy"] == pytest.approx(0.8866667, abs=1e-6)
    # sd of (0.88, 0.91, 0.87): mean 0.886667, squares 0.0000444 + 0.0005444 + 0.0002778
    assert row["final_accuracy_sd"] == pytest.approx(math.sqrt(0.00086667 / 2), abs=1e-6)
    assert row["ratio_vs_fedavg"] == pytest.approx(19 / 3)
    # mean -7/3; sd sqrt(7/3) = 1.527525; t(0.975, 2) = 4.302653; half = 3.794578
    assert t_quantile(0.95, 2) == pytest.approx(4.302653, abs=1e-6)
    assert row[DIFF] == pytest.approx(-2.333333, abs=1e-6)
    assert row[f"{DIFF}_ci95_low"] == pytest.approx(-6.127911, abs=1e-5)
    assert row[f"{DIFF}_ci95_high"] == pytest.approx(1.461245, abs=1e-5)
    # The target (0.9) is reached by the baseline in all seeds, by the row in one (0.91).
    assert base["target_reached"] == "3/3" and row["target_reached"] == "1/3"
    assert row["bytes_to_target"] == 200 and row["bytes_to_target_sd"] is None
    table = markdown_table([base, row], baseline="base")
    assert "| row | 3 | 0.8867 ± 0.0208 |" in table
    assert "-2.33 [-6.13, 1.46]" in table
    assert "200 (1/3)" in table


def test_one_seed_has_no_spread_and_no_interval() -> None:
    assert paired_interval([1.5]) == (1.5, None, None)
    runs = run_rows(
        [outcome("base", 0, 0.9, 100), outcome("row", 0, 0.8, 50)],
        baseline="base",
        target_accuracy=0.95,
    )
    _, row = aggregate(runs, baseline="base")
    assert row[DIFF] == pytest.approx(-10.0)
    assert row["final_accuracy_sd"] is None and row[f"{DIFF}_ci95_low"] is None
    assert row["bytes_to_target"] is None and row["target_reached"] == "0/1"
    assert "| row | 1 | 0.8000 | 0.8000 |" in markdown_table([row], baseline="base")


def test_the_exported_models_cost_reaches_the_tables(tmp_path: Path) -> None:
    shrunk = replace(
        summary(0.8, 100),
        params_compact=497_837,
        macs_per_example=3_277_364,
        latency_ms_per_example=0.30449,
    )
    base = Outcome("base", 0, summary(0.9, 1000), [0.8, 0.9], [500, 1000])
    row = Outcome("row", 0, shrunk, [0.7, 0.8], [50, 100])
    runs = run_rows([base, row], baseline="base", target_accuracy=0.95)
    assert runs[1]["latency_ms_per_example"] == 0.304
    table = write_summary(tmp_path, runs, baseline="base")
    assert table.splitlines()[0].endswith(
        "| params_compact | macs_per_example | latency_ms_per_example |"
    )
    assert table.splitlines()[-1].endswith("| 497837 | 3277364 | 0.304 |")
    with (tmp_path / "runs.csv").open() as f:
        assert list(csv.DictReader(f))[1]["latency_ms_per_example"] == "0.304"


def test_a_seed_without_its_baseline_run_is_an_error() -> None:
    with pytest.raises(ValueError, match="no run with seed 1"):
        runs = [outcome("base", 0, 0.9, 1), outcome("row", 1, 0.9, 1)]
        run_rows(runs, baseline="base", target_accuracy=0.5)


@pytest.mark.slow
def test_a_two_row_scenario_file_runs_over_seeds_into_the_table(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, TWO_ROWS)
    main(["--scenario", str(path), "--seeds", "2", "--out", str(tmp_path / "out")])
    directory = tmp_path / "out" / "two"
    printed = capsys.readouterr().out
    assert "int8-topk0.1" in printed and " ± " in printed
    with (directory / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["strategy"], r["seed"]) for r in runs] == [
        ("fedavg", "4"),
        ("int8-topk0.1", "4"),
        ("fedavg", "5"),
        ("int8-topk0.1", "5"),
    ]
    with (directory / "summary.csv").open() as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    row = rows["int8-topk0.1"]
    assert row["seeds"] == "2" and row["rounds"] == "2"
    assert float(row["final_accuracy_sd"]) >= 0.0
    low, mid, high = (float(row[f"{DIFF}{s}"]) for s in ("_ci95_low", "", "_ci95_high"))
    assert low <= mid <= high
    # Each run's own files agree with the table.
    for r in runs:
        rounds = (directory / f"{r['strategy']}-seed{r['seed']}" / "rounds.csv").read_text()
        assert len(rounds.splitlines()) == 3
    assert float(rows["fedavg"]["ratio_vs_fedavg"]) == 1.0
    assert float(row["ratio_vs_fedavg"]) > 2.0
    assert (directory / "accuracy_vs_mb.png").stat().st_size > 0
    assert "| int8-topk0.1 | 2 |" in (directory / "summary.md").read_text()


def test_a_run_with_failed_replies_is_run_again_then_refused(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console
    from rich.progress import Progress

    import simulations.compare as harness
    from strategies.accounting import RoundTraffic

    calls: list[int] = []

    def fake_simulate(cfg, *, num_supernodes, on_round_end, num_cpus, quiet):
        calls.append(num_supernodes)
        (tmp_path / cfg.run_name).mkdir(exist_ok=True)
        for server_round in (1, 2):  # a worker lost in round 2 of the first attempt
            failed = int(len(calls) == 1 and server_round == 2) if fail_once else 1
            on_round_end(RoundTraffic(server_round, failures=failed))
        return summary(0.9, 100)

    monkeypatch.setattr(harness, "simulate", fake_simulate)
    cfg = RunConfig(run_name="r", results_dir=str(tmp_path))
    printed = io.StringIO()
    console = Console(file=printed)
    with Progress(console=console) as progress:
        task = progress.add_task("rounds", total=2)
        fail_once = True
        assert harness.run_whole(cfg, 3, None, console, progress, task).final_accuracy == 0.9
        assert len(calls) == 2 and progress.tasks[0].completed == 2
        fail_once = False
        with pytest.raises(RuntimeError, match="failed replies in each of 3 attempts"):
            harness.run_whole(cfg, 3, None, console, progress, task)
    assert len(calls) == 5 and not (tmp_path / "r").exists()
    assert "failed replies in rounds [2] (attempt 1 of 3)" in printed.getvalue()


def test_reuse_takes_only_a_finished_run_of_the_same_config(tmp_path: Path) -> None:
    from fedprune.results import RoundRecord, summarize, write_run
    from simulations.compare import finished_run

    cfg = RunConfig(run_name="r", results_dir=str(tmp_path), num_server_rounds=2)
    assert finished_run(cfg, 3) is None
    records = [RoundRecord(i, 0.5, 1.0, 10, 20, 1.0, None, 0.1) for i in (1, 2)]
    done = summarize("r", cfg.to_mapping(), 3, records, 1.0, 100, 0.5)
    write_run(tmp_path / "r", records, done)
    assert finished_run(cfg, 3) == done
    assert finished_run(cfg, 4) is None  # another federation size
    assert finished_run(cfg.replace(lr=0.2), 3) is None  # another config
    assert finished_run(cfg.replace(num_server_rounds=3), 3) is None
