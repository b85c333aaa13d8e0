"""Per-round metrics in TensorBoard and MLflow, read back with each tool's own reader."""

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedprune.config import ConfigError, RunConfig
from fedprune.results import RoundRecord, read_clients, read_rounds
from fedprune.tracking import TENSORBOARD_DIR, MetricsLog, mlflow_uri, round_metrics
from simulations.simulate import simulate

RECORDS = [
    RoundRecord(1, 0.5, 1.25, 1000, 2000, 1.0, None, 0.75),
    RoundRecord(2, 0.625, 1.0, 900, 1800, 0.5, 2.5, 0.5),
]


def same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, values equal to float32 precision (event files store float32)."""
    steps, values = [s for s, _ in got], [v for _, v in got]
    return steps == [s for s, _ in expected] and values == pytest.approx(
        [v for _, v in expected], rel=1e-6, abs=1e-3
    )


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def mlflow_history(results_dir: Path, run_name: str) -> tuple[dict, dict[str, list]]:
    client = MlflowClient(tracking_uri=mlflow_uri(results_dir))
    experiment = client.get_experiment_by_name(results_dir.name)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert run.info.status == "FINISHED"
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    return run.data.params, history


def test_round_metrics_leave_out_an_unmeasured_epsilon() -> None:
    assert "epsilon" not in round_metrics(RECORDS[0])
    assert round_metrics(RECORDS[1]) == {
        "accuracy": 0.625,
        "loss": 1.0,
        "bytes_up": 900.0,
        "bytes_down": 1800.0,
        "density": 0.5,
        "wall_s": 0.5,
        "epsilon": 2.5,
    }


def test_metrics_log_writes_both_trackers(tmp_path: Path) -> None:
    cfg = RunConfig(run_name="unit", results_dir=str(tmp_path / "cmp"), log_mlflow=True)
    log = MetricsLog(cfg)
    for record in RECORDS:
        log.round(record)
    log.close()
    scalars = tensorboard_scalars(tmp_path / "cmp" / "unit")
    params, history = mlflow_history(tmp_path / "cmp", "unit")
    for name in ("accuracy", "loss", "bytes_up", "bytes_down", "density", "wall_s"):
        expected = [(r.round, round_metrics(r)[name]) for r in RECORDS]
        assert same(scalars[name], expected)
        assert history[name] == expected
    assert scalars["epsilon"] == [(2, 2.5)] and history["epsilon"] == [(2, 2.5)]
    assert params["run-name"] == "unit" and params["log-mlflow"] == "True"


def test_tensorboard_off_writes_no_events(tmp_path: Path) -> None:
    log = MetricsLog(RunConfig(run_name="off", results_dir=str(tmp_path), log_tensorboard=False))
    log.round(RECORDS[0])
    log.close()
    assert not (tmp_path / "off").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_missing_tracker_package_names_the_key(monkeypatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails
    with pytest.raises(ConfigError, match=r"'log-mlflow'.*fedprune\[mlflow\]"):
        MetricsLog(RunConfig(results_dir=str(tmp_path), log_tensorboard=False, log_mlflow=True))


@pytest.mark.slow
def test_a_short_run_reads_back_in_tensorboard_mlflow_and_its_csvs(tmp_path: Path) -> None:
    cfg = RunConfig(
        run_name="tracked",
        results_dir=str(tmp_path / "runs"),
        num_server_rounds=2,
        batch_size=64,
        dp=True,
        noise_multiplier=1.0,
        target_density=0.5,
        prune_end_round=2,
        log_mlflow=True,
    )
    summary = simulate(cfg, num_supernodes=3, quiet=True)
    run_dir = tmp_path / "runs" / "tracked"
    rounds = read_rounds(run_dir)
    assert [float(r["wall_s"]) for r in rounds] == pytest.approx(summary.round_wall_s, abs=1e-3)
    scalars = tensorboard_scalars(run_dir)
    _, history = mlflow_history(tmp_path / "runs", "tracked")
    for name in ("accuracy", "loss", "bytes_up", "bytes_down", "density", "epsilon", "wall_s"):
        expected = [(int(r["round"]), float(r[name])) for r in rounds]
        assert same(scalars[name], expected) and same(history[name], expected)
    # clients.csv: each node in each round; the rounds' bytes are exactly the nodes' sums, and
    # the round's ε is the largest a node reported.
    clients = read_clients(run_dir)
    with (run_dir / "clients.csv").open() as f:
        assert next(csv.reader(f)) == ["round", "node_id", "bytes_up", "bytes_down", "epsilon"]
    for r in rounds:
        mine = [c for c in clients if c.round == int(r["round"])]
        assert len(mine) == 3 and len({c.node_id for c in mine}) == 3
        assert sum(c.bytes_up for c in mine) == int(r["bytes_up"])
        assert sum(c.bytes_down for c in mine) == int(r["bytes_down"])
        assert all(c.bytes_up > 0 and c.bytes_down > 0 for c in mine)
        epsilons = [c.epsilon for c in mine if c.epsilon is not None]
        assert len(epsilons) == 3
        assert max(epsilons) == pytest.approx(float(r["epsilon"]), abs=1e-6)
