"""The fedprune ServerApp: build the strategy for the run config, run it, write the results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clients import core
from fedprune import keys
from fedprune.config import RunConfig
from fedprune.data import load_dataset
from fedprune.export import load_compact, save_compact
from fedprune.models import get_weights, set_weights
from fedprune.pruning import prunable_names
from fedprune.results import RoundRecord, RunSummary, summarize, write_run
from strategies.accounting import RoundTraffic
from strategies.factory import build_strategy
from strategies.records import from_record, scalar, to_record

MODEL_FILE = "model.npz"
"""The compact export of the final global model, next to rounds.csv and summary.json."""


def run(
    grid: Grid,
    cfg: RunConfig,
    *,
    on_round_end: Callable[[RoundTraffic], None] | None = None,
) -> RunSummary:
    """Run ``cfg`` on ``grid`` and write ``rounds.csv`` and ``summary.json``.

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
    model = core.new_model(cfg)
    _, test = load_dataset(cfg.dataset)
    built = build_strategy(
        cfg,
        prunable=prunable_names(model),
        rng=np.random.default_rng(core.derive_seed(cfg.seed, "server")),
    )
    built.strategy.on_round_end = on_round_end

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, from_record(arrays))
        loss, accuracy = core.evaluate(model, test)
        return MetricRecord({keys.ACCURACY: accuracy, keys.LOSS: loss})

    initial = get_weights(model)
    result = built.strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    records: list[RoundRecord] = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        evaluation = result.evaluate_metrics_serverapp.get(server_round, MetricRecord())
        train_metrics = result.train_metrics_clientapp.get(server_round, MetricRecord())
        traffic = built.strategy.rounds.get(server_round, RoundTraffic(server_round))
        epsilon = scalar(train_metrics, keys.EPSILON, float, -1.0)
        records.append(
            RoundRecord(
                round=server_round,
                accuracy=scalar(evaluation, keys.ACCURACY, float, float("nan")),
                loss=scalar(evaluation, keys.LOSS, float, float("nan")),
                bytes_up=traffic.bytes_up,
                bytes_down=traffic.bytes_down,
                density=scalar(train_metrics, keys.DENSITY, float, 1.0),
                epsilon=None if epsilon < 0 else epsilon,
                wall_s=traffic.wall_s,
            )
        )
    wall_s = time.perf_counter() - started
    directory = Path(cfg.results_dir) / cfg.run_name
    # The compact export is read back and evaluated: the accuracy it reports is the file's.
    masks = built.masking.mask if built.masking is not None else None
    # Flower's Result keeps no arrays when every round was skipped: the model is the initial one.
    final = from_record(result.arrays) if len(result.arrays) else initial
    model_bytes = save_compact(directory / MODEL_FILE, final, masks)
    set_weights(model, load_compact(directory / MODEL_FILE))
    _, compact_accuracy = core.evaluate(model, test)
    summary = summarize(
        cfg.run_name,
        dict(cfg.to_mapping()),
        num_clients=len(list(grid.get_node_ids())),
        records=records,
        wall_s=wall_s,
        model_bytes_compact=model_bytes,
        compact_accuracy=compact_accuracy,
    )
    write_run(directory, records, summary)
    return summary


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
