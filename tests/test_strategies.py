"""FedPrune on real Flower messages and a real inner FedAvg (no network needed)."""

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy

from boundary.records import from_record, payload_record, scalar, to_record
from fedprune import codec, keys
from fedprune.masks import ReconcileConfig
from simulations.grid import StaticGrid, server_task_identity
from strategies.accounting import WireAccounting, message_wire_bytes, object_tree_bytes
from strategies.downlink import Downlink
from strategies.masking import DensitySchedule, MaskPolicy
from strategies.state import RoundState
from strategies.strategy import FedPrune, aggregates_weighted_mean
from strategies.validation import ReplyLimits

INT8 = codec.CodecConfig(quant="int8-channel")
FLOAT = codec.CodecConfig(quant="none")
UNBOUNDED = ReplyLimits(examples_ratio=0.0, norm_ratio=0.0)


def compressed(inner: FedAvg, masking: MaskPolicy | None = None, **limits: int) -> FedPrune:
    return FedPrune(
        inner,
        codec_config=INT8,
        masking=masking,
        limits=ReplyLimits(**limits, examples_ratio=0.0, norm_ratio=0.0),
    )


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_task_identity():
        yield


class RecordingFedAvg(FedAvg):
    """Stock FedAvg that keeps what it was asked to aggregate."""

    seen: list[dict[str, np.ndarray]]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen = [from_record(r.content.array_records[keys.ARRAYS]) for r in replies]
        return super().aggregate_train(server_round, replies)


GLOBAL = {
    "w": np.array([[1.0, -2.0, 0.5], [0.25, 4.0, -1.0]], dtype=np.float32),
    "b": np.array([0.0, 1.0], dtype=np.float32),
}


def downlink(wrapper: FedPrune, nodes: list[int]) -> list[Message]:
    sent = wrapper.configure_train(1, to_record(GLOBAL), ConfigRecord(), StaticGrid(nodes))
    return sorted(sent, key=lambda m: m.metadata.dst_node_id)


def train_messages(nodes: tuple[int, ...], server_round: int = 1) -> list[Message]:
    config_record = ConfigRecord({keys.SERVER_ROUND: server_round})
    record = RecordDict({keys.ARRAYS: to_record(GLOBAL), keys.CONFIG: config_record})
    return [Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def reply(to: Message, delta: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: to_record(codec.encode(delta, INT8)),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
        }
    )
    return Message(content=content, reply_to=to)


def test_replies_are_decoded_and_reconstructed_before_averaging() -> None:
    inner = RecordingFedAvg()
    wrapper = compressed(inner)
    sent = downlink(wrapper, [11, 12])
    # One encoded, serialized payload for every node that gets the same variant.
    assert sent[0].content.array_records[keys.ARRAYS] is sent[1].content.array_records[keys.ARRAYS]
    d1 = {"w": np.full((2, 3), 0.1, np.float32), "b": np.array([0.5, -0.5], np.float32)}
    d2 = {"w": np.full((2, 3), -0.3, np.float32), "b": np.array([1.0, 2.0], np.float32)}
    arrays, metrics = wrapper.aggregate_train(1, [reply(sent[0], d1, 1), reply(sent[1], d2, 3)])
    assert arrays is not None and metrics is not None
    # The inner strategy saw float32 models g + delta, never codes or scales.
    for seen in inner.seen:
        assert list(seen) == ["w", "b"]
        assert all(a.dtype == np.float32 for a in seen.values())
    np.testing.assert_allclose(inner.seen[0]["w"], GLOBAL["w"] + 0.1, atol=1e-6)
    # Example-weighted average of the reconstructed models, by hand: (1 * m1 + 3 * m2) / 4.
    got = from_record(arrays)
    np.testing.assert_allclose(got["w"], GLOBAL["w"] + (0.1 - 3 * 0.3) / 4, atol=1e-6)
    np.testing.assert_allclose(
        got["b"], GLOBAL["b"] + [(0.5 + 3.0) / 4, (-0.5 + 6.0) / 4], atol=1e-2
    )
    assert metrics[keys.NUM_REJECTED] == 0


@pytest.mark.parametrize(
    "update",
    [
        codec.CodecConfig(quant="int8-channel", topk=0.5),
        codec.CodecConfig(quant="ternary", topk=0.5, topk_scope="model", topk_block=2),
    ],
    ids=["int8-tensor-topk", "ternary-model-topk-blocks"],
)
@pytest.mark.parametrize("prunes", [True, False], ids=["pruning", "dense"])
@pytest.mark.parametrize(
    "make",
    [FedAvg, lambda: FedAvgM(server_momentum=0.9), lambda: FedAdam(eta=0.1)],
    ids=["fedavg", "fedavgm", "fedadam"],
)
def test_the_weighted_mean_path_equals_aggregating_every_model(
    make: Callable[[], Strategy], prunes: bool, update: codec.CodecConfig
) -> None:
    """Summing sparse updates into one mean reply == the inner strategy averaging N models.

    With pruning on (the default configuration), the server scores each client's model itself
    in round 1 and prunes ``w`` to half; round 2's replies are deltas under that mask (top-k by
    blocks over the mask's candidates, ranked across tensors, in the second codec).
    """
    fast = make()
    general = type("Subclass", (type(fast),), {})()  # a subclass: every model goes to the inner
    general.__dict__.update(make().__dict__)
    assert aggregates_weighted_mean(fast) and not aggregates_weighted_mean(general)
    results = []
    masks = []
    for inner in (fast, general):
        masking = (
            MaskPolicy(
                ["w"],
                DensitySchedule(initial=1.0, final=0.5, start_round=1, end_round=1),
                ReconcileConfig(rule="topk"),
                server_scores=True,
            )
            if prunes
            else None
        )
        wrapper = FedPrune(
            inner, codec_config=INT8, update_codec=update, limits=UNBOUNDED, masking=masking
        )
        weights = GLOBAL
        for server_round in (1, 2):  # FedAvgM and FedAdam carry state into round 2
            sent = wrapper.configure_train(
                server_round, to_record(weights), ConfigRecord(), StaticGrid([11, 12, 13])
            )
            replies = []
            for i, message in enumerate(sorted(sent, key=lambda m: m.metadata.dst_node_id)):
                seeded = np.random.default_rng(10 * server_round + i)
                delta = {
                    k: seeded.standard_normal(v.shape).astype(np.float32) for k, v in GLOBAL.items()
                }
                mask = None if masking is None else masking.mask
                payload = codec.encode(delta, update, masks=mask, send_masks=False)
                content = RecordDict(
                    {
                        keys.ARRAYS: to_record(payload),
                        keys.METRICS: MetricRecord(
                            {keys.NUM_EXAMPLES: 10 * (i + 1), keys.TRAIN_LOSS: float(i)}
                        ),
                    }
                )
                replies.append(Message(content=content, reply_to=message))
            arrays, metrics = wrapper.aggregate_train(server_round, replies)
            assert arrays is not None and metrics is not None
            weights = from_record(arrays)
            aggregated_metrics = dict(metrics)
        results.append((weights, aggregated_metrics))
        masks.append(None if masking is None else masking.mask)
    (w_fast, m_fast), (w_general, m_general) = results
    if prunes:
        assert masks[0] is not None and masks[1] is not None
        np.testing.assert_array_equal(masks[0]["w"], masks[1]["w"])
        assert masks[0]["w"].sum() == 3  # half of the 6 entries
        assert np.all(w_fast["w"][~masks[0]["w"]] == 0.0)
    for name in GLOBAL:
        np.testing.assert_allclose(w_fast[name], w_general[name], rtol=1e-5, atol=1e-6)
    assert m_fast == pytest.approx(m_general)
    assert m_fast[keys.TRAIN_LOSS] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)


class ExamplesSeen(FedAvg):
    """FedAvg by the general path (a subclass gets every model), noting each reply's examples."""

    examples: list[int]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.examples = [int(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies]
        return super().aggregate_train(server_round, replies)


@pytest.mark.parametrize(
    "make", [FedAvg, lambda: FedAdam(eta=0.1), ExamplesSeen], ids=["fedavg", "fedadam", "general"]
)
def test_the_aggregate_depends_on_neither_arrival_order_nor_encoding(
    make: Callable[[], Strategy],
) -> None:
    """The same updates, in any order and in any lossless encoding, give the same model.

    Pruning on (the server scores models in round 1, prunes ``w`` to half), ternary model-wide
    top-k replies in round 2, random updates of mixed scales: float32 sums in another order
    round differently, so this fails unless the replies are put in an order that depends on
    what they say (the wire's canonical order, by content hash, changes with the container or
    the entropy stage). The general path (an inner strategy that gets every model) sees the
    models in that order: by example count.
    """
    base = codec.CodecConfig(quant="ternary", topk=0.5, topk_scope="model")
    outcomes = []
    for order, update in (
        ([0, 1, 2, 3], dataclasses.replace(base, entropy=True)),
        ([3, 1, 0, 2], dataclasses.replace(base, entropy=True, container="blob")),
        ([2, 3, 1, 0], base),
    ):
        masking = MaskPolicy(
            ["w"],
            DensitySchedule(initial=1.0, final=0.5, start_round=1, end_round=1),
            ReconcileConfig(rule="topk"),
            server_scores=True,
        )
        inner = make()
        wrapper = FedPrune(
            inner, codec_config=INT8, update_codec=update, limits=UNBOUNDED, masking=masking
        )
        weights = GLOBAL
        for server_round in (1, 2):
            sent = wrapper.configure_train(
                server_round, to_record(weights), ConfigRecord(), StaticGrid([11, 12, 13, 14])
            )
            replies = []
            for i, message in enumerate(sorted(sent, key=lambda m: m.metadata.dst_node_id)):
                seeded = np.random.default_rng(10 * server_round + i)
                delta = {
                    k: (10.0 ** (i - 2) * seeded.standard_normal(v.shape)).astype(np.float32)
                    for k, v in GLOBAL.items()
                }
                payload = codec.encode(delta, update, masks=masking.mask, send_masks=False)
                metrics = MetricRecord({keys.NUM_EXAMPLES: 7 + 3 * i, keys.TRAIN_LOSS: 0.1 * i})
                content = RecordDict({keys.ARRAYS: payload_record(payload), keys.METRICS: metrics})
                replies.append(Message(content=content, reply_to=message))
            arrays, _ = wrapper.aggregate_train(server_round, [replies[j] for j in order])
            assert arrays is not None
            weights = from_record(arrays)
            if isinstance(inner, ExamplesSeen):
                assert inner.examples == [7, 10, 13, 16]
        outcomes.append(weights)
    for other in outcomes[1:]:
        for name in GLOBAL:
            np.testing.assert_array_equal(other[name], outcomes[0][name])


def test_the_float32_baseline_is_stock_fedavg_bit_for_bit() -> None:
    """Without a codec, FedPrune(FedAvg) aggregates the models exactly as Flower's FedAvg."""
    wrapper = FedPrune(FedAvg(), limits=UNBOUNDED)
    sent = sorted(
        wrapper.configure_train(1, to_record(GLOBAL), ConfigRecord(), StaticGrid([11, 12, 13])),
        key=lambda m: m.metadata.dst_node_id,
    )
    rng = np.random.default_rng(3)
    models = [
        {
            k: (v + rng.standard_normal(v.shape) * 10.0 ** rng.integers(-8, 2)).astype(np.float32)
            for k, v in GLOBAL.items()
        }
        for _ in sent
    ]

    def replies() -> list[Message]:
        return [
            Message(
                content=RecordDict(
                    {
                        keys.ARRAYS: to_record(model),
                        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 7 * (i + 1)}),
                    }
                ),
                reply_to=message,
            )
            for i, (model, message) in enumerate(zip(models, sent, strict=True))
        ]

    ours, _ = wrapper.aggregate_train(1, replies())
    stock, _ = FedAvg().aggregate_train(1, replies())
    assert ours is not None and stock is not None
    for name, array in from_record(stock).items():
        np.testing.assert_array_equal(from_record(ours)[name], array)


def test_a_malformed_reply_is_dropped_and_the_round_goes_on() -> None:
    inner = RecordingFedAvg()
    wrapper = compressed(inner)
    sent = downlink(wrapper, [11, 12])
    good = reply(sent[0], {"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)}, 5)
    bad = reply(sent[1], {"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)}, 5)
    codes = from_record(bad.content.array_records[keys.ARRAYS])
    codes["codes"] = codes["codes"][:-1]  # one code short
    bad.content[keys.ARRAYS] = to_record(codes)
    arrays, metrics = wrapper.aggregate_train(1, [good, bad])
    assert arrays is not None and metrics is not None
    assert metrics[keys.NUM_REJECTED] == 1
    assert len(inner.seen) == 1
    np.testing.assert_allclose(from_record(arrays)["b"], GLOBAL["b"] + 1.0, atol=1e-6)


def test_mask_bits_travel_only_to_nodes_without_the_current_version() -> None:
    encoder = Downlink(INT8)
    mask = {"w": np.array([[True, False, True], [False, True, False]])}
    state = RoundState(1, GLOBAL, mask=mask, mask_version=1)

    first = encoder.encode(train_messages((1, 2)), state)
    carried = [
        codec.payload_masks(from_record(m.content.array_records[keys.ARRAYS])) for m in first
    ]
    assert all(np.array_equal(c["w"], mask["w"]) for c in carried)
    encoder.delivered(1)  # only node 1 answered
    second = encoder.encode(train_messages((1, 2)), state)
    payloads = [from_record(m.content.array_records[keys.ARRAYS]) for m in second]
    assert codec.payload_masks(payloads[0]) == {}  # node 1 holds v1
    assert np.array_equal(codec.payload_masks(payloads[1])["w"], mask["w"])  # node 2 does not
    # Without the bits the payload is smaller, and it decodes with the cached mask.
    assert codec.wire_size(payloads[0]) < codec.wire_size(payloads[1])
    decoded = codec.decode(payloads[0], masks=mask)
    assert np.all(decoded["w"][~mask["w"]] == 0.0)


def test_mask_reconciliation_reaches_the_scheduled_density_and_zeroes_pruned_weights() -> None:
    rng = np.random.default_rng(3)
    weights = {"w": rng.normal(size=(8, 10)).astype(np.float32), "b": np.ones(8, np.float32)}
    masking = MaskPolicy(
        ["w"],
        DensitySchedule(initial=1.0, final=0.25, start_round=1, end_round=1),
        ReconcileConfig(rule="topk"),
    )
    strategy = compressed(FedAvg(min_available_nodes=2, min_train_nodes=2), masking)
    messages = list(
        strategy.configure_train(1, to_record(weights), ConfigRecord(), StaticGrid([1, 2]))
    )
    config = messages[0].content.config_records[keys.CONFIG]
    assert config[keys.VOTE] == "scores" and config[keys.DENSITY] == 0.25
    zero = {k: np.zeros_like(v) for k, v in weights.items()}
    replies = []
    for message, n in zip(messages, (1, 3), strict=True):
        content = RecordDict(
            {
                keys.ARRAYS: to_record(codec.encode(zero, FLOAT)),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
                keys.MASK_VOTE: to_record(codec.encode({"w": np.abs(weights["w"])}, FLOAT)),
            }
        )
        replies.append(Message(content=content, reply_to=message))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and masking.mask is not None
    assert masking.mask["w"].sum() == 20  # exactly round(0.25 * 80)
    assert metrics[keys.DENSITY] == 0.25
    assert masking.version == 2
    got = from_record(arrays)["w"]
    assert np.all(got[~masking.mask["w"]] == 0.0)
    kept = np.abs(weights["w"])[masking.mask["w"]]
    assert kept.min() >= np.abs(weights["w"])[~masking.mask["w"]].max()
    np.testing.assert_array_equal(got[masking.mask["w"]], weights["w"][masking.mask["w"]])


def test_wire_accounting_counts_each_receiver_and_matches_flowers_serialization() -> None:
    wrapper = compressed(RecordingFedAvg())
    accounting = WireAccounting(wrapper)
    sent = downlink(wrapper, [1, 2, 3])
    one = object_tree_bytes(sent[0])
    assert message_wire_bytes(sent) == sum(object_tree_bytes(m) for m in sent)
    assert 3 * one - 64 <= message_wire_bytes(sent) <= 3 * one + 64  # metadata differs slightly
    # The encoded arrays are the bulk of it, and codec.wire_size predicts them exactly.
    payload = from_record(sent[0].content.array_records[keys.ARRAYS])
    assert codec.wire_size(payload) == object_tree_bytes(sent[0].content.array_records[keys.ARRAYS])
    replies = [
        reply(m, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1) for m in sent
    ]
    expected_up = message_wire_bytes(replies)  # before the wrapper decodes them in place
    _, metrics = accounting.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics[keys.BYTES_UP] == expected_up


def test_records_round_trip_keeps_shapes_dtypes_and_order() -> None:
    arrays = {
        "z": np.array("rdp"),  # 0-d (accountant state)
        "a": np.arange(6, dtype=np.int8).reshape(2, 3)[:, ::2],  # non-contiguous view
        "m": np.array([True, False]),
    }
    back = from_record(to_record(arrays))
    assert list(back) == ["z", "a", "m"]
    for name, a in arrays.items():
        assert back[name].shape == a.shape and back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)


@pytest.mark.parametrize(
    "selection",
    [{}, {"topk_scope": "model", "topk_block": 2}],
    ids=["tensor-topk", "model-topk-blocks"],
)
def test_delta_downlink_keeps_every_node_on_the_servers_reference(
    selection: dict[str, object],
) -> None:
    """Node 1 trains every round, node 2 joins in round 3 (full weights) and gets deltas after.

    Delta receivers hold the server's reference bit for bit; a node sent full weights in a round
    where others get a delta receives the new reference itself, so from then on it differs from
    the server's copy only by int8 rounding, never by the change that top-k held back.
    """
    from flwr.app import Context

    from clients.client_app import receive
    from fedprune.config import RunConfig

    cfg = RunConfig(update_topk=0.25, delta_downlink=True, **selection)  # type: ignore[arg-type]
    encoder = Downlink(cfg.codec(), update_codec=cfg.update_codec(), delta_downlink=True)
    contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in (1, 2)}
    rng = np.random.default_rng(5)
    global_model = {k: v.copy() for k, v in GLOBAL.items()}
    kinds = {}
    for server_round in (1, 2, 3, 4, 5):
        nodes = (1,) if server_round < 3 else (1, 2)
        config_record = ConfigRecord({keys.SERVER_ROUND: server_round})
        record = RecordDict({keys.ARRAYS: to_record(global_model), keys.CONFIG: config_record})
        messages = [
            Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes
        ]
        sent = encoder.encode(messages, RoundState(server_round, global_model))
        kinds[server_round] = [
            m.content.config_records[keys.CONFIG][keys.PAYLOAD_KIND] for m in sent
        ]
        for message, kind in zip(sent, kinds[server_round], strict=True):
            node = message.metadata.dst_node_id
            encoded = from_record(message.content.array_records[keys.ARRAYS])
            assert ("select" in encoded) == (kind == "delta")  # deltas are top-k sparsified
            start, _ = receive(message, contexts[node], cfg)
            assert encoder._ref is not None
            for name in start:
                if node == 1:  # exact: delta receiver throughout (int8 image in round 1)
                    np.testing.assert_array_equal(start[name], encoder._ref[name])
                else:  # within int8 rounding (half a step of the largest channel: 4/127/2)
                    np.testing.assert_allclose(start[name], encoder._ref[name], atol=0.016)
            encoder.delivered(node)
        global_model = {
            k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in global_model.items()
        }
    assert kinds == {
        1: ["weights"],
        2: ["delta"],
        3: ["delta", "weights"],
        4: ["delta", "delta"],
        5: ["delta", "delta"],
    }


@pytest.mark.parametrize("rule", ["topk", "majority", "intersection", "union"])
def test_magnitude_votes_are_computed_from_the_decoded_models_not_uploaded(rule: str) -> None:
    rng = np.random.default_rng(4)
    models = [
        {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": np.zeros(6, np.float32)}
        for _ in range(3)
    ]
    masking = MaskPolicy(
        ["w"],
        DensitySchedule(initial=1.0, final=0.4, start_round=1, end_round=1),
        ReconcileConfig(rule=rule),  # type: ignore[arg-type]
        server_scores=True,
    )
    strategy = compressed(FedAvg(min_available_nodes=3, min_train_nodes=3), masking)
    g = models[0]
    sent = sorted(
        strategy.configure_train(1, to_record(g), ConfigRecord(), StaticGrid([1, 2, 3])),
        key=lambda m: m.metadata.dst_node_id,
    )
    assert all(m.content.config_records[keys.CONFIG][keys.VOTE] == "none" for m in sent)
    replies = [
        Message(
            content=RecordDict(
                {
                    keys.ARRAYS: to_record(codec.encode({k: m[k] - g[k] for k in g}, FLOAT)),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
                }
            ),
            reply_to=message,
        )
        for message, m, n in zip(sent, models, (1, 1, 2), strict=True)
    ]
    strategy.aggregate_train(1, replies)
    assert masking.mask is not None and masking.version == 2
    from fedprune.masks import reconcile

    # What the server decoded: g + (m - g), in float32, as the client's model.
    models = [{"w": g["w"] + (m["w"] - g["w"])} for m in models]
    own = [
        reconcile([{"w": np.abs(m["w"])}], [1.0], ReconcileConfig("topk", density=0.4))
        for m in models
    ]
    scores = [{"w": np.abs(m["w"])} for m in models]
    votes = scores if rule == "topk" else own
    expected = reconcile(votes, [1.0, 1.0, 2.0], ReconcileConfig(rule=rule, density=0.4))  # type: ignore[arg-type]
    np.testing.assert_array_equal(masking.mask["w"], expected["w"])


def test_oversized_or_misshaped_payloads_are_rejected_before_decoding() -> None:
    inner = RecordingFedAvg()
    wrapper = compressed(inner)
    sent = downlink(wrapper, [1, 2, 3])
    good = reply(sent[0], {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1)
    big = reply(sent[1], {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1)
    padded = from_record(big.content.array_records[keys.ARRAYS])
    padded["codes"] = np.zeros(2**21, np.int8)  # 2 MiB of codes for a 8-entry model
    big.content[keys.ARRAYS] = to_record(padded)
    shaped = reply(sent[2], {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, 1)
    _, metrics = wrapper.aggregate_train(1, [good, big, shaped])
    assert metrics is not None and metrics[keys.NUM_REJECTED] == 2
    assert len(inner.seen) == 1


def _payload_edit(name: str, value: object) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(payload: dict[str, np.ndarray]) -> None:
        if name == "scale":
            payload["scale"] = payload["scale"].copy()
            payload["scale"][0] = value
        elif name == "codes-short":
            payload["codes"] = payload["codes"][:-1]
        else:  # oversized
            payload["codes"] = np.zeros(2**21, np.int8)

    return edit


def _vote_edit(kind: str) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(vote: dict[str, np.ndarray]) -> None:
        if kind == "wrong-length":
            vote["w"] = vote["w"][:0]
        elif kind == "padding-bits":
            vote["w"] = vote["w"] | np.uint8(0b11)  # 6 mask bits in 8: the last 2 are padding
        elif kind == "dense":
            vote["w"] = codec.pack_mask(np.ones((2, 3), bool))
        elif kind == "empty":
            vote["w"] = codec.pack_mask(np.zeros((2, 3), bool))
        elif kind == "extra-tensor":
            vote["b"] = codec.pack_mask(np.ones(2, bool))
        else:  # float scores where a mask was asked for
            vote["w"] = np.ones((2, 3), np.float32)

    return edit


BAD_PAYLOADS = {
    "scale-nan": _payload_edit("scale", np.nan),
    "scale-inf": _payload_edit("scale", np.inf),
    "scale-zero": _payload_edit("scale", 0.0),
    "scale-negative": _payload_edit("scale", -1.0),
    "codes-short": _payload_edit("codes-short", None),
    "oversized": _payload_edit("oversized", None),
}
BAD_VOTES = {
    f"vote-{kind}": _vote_edit(kind)
    for kind in ("wrong-length", "padding-bits", "dense", "empty", "extra-tensor", "not-bits")
}


@pytest.mark.parametrize("kind", sorted({**BAD_PAYLOADS, **BAD_VOTES}))
def test_a_bad_payload_or_vote_is_dropped_and_model_and_mask_equal_the_run_without_it(
    kind: str,
) -> None:
    """The compressed chain with a mask-vote round (majority of 0.5-density masks)."""

    def run(with_bad: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        masking = MaskPolicy(
            ["w"],
            DensitySchedule(initial=1.0, final=0.5, start_round=1, end_round=1),
            ReconcileConfig(rule="majority"),
        )
        chain = compressed(FedAvg(min_available_nodes=2, min_train_nodes=2), masking, min_replies=2)
        nodes = [1, 2, 3] if with_bad else [1, 2]
        sent = list(chain.configure_train(1, to_record(GLOBAL), ConfigRecord(), StaticGrid(nodes)))
        assert all(m.content.config_records[keys.CONFIG][keys.VOTE] == "mask" for m in sent)
        sent.sort(key=lambda m: m.metadata.dst_node_id)
        keeps = [
            np.array([[1, 1, 0], [1, 0, 0]], bool),
            np.array([[1, 0, 1], [1, 0, 0]], bool),
            np.array([[0, 1, 1], [1, 0, 0]], bool),
        ]
        replies = []
        for i, message in enumerate(sent):
            delta = {"w": np.full((2, 3), 0.5 * (i + 1), np.float32), "b": np.ones(2, np.float32)}
            payload = dict(codec.encode(delta, INT8))
            vote = {"w": codec.pack_mask(keeps[i])}
            if i == 2:
                if kind in BAD_PAYLOADS:
                    BAD_PAYLOADS[kind](payload)
                else:
                    BAD_VOTES[kind](vote)
            reply_metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.SERVER_ROUND: 1})
            content = RecordDict(
                {
                    keys.ARRAYS: to_record(payload),
                    keys.METRICS: reply_metrics,
                    keys.MASK_VOTE: to_record(vote),
                }
            )
            replies.append(Message(content=content, reply_to=message))
        arrays, metrics = chain.aggregate_train(1, replies)
        assert arrays is not None and metrics is not None and masking.mask is not None
        return from_record(arrays), masking.mask, scalar(metrics, keys.NUM_REJECTED, int)

    clean, clean_mask, clean_rejected = run(with_bad=False)
    got, mask, rejected = run(with_bad=True)
    assert (clean_rejected, rejected) == (0, 1)
    np.testing.assert_array_equal(mask["w"], clean_mask["w"])
    # Kept by at least half of the two good votes (a tie keeps).
    np.testing.assert_array_equal(clean_mask["w"], [[1, 1, 1], [1, 0, 0]])
    for name in GLOBAL:
        np.testing.assert_array_equal(got[name], clean[name])


def test_the_server_waits_for_its_nodes_and_says_when_too_few_come() -> None:
    from strategies.server_app import _wait_for_nodes

    _wait_for_nodes(StaticGrid([1, 2, 3]), 3, settle_s=0.0)  # returns at once
    with pytest.raises(RuntimeError, match="only 2 of the 3 nodes"):
        _wait_for_nodes(StaticGrid([1, 2]), 3, timeout_s=0.2)
