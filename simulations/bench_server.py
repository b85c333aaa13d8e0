"""Server cost per reply: the compressed chain against stock Flower FedAvg, same replies.

``server_reply_cost_vs_fedavg`` is the median CPU time of ``aggregate_train`` through the whole
server chain of a compressed run (the accounting wrapper, the reply boundary that decodes each
int8-per-channel top-5 % delta, the bounds, the inner FedAvg) divided by that of stock
``flwr.serverapp.strategy.FedAvg`` aggregating the same clients' models sent as float32
``ArrayRecord`` s, both timed in this run on a ResNet-18-sized model (11.2 M parameters).
``server_peak_rss_per_reply_mb`` is the growth of the process's peak resident memory during the
compressed aggregation, per reply (Linux: ``/proc/self/clear_refs`` resets the peak).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from boundary.records import payload_record, to_record
from fedprune import codec, keys
from fedprune.config import RunConfig
from simulations.grid import StaticGrid, server_task_identity
from strategies.factory import build_strategy

REPLIES = 20
REPEATS = 3


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the process's peak
        Path("/proc/self/clear_refs").write_text("5")


def bench_server_reply_cost() -> dict[str, float]:
    """Return ``server_reply_cost_vs_fedavg`` and ``server_peak_rss_per_reply_mb``."""
    from simulations.bench import resnet18_tensors

    rng = np.random.default_rng(0)
    _, weights = resnet18_tensors(rng)
    weights = {k: v.copy() for k, v in weights.items() if v.dtype == np.float32}
    cfg = RunConfig(target_density=1.0, update_topk=0.05, quant="int8-channel")
    deltas = [
        {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
        for _ in range(REPLIES)
    ]
    encoded = [codec.encode(d, cfg.update_codec()) for d in deltas]
    payloads = [payload_record(p) for p in encoded]
    # What stock FedAvg gets: each client's model (the global one plus its decoded update).
    models = []
    for payload in encoded:
        update = codec.decode(payload)
        models.append(to_record({k: w + update[k] for k, w in weights.items()}))
    del deltas, encoded
    metrics = MetricRecord({keys.NUM_EXAMPLES: 100, keys.SERVER_ROUND: 1})
    chain_s: list[float] = []
    fedavg_s: list[float] = []
    peaks: list[float] = []
    with server_task_identity():
        for _ in range(REPEATS):
            built = build_strategy(cfg, prunable=[])
            sent = sorted(
                built.strategy.configure_train(
                    1, to_record(weights), ConfigRecord(), StaticGrid(range(1, REPLIES + 1))
                ),
                key=lambda m: m.metadata.dst_node_id,
            )
            replies = [
                Message(
                    content=RecordDict({keys.ARRAYS: p, keys.METRICS: MetricRecord(dict(metrics))}),
                    reply_to=m,
                )
                for p, m in zip(payloads, sent, strict=True)
            ]
            base = _rss_mb()
            _reset_peak()
            start = time.process_time()
            built.strategy.aggregate_train(1, replies)
            chain_s.append(time.process_time() - start)
            peaks.append((_peak_rss_mb() - base) / REPLIES)
            stock = [
                Message(
                    content=RecordDict(
                        {"arrays": m, "metrics": MetricRecord({"num-examples": 100})}
                    ),
                    reply_to=s,
                )
                for m, s in zip(models, sent, strict=True)
            ]
            start = time.process_time()
            FedAvg().aggregate_train(1, stock)
            fedavg_s.append(time.process_time() - start)
    chain, fedavg = float(np.median(chain_s)), float(np.median(fedavg_s))
    return {
        "server_reply_cost_vs_fedavg": chain / fedavg,
        "server_reply_ms_compressed": 1e3 * chain / REPLIES,
        "server_reply_ms_fedavg": 1e3 * fedavg / REPLIES,
        "server_peak_rss_per_reply_mb": float(np.median(peaks)),
    }


if __name__ == "__main__":  # pragma: no cover
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    for key, value in bench_server_reply_cost().items():
        print(f"{key}: {value:.3f}")
