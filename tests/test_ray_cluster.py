"""Flower's Ray backend joining an existing Ray cluster: two Ray nodes on this machine.

A child process starts a head node and a worker node (``ray.cluster_utils.Cluster``: real GCS
and raylet processes, one CPU each), sets ``RAY_ADDRESS`` to the head, and runs a short
simulation; the ClientApp records on which Ray node it ran. ``RAY_TMPDIR`` is private to the
child, so no other Ray user of this machine can find (and join) this cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from simulations.simulate import backend_config

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from clients.client_app import train
from fedprune.config import RunConfig
from simulations.simulate import simulate

out = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
cfg = RunConfig(run_name="ray-cluster", results_dir=str(out), num_server_rounds=2,
                prune_end_round=1, checkpoint=False)
app = ClientApp()

@app.train()
def _train(msg: Message, context: Context) -> Message:
    node = ray.get_runtime_context().get_node_id()
    (out / f"node-{node}").touch()
    return train(msg, context, cfg)

try:
    summary = simulate(cfg, num_supernodes=4, quiet=True, client_app=app)
    print("RESULT", json.dumps({"rounds": summary.rounds, "accuracy": summary.final_accuracy,
                                "cluster_nodes": len(cluster.list_all_nodes())}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_backend_config_joins_the_cluster_named_by_ray_address(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert backend_config()["init_args"] == {"include_dashboard": False, "address": "10.0.0.1:6379"}
    with pytest.raises(ValueError, match="cluster sets the CPUs"):
        backend_config(4)
    monkeypatch.delenv("RAY_ADDRESS")
    assert backend_config(3)["init_args"] == {"include_dashboard": False, "num_cpus": 3}


@pytest.mark.slow
def test_simulation_runs_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["cluster_nodes"] == 2
    assert result["rounds"] == 2 and result["accuracy"] > 0.3
    ran_on = {p.name for p in tmp_path.glob("node-*")}
    assert len(ran_on) == 2  # ClientApps ran on both Ray nodes
