"""A ``NumPyClient`` adapter over the same training core, for Flower's legacy path.

Flower 1.42 keeps ``NumPyClient`` in ``flwr.compat`` (legacy). Legacy strategies
(``flwr.server.strategy``) average the dense float32 lists they receive, so this adapter speaks
dense float32: it trains exactly as the ClientApp does (:func:`fedprune.task.train`, with DP-SGD
when the run config asks for it) but sends no compressed payloads. Compression, masks and
byte-exact accounting live in the Message-API app (:mod:`clients.client_app`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar
from flwr.compat.client.client import Client
from flwr.compat.client.numpy_client import NumPyClient

from clients.client_app import node_partition
from fedprune import keys, task
from fedprune.config import RunConfig
from fedprune.models import get_weights, set_weights


class FedPruneNumPyClient(NumPyClient):
    """Train and evaluate the run's model on one partition, dense float32 in and out.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    partition_id, num_partitions : int
        This node's partition of the training split.
    """

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.model = task.new_model(cfg)
        self.names = list(get_weights(self.model))
        self.accountant_state: dict[str, np.ndarray] | None = None
        self.teacher = task.new_teacher(cfg, partition_id) if cfg.distill else None

    def _load(self, parameters: NDArrays) -> None:
        if len(parameters) != len(self.names):
            raise ValueError(f"expected {len(self.names)} arrays, got {len(parameters)}")
        set_weights(self.model, dict(zip(self.names, parameters, strict=True)))

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Return the current weights in ``state_dict`` order."""
        return list(get_weights(self.model).values())

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train one round from ``parameters``; return the new weights and metrics."""
        self._load(parameters)
        data = task.local_train_data(self.cfg, self.partition_id, self.num_partitions)
        server_round = config.get(keys.SERVER_ROUND, 1)
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise ValueError(
                f"config '{keys.SERVER_ROUND}' must be an integer, got {server_round!r}"
            )
        result = task.train(
            self.cfg,
            self.model,
            data,
            masks=None,
            server_round=server_round,
            node_seed=self.partition_id,
            accountant_state=self.accountant_state,
            teacher=self.teacher,
        )
        self.accountant_state = result.accountant_state
        if self.teacher is not None and result.teacher_weights is not None:
            set_weights(self.teacher, result.teacher_weights)  # kept here, never returned
        metrics: dict[str, Scalar] = {}
        if not self.cfg.dp:  # the loss on private batches is not noised: under DP it stays here
            metrics[keys.TRAIN_LOSS] = result.train_loss
        if result.epsilon is not None:
            metrics[keys.EPSILON] = result.epsilon
        return list(result.weights.values()), result.num_examples, metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate ``parameters`` on this node's shard of the held-out split."""
        self._load(parameters)
        data = task.local_eval_data(self.cfg, self.partition_id, self.num_partitions)
        loss, accuracy = task.evaluate(self.model, data)
        return loss, len(data), {keys.ACCURACY: accuracy}


def make_legacy_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """Return a ``ClientApp`` built from a ``client_fn`` (the legacy path)."""

    def client_fn(context: Context) -> Client:
        config = cfg if cfg is not None else RunConfig.from_mapping(context.run_config)
        partition_id, num_partitions = node_partition(context)
        return FedPruneNumPyClient(config, partition_id, num_partitions).to_client()

    return ClientApp(client_fn=client_fn)
