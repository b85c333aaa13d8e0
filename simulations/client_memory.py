"""Peak memory of one federated client: ``python -m simulations.client_memory``.

:func:`client_peak_rss_mb` starts a fresh Python process that does what a SuperNode's
``flwr-clientapp`` process does for one training round — import Flower and torch, receive the
round-1 downlink built by the real server strategy, load its data partition, train one round
under the mask, encode its reply — with one CPU thread, and returns that process's peak resident
set size (``VmHWM``). The benchmark model is the CNN on Fashion-MNIST when the Debian dataset
package is installed (:data:`fedprune.data.FASHION_MNIST_SYSTEM_DIR`), else the MLP on digits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

FASHION_MNIST_DIR: Final = Path("/usr/share/datasets/fashion-mnist")
"""Same as :data:`fedprune.data.FASHION_MNIST_SYSTEM_DIR` (not imported: no torch here)."""


@dataclass(frozen=True)
class ClientMemory:
    """What one client round cost in memory (MiB of resident set size) and time."""

    dataset: str
    model: str
    threads: int
    local_steps: int
    """The run config's ``local-steps`` (0: the round is one whole local epoch)."""
    num_examples: int
    data: str
    """``"file"`` (the node's data file, ``data-path``) or ``"partition"`` (in memory)."""
    imports_mb: float
    """RSS after importing torch, Flower and the ClientApp (what a ``flwr-clientapp`` imports)."""
    import_s: float
    data_mb: float
    """Peak RSS after loading the client's data (its file, or the dataset and partitioning)."""
    peak_mb: float
    """Peak RSS over the whole round (``VmHWM``)."""
    train_s: float
    """The round: decode, load the data, train one local epoch, encode the reply."""

    @property
    def round_mb(self) -> float:
        """The round's increase of the peak over the imports."""
        return round(self.peak_mb - self.imports_mb, 1)


def benchmark_model() -> tuple[str, str]:
    """Return ``(dataset, model)``: CNN on Fashion-MNIST if installed, else MLP on digits."""
    if FASHION_MNIST_DIR.is_dir() and any(FASHION_MNIST_DIR.glob("*.gz")):
        return "fashion-mnist", "cnn"
    return "digits", "mlp"


def _status_mb(field: str) -> float:
    """Return a ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_client_memory(
    dataset: str | None = None,
    model: str | None = None,
    *,
    threads: int = 1,
    partition_id: int = 0,
    num_partitions: int = 2,
    data_path: str | os.PathLike[str] | None = None,
    downlink: str | os.PathLike[str] | None = None,
    local_steps: int = 0,
    timeout_s: float = 1800.0,
) -> ClientMemory:
    """Measure one client round in a fresh process (see the module docstring).

    Parameters
    ----------
    dataset, model : str, optional
        Default: :func:`benchmark_model`.
    threads : int
        ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` of the client.
    partition_id, num_partitions : int
        The client's partition (Dirichlet split, as the run config's defaults).
    data_path : str or os.PathLike, optional
        The node's data file (node config ``data-path``); default: partition in memory.
    downlink : str or os.PathLike, optional
        The round-1 message written by :func:`write_downlink`; default: written first, by
        another process of this interpreter (the server's imports stay out of the client's).
    local_steps : int
        The run config's ``local-steps`` (0: one whole local epoch).
    timeout_s : float
        Limit for each child process.

    Returns
    -------
    ClientMemory
        The measurement.

    Raises
    ------
    RuntimeError
        If a child process fails.
    """
    default_dataset, default_model = benchmark_model()
    dataset, model = dataset or default_dataset, model or default_model
    with tempfile.TemporaryDirectory() as tmp:
        if downlink is None:
            downlink = Path(tmp) / "downlink.pb"
            _run_child(
                ["--write-downlink", str(downlink), "--dataset", dataset, "--model", model],
                threads,
                timeout_s,
            )
        argv = [
            "--child",
            "--dataset",
            dataset,
            "--model",
            model,
            "--threads",
            str(threads),
            "--partition-id",
            str(partition_id),
            "--num-partitions",
            str(num_partitions),
            "--downlink",
            str(downlink),
            "--local-steps",
            str(local_steps),
        ]
        if data_path is not None:
            argv += ["--data-path", str(data_path)]
        stdout = _run_child(argv, threads, timeout_s)
    marker = "CLIENT_MEMORY "
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    if not lines:
        raise RuntimeError(f"client memory probe printed no result:\n{stdout[-3000:]}")
    return ClientMemory(**json.loads(lines[-1][len(marker) :]))


def _run_child(args: list[str], threads: int, timeout_s: float) -> str:
    """Run ``python -m simulations.client_memory ARGS`` with ``threads`` threads; its stdout."""
    env = dict(os.environ)
    env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    result = subprocess.run(
        [sys.executable, "-m", "simulations.client_memory", *args],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"client memory probe failed (exit code {result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result.stdout


def client_peak_rss_mb(
    dataset: str | None = None, model: str | None = None, *, threads: int = 1
) -> float:
    """Return the peak RSS in MiB of one client process training one round (one thread).

    Parameters
    ----------
    dataset, model : str, optional
        Default: the benchmark model (:func:`benchmark_model`).
    threads : int
        CPU threads of the client.

    Returns
    -------
    float
        ``VmHWM`` of the client process, MiB.
    """
    return measure_client_memory(dataset, model, threads=threads).peak_mb


def write_downlink(path: str | os.PathLike[str], dataset: str, model: str) -> None:
    """Write the round-1 training message as the ServerApp's strategy builds it (protobuf).

    The bytes are Flower's own wire form of the message (``message_to_proto``): what a
    SuperNode receives for partition 0 in round 1.
    """
    from flwr.app import ConfigRecord
    from flwr.common.serde import message_to_proto

    from boundary.records import to_record
    from fedprune import task
    from fedprune.config import RunConfig
    from fedprune.models import get_weights
    from fedprune.pruning import prunable_names
    from simulations.grid import StaticGrid, server_task_identity
    from strategies.factory import build_strategy

    cfg = RunConfig.from_mapping({"dataset": dataset, "model": model, "num-server-rounds": 1})
    net = task.new_model(cfg)
    built = build_strategy(cfg, prunable=prunable_names(net))
    with server_task_identity():
        sent = built.strategy.configure_train(
            1, to_record(get_weights(net)), ConfigRecord(), StaticGrid([1, 2])
        )
        message = next(iter(sent))
        Path(path).write_bytes(message_to_proto(message).SerializeToString())


def _child(
    dataset: str,
    model: str,
    threads: int,
    partition_id: int,
    num_partitions: int,
    downlink: str,
    data_path: str | None,
    local_steps: int = 0,
) -> None:
    """Run one client round in this process and print the measurement (``--child``)."""
    # The imports are part of what is measured: those of a flwr-clientapp running our app.
    started = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import train
    from fedprune import keys, task
    from fedprune.config import RunConfig

    import_s = time.perf_counter() - started
    imports_mb = _status_mb("VmRSS")

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    proto = ProtoMessage()
    proto.ParseFromString(Path(downlink).read_bytes())
    message = message_from_proto(proto)
    cfg = RunConfig.from_mapping(
        {"dataset": dataset, "model": model, "num-server-rounds": 1, "local-steps": local_steps}
    )
    node_config: dict[str, int | str] = (
        {keys.DATA_PATH: data_path}
        if data_path is not None
        else {keys.PARTITION_ID: partition_id, keys.NUM_PARTITIONS: num_partitions}
    )
    started = time.perf_counter()
    task.local_train_data(cfg, partition_id, num_partitions, data_path=data_path)
    data_mb = _status_mb("VmHWM")
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node_config,  # type: ignore[arg-type]
        state=RecordDict(),
        run_config=cfg.to_mapping(),
    )
    reply = train(message, context, cfg)
    train_s = time.perf_counter() - started
    num_examples = int(reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])  # type: ignore[arg-type]
    measured = ClientMemory(
        dataset=dataset,
        model=model,
        threads=threads,
        local_steps=local_steps,
        num_examples=num_examples,
        data="partition" if data_path is None else "file",
        imports_mb=round(imports_mb, 1),
        import_s=round(import_s, 2),
        data_mb=round(data_mb, 1),
        peak_mb=round(_status_mb("VmHWM"), 1),
        train_s=round(train_s, 2),
    )
    print("CLIENT_MEMORY " + json.dumps(asdict(measured)), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the client's peak RSS for one round (``python -m simulations.client_memory``)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.client_memory")
    parser.add_argument("--dataset")
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=2)
    parser.add_argument("--data-path", help="the node's data file (default: partition in memory)")
    parser.add_argument("--downlink", help="round-1 message from --write-downlink")
    parser.add_argument(
        "--local-steps", type=int, default=0, help="run config local-steps (0: one epoch)"
    )
    parser.add_argument("--write-downlink", metavar="FILE", help="only write the message")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_downlink:
        default_dataset, default_model = benchmark_model()
        write_downlink(
            args.write_downlink, args.dataset or default_dataset, args.model or default_model
        )
        return 0
    if args.child:
        _child(
            args.dataset,
            args.model,
            args.threads,
            args.partition_id,
            args.num_partitions,
            args.downlink,
            args.data_path,
            args.local_steps,
        )
        return 0
    measured = measure_client_memory(
        args.dataset,
        args.model,
        threads=args.threads,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        data_path=args.data_path,
        downlink=args.downlink,
        local_steps=args.local_steps,
    )
    for name, value in asdict(measured).items():
        print(f"{name}\t{value}")
    print(f"round_mb\t{measured.round_mb}")
    print(f"client_peak_rss_mb\t{measured.peak_mb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
