"""FedPrune's reply boundary and bounds: each bad input is dropped, the aggregate equals the run
without it; an honest-looking reply cannot take over the model."""

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

from boundary.records import from_record, to_record
from fedprune import keys
from simulations.grid import StaticGrid, server_task_identity
from strategies.strategy import FedPrune
from strategies.validation import ReplyLimits

GLOBAL = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.5, -0.5], dtype=np.float32),
}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_task_identity():
        yield


def configure(strategy: FedPrune, nodes: list[int]) -> list[Message]:
    return list(strategy.configure_train(1, to_record(GLOBAL), ConfigRecord(), StaticGrid(nodes)))


def good(to: Message, shift: float, n: int = 10) -> Message:
    arrays = {k: v + np.float32(shift) for k, v in GLOBAL.items()}
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.SERVER_ROUND: 1})
    return Message(
        content=RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=to
    )


def with_arrays(arrays: dict[str, np.ndarray]) -> Callable[[Message], None]:
    def edit(reply: Message) -> None:
        reply.content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})

    return edit


def with_metric(key: str, value: object) -> Callable[[Message], None]:
    def edit(reply: Message) -> None:
        reply.content[keys.METRICS][key] = value  # type: ignore[assignment]

    return edit


def without(record: str) -> Callable[[Message], None]:
    def edit(reply: Message) -> None:
        del reply.content[record]

    return edit


def with_record(name: str, record: object) -> Callable[[Message], None]:
    def edit(reply: Message) -> None:
        reply.content[name] = record  # type: ignore[assignment]

    return edit


def npy_array(
    descr: str,
    shape: tuple[int, ...],
    *,
    body: int,
    fortran: bool = False,
    fields: tuple[tuple[int, ...], str] | None = None,
) -> Array:
    """An npy buffer with the given header and ``body`` zero bytes after it."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    shape_field, dtype_field = fields or (shape, "float32")
    return Array(dtype_field, shape_field, "numpy.ndarray", buffer.getvalue() + bytes(body))


def with_array(array: Array) -> Callable[[Message], None]:
    """Replace the reply's first tensor (``w``) by ``array``."""

    def edit(reply: Message) -> None:
        record = reply.content.array_records[keys.ARRAYS]
        reply.content[keys.ARRAYS] = ArrayRecord({"w": array, "b": record["b"]})

    return edit


def evaluate_type(reply: Message) -> None:
    reply.metadata.message_type = MessageType.EVALUATE


def unbounded(**limits: int) -> ReplyLimits:
    """Limits without the round-relative bounds (tested on their own below)."""
    return ReplyLimits(**limits, examples_ratio=0.0, norm_ratio=0.0)


NAN_W = GLOBAL["w"].copy()
NAN_W[0, 0] = np.nan

BAD_INPUTS: dict[str, Callable[[Message], None]] = {
    "nan": with_arrays({"w": NAN_W, "b": GLOBAL["b"]}),
    "inf": with_arrays({"w": GLOBAL["w"], "b": np.array([np.inf, 0], np.float32)}),
    "wrong-shape": with_arrays({"w": GLOBAL["w"].T.copy(), "b": GLOBAL["b"]}),
    "wrong-dtype": with_arrays({"w": GLOBAL["w"].astype(np.float64), "b": GLOBAL["b"]}),
    "missing-tensor": with_arrays({"w": GLOBAL["w"]}),
    "extra-tensor": with_arrays({**GLOBAL, "x": np.zeros(1, np.float32)}),
    "int8-codes": with_arrays({k: np.ones(v.shape, np.int8) for k, v in GLOBAL.items()}),
    "zero-examples": with_metric(keys.NUM_EXAMPLES, 0),
    "negative-examples": with_metric(keys.NUM_EXAMPLES, -5),
    "huge-examples": with_metric(keys.NUM_EXAMPLES, 10**9),
    "float-examples": with_metric(keys.NUM_EXAMPLES, 2.5),
    "stale-round": with_metric(keys.SERVER_ROUND, 0),
    "epsilon-nan": with_metric(keys.EPSILON, float("nan")),
    "epsilon-negative": with_metric(keys.EPSILON, -1.0),
    "epsilon-list": with_metric(keys.EPSILON, [1.0, 2.0]),
    "no-arrays": without(keys.ARRAYS),
    "no-metrics": without(keys.METRICS),
    "extra-record": with_record("extra", ConfigRecord({"x": 1})),
    "arrays-not-arrays": with_record(keys.ARRAYS, ConfigRecord({"w": 1})),
    "metric-list": with_metric(keys.TRAIN_LOSS, [0.5, 0.5]),
    "metric-inf": with_metric(keys.TRAIN_LOSS, float("inf")),
    # Arrays that cannot be read, each for another reason (none is a ValueError of numpy's).
    "foreign-stype": with_array(Array("float32", (2, 3), "torch.Tensor", bytes(24))),
    "empty-buffer": with_array(Array("float32", (2, 3), "numpy.ndarray", b"")),
    "garbage-bytes": with_array(Array("float32", (2, 3), "numpy.ndarray", b"\x93NUMPY garbage")),
    "header-bomb": with_array(npy_array("<f4", (2**40,), body=16)),
    "header-shorter-body": with_array(npy_array("<f4", (2, 3), body=20)),
    "header-other-shape": with_array(npy_array("<f4", (3, 2), body=24, fields=((2, 3), "float32"))),
    "header-object-dtype": with_array(npy_array("|O", (2, 3), body=48)),
    "header-fortran": with_array(npy_array("<f4", (2, 3), body=24, fortran=True)),
    # Raw arrays (how payloads travel): dtype, shape and byte count are checked, nothing else.
    "raw-bomb": with_array(Array("float32", (2**40,), "raw", bytes(16))),
    "raw-short": with_array(Array("float32", (2, 3), "raw", bytes(20))),
    "raw-float64": with_array(Array("float64", (2, 3), "raw", bytes(48))),
    "raw-object": with_array(Array("object", (2, 3), "raw", bytes(48))),
    "raw-negative-shape": with_array(Array("float32", (-2, -3), "raw", bytes(24))),
    "wrong-message-type": evaluate_type,
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_a_bad_reply_is_dropped_and_the_model_equals_the_run_without_it(kind: str) -> None:
    def aggregate(with_bad: bool) -> tuple[dict[str, np.ndarray], MetricRecord]:
        strategy = FedPrune(FedAvg(), limits=unbounded(min_replies=2))
        sent = configure(strategy, [1, 2, 3])
        replies = [good(sent[0], 1.0, n=10), good(sent[1], 3.0, n=30)]
        if with_bad:
            bad = good(sent[2], 100.0, n=10)
            BAD_INPUTS[kind](bad)
            replies.append(bad)
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert arrays is not None and metrics is not None
        return from_record(arrays), metrics

    clean, _ = aggregate(with_bad=False)
    got, metrics = aggregate(with_bad=True)
    assert metrics[keys.NUM_REJECTED] == 1
    for name in GLOBAL:
        np.testing.assert_array_equal(got[name], clean[name])
    np.testing.assert_allclose(clean["w"], GLOBAL["w"] + 2.5)  # (10 * 1 + 30 * 3) / 40


def test_a_duplicate_reply_from_one_node_counts_once() -> None:
    strategy = FedPrune(FedAvg(), limits=unbounded(min_replies=1))
    sent = configure(strategy, [1, 2])
    arrays, metrics = strategy.aggregate_train(
        1, [good(sent[0], 1.0), good(sent[0], 9.0), good(sent[1], 3.0)]
    )
    assert arrays is not None and metrics is not None
    assert metrics[keys.NUM_REJECTED] == 1
    np.testing.assert_allclose(from_record(arrays)["w"], GLOBAL["w"] + 2.0)


def test_too_few_valid_replies_skip_the_round() -> None:
    strategy = FedPrune(FedAvg(), limits=unbounded(min_replies=2))
    sent = configure(strategy, [1, 2])
    bad = good(sent[1], 0.0)
    BAD_INPUTS["nan"](bad)
    arrays, metrics = strategy.aggregate_train(1, [good(sent[0], 1.0), bad])
    assert arrays is None  # the ServerApp keeps the previous global model
    assert metrics is not None and metrics[keys.NUM_REJECTED] == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_non_finite_aggregate_skips_the_round_and_leaves_the_server_optimizer_as_it_was() -> None:
    """Finite replies whose FedAvgM step overflows float32: the momentum must not keep the inf."""
    from flwr.serverapp.strategy import FedAvgM

    from strategies.wrapper import strategy_state

    inner = FedAvgM(server_learning_rate=2.0, server_momentum=0.9)
    strategy = FedPrune(inner, limits=unbounded(min_replies=2))
    sent = configure(strategy, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [good(sent[0], 1.0), good(sent[1], 3.0)])
    assert arrays is not None and inner.momentum_vector is not None
    before = strategy_state(inner)
    huge = 3e38 - float(GLOBAL["w"].max())  # finite replies; 2 x 3e38 overflows float32
    arrays, metrics = strategy.aggregate_train(1, [good(sent[0], huge), good(sent[1], huge)])
    assert arrays is None and metrics is not None and metrics[keys.NUM_REJECTED] == 0
    after = strategy_state(inner)
    assert set(after) == set(before)
    for name, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[name], value)
            assert np.isfinite(after[name]).all()


def test_every_failure_reason_is_recorded() -> None:
    strategy = FedPrune(FedAvg(), limits=unbounded(min_replies=1))
    sent = configure(strategy, [1, 2])
    bad = good(sent[1], 0.0)
    BAD_INPUTS["wrong-shape"](bad)
    strategy.aggregate_train(1, [good(sent[0], 1.0), bad])
    assert len(strategy.rejected[1]) == 1
    assert "'w' is float32[3, 2], expected float32[2, 3]" in strategy.rejected[1][0]


def test_replies_to_every_node_are_configured_with_the_global_model() -> None:
    strategy = FedPrune(FedAvg(), limits=unbounded())
    sent = configure(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in sent)


def sends(message: Message, w: list[float], n: int = 1) -> Message:
    arrays = {"w": np.array([w], np.float32)}
    metrics = MetricRecord({keys.NUM_EXAMPLES: n})
    return Message(
        content=RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}),
        reply_to=message,
    )


def test_update_clipping_bounds_each_update_norm_by_hand() -> None:
    zero = {"w": np.zeros((1, 2), np.float32)}
    strategy = FedPrune(FedAvg(), limits=ReplyLimits(max_update_norm=2.0, norm_ratio=0.0))
    sent = list(strategy.configure_train(1, to_record(zero), ConfigRecord(), StaticGrid([1, 2])))
    # Norm 5 is scaled to 2: (3, 4) -> (1.2, 1.6); norm 1 stays. Mean: (0.6, 1.3).
    arrays, _ = strategy.aggregate_train(1, [sends(sent[0], [3, 4]), sends(sent[1], [0, 1])])
    assert arrays is not None and len(strategy.bounded[1]) == 1
    np.testing.assert_allclose(from_record(arrays)["w"], [[0.6, 1.3]], rtol=1e-6)


def test_a_huge_update_is_clipped_to_a_multiple_of_the_lower_median_norm_by_default() -> None:
    zero = {"w": np.zeros((1, 2), np.float32)}
    strategy = FedPrune(FedAvg())  # default limits: norm_ratio 3
    sent = sorted(
        strategy.configure_train(1, to_record(zero), ConfigRecord(), StaticGrid([1, 2, 3])),
        key=lambda m: m.metadata.dst_node_id,
    )
    # Norms 1, 2 and 5e6: the lower median is 2, the bound 6; (3e6, 4e6) -> (3.6, 4.8).
    replies = [sends(sent[0], [0, 1]), sends(sent[1], [2, 0]), sends(sent[2], [3e6, 4e6])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.bounded[1] == ["node 3: update norm 5e+06 clipped to 6"]
    np.testing.assert_allclose(
        from_record(arrays)["w"], [[(0 + 2 + 3.6) / 3, (1 + 0 + 4.8) / 3]], rtol=1e-6
    )


def test_a_huge_example_count_weighs_at_most_a_multiple_of_the_lower_median() -> None:
    zero = {"w": np.zeros((1, 2), np.float32)}
    strategy = FedPrune(FedAvg())  # default limits: examples_ratio 4
    sent = sorted(
        strategy.configure_train(1, to_record(zero), ConfigRecord(), StaticGrid([1, 2, 3])),
        key=lambda m: m.metadata.dst_node_id,
    )
    # Claims 10, 20 and 10**7: the median is 20, so the third weighs 80, not 10**7.
    replies = [
        sends(sent[0], [1, 1], n=10),
        sends(sent[1], [1, 1], n=20),
        sends(sent[2], [-1, 0], n=10**7),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.bounded[1] == ["node 3: num-examples 10000000 weighed as 80"]
    np.testing.assert_allclose(
        from_record(arrays)["w"], [[(10 + 20 - 80) / 110, (10 + 20) / 110]], rtol=1e-6
    )


def test_round_relative_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="norm_ratio must be 0"):
        ReplyLimits(norm_ratio=0.5)
    with pytest.raises(ValueError, match="examples_ratio must be a finite"):
        ReplyLimits(examples_ratio=float("inf"))


@pytest.mark.parametrize("inner", [FedAvg, FedMedian, Krum])
def test_replies_whose_metric_keys_differ_never_reach_the_inner_strategy_inconsistent(
    inner: type[FedAvg],
) -> None:
    """Flower's strategies raise InconsistentMessageReplies on differing keys; FedPrune never lets
    them see such replies: only the keys every accepted reply has are aggregated."""

    def aggregate(extra: bool) -> dict[str, np.ndarray]:
        strategy = FedPrune(inner(), limits=unbounded(min_replies=2))
        sent = configure(strategy, [1, 2, 3])
        replies = [good(sent[0], 1.0), good(sent[1], 3.0), good(sent[2], 2.0)]
        if extra:
            replies[0].content.metric_records[keys.METRICS]["extra-metric"] = 1.0
            replies[1].content.metric_records[keys.METRICS][keys.TRAIN_LOSS] = 0.5
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return from_record(arrays)

    got, want = aggregate(extra=True), aggregate(extra=False)
    for name in GLOBAL:
        np.testing.assert_array_equal(got[name], want[name])


def test_an_error_reply_in_a_pruning_round_is_counted_and_the_round_goes_on() -> None:
    from flwr.app import Error

    from fedprune.codec import CodecConfig, encode
    from fedprune.masks import ReconcileConfig
    from strategies.masking import DensitySchedule, MaskPolicy

    def aggregate(with_error: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        policy = MaskPolicy(
            ["w"], DensitySchedule(1.0, 0.5, 1, 1), ReconcileConfig(), server_scores=True
        )
        strategy = FedPrune(
            FedAvg(), codec_config=CodecConfig(), masking=policy, limits=unbounded(min_replies=2)
        )
        sent = configure(strategy, [1, 2, 3])
        replies = []
        for i, message in enumerate(sent[:2]):
            delta = {k: np.full(v.shape, 0.5 * (i + 1), np.float32) for k, v in GLOBAL.items()}
            content = RecordDict(
                {
                    keys.ARRAYS: to_record(encode(delta, CodecConfig())),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
                }
            )
            replies.append(Message(content=content, reply_to=message))
        if with_error:
            replies.insert(0, Message(Error(code=0, reason="node went away"), reply_to=sent[2]))
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert arrays is not None and metrics is not None and policy.mask is not None
        assert metrics[keys.NUM_REJECTED] == 0
        return from_record(arrays), policy.mask

    (got, got_mask), (want, want_mask) = aggregate(True), aggregate(False)
    np.testing.assert_array_equal(got_mask["w"], want_mask["w"])
    for name in GLOBAL:
        np.testing.assert_array_equal(got[name], want[name])
