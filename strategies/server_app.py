"""The fedprune ServerApp: build the strategy for the run config, run it, write the results.

The rounds are driven here rather than by Flower's ``Strategy.start``, which always begins at
round 1: each round calls the same four strategy steps (configure/aggregate train, then
evaluate), evaluates the global model on the held-out split, and writes a checkpoint, so that a
run can resume after its last completed round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from boundary.install import InstallGuard
from boundary.records import from_record, scalar, to_record
from fedprune import codec, keys, task
from fedprune.channels import channel_mask_of, shrink
from fedprune.checkpoint import (
    SERVER_FILE,
    checkpoint_dir,
    load_state,
    nested,
    prefixed,
    run_dir,
    save_state,
)
from fedprune.config import ConfigError, RunConfig
from fedprune.data import load_dataset
from fedprune.export import footprint, load_compact, load_shrunk, save_compact, save_shrunk
from fedprune.models import get_weights, set_weights
from fedprune.pruning import prunable_names
from fedprune.results import (
    ClientRecord,
    RoundRecord,
    RunSummary,
    read_clients,
    summarize,
    write_clients,
    write_run,
)
from fedprune.tracking import MetricsLog
from strategies.accounting import RoundTraffic
from strategies.factory import build_strategy
from strategies.wrapper import load_strategy_state, strategy_state

MODEL_FILE = "model.npz"
"""The compact export of the final global model, next to rounds.csv and summary.json."""
TIMEOUT_S = 3600.0
"""How long a round waits for replies (Flower's default)."""


def run(
    grid: Grid,
    cfg: RunConfig,
    *,
    on_round_end: Callable[[RoundTraffic], None] | None = None,
) -> RunSummary:
    """Run ``cfg`` on ``grid`` and write ``rounds.csv`` and ``summary.json``.

    After every round the server state is checkpointed (``cfg.checkpoint``); with
    ``cfg.resume`` the run continues after the latest checkpoint of ``cfg.run_name``.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    cfg : RunConfig
        The validated run configuration.
    on_round_end : Callable[[RoundTraffic], None], optional
        Called after each round's aggregation (progress reporting).

    Returns
    -------
    RunSummary
        What was measured over the run.
    """
    started = time.perf_counter()
    model = task.new_model(cfg)
    _, test = load_dataset(cfg.dataset)
    if cfg.eval_examples:  # the first N of the held-out split, the same for every seed
        test = test.subset(slice(0, cfg.eval_examples))
    channels = task.channel_pruning(cfg, model)
    built = build_strategy(cfg, prunable=prunable_names(model), channels=channels)
    built.strategy.on_round_end = on_round_end
    directory = run_dir(cfg.results_dir, cfg.run_name)
    checkpoint_file = checkpoint_dir(cfg.results_dir, cfg.run_name) / SERVER_FILE

    def evaluate(arrays: ArrayRecord) -> tuple[float, float]:
        set_weights(model, from_record(arrays))
        loss, accuracy = task.evaluate(model, test)
        return loss, accuracy

    initial = to_record(get_weights(model))
    if cfg.seeded_start and built.fedprune.downlink is not None:
        built.fedprune.downlink.expect_seeded_start(codec.weights_digest(get_weights(model)))
    resumed = _resume(cfg, checkpoint_file, built.strategy) if cfg.resume else None
    arrays, records, done, elapsed = resumed or (initial, [], 0, 0.0)
    clients = [c for c in read_clients(directory) if c.round <= done]
    metrics_log = MetricsLog(cfg)
    strategy = built.strategy
    guard = InstallGuard()  # every node must run this install: see boundary.install
    _wait_for_nodes(grid, cfg.min_train_nodes)
    for server_round in range(done + 1, cfg.num_server_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, cfg.num_server_rounds)
        train_config = guard.stamp(ConfigRecord({keys.RESUMED_FROM: done}), grid.get_node_ids())
        replies = list(
            grid.send_and_receive(
                strategy.configure_train(server_round, arrays, train_config, grid),
                timeout=TIMEOUT_S,
            )
        )
        guard.confirm(replies)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:  # None: the round was skipped, the model stays
            arrays = aggregated
        eval_config = guard.stamp(ConfigRecord(), grid.get_node_ids())
        replies = list(
            grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, eval_config, grid),
                timeout=TIMEOUT_S,
            )
        )
        guard.confirm(replies)
        federated = strategy.aggregate_evaluate(server_round, replies)
        if federated is not None:
            log(INFO, "round %d: federated evaluation %s", server_round, federated)
        loss, accuracy = evaluate(arrays)
        log(INFO, "round %d: test accuracy %.4f, loss %.4f", server_round, accuracy, loss)
        train_metrics = train_metrics or MetricRecord()
        traffic = strategy.rounds.get(server_round, RoundTraffic(server_round))
        # A skipped round reports no density: the global mask's is what the model has.
        global_density = built.masking.density if built.masking is not None else 1.0
        # ε is cumulative: a round in which no client reported one keeps the last value.
        epsilon = max(
            scalar(train_metrics, keys.EPSILON, float, -1.0),
            records[-1].epsilon if records and records[-1].epsilon is not None else -1.0,
        )
        records.append(
            RoundRecord(
                round=server_round,
                accuracy=accuracy,
                loss=loss,
                bytes_up=traffic.bytes_up,
                bytes_down=traffic.bytes_down,
                density=scalar(train_metrics, keys.DENSITY, float, global_density),
                epsilon=None if epsilon < 0 else epsilon,
                wall_s=traffic.wall_s,
                num_failed=traffic.failures,
                rejections=tuple(built.fedprune.rejected.get(server_round, ())),
                bounded=tuple(built.fedprune.bounded.get(server_round, ())),
                uplink_bits={
                    part: scalar(train_metrics, f"{keys.UPLINK_BITS}-{part}", float)
                    for part in codec.BREAKDOWN_KEYS
                    if f"{keys.UPLINK_BITS}-{part}" in train_metrics
                },
            )
        )
        metrics_log.round(records[-1])
        clients += [
            ClientRecord(server_round, node_id, n.bytes_up, n.bytes_down, n.epsilon)
            for node_id, n in sorted(traffic.nodes.items())
        ]
        if cfg.checkpoint:
            save_state(
                checkpoint_file,
                {
                    "round": server_round,
                    "wall-s": elapsed + time.perf_counter() - started,
                    "config": cfg.to_mapping(),
                    "records": [dataclasses.asdict(r) for r in records],
                    **prefixed("model", from_record(arrays)),
                    **prefixed("strategy", strategy_state(strategy)),
                },
            )
    wall_s = elapsed + time.perf_counter() - started
    # The compact export is read back and evaluated: the accuracy it reports is the file's.
    masks = built.masking.mask if built.masking is not None else None
    set_weights(model, from_record(arrays))
    if channels is not None and masks is not None:  # the physically smaller network
        small = shrink(model, channels.graph, channel_mask_of(channels.graph, masks))
        model_bytes = save_shrunk(directory / MODEL_FILE, small, channels, masks)
        exported = load_shrunk(directory / MODEL_FILE, model, channels)
    else:
        model_bytes = save_compact(directory / MODEL_FILE, from_record(arrays), masks)
        set_weights(model, load_compact(directory / MODEL_FILE))
        exported = model
    _, compact_accuracy = task.evaluate(exported, test)
    cost = footprint(exported, test.input_shape)
    summary = summarize(
        cfg.run_name,
        dict(cfg.to_mapping()),
        num_clients=len(list(grid.get_node_ids())),
        records=records,
        wall_s=wall_s,
        model_bytes_compact=model_bytes,
        compact_accuracy=compact_accuracy,
        params_compact=cost.params,
        macs_per_example=cost.macs_per_example,
        latency_ms_per_example=cost.latency_ms_per_example,
    )
    write_run(directory, records, summary)
    write_clients(directory, clients)
    metrics_log.close()
    return summary


def _wait_for_nodes(
    grid: Grid, count: int, settle_s: float = 0.2, timeout_s: float = TIMEOUT_S
) -> None:
    """Wait until at least ``count`` nodes are connected and no more joined for ``settle_s``.

    Flower's strategies size their sample from the nodes connected when a round is configured
    and only then wait for the minimum: a round configured while the SuperNodes are still
    registering would sample fewer of them than a run that started a moment later.

    Raises
    ------
    RuntimeError
        If fewer than ``count`` nodes connected within ``timeout_s``.
    """
    started = time.monotonic()
    seen, since = -1, started
    while True:
        connected = len(list(grid.get_node_ids()))
        now = time.monotonic()
        if connected != seen:
            if connected < count and seen < 0:
                log(INFO, "waiting for %d nodes to connect (%d so far)", count, connected)
            seen, since = connected, now
        elif connected >= count and now - since >= settle_s:
            return
        if connected < count and now - started > timeout_s:
            raise RuntimeError(
                f"only {connected} of the {count} nodes that min-train-nodes asks for connected "
                f"in {timeout_s:.0f} s"
            )
        time.sleep(0.05)


def _resume(
    cfg: RunConfig, path: Path, strategy: Strategy
) -> tuple[ArrayRecord, list[RoundRecord], int, float] | None:
    """Load the latest checkpoint into ``strategy``; return (model, history, round, wall).

    ``None`` when there is no checkpoint yet (the run starts at round 1).

    Raises
    ------
    ConfigError
        If the checkpoint was written under a different configuration.
    """
    if not path.exists():
        log(INFO, "resume: no checkpoint at %s, starting at round 1", path)
        return None
    state = load_state(path)
    cfg.check_resumable(state["config"])
    done = int(state["round"])
    if done > cfg.num_server_rounds:
        raise ConfigError(
            f"cannot resume {path} at round {done + 1}: num-server-rounds is "
            f"{cfg.num_server_rounds}"
        )
    load_strategy_state(strategy, nested(state, "strategy"))
    records = [
        RoundRecord(**{**r, "rejections": tuple(r["rejections"]), "bounded": tuple(r["bounded"])})
        for r in state["records"]
    ]
    log(INFO, "resume: continuing after round %d from %s", done, path)
    return to_record(nested(state, "model")), records, done, float(state["wall-s"])


def make_server_app(
    cfg: RunConfig | None = None,
    on_round_end: Callable[[RoundTraffic], None] | None = None,
    on_done: Callable[[RunSummary], None] | None = None,
) -> ServerApp:
    """Return a ServerApp that runs :func:`run`.

    Parameters
    ----------
    cfg : RunConfig, optional
        A fixed configuration (in-process simulations). By default ``context.run_config`` is
        parsed and validated once, as under ``flwr run``.
    on_round_end : Callable[[RoundTraffic], None], optional
        Progress callback, see :func:`run`.
    on_done : Callable[[RunSummary], None], optional
        Receives the run's summary when it has been written.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summary = run(
            grid,
            cfg if cfg is not None else RunConfig.from_mapping(context.run_config),
            on_round_end=on_round_end,
        )
        if on_done is not None:
            on_done(summary)

    return server_app


app = make_server_app()
