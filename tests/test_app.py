"""End to end in Flower's Ray simulation engine: 4 SuperNodes, digits, a few rounds each."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedprune import codec, task
from fedprune.config import RunConfig
from fedprune.data import client_data, load_dataset
from fedprune.export import load_compact
from fedprune.models import set_weights
from fedprune.privacy import planned_total_steps
from fedprune.pruning import prunable_names
from fedprune.results import RunSummary, read_rounds
from simulations.simulate import simulate
from strategies.server_app import MODEL_FILE

pytestmark = pytest.mark.slow

NODES = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("results")


def run(results: Path, name: str, rounds: int = 3, **changes: object) -> RunSummary:
    cfg = RunConfig(run_name=name, results_dir=str(results), num_server_rounds=rounds)
    return simulate(cfg.replace(**changes), num_supernodes=NODES)


@pytest.fixture(scope="module")
def baseline(results: Path) -> RunSummary:
    return run(results, "fedavg", strategy="fedavg", target_density=1.0)


@pytest.fixture(scope="module")
def int8(results: Path) -> RunSummary:
    return run(
        results, "int8", quant="int8", target_density=1.0, error_feedback=False, entropy=False
    )


@pytest.fixture(scope="module")
def sparse_deltas(results: Path) -> RunSummary:
    return run(
        results,
        "sparse-deltas",
        quant="int8",
        target_density=1.0,
        entropy=False,
        update_topk=0.25,
        delta_downlink=True,
    )


@pytest.fixture(scope="module")
def pruned(results: Path) -> RunSummary:
    return run(results, "pruned", target_density=0.3, prune_start_round=1, prune_end_round=2)


def accuracies(results: Path, name: str) -> list[float]:
    return [float(row["accuracy"]) for row in read_rounds(results / name)]


def test_fedavg_learns(results: Path, baseline: RunSummary) -> None:
    acc = accuracies(results, "fedavg")
    assert len(acc) == 3
    assert acc[-1] > 0.5  # ten classes: chance is 0.1
    assert acc[-1] > acc[0]
    assert baseline.num_clients == NODES


def test_int8_uplink_is_a_quarter_of_float32_and_decoded_before_averaging(
    baseline: RunSummary, int8: RunSummary
) -> None:
    ratio = int8.bytes_up / baseline.bytes_up
    assert 0.24 < ratio < 0.30, ratio
    # Averaging raw int8 codes would wreck the model; decoded replies track float32 closely.
    assert int8.final_accuracy > baseline.final_accuracy - 0.05


def test_top_k_deltas_shrink_both_directions_and_still_learn(
    int8: RunSummary, sparse_deltas: RunSummary
) -> None:
    # A quarter of the codes plus a bit per entry: well under half of dense int8 per direction
    # (round 1 still sends weights down: no node holds a reference yet).
    assert sparse_deltas.bytes_up < 0.5 * int8.bytes_up
    assert sparse_deltas.bytes_down < 0.75 * int8.bytes_down
    assert sparse_deltas.final_accuracy > 0.5


def test_pruned_run_hits_the_target_density_with_exact_zeros(
    results: Path, pruned: RunSummary
) -> None:
    assert pruned.density == pytest.approx(0.3, abs=1e-12)
    rows = read_rounds(results / "pruned")
    assert [float(r["density"]) for r in rows][-1] == pytest.approx(0.3, abs=1e-12)
    cfg = RunConfig()
    names = prunable_names(task.new_model(cfg))
    with np.load(results / "pruned" / MODEL_FILE, allow_pickle=False) as f:
        masks = codec.payload_masks({k: f[k] for k in f.files})
    weights = load_compact(results / "pruned" / MODEL_FILE)
    kept = sum(int(masks[n].sum()) for n in names)
    total = sum(masks[n].size for n in names)
    assert kept == round(0.3 * total)
    for name in names:
        assert np.all(weights[name][~masks[name]] == 0.0)
    assert pruned.final_accuracy > 0.3
    # The compact file reloads into a model with the accuracy the summary reports.
    model = task.new_model(cfg)
    set_weights(model, weights)
    _, test = load_dataset("digits")
    assert task.evaluate(model, test)[1] == pruned.compact_accuracy


@pytest.mark.parametrize("inner", ["fedavgm", "fedprox"])
def test_server_optimizers_work_inside_the_wrappers(results: Path, inner: str) -> None:
    summary = run(
        results,
        f"inner-{inner}",
        rounds=2,
        inner_strategy=inner,
        target_density=0.5,
        prune_end_round=1,
        server_momentum=0.5,
    )
    assert summary.density == pytest.approx(0.5, abs=1e-12)
    assert summary.final_accuracy > 0.2


def test_dp_epsilon_rises_every_round_and_matches_opacus(results: Path) -> None:
    sigma, rounds = 1.2, 3
    summary = run(results, "dp", rounds=rounds, dp=True, noise_multiplier=sigma, target_density=0.5)
    epsilons = [float(r["epsilon"]) for r in read_rounds(results / "dp")]
    assert all(b > a for a, b in pairwise(epsilons)), epsilons
    # What one Opacus accountant computes for each client over the run; the server keeps the max.
    cfg = RunConfig()
    expected = []
    for pid in range(NODES):
        data = client_data(
            "digits", pid, NODES, scheme=cfg.partitioning, alpha=cfg.alpha, seed=cfg.seed
        )
        loader = data.to_loader(cfg.batch_size)
        accountant = RDPAccountant()
        steps = planned_total_steps(loader, num_rounds=rounds, local_epochs=cfg.local_epochs)
        accountant.history = [(sigma, 1 / len(loader), steps)]
        expected.append(accountant.get_epsilon(delta=cfg.target_delta))
    assert summary.epsilon == pytest.approx(max(expected), rel=1e-9)
    assert epsilons[-1] == pytest.approx(max(expected), rel=1e-5)
