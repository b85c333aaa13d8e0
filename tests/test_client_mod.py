"""Compression in a foreign Flower app: a quickstart-style app, plus the mod and the wrappers.

The app below is written as Flower's PyTorch quickstart is (its own model and data, ``@app.train``
returning ``ArrayRecord(model.state_dict())``, ``FedAvg.start`` in the ServerApp) and knows
nothing of fedprune. Adding ``compression_mod`` to its ClientApp and the server wrappers around
its ``FedAvg`` must cut its bytes (counted from Flower's serialization of every message, both
ways) with its accuracy held, in Flower's real simulation engine.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from clients.mod import compression_mod, make_compression_mod
from fedprune.codec import CodecConfig
from simulations.grid import server_task_identity
from simulations.simulate import backend_config
from strategies.accounting import WireAccounting
from strategies.strategy import FedPrune
from strategies.validation import ReplyLimits

NODES = 4
ROUNDS = 6


# -- the foreign app -------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y
    )


def make_quickstart_client(mods: list | None = None) -> ClientApp:
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        x_all, _, y_all, _ = digits()
        x, y = torch.from_numpy(x_all[pid::n]), torch.from_numpy(y_all[pid::n])
        torch.manual_seed(pid)
        model = Net()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i in range(0, len(x), 16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(x)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def accuracy(arrays: ArrayRecord) -> float:
    _, x, _, y = digits()
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@dataclass
class Outcome:
    accuracy: float
    bytes_up: int
    bytes_down: int


def run_app(wrap: Callable[[Strategy], WireAccounting], client: ClientApp) -> Outcome:
    out: list[Outcome] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = wrap(FedAvg(fraction_train=1.0, fraction_evaluate=0.0))
        result = strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=ROUNDS)
        up = sum(t.bytes_up for t in strategy.rounds.values())
        down = sum(t.bytes_down for t in strategy.rounds.values())
        out.append(Outcome(accuracy(result.arrays), up, down))

    run_simulation(
        server_app=server, client_app=client, num_supernodes=NODES,
        backend_config=backend_config(quiet=True),
    )  # fmt: skip
    assert out, "the ServerApp did not finish"
    return out[0]


# -- the tests -------------------------------------------------------------------------------
def test_mod_passes_other_messages_and_refuses_a_reply_of_another_model() -> None:
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with server_task_identity():
        query = Message(RecordDict(), dst_node_id=1, message_type="query")
        assert compression_mod(query, context, lambda m, c: m) is query
        no_arrays = Message(RecordDict(), dst_node_id=1, message_type="train")
        with pytest.raises(ValueError, match="no 'arrays'"):
            make_compression_mod()(no_arrays, context, lambda m, c: m)


@pytest.mark.slow
def test_quickstart_app_with_mod_and_wrappers_sends_fewer_bytes_at_equal_accuracy() -> None:
    def counted(strategy: Strategy) -> WireAccounting:
        return WireAccounting(strategy)

    def compressed(strategy: Strategy) -> WireAccounting:
        codec = CodecConfig(quant="int8-channel", entropy=True)
        return WireAccounting(
            FedPrune(strategy, codec_config=codec, limits=ReplyLimits(min_replies=NODES))
        )

    plain = run_app(counted, make_quickstart_client())
    small = run_app(compressed, make_quickstart_client(mods=[compression_mod]))
    print(f"plain {plain}\ncompressed {small}")
    assert plain.accuracy > 0.85  # the app learns
    assert small.accuracy > plain.accuracy - 0.02
    # Measured: 3.4x fewer bytes up, 3.1x down (int8 per channel + zlib on a 4.8 k-parameter
    # MLP, whose per-channel scales and framing weigh more than on larger models).
    assert small.bytes_up < plain.bytes_up / 2.5
    assert small.bytes_down < plain.bytes_down / 2.5
