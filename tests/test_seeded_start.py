"""Seeded start: round 1 sends the initial model's digest, nodes build the model themselves."""

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from boundary.records import from_record, to_record
from clients.client_app import receive
from fedprune import codec, keys, task
from fedprune.codec.container import unpack_blob
from fedprune.config import ConfigError, RunConfig
from fedprune.models import get_weights
from simulations.grid import server_task_identity
from strategies.downlink import Downlink
from strategies.state import RoundState


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_task_identity():
        yield


CFG = RunConfig(
    quant="ternary",
    downlink_quant="int8-channel",
    update_topk=0.05,
    delta_downlink=True,
    container="blob",
    seeded_start=True,
)


def _messages(model: dict[str, np.ndarray], server_round: int) -> list[Message]:
    content = RecordDict(
        {
            keys.ARRAYS: to_record(model),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round}),
        }
    )
    return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]


# The delta downlink as the Fashion-MNIST rows send it: signs of its own top 3 %, log8 steps.
LOG8 = CFG.replace(downlink_quant="ternary", downlink_topk=0.03, lowbit_scales="log8")


@pytest.mark.parametrize("cfg", [CFG, LOG8], ids=["int8-down", "ternary-log8-down"])
def test_round_one_sends_a_digest_and_nodes_rebuild_the_model(cfg: RunConfig) -> None:
    initial = get_weights(task.new_model(cfg))
    wrapper = Downlink(cfg.codec(), update_codec=cfg.downlink_update_codec(), delta_downlink=True)
    wrapper.expect_seeded_start(codec.weights_digest(initial))
    contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in (1, 2)}
    sent = wrapper.encode(_messages(initial, 1), RoundState(1, initial))
    for message in sent:
        config = message.content.config_records[keys.CONFIG]
        assert config[keys.PAYLOAD_KIND] == "seed"
        assert len(message.content.array_records[keys.ARRAYS]) == 0  # no model travels
        start, masks = receive(message, contexts[message.metadata.dst_node_id], cfg)
        assert masks is None
        for name, w in initial.items():
            np.testing.assert_array_equal(start[name], w)
    for message in sent:  # both nodes answered round 1
        wrapper.delivered(message.metadata.dst_node_id)
    rng = np.random.default_rng(0)
    moved = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in initial.items()}
    second = wrapper.encode(_messages(moved, 2), RoundState(2, moved))
    for message in second:
        config = message.content.config_records[keys.CONFIG]
        assert config[keys.PAYLOAD_KIND] == "delta"  # against the exact initial model
        assert list(message.content.array_records[keys.ARRAYS]) == [codec.KEY_BLOB]
        blob = from_record(message.content.array_records[keys.ARRAYS])[codec.KEY_BLOB]
        flags = int(unpack_blob({codec.KEY_BLOB: blob})[codec.KEY_META][1])
        assert bool(flags & codec.FLAG_SCALES_LOG8) == (cfg.lowbit_scales == "log8")
        start, _ = receive(message, contexts[message.metadata.dst_node_id], cfg)
        assert wrapper._ref is not None
        for name in start:
            np.testing.assert_array_equal(start[name], wrapper._ref[name])


def test_a_node_with_another_initial_model_fails_clearly() -> None:
    initial = get_weights(task.new_model(CFG))
    wrapper = Downlink(CFG.codec(), delta_downlink=True)
    wrapper.expect_seeded_start(codec.weights_digest(initial))
    message = wrapper.encode(_messages(initial, 1), RoundState(1, initial))[0]
    other = CFG.replace(seed=1)
    with pytest.raises(ValueError, match="seeded start: this node's initial model"):
        receive(message, Context(1, 1, {}, RecordDict(), {}), other)


def test_a_resumed_or_other_model_is_sent_as_weights() -> None:
    initial = get_weights(task.new_model(CFG))
    wrapper = Downlink(CFG.codec(), delta_downlink=True)
    wrapper.expect_seeded_start(codec.weights_digest(initial))
    resumed = {k: v + np.float32(1.0) for k, v in initial.items()}
    sent = wrapper.encode(_messages(resumed, 1), RoundState(1, resumed))
    assert {m.content.config_records[keys.CONFIG][keys.PAYLOAD_KIND] for m in sent} == {"weights"}


def test_digest_depends_on_names_shapes_and_values() -> None:
    a = {"w": np.zeros((2, 3), np.float32)}
    assert codec.weights_digest(a) == codec.weights_digest({"w": np.zeros((2, 3), np.float64)})
    assert codec.weights_digest(a) != codec.weights_digest({"v": np.zeros((2, 3), np.float32)})
    assert codec.weights_digest(a) != codec.weights_digest({"w": np.zeros((3, 2), np.float32)})
    assert codec.weights_digest(a) != codec.weights_digest({"w": np.ones((2, 3), np.float32)})


def test_downlink_settings_are_their_own() -> None:
    assert CFG.update_codec().quant == "ternary"
    assert CFG.downlink_update_codec().quant == "int8-channel"
    assert CFG.downlink_update_codec().topk == 0.05  # 0.0: same as update-topk
    assert CFG.replace(downlink_topk=0.02).downlink_update_codec().topk == 0.02
    # Full weights of a low-bit downlink go int8: signs of a whole model are not a model.
    assert CFG.replace(downlink_quant="same").codec().quant == "int8-channel"
    assert RunConfig().downlink_update_codec() == RunConfig().update_codec()
    with pytest.raises(ConfigError, match="downlink-topk"):
        RunConfig(downlink_topk=1.5)
    with pytest.raises(ConfigError, match="seeded-start"):
        RunConfig(strategy="fedavg", target_density=1.0, seeded_start=True)
