"""Kill a run with SIGKILL after round k; resumed, it ends with the model of an unbroken run.

Real Ray simulations on digits with 4 SuperNodes. The killed run is a separate process group
(the ServerApp and Ray's workers die together, as on a crashed machine); the resumed and
uninterrupted runs are in-process.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.checkpoint import SERVER_FILE, checkpoint_dir, load_state, nested
from fedprune.config import RunConfig
from fedprune.results import RunSummary, read_rounds
from simulations.simulate import simulate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NODES = 4
CHILD = """
import json, sys
from fedprune.config import RunConfig
from simulations.simulate import simulate
simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), num_supernodes=int(sys.argv[2]),
         quiet=True)
"""


def model_hash(cfg: RunConfig) -> str:
    """SHA-256 of the global model in the run's checkpoint (names and float32 bytes)."""
    state = load_state(checkpoint_dir(cfg.results_dir, cfg.run_name) / SERVER_FILE)
    digest = hashlib.sha256()
    for name, array in sorted(nested(state, "model").items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def checkpointed_round(cfg: RunConfig) -> int:
    try:
        return int(load_state(checkpoint_dir(cfg.results_dir, cfg.run_name) / SERVER_FILE)["round"])
    except FileNotFoundError:
        return 0


def kill_after_round(cfg: RunConfig, k: int, timeout_s: float = 300.0) -> int:
    """Run ``cfg`` in a new process group; SIGKILL the group once round ``k`` is checkpointed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg.to_mapping()), str(NODES)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while checkpointed_round(cfg) < k:
            assert child.poll() is None, f"the run ended before round {k} (rc {child.returncode})"
            assert time.monotonic() < deadline, f"round {k} not checkpointed in {timeout_s} s"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return checkpointed_round(cfg)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("results")


def config(results: Path, name: str, **changes: object) -> RunConfig:
    base = RunConfig(
        run_name=name,
        results_dir=str(results),
        num_server_rounds=4,
        target_density=0.5,
        prune_end_round=3,
        dp=True,
        noise_multiplier=0.8,
    )
    return base.replace(**changes)


def test_sigkill_after_round_k_resumes_at_k_plus_1_with_the_same_model(results: Path) -> None:
    # Pruning (mask + version), int8 + zlib, error feedback and DP: server and node state.
    unbroken_cfg = config(results, "unbroken")
    unbroken = simulate(unbroken_cfg, num_supernodes=NODES, quiet=True)
    broken_cfg = config(results, "broken")
    killed_at = kill_after_round(broken_cfg, 2)
    assert killed_at in (2, 3)  # killed during round 3 at the latest
    resumed: RunSummary = simulate(
        broken_cfg.replace(resume=True), num_supernodes=NODES, quiet=True
    )
    assert model_hash(broken_cfg) == model_hash(unbroken_cfg)
    assert resumed.final_accuracy == unbroken.final_accuracy
    # ε went on counting from the nodes' saved accountants instead of starting over.
    assert resumed.epsilon == unbroken.epsilon
    got = read_rounds(Path(results) / "broken")
    want = read_rounds(Path(results) / "unbroken")
    assert [r["round"] for r in got] == ["1", "2", "3", "4"]
    for column in ("accuracy", "loss", "epsilon", "density"):
        assert [r[column] for r in got] == [r[column] for r in want]
    # A fresh run under the name of a finished one starts over: its nodes drop their old states.
    again = simulate(unbroken_cfg, num_supernodes=NODES, quiet=True)
    assert model_hash(unbroken_cfg) == model_hash(broken_cfg)
    assert again.epsilon == unbroken.epsilon


def test_an_extended_run_keeps_the_server_optimizer_state(results: Path) -> None:
    # FedAdam's moments live in the inner strategy; FedAvgM's momentum round-trips in
    # tests/test_checkpoint.py.
    changes = {"inner_strategy": "fedadam", "dp": False, "noise_multiplier": 0.0, "lr": 0.05}
    full = config(results, "fedadam-full", num_server_rounds=3, **changes)
    simulate(full, num_supernodes=NODES, quiet=True)
    part = config(results, "fedadam-part", num_server_rounds=2, **changes)
    simulate(part, num_supernodes=NODES, quiet=True)
    simulate(part.replace(num_server_rounds=3, resume=True), num_supernodes=NODES, quiet=True)
    assert model_hash(part) == model_hash(full)
