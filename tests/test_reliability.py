"""Failures and attacks in Flower's simulation engine, in the default (pruning) configuration.

No client can end a run or take over the model: an error reply, a reply of another shape, a
reply whose arrays cannot be read is rejected with its reason, and the model equals the run in
which that client failed; an honest-looking client claiming ten million examples or sending a
×10⁶ update is bounded by default.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from fedprune.config import RunConfig
from fedprune.results import RunSummary, read_rounds
from simulations.faults import make_faulty_client_app
from simulations.simulate import simulate
from strategies.server_app import MODEL_FILE

pytestmark = pytest.mark.slow

NODES = 10
BAD = {0: "raise", 1: "extra-record", 2: "no-metrics", 3: "foreign-array", 4: "header-bomb"}
"""Rejected: the run goes on without them."""
RESHAPED = {5: "extra-metric", 6: "no-loss"}
"""Accepted: the metric keys the inner strategy sees are those every reply has."""
REASONS = (
    "the round expects ['arrays', 'metrics']",  # extra-record, no-metrics
    "serialization type 'torch.Tensor' is neither numpy nor raw",
    "npy header declares [1099511627776] float32",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def run(results: Path, name: str, faults: dict[int, str], **changes: object) -> RunSummary:
    """The default configuration (pruning on, int8, zlib, error feedback), 3 short rounds."""
    cfg = RunConfig(
        run_name=name,
        results_dir=str(results),
        num_server_rounds=3,
        prune_end_round=2,
        min_train_nodes=5,
    ).replace(**changes)
    app = make_faulty_client_app(cfg, faults)
    return simulate(cfg, num_supernodes=NODES, client_app=app, quiet=True)


def model(results: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(results / name / MODEL_FILE) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize(
    ("inner", "density"),
    [("fedavg", 0.3), ("fedmedian", 0.3), ("krum", 0.3), ("fedavg", 1.0)],
)
def test_bad_replies_are_rejected_and_the_model_equals_the_run_where_those_clients_failed(
    results: Path, inner: str, density: float
) -> None:
    name = f"{inner}-{density}"
    changes = {"inner_strategy": inner, "target_density": density}
    faulty = run(results, f"bad-{name}", {**BAD, **RESHAPED}, **changes)
    failed = run(results, f"failed-{name}", {**dict.fromkeys(BAD, "raise"), **RESHAPED}, **changes)
    assert faulty.rounds == failed.rounds == 3
    assert faulty.num_failed == failed.num_failed - 4 * 3  # only partition 0 raised
    assert faulty.num_rejected == 4 * 3 and failed.num_rejected == 0
    rows = read_rounds(results / f"bad-{name}")
    assert [int(r["num_rejected"]) for r in rows] == [4, 4, 4]
    for reason in REASONS:
        assert reason in rows[0]["rejected"]
    summary = json.loads((results / f"bad-{name}" / "summary.json").read_text())
    assert len(summary["rejections"]["1"]) == 4
    # The model is the one trained by the clients that behaved, bit for bit.
    got, want = model(results, f"bad-{name}"), model(results, f"failed-{name}")
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert [r["accuracy"] for r in rows] == [
        r["accuracy"] for r in read_rounds(results / f"failed-{name}")
    ]


@pytest.fixture(scope="module")
def clean(results: Path) -> RunSummary:
    return run(results, "clean", {})


def bounded_every_round(results: Path, name: str) -> bool:
    return all(int(r["num_bounded"]) >= 1 for r in read_rounds(results / name))


def test_a_client_claiming_ten_million_examples_no_longer_takes_over_fedavg(
    results: Path, clean: RunSummary
) -> None:
    attacked = run(results, "claims", {0: "claims-examples"})
    unbounded = run(results, "claims-unbounded", {0: "claims-examples"}, max_examples_ratio=0.0)
    assert bounded_every_round(results, "claims")
    # Measured (digits, 3 rounds): without the bound the claim takes FedAvg to 0.10 (chance)
    # against 0.52 clean; with the default bound (4x the median claim) it reaches 0.43.
    assert unbounded.final_accuracy <= clean.final_accuracy - 0.3
    assert attacked.final_accuracy >= unbounded.final_accuracy + 0.2
    assert attacked.final_accuracy >= clean.final_accuracy - 0.15


def test_a_million_fold_update_is_clipped_by_default(results: Path, clean: RunSummary) -> None:
    attacked = run(results, "scales", {0: "scales-update"})
    assert bounded_every_round(results, "scales")
    assert attacked.final_accuracy >= clean.final_accuracy - 0.03


def test_too_many_failures_skip_every_round_and_keep_the_initial_model(results: Path) -> None:
    summary = run(results, "too-few", dict.fromkeys(range(6), "raise"))  # 4 valid < 5
    initial = run(results, "no-training", dict.fromkeys(range(NODES), "raise"), min_train_nodes=1)
    assert summary.final_accuracy == initial.final_accuracy  # the untouched initial model


@pytest.mark.parametrize("inner", ["fedmedian", "krum"])
def test_a_robust_inner_strategy_resists_sign_flipping_attackers(results: Path, inner: str) -> None:
    changes = {"inner_strategy": inner, "entropy": False, "partitioning": "iid"}
    clean = run(results, f"clean-{inner}", {}, **changes)
    attacked = run(results, f"attacked-{inner}", {0: "sign-flip"}, **changes)
    # Pruning on (the default): 3 rounds of a pruned model are noisier than the dense ones the
    # old version of this test ran (FedMedian measured 0.644 against 0.675 clean).
    assert attacked.final_accuracy >= clean.final_accuracy - 0.05
