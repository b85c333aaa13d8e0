"""Simulation benchmarks: round time of the compressed preset, memory of a 1000-node run.

- ``round_time_ratio``: median per-round wall time of density 0.3 + int8 over FedAvg float32,
  same simulation settings, measured in the same process one after the other.
- ``sim_1000_peak_rss_mb``: peak resident memory, summed over this process and every process it
  spawned (Ray's GCS, raylet, workers), of a run with 1000 virtual SuperNodes, 10 % sampled per
  round, 2 rounds, the small MLP on digits.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedprune.config import RunConfig
from simulations.compare import quiet_flower_logs
from simulations.simulate import simulate

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Return the direct children of ``pid`` (from /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, in bytes (Linux /proc)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident_pages * PAGE_BYTES
        stack.extend(_children(pid))
    return total


@contextmanager
def peak_tree_rss(interval_s: float = 0.1) -> Iterator[Callable[[], int]]:
    """Sample the process tree's RSS in a thread; yield a getter of the peak (bytes)."""
    peak = tree_rss_bytes(os.getpid())
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval_s):
            peak = max(peak, tree_rss_bytes(os.getpid()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()


def bench_round_time(rounds: int = 12, num_supernodes: int = 10) -> dict[str, float]:
    """Median round wall time of d0.3 + int8 over FedAvg float32 (digits, MLP).

    Both runs are made twice, in the order FedAvg, compressed, compressed, FedAvg, and each
    median is over the rounds of its two runs: a drift of the machine's load over the benchmark
    then weighs on both sides alike (one run pair alone moved the ratio by +-0.3 here).
    """
    quiet_flower_logs()
    walls: dict[str, list[float]] = {"fedavg": [], "d03-int8": []}
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(results_dir=out, num_server_rounds=rounds, prune_end_round=3)
        configs = {
            "fedavg": base.replace(run_name="fedavg", strategy="fedavg", target_density=1.0),
            "d03-int8": base.replace(run_name="d03-int8", target_density=0.3, quant="int8-channel"),
        }
        for name in ("fedavg", "d03-int8", "d03-int8", "fedavg"):
            summary = simulate(configs[name], num_supernodes=num_supernodes, quiet=True)
            walls[name].extend(summary.round_wall_s)
    fedavg_s = statistics.median(walls["fedavg"])
    compressed_s = statistics.median(walls["d03-int8"])
    return {
        "round_time_ratio": compressed_s / fedavg_s,
        "round_time_fedavg_ms": 1e3 * fedavg_s,
        "round_time_d03_int8_ms": 1e3 * compressed_s,
    }


def bench_sim_1000(num_supernodes: int = 1000) -> dict[str, float]:
    """Peak RSS of a 1000-node simulation (10 % sampled, 2 rounds, MLP on digits)."""
    quiet_flower_logs()
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(
            run_name="sim-1000",
            results_dir=out,
            num_server_rounds=2,
            fraction_train=0.1,
            min_train_nodes=2,
            partitioning="iid",
            target_density=0.3,
            prune_end_round=2,
        )
        with peak_tree_rss() as peak:
            simulate(cfg, num_supernodes=num_supernodes, quiet=True)
            peak_bytes = peak()
    return {"sim_1000_peak_rss_mb": peak_bytes / 2**20}
