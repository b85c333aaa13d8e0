"""The NumPyClient adapter under Flower's legacy path (client_fn + server_fn, legacy FedAvg)."""

import pytest
from flwr.common import Context, Metrics, ndarrays_to_parameters
from flwr.compat.server import ServerAppComponents
from flwr.server import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clients.numpy_client import make_legacy_client_app
from fedprune import keys, task
from fedprune.config import RunConfig
from fedprune.models import get_weights
from simulations.simulate import backend_config

pytestmark = pytest.mark.slow


def test_numpy_client_trains_under_the_legacy_path() -> None:
    cfg = RunConfig(strategy="fedavg", target_density=1.0, num_server_rounds=2)
    accuracies: list[float] = []

    def weighted_accuracy(metrics: list[tuple[int, Metrics]]) -> Metrics:
        total = sum(n for n, _ in metrics)
        accuracy = sum(n * float(m[keys.ACCURACY]) for n, m in metrics) / total
        accuracies.append(accuracy)
        return {keys.ACCURACY: accuracy}

    def server_fn(context: Context) -> ServerAppComponents:
        initial = list(get_weights(task.new_model(cfg)).values())
        strategy = FedAvg(
            min_fit_clients=3,
            min_evaluate_clients=3,
            min_available_clients=3,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=lambda rnd: {keys.SERVER_ROUND: rnd},
            evaluate_metrics_aggregation_fn=weighted_accuracy,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=2))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=make_legacy_client_app(cfg),
        num_supernodes=3,
        backend_config=backend_config(),
    )
    assert len(accuracies) == 2
    assert accuracies[-1] > 0.3  # ten classes: chance is 0.1
