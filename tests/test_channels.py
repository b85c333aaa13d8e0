"""Tests for fedprune.channels: graph, selection, reconciliation, wire form, shrink, DP, codec."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedprune import channels as ch
from fedprune import codec, keys, task
from fedprune.config import ConfigError, RunConfig
from fedprune.data import load_dataset
from fedprune.export import footprint, load_shrunk, save_shrunk
from fedprune.models import build_model, get_weights
from fedprune.privacy import PrivateTrainer
from fedprune.pruning import apply_mask

torch.set_num_threads(1)


def tiny_chain() -> nn.Sequential:
    """Conv(2->4) GroupNorm(2 groups) ReLU Flatten Linear(4*9 -> 3), inputs (2, 3, 3)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial norm parameters and biases (defaults are ones and zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen))


def torch_masks(masks: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in masks.items()}


# -- graph -----------------------------------------------------------------------------------


def test_graph_of_a_tiny_chain_hand_checked() -> None:
    graph = ch.channel_graph(tiny_chain(), (2, 3, 3))
    assert len(graph.groups) == 1
    g = graph.groups[0]
    assert (g.name, g.size, g.unit) == ("0.weight", 4, 2)
    assert g.rows == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert g.cols == (("4.weight", 9),)
    assert g.scored == ("0.weight",)
    mask = {"0.weight": np.array([True, True, False, False])}
    em = ch.expand(graph, mask)
    assert em["0.weight"].shape == (4, 2, 3, 3)
    assert em["0.weight"][:2].all() and not em["0.weight"][2:].any()
    assert em["1.bias"].tolist() == [True, True, False, False]
    assert em["4.weight"][:, :18].all() and not em["4.weight"][:, 18:].any()
    assert em["4.bias"].all()  # depends on no group
    # 4*2*9 + 4 + 4 + 4 conv/norm, 3*36 + 3 linear; half the channels go.
    assert graph.num_params == 72 + 12 + 108 + 3
    assert ch.kept_params(graph, mask) == 36 + 6 + 54 + 3


def test_resnet18_graph_shares_the_residual_stream() -> None:
    model = build_model("resnet18", input_shape=(1, 8, 8), num_classes=10)
    graph = ch.channel_graph(model)
    by_name = {g.name: g for g in graph.groups}
    # One stream per stage + one inner group per block.
    assert len(graph.groups) == 4 + 8
    stem = by_name["stream:conv1"]
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer1.1.bn2.bias"} <= set(
        stem.rows
    )
    assert ("layer2.0.downsample.0.weight", 1) in stem.cols
    last = by_name["stream:layer4.0"]
    assert ("fc.weight", 1) in last.cols
    assert last.unit == 512 // 32
    # Every parameter except the classifier's bias depends on some group.
    covered = {t for g in graph.groups for t in g.rows} | {
        t for g in graph.groups for t, _ in g.cols
    }
    assert set(graph.shapes) - covered == {"fc.bias"}


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), "Softmax"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), "grouped"),
        (nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 2)), "reads 5 inputs"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm"),
        (nn.Sequential(nn.ReLU()), "no Linear or Conv"),
        (Residual(), "not supported"),
    ],
)
def test_unsupported_models_are_rejected(model: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ch.channel_graph(model, (4,))


# -- selection and reconciliation ------------------------------------------------------------


def test_selection_hand_computed() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    graph = ch.channel_graph(model)
    # 8 + 4 + 4 + 1 = 17 parameters, 4.25 per hidden channel (weight row, bias, next column).
    scores = {"0.weight": np.array([3.0, 1.0, 2.0, 2.0], dtype=np.float32)}
    # Half: drop the lowest (1), then the tie at 2 goes to the earlier index kept -> drop 2.
    mask = ch.select_channels(graph, scores, 9 / 17)
    assert mask["0.weight"].tolist() == [True, False, False, True]
    assert ch.kept_params(graph, mask) == 9
    # Never the last channel of a group, however low the density.
    mask = ch.select_channels(graph, scores, 0.01)
    assert mask["0.weight"].tolist() == [True, False, False, False]
    # Monotone: a channel outside the prior stays out even if it now scores best.
    prior = {"0.weight": np.array([False, True, True, True])}
    mask = ch.select_channels(graph, scores, 1.0, prior)
    assert mask["0.weight"].tolist() == [False, True, True, True]


@pytest.mark.parametrize("rule", ["topk", "majority", "intersection", "union"])
def test_reconciliation_is_independent_of_reply_order(rule: Any) -> None:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(8, 16))
    graph = ch.channel_graph(model, (1, 8, 8))
    plan = ch.ChannelPruning(graph)
    rng = np.random.default_rng(3)
    votes: list[dict[str, Any]] = []
    weights = [30.0, 12.0, 30.0, 7.0]
    for _ in weights:
        scores = {g.name: rng.random(g.size).astype(np.float32) for g in graph.groups}
        votes.append(plan.own_vote(scores, rule=rule, density=0.4, prior=None))
    results = []
    for perm in itertools.permutations(range(len(votes))):
        results.append(
            plan.reconcile(
                [votes[i] for i in perm],
                [weights[i] for i in perm],
                rule=rule,
                threshold=0.5,
                density=0.4,
                prior=None,
            )
        )
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in results[0])
    if rule == "topk":
        kept = ch.kept_params(graph, ch.channel_mask_of(graph, results[0]))
        assert kept <= round(0.4 * graph.num_params)


def test_topk_reconciliation_is_example_weighted() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    graph = ch.channel_graph(model)
    a = {"0.weight": np.array([1.0, 0.0], dtype=np.float32)}
    b = {"0.weight": np.array([0.0, 1.0], dtype=np.float32)}
    plan = ch.ChannelPruning(graph)
    for wa, wb, want in [(3.0, 1.0, [True, False]), (1.0, 3.0, [False, True])]:
        got = plan.reconcile([a, b], [wa, wb], rule="topk", threshold=0.5, density=0.5, prior=None)
        assert ch.channel_mask_of(graph, got)["0.weight"].tolist() == want


# -- wire form and malformed votes -----------------------------------------------------------


@pytest.fixture
def cnn_plan() -> ch.ChannelPruning:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(6, 5))
    return ch.ChannelPruning(ch.channel_graph(model, (1, 8, 8)))


def test_channel_mask_travels_as_one_bit_per_channel(cnn_plan: ch.ChannelPruning) -> None:
    graph = cnn_plan.graph
    assert graph.num_channels == 11
    weights = {n: np.ones(s, dtype=np.float32) for n, s in graph.shapes.items()}
    masks = cnn_plan.initial_mask(weights, 0.5)
    wire = cnn_plan.wire_mask(masks)
    assert set(wire) == {keys.CHANNEL_BITS}
    assert wire[keys.CHANNEL_BITS].dtype == np.uint8 and wire[keys.CHANNEL_BITS].nbytes == 2
    back = cnn_plan.read_mask(wire)
    assert all(np.array_equal(back[k], masks[k]) for k in masks)
    vote = ch.channel_mask_of(graph, masks)
    encoded = cnn_plan.encode_vote(vote, "majority")
    assert encoded[keys.CHANNEL_BITS].nbytes == 2
    density = ch.kept_params(graph, vote) / graph.num_params
    got = cnn_plan.read_vote(encoded, "majority", density)
    assert all(np.array_equal(got[k], vote[k]) for k in vote)


def test_malformed_channel_votes_are_rejected_with_a_reason(
    cnn_plan: ch.ChannelPruning,
) -> None:
    graph = cnn_plan.graph
    full = {g.name: np.ones(g.size, dtype=np.bool_) for g in graph.groups}
    good = ch.pack_channel_mask(graph, full)  # 11 ones, then 5 zero padding bits
    cases: list[tuple[dict[str, np.ndarray], str, float, str]] = [
        ({keys.CHANNEL_BITS: good[:1]}, "majority", 1.0, "must be 2 uint8 bytes"),
        ({keys.CHANNEL_BITS: np.append(good, 0).astype(np.uint8)}, "majority", 1.0, "2 uint8"),
        ({keys.CHANNEL_BITS: good | np.array([0, 1], np.uint8)}, "majority", 1.0, "padding"),
        ({keys.CHANNEL_BITS: good}, "majority", 0.3, "asked for 0.3000"),
        ({keys.CHANNEL_BITS: np.zeros(2, np.uint8)}, "majority", 1.0, "removes every channel"),
        ({keys.CHANNEL_SCORES: np.ones(10, np.float32)}, "topk", 1.0, r"expected \(11,\)"),
        ({keys.CHANNEL_SCORES: np.ones(11, np.float64)}, "topk", 1.0, "float32"),
        ({keys.CHANNEL_SCORES: np.full(11, np.nan, np.float32)}, "topk", 1.0, "finite"),
        ({keys.CHANNEL_BITS: good}, "topk", 1.0, "expected"),
    ]
    for arrays, rule, density, match in cases:
        with pytest.raises(ValueError, match=match):
            cnn_plan.read_vote(arrays, rule, density)  # type: ignore[arg-type]


def test_a_vote_that_splits_a_groupnorm_group_is_rejected() -> None:
    graph = ch.channel_graph(tiny_chain(), (2, 3, 3))
    bits = np.packbits(np.array([1, 0, 1, 1], dtype=np.bool_))
    with pytest.raises(ValueError, match="splits a unit of 2 channels"):
        ch.unpack_channel_mask(graph, bits)


# -- the smaller network ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("mlp", (1, 8, 8), {}),
        ("cnn", (1, 28, 28), {}),
        ("resnet18", (3, 16, 16), {}),
    ],
)
def test_shrunk_model_equals_masked_model(
    name: str, shape: tuple[int, ...], kwargs: dict[str, Any], tmp_path: Path
) -> None:
    model = build_model(
        name, input_shape=shape, num_classes=10, generator=torch.Generator().manual_seed(0)
    )
    randomize(model, 1)
    model.eval()
    graph = ch.channel_graph(model, shape)
    plan = ch.ChannelPruning(graph, "l2")
    masks = plan.initial_mask(get_weights(model), 0.3)
    mask = ch.channel_mask_of(graph, masks)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    dense_out = model(x).detach()
    apply_mask(model, torch_masks(masks))
    small = ch.shrink(model, graph, mask)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == ch.kept_params(graph, mask) <= round(0.3 * graph.num_params)
    assert n_small > 0.25 * graph.num_params
    with torch.no_grad():
        want, got = model(x), small(x)
    assert not torch.allclose(dense_out, want, atol=1e-3)  # pruning changed the function
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cost = footprint(small, shape, repeats=2)
    assert cost.params == n_small
    assert cost.macs_per_example < ch.model_macs(model, shape)
    # The export loads and runs: the same architecture, int8 weights.
    size = save_shrunk(tmp_path / "m.npz", small, plan, masks)
    assert size < 0.3 * 4 * graph.num_params
    loaded = load_shrunk(tmp_path / "m.npz", model, plan).eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == want.shape and bool(torch.isfinite(out).all())


# -- composition: DP and the codec keep removed channels at exactly zero ---------------------


def test_removed_channels_and_dependents_stay_zero_after_every_dp_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = RunConfig(
        model="cnn",
        dp=True,
        noise_multiplier=1.0,
        batch_size=64,
        prune_granularity="channel",
        lr=0.5,
    )
    model = task.new_model(cfg)
    plan = task.channel_pruning(cfg, model)
    assert plan is not None
    masks = plan.initial_mask(get_weights(model), 0.3)
    pruned = {k: ~m for k, m in masks.items() if not m.all()}
    assert {"0.bias", "3.weight", "3.bias", "7.weight"} <= set(pruned)
    steps = []
    original = PrivateTrainer.step

    def checked_step(self: PrivateTrainer) -> None:
        original(self)
        params = dict(self.module.named_parameters())
        for name, gone in pruned.items():
            assert torch.all(params[name].detach()[torch.from_numpy(gone)] == 0.0), name
        steps.append(1)

    monkeypatch.setattr(PrivateTrainer, "step", checked_step)
    data = task.local_train_data(cfg, 0, 8)
    result = task.train(cfg, model, data, masks=torch_masks(masks), server_round=1, node_seed=0)
    assert len(steps) >= 3
    for name, gone in pruned.items():
        assert np.all(result.weights[name][gone] == 0.0)
    # The vote comes from the DP-trained weights only (magnitude: post-processing).
    vote = task.channel_vote(
        cfg, plan, model, data, density=0.3, masks=torch_masks(masks), node_seed=0, server_round=1
    )
    assert set(vote) == {keys.CHANNEL_SCORES}
    flat = vote[keys.CHANNEL_SCORES]
    removed = ch.flatten(
        plan.graph, {k: ~v for k, v in ch.channel_mask_of(plan.graph, masks).items()}
    )
    assert np.all(flat[removed.astype(bool)] == 0.0)


@pytest.mark.parametrize(
    "config",
    [
        codec.CodecConfig(quant="int8-channel", entropy=True),
        codec.CodecConfig(quant="int8", entropy=False, topk=0.25),
        codec.CodecConfig(quant="none", entropy=True),
    ],
)
def test_codec_round_trip_keeps_removed_channels_zero_and_skips_them(
    config: codec.CodecConfig,
) -> None:
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    randomize(model, 4)
    plan = ch.ChannelPruning(ch.channel_graph(model, (1, 28, 28)))
    weights = get_weights(model)
    masks = plan.initial_mask(weights, 0.3)
    decoded = codec.decode(codec.encode(weights, config, masks=masks), masks=masks)
    for name, keep in masks.items():
        assert np.all(decoded[name][~keep] == 0.0), name
    # An update of a model trained under the mask is zero at removed entries, and so is what
    # error feedback carries over.
    dense = codec.encode(weights, config)
    weights = {k: np.where(masks[k], w, np.float32(0.0)) for k, w in weights.items()}
    payload = codec.encode(weights, config, masks=masks, send_masks=False)
    decoded = codec.decode(payload, masks=masks)
    for name, keep in masks.items():
        assert np.all(decoded[name][~keep] == 0.0), name
    res = codec.residual(weights, payload, masks=masks)
    for name, keep in masks.items():
        assert np.all(res[name][~keep] == 0.0), name
    # Removed channels and their dependents are not sent: ~30 % of the values travel.
    sparse_bytes = sum(a.nbytes for a in payload.values())
    dense_bytes = sum(a.nbytes for a in dense.values())
    assert sparse_bytes < 0.45 * dense_bytes, (sparse_bytes, dense_bytes)


def test_distillation_and_channel_pruning_compose() -> None:
    cfg = RunConfig(
        model="mlp-small", distill=True, teacher_model="mlp", prune_granularity="channel"
    )
    model = task.new_model(cfg)
    plan = task.channel_pruning(cfg, model)
    assert plan is not None
    masks = plan.initial_mask(get_weights(model), 0.5)
    data = task.local_train_data(cfg, 0, 8)
    teacher = task.new_teacher(cfg, 0)
    result = task.train(
        cfg, model, data, masks=torch_masks(masks), server_round=1, node_seed=0, teacher=teacher
    )
    for name, keep in masks.items():
        assert np.all(result.weights[name][~keep] == 0.0), name


def test_config_rejects_channel_pruning_without_the_compressed_strategy() -> None:
    with pytest.raises(ConfigError, match="prune-granularity"):
        RunConfig(strategy="fedavg", target_density=1.0, prune_granularity="channel")
    with pytest.raises(ConfigError, match="channel-norm"):
        RunConfig.from_mapping({"channel-norm": "l3"})


def test_digits_shape_is_what_the_graph_needs() -> None:
    train, _ = load_dataset("digits")
    model = build_model("cnn", input_shape=train.input_shape, num_classes=10)
    graph = ch.channel_graph(copy.deepcopy(model), train.input_shape)
    assert [g.size for g in graph.groups] == [32, 64]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "rule", "extra"),
    [
        # Round 3's downlink is a top-k delta to nodes that lack the new mask: channel bits only.
        ("magnitude", "topk", {"delta_downlink": True, "update_topk": 0.25}),
        ("sensitivity", "majority", {}),
    ],
)
def test_channel_pruned_run_end_to_end(
    tmp_path: Path, method: str, rule: str, extra: dict[str, Any]
) -> None:
    from simulations.simulate import simulate
    from strategies.server_app import MODEL_FILE

    cfg = RunConfig(
        run_name="channels",
        results_dir=str(tmp_path),
        num_server_rounds=3,
        prune_start_round=1,
        prune_end_round=2,
        target_density=0.3,
        prune_granularity="channel",
        prune_method=method,  # type: ignore[arg-type]
        reconcile_rule=rule,  # type: ignore[arg-type]
    ).replace(**extra)
    summary = simulate(cfg, num_supernodes=2, num_cpus=2)
    model = task.new_model(cfg)
    plan = task.channel_pruning(cfg, model)
    assert plan is not None
    assert 0.25 < summary.density <= 0.3
    assert summary.params_compact == pytest.approx(summary.density * plan.graph.num_params, abs=1)
    assert summary.final_accuracy > 0.3
    small = load_shrunk(tmp_path / "channels" / MODEL_FILE, model, plan)
    assert sum(p.numel() for p in small.parameters()) == summary.params_compact
    _, test = load_dataset("digits")
    assert task.evaluate(small, test)[1] == summary.compact_accuracy


# -- the server hook on real Flower messages -------------------------------------------------


def _strategy_setup(initial: float = 1.0) -> tuple[Any, ch.ChannelPruning, dict[str, np.ndarray]]:
    from flwr.serverapp.strategy import FedAvg

    from fedprune.masks import ReconcileConfig
    from strategies.masking import DensitySchedule, MaskPolicy
    from strategies.strategy import FedPrune
    from strategies.validation import ReplyLimits

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = ch.ChannelPruning(ch.channel_graph(model))
    masking = MaskPolicy(
        ["0.weight", "2.weight"],
        DensitySchedule(initial=initial, final=0.5, start_round=1, end_round=1),
        ReconcileConfig(rule="majority"),
        server_scores=False,
        channels=plan,
    )
    strategy = FedPrune(
        FedAvg(min_available_nodes=3, min_train_nodes=3),
        codec_config=codec.CodecConfig(quant="none"),
        masking=masking,
        limits=ReplyLimits(examples_ratio=0.0, norm_ratio=0.0),
    )
    return strategy, plan, get_weights(model)


def _channel_replies(
    sent: list[Any], weights: dict[str, np.ndarray], votes: list[Any]
) -> list[Any]:
    from flwr.app import Message, MetricRecord, RecordDict

    from boundary.records import to_record

    zero = {k: np.zeros_like(v) for k, v in weights.items()}
    out = []
    for message, (vote, n) in zip(sent, votes, strict=True):
        update = codec.encode(zero, codec.CodecConfig(quant="none"))
        content = RecordDict(
            {keys.ARRAYS: to_record(update), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n})}
        )
        if vote is not None:
            content[keys.CHANNEL_VOTE] = to_record(vote)
        out.append(Message(content=content, reply_to=message))
    return out


def test_server_hook_reconciles_channel_votes_and_rejects_malformed_ones() -> None:
    from flwr.app import ConfigRecord

    from boundary.records import to_record
    from simulations.grid import StaticGrid, server_task_identity

    def vote(kept: list[int]) -> dict[str, np.ndarray]:
        mask = {"0.weight": np.isin(np.arange(8), kept)}
        return plan.encode_vote(mask, "majority")

    with server_task_identity():
        _, plan, _ = _strategy_setup()
        half = [0, 1, 2, 3]  # 4 of 8 hidden units: (4*4 + 4 + 3*4) + 3 = 35 of 67 params
        good = [(vote(half), 5), (vote([0, 1, 2, 4]), 3)]
        bad_len = {keys.CHANNEL_BITS: np.zeros(2, np.uint8)}  # 8 channels fit in 1 byte
        masks = []
        for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
            strategy, plan, weights = _strategy_setup()
            sent = sorted(
                strategy.configure_train(
                    1, to_record(weights), ConfigRecord(), StaticGrid([1, 2, 3])
                ),
                key=lambda m: m.metadata.dst_node_id,
            )
            assert all(keys.CHANNEL_MASK in m.content for m in sent)
            ballots = [*good, (bad_len, 9)]
            replies = _channel_replies(sent, weights, [ballots[i] for i in order])
            _, metrics = strategy.aggregate_train(1, replies)
            assert metrics[keys.NUM_REJECTED] == 1  # the malformed vote rejects its reply
            masking = strategy.masking
            assert masking.mask is not None and masking.version == 2
            masks.append(ch.channel_mask_of(plan.graph, masking.mask)["0.weight"])
        # The malformed vote (its weight 9 would win) is dropped; the 5-example vote wins.
        for m in masks:
            assert m.tolist() == np.isin(np.arange(8), [0, 1, 2, 3]).tolist()


def test_payload_sends_channel_bits_instead_of_element_mask_bits() -> None:
    from flwr.app import ConfigRecord

    from boundary.records import from_record, to_record
    from simulations.grid import StaticGrid, server_task_identity

    with server_task_identity():
        strategy, plan, weights = _strategy_setup(initial=0.5)
        sent = list(
            strategy.configure_train(1, to_record(weights), ConfigRecord(), StaticGrid([1, 2, 3]))
        )
        masking = strategy.masking
        for message in sent:
            arrays = from_record(message.content.array_records[keys.ARRAYS])
            assert codec.payload_masks(arrays) == {}
            bits = from_record(message.content.array_records[keys.CHANNEL_MASK])
            assert bits[keys.CHANNEL_BITS].nbytes == 1  # 8 hidden channels, one bit each
            decoded = codec.decode(arrays, masks=plan.read_mask(bits))
            assert masking.mask is not None
            for name, keep in masking.mask.items():
                assert np.all(decoded[name][~keep] == 0.0)
