"""Reproducible sampling: with fraction-train < 1 the same seed trains the same partitions.

The end-to-end test runs real Ray simulations (digits, 4 SuperNodes, fraction-train 0.5) and
records which partition trained in which round from inside the ClientApp: a fresh run, a repeated
run (other node ids: Flower draws them per run) and a run resumed after round 1 train the same
partitions in every round.
"""

from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.client_app import node_partition, partition_reply, train
from fedprune import keys
from fedprune.config import RunConfig
from simulations.simulate import simulate
from strategies.sampling import sample_partitions

NODES = 4


def test_sample_partitions_is_a_function_of_seed_and_round() -> None:
    chosen = sample_partitions(range(10), 0.5, 2, seed=0, server_round=3)
    assert chosen == sample_partitions([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], 0.5, 2, 0, 3)
    assert len(chosen) == 5 and set(chosen) <= set(range(10))
    rounds = [tuple(sample_partitions(range(10), 0.5, 2, 0, r)) for r in range(1, 9)]
    assert len(set(rounds)) > 1  # it does change from round to round
    seeds = [tuple(sample_partitions(range(10), 0.5, 2, s, 1)) for s in range(8)]
    assert len(set(seeds)) > 1  # and with the seed
    assert sample_partitions(range(10), 0.1, 3, 0, 1).__len__() == 3  # min-train-nodes
    assert sample_partitions(range(2), 0.5, 3, 0, 1) == [0, 1]  # no more than there are


@pytest.mark.parametrize(("fraction", "server_round"), [(0.0, 1), (1.5, 1), (0.5, 0)])
def test_sample_partitions_refuses_bad_input(fraction: float, server_round: int) -> None:
    with pytest.raises(ValueError, match=r"fraction|server_round"):
        sample_partitions(range(4), fraction, 1, 0, server_round)


def recording_app(cfg: RunConfig, log_dir: Path) -> ClientApp:
    """The fedprune ClientApp's train, recording (round, partition) in ``log_dir``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition_id, _ = node_partition(context)
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        (log_dir / f"{server_round}-{partition_id}").touch()
        return train(msg, context, cfg)

    app.query(keys.PARTITION_QUERY)(partition_reply)
    return app


def trained(log_dir: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for f in sorted(log_dir.iterdir()):
        r, p = map(int, f.name.split("-"))
        out.setdefault(r, []).append(p)
    return {r: sorted(ps) for r, ps in sorted(out.items())}


def run(tmp: Path, name: str, rounds: int, *, resume: bool = False) -> dict[int, list[int]]:
    cfg = RunConfig(
        run_name=name,
        results_dir=str(tmp / "results"),
        num_server_rounds=rounds,
        fraction_train=0.5,
        prune_end_round=2,
        resume=resume,
        seed=3,
    )
    log_dir = tmp / f"log-{name}-{rounds}"
    log_dir.mkdir()
    simulate(cfg, num_supernodes=NODES, quiet=True, client_app=recording_app(cfg, log_dir))
    return trained(log_dir)


@pytest.mark.slow
def test_fresh_repeated_and_resumed_runs_train_the_same_partitions(tmp_path: Path) -> None:
    fresh = run(tmp_path, "a", 3)
    expected = {r: sample_partitions(range(NODES), 0.5, 2, 3, r) for r in (1, 2, 3)}
    assert fresh == expected
    assert len({tuple(v) for v in fresh.values()}) > 1  # not the same two every round
    assert run(tmp_path, "b", 3) == fresh
    assert run(tmp_path, "c", 1) == {1: fresh[1]}
    assert run(tmp_path, "c", 3, resume=True) == {2: fresh[2], 3: fresh[3]}
