"""Failures and attacks in Flower's simulation engine: the run goes on, robust strategies hold."""

from pathlib import Path

import pytest

from fedprune.config import RunConfig
from fedprune.results import RunSummary, read_rounds
from simulations.faults import make_faulty_client_app
from simulations.simulate import simulate

pytestmark = pytest.mark.slow

NODES = 10


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def run(
    results: Path,
    name: str,
    failing: frozenset[int] = frozenset(),
    attackers: frozenset[int] = frozenset(),
    **changes: object,
) -> RunSummary:
    cfg = RunConfig(
        run_name=name,
        results_dir=str(results),
        num_server_rounds=3,
        partitioning="iid",
        target_density=1.0,
        quant="int8-channel",
        entropy=False,
        error_feedback=False,
        min_train_nodes=5,
    ).replace(**changes)
    app = make_faulty_client_app(cfg, failing=failing, attackers=attackers)
    return simulate(cfg, num_supernodes=NODES, client_app=app, quiet=True)


def test_thirty_percent_of_clients_raising_does_not_stop_the_rounds(results: Path) -> None:
    summary = run(results, "failing", failing=frozenset({0, 1, 2}))
    assert summary.rounds == 3
    assert summary.final_accuracy > 0.5
    rows = read_rounds(results / "failing")
    assert [float(r["accuracy"]) for r in rows][-1] > float(rows[0]["accuracy"])


def test_too_many_failures_skip_every_round_and_keep_the_initial_model(results: Path) -> None:
    summary = run(results, "too-few", failing=frozenset(range(6)))  # 4 valid < min-train-nodes 5
    initial = run(results, "no-training", failing=frozenset(range(NODES)), min_train_nodes=1)
    assert summary.final_accuracy == initial.final_accuracy  # the untouched initial model


@pytest.mark.parametrize("inner", ["fedmedian", "krum"])
def test_a_robust_inner_strategy_resists_sign_flipping_attackers(results: Path, inner: str) -> None:
    clean = run(results, f"clean-{inner}", inner_strategy=inner)
    attacked = run(results, f"attacked-{inner}", inner_strategy=inner, attackers=frozenset({0}))
    assert attacked.final_accuracy >= clean.final_accuracy - 0.03
