"""The server's per-round metrics, also where people watch experiments: TensorBoard and MLflow.

:class:`MetricsLog` receives each :class:`~fedprune.results.RoundRecord` as the round ends and
writes it, with the round as the step, to

- TensorBoard event files in ``<results-dir>/<run-name>/tensorboard/`` (``log-tensorboard``,
  on by default; needs the ``tensorboard`` package, in the ``simulation`` extra):
  ``tensorboard --logdir <results-dir>`` shows every run of a comparison side by side;
- an MLflow tracking store in ``<results-dir>/mlflow.db`` (``log-mlflow``, off by default; the
  ``mlflow`` extra): one experiment per results folder (named after it), one MLflow run per
  fedprune run, with the run config as parameters:
  ``mlflow ui --backend-store-uri sqlite:///<results-dir>/mlflow.db``. MLflow's plain-folder
  store (``./mlruns``) is in maintenance mode and refuses to start by default (MLflow 3.17),
  so the local store is MLflow's SQLite one: a single file.

The metrics are those of ``rounds.csv``: ``accuracy``, ``loss``, ``bytes_up``, ``bytes_down``,
``density``, ``wall_s`` and, under DP, ``epsilon``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedprune.checkpoint import run_dir
from fedprune.config import ConfigError, RunConfig
from fedprune.results import RoundRecord

TENSORBOARD_DIR = "tensorboard"
"""Folder of a run's TensorBoard event files, next to its ``rounds.csv``."""
MLFLOW_DB = "mlflow.db"
"""The MLflow store of a results folder (SQLite)."""


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """Return the metrics of one round, by name (ε only when measured)."""
    metrics = {
        "accuracy": record.accuracy,
        "loss": record.loss,
        "bytes_up": float(record.bytes_up),
        "bytes_down": float(record.bytes_down),
        "density": record.density,
        "wall_s": record.wall_s,
    }
    if record.epsilon is not None:
        metrics["epsilon"] = record.epsilon
    return metrics


def mlflow_uri(results_dir: str | Path) -> str:
    """Return the tracking URI of the MLflow store of ``results_dir``."""
    return f"sqlite:///{(Path(results_dir) / MLFLOW_DB).resolve()}"


class MetricsLog:
    """Write a run's per-round metrics to the trackers its config turns on.

    Parameters
    ----------
    cfg : RunConfig
        The run (``log-tensorboard``, ``log-mlflow``, ``results-dir``, ``run-name``).

    Raises
    ------
    ConfigError
        If a tracker is on but its package is not installed (naming the key and the extra).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self._tensorboard: Any = None
        self._mlflow: Any = None
        self._mlflow_run = ""
        directory = run_dir(cfg.results_dir, cfg.run_name)  # a relative results-dir: the project's
        root = directory.parent
        if cfg.log_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "config key 'log-tensorboard': needs the tensorboard package "
                    "(pip install 'fedprune[simulation]'), or set it to false"
                ) from err
            self._tensorboard = SummaryWriter(log_dir=str(directory / TENSORBOARD_DIR))
        if cfg.log_mlflow:
            try:
                from mlflow.entities import Param
                from mlflow.tracking import MlflowClient
            except ImportError as err:
                raise ConfigError(
                    "config key 'log-mlflow': needs MLflow (pip install 'fedprune[mlflow]'), "
                    "or set it to false"
                ) from err
            root.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=mlflow_uri(root))
            name = root.resolve().name
            experiment = client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(name)
            )
            run = client.create_run(experiment_id, run_name=cfg.run_name)
            self._mlflow, self._mlflow_run = client, run.info.run_id
            params = [Param(key, str(value)) for key, value in cfg.to_mapping().items()]
            client.log_batch(self._mlflow_run, params=params)

    def round(self, record: RoundRecord) -> None:
        """Log one finished round (its number is the step)."""
        metrics = round_metrics(record)
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, value, global_step=record.round)
            self._tensorboard.flush()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(name, value, now, record.round) for name, value in metrics.items()]
            self._mlflow.log_batch(self._mlflow_run, metrics=batch)

    def close(self) -> None:
        """Close the event files and mark the MLflow run finished."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run, status="FINISHED")
