"""Tests for fedprune.privacy: DP-SGD with Opacus on pruned models."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedprune.privacy import (
    MECHANISM_KEY,
    NOISE_MULTIPLIER_KEY,
    NUM_STEPS_KEY,
    SAMPLE_RATE_KEY,
    DPCompatibilityError,
    DPConfig,
    PrivateTrainer,
    accountant_state_from_arrays,
    accountant_state_to_arrays,
    calibrate_noise,
    dp_compatible,
    epsilon_spent,
    make_private,
    planned_total_steps,
)

torch.set_num_threads(1)

# Opacus's per-sample hooks on a first layer whose input needs no grad (harmless, from torch).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

N_FEATURES = 6
N_CLASSES = 3


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 10), nn.ReLU(), nn.Linear(10, N_CLASSES))


def _loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _masks(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.rand(10, N_FEATURES, generator=g) < 0.5,
        "2.weight": torch.rand(N_CLASSES, 10, generator=g) < 0.5,
    }


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def _epoch(trainer: PrivateTrainer) -> None:
    for x, y in trainer.loader:
        trainer.zero_grad()
        nn.functional.cross_entropy(trainer.model(x), y).backward()
        trainer.step()


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._backward_hooks for m in model.modules())


def _dp(**kw: object) -> DPConfig:
    base: dict[str, object] = {"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0}
    base.update(kw)
    return DPConfig(**base)  # type: ignore[arg-type]


# -- DPConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enabled": True}, "noise_multiplier"),
        ({"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 3.0}, "noise_multiplier"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"target_delta": 0.0}, "target_delta"),
        ({"target_delta": 1.0}, "target_delta"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"accountant": "gdp"}, "accountant"),
        ({"grad_sample_mode": "ghost"}, "grad_sample_mode"),
    ],
)
def test_dpconfig_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_dpconfig_valid_modes_and_from_run_config() -> None:
    assert DPConfig(enabled=False).noise_multiplier is None  # disabled needs neither
    assert DPConfig(enabled=True, target_epsilon=3.0).target_epsilon == 3.0
    rc = SimpleNamespace(
        dp=True,
        noise_multiplier=0.0,
        target_epsilon=4.0,
        target_delta=1e-4,
        max_grad_norm=0.5,
        accountant="prv",
    )
    cfg = DPConfig.from_run_config(rc)
    assert cfg == DPConfig(
        enabled=True, target_epsilon=4.0, target_delta=1e-4, max_grad_norm=0.5, accountant="prv"
    )
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPConfig.from_run_config(SimpleNamespace(**{**vars(rc), "target_epsilon": 0.0}))


# -- accountant state -------------------------------------------------------------------------


def test_golden_epsilon_rdp() -> None:
    state = {"history": [(1.5, 0.04, 2250)], "mechanism": "rdp"}
    eps = epsilon_spent(accountant_state_to_arrays(state), delta=1e-5)
    assert round(eps, 4) == 7.3291
    assert eps == pytest.approx(7.3291111714, abs=1e-9)


def test_empty_state_has_zero_epsilon() -> None:
    arrays = accountant_state_to_arrays({"history": [], "mechanism": "prv"})
    assert arrays[NUM_STEPS_KEY].shape == (0,)
    assert epsilon_spent(arrays, delta=1e-5) == 0.0


_history = st.lists(
    st.tuples(
        st.floats(0.0, 50.0, allow_nan=False),
        st.floats(1e-6, 1.0, exclude_min=False),
        st.integers(1, 2**40),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(history=_history, mechanism=st.sampled_from(["rdp", "prv"]))
def test_state_arrays_round_trip_exact(history: list[tuple[float, float, int]], mechanism: str):
    state = {"history": history, "mechanism": mechanism}
    arrays = accountant_state_to_arrays(state)
    assert arrays[NOISE_MULTIPLIER_KEY].dtype == np.float64
    assert arrays[SAMPLE_RATE_KEY].dtype == np.float64
    assert arrays[NUM_STEPS_KEY].dtype == np.int64
    # Through the pickle-free serialisation Flower's Array uses.
    reloaded = {}
    for key, value in arrays.items():
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        buf.seek(0)
        reloaded[key] = np.load(buf, allow_pickle=False)
    assert accountant_state_from_arrays(reloaded) == state


def test_state_arrays_through_flower_array_record() -> None:
    from flwr.app import Array, ArrayRecord

    state = {"history": [(1.1, 0.25, 4), (0.9, 0.125, 17)], "mechanism": "prv"}
    record = ArrayRecord(
        {k: Array.from_numpy_ndarray(v) for k, v in accountant_state_to_arrays(state).items()}
    )
    back = {k: record[k].numpy() for k in record}
    assert accountant_state_from_arrays(back) == state


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (MECHANISM_KEY, np.array("gdp")),
        (MECHANISM_KEY, np.array(["rdp"])),
        (NUM_STEPS_KEY, np.array([0])),
        (NUM_STEPS_KEY, np.array([1.0])),
        (SAMPLE_RATE_KEY, np.array([1.5])),
        (NOISE_MULTIPLIER_KEY, np.array([np.nan])),
        (NOISE_MULTIPLIER_KEY, np.array([1.0, 2.0])),
    ],
)
def test_state_arrays_rejects_bad_input(key: str, value: np.ndarray) -> None:
    arrays = accountant_state_to_arrays({"history": [(1.0, 0.5, 3)], "mechanism": "rdp"})
    arrays[key] = value
    with pytest.raises(ValueError, match=key):
        accountant_state_from_arrays(arrays)
    arrays = accountant_state_to_arrays({"history": [(1.0, 0.5, 3)], "mechanism": "rdp"})
    del arrays[key]
    with pytest.raises(ValueError, match=key):
        accountant_state_from_arrays(arrays)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_cumulative_over_rounds(mechanism: str) -> None:
    rounds, sigma = 3, 1.1
    cfg = _dp(noise_multiplier=sigma, accountant=mechanism)
    loader = _loader(n=32, batch_size=8)  # q = 1/4, 4 steps per epoch
    model = _mlp()
    gen = torch.Generator().manual_seed(7)
    saved: dict[str, np.ndarray] | None = None
    epsilons = []
    for _ in range(rounds):
        trainer = make_private(
            model, _sgd, loader, cfg, generator=gen, masks=_masks(), accountant_state=saved
        )
        _epoch(trainer)
        assert trainer.steps == 4
        # Persist through arrays -> state -> arrays, as context.state would.
        saved = accountant_state_to_arrays(accountant_state_from_arrays(trainer.accountant_state()))
        epsilons.append(trainer.epsilon())
        trainer.close()
    assert saved is not None
    # Histories merge: one entry (sigma, q, rounds * steps).
    assert accountant_state_from_arrays(saved)["history"] == [(sigma, 0.25, 12)]
    reference = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    reference.history = [(sigma, 0.25, rounds * 4)]
    expected = reference.get_epsilon(delta=1e-5)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-12)
    assert epsilon_spent(saved, delta=1e-5) == pytest.approx(expected, rel=1e-12)
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_accountant_mismatch_rejected() -> None:
    saved = accountant_state_to_arrays({"history": [(1.0, 0.25, 4)], "mechanism": "prv"})
    with pytest.raises(ValueError, match="accountant"):
        make_private(
            _mlp(),
            _sgd,
            _loader(),
            _dp(accountant="rdp"),
            generator=torch.Generator(),
            accountant_state=saved,
        )


# -- masks ------------------------------------------------------------------------------------


MODES = ["hooks", "functorch", "ew"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make_opt", [_sgd, _adam], ids=["sgd-momentum", "adam"])
def test_pruned_coordinates_stay_exactly_zero(make_opt, mode: str) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Opacus-style "_module." names are accepted too.
    masks = {"_module.0.weight": _masks()["0.weight"], "2.weight": _masks()["2.weight"]}
    trainer = make_private(
        model,
        make_opt,
        _loader(),
        _dp(grad_sample_mode=mode),
        generator=torch.Generator().manual_seed(0),
        masks=masks,
    )
    assert trainer.module is model
    for _ in range(3):
        _epoch(trainer)
    params = dict(model.named_parameters())
    for name, keep in _masks().items():
        p = params[name]
        assert torch.all(p[~keep] == 0.0)
        assert not torch.equal(p[keep], before[name][keep])  # live weights trained
        assert p.grad is not None
        assert torch.all(p.grad[~keep] == 0.0)  # noised gradient masked before the step
        state = trainer.optimizer.state[p]
        assert state, "optimizer state must exist after steps"
        for value in state.values():
            if value.shape == p.shape:
                assert torch.all(value[~keep] == 0.0)
                assert torch.any(value[keep] != 0.0)
    assert list(model.state_dict()) == list(before)  # no "_module." prefix, no prune hooks
    assert trainer.close() is model
    assert not _has_hooks(model)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_masks_applied_before_first_step() -> None:
    model = _mlp()
    make_private(model, _sgd, _loader(), _dp(), generator=torch.Generator(), masks=_masks())
    for name, keep in _masks().items():
        assert torch.all(model.state_dict()[name][~keep] == 0.0)


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({"3.weight": torch.ones(3, 10, dtype=torch.bool)}, "3.weight"),
        ({"0.weight": torch.ones(10, 5, dtype=torch.bool)}, "shape"),
        ({"0.weight": torch.ones(10, N_FEATURES)}, "boolean"),
    ],
)
def test_bad_masks_rejected(masks: dict[str, torch.Tensor], match: str) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        make_private(model, _sgd, _loader(), _dp(), generator=torch.Generator(), masks=masks)
    assert not _has_hooks(model)  # rejected before Opacus touched the model


def test_numpy_masks_accepted() -> None:
    model = _mlp()
    masks = {k: v.numpy() for k, v in _masks().items()}
    trainer = make_private(model, _adam, _loader(), _dp(), generator=torch.Generator(), masks=masks)
    _epoch(trainer)
    weight = dict(model.named_parameters())["0.weight"]
    assert torch.all(weight[~torch.from_numpy(masks["0.weight"])] == 0.0)


# -- clipping ---------------------------------------------------------------------------------


def _reference_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, keep: dict[str, torch.Tensor], c: float
) -> dict[str, torch.Tensor]:
    """Per-sample grads, masked, clipped to c over all live coordinates, summed."""
    names = [n for n, _ in model.named_parameters()]
    per_sample = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        }
        for n, k in keep.items():
            grads[n][~k] = 0.0
        per_sample.append(grads)
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for grads in per_sample:
        norm = torch.sqrt(torch.stack([(grads[n] ** 2).sum() for n in names]).sum())
        factor = min(1.0, c / (float(norm) + 1e-6))
        for n in names:
            out[n] += factor * grads[n]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_clipping_spent_on_live_coordinates_only(mode: str) -> None:
    c = 0.05  # small: every sample is clipped
    model = _mlp()
    keep = _masks()
    trainer = make_private(
        model,
        _sgd,
        _loader(),
        _dp(max_grad_norm=c, grad_sample_mode=mode),
        generator=torch.Generator(),
        masks=keep,
    )
    trainer.optimizer.noise_multiplier = 0.0  # test only: clipping without noise
    ref_model = _mlp()
    ref_model.load_state_dict(model.state_dict())  # masked initial weights
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, N_FEATURES, generator=g) * 5
    y = torch.randint(0, N_CLASSES, (6,), generator=g)
    expected = _reference_clipped_sum(ref_model, x, y, keep, c)

    trainer.zero_grad()
    nn.functional.cross_entropy(trainer.model(x), y).backward()
    trainer.step()
    for name, p in model.named_parameters():
        summed_grad = p.summed_grad  # type: ignore[attr-defined]  # Opacus: clipped sum
        torch.testing.assert_close(summed_grad, expected[name], rtol=1e-4, atol=1e-7)

    # Batch of one: the clipped gradient has norm exactly c on the live coordinates.
    trainer.zero_grad()
    nn.functional.cross_entropy(trainer.model(x[:1]), y[:1]).backward()
    trainer.step()
    params = dict(model.named_parameters())
    summed = {n: p.summed_grad for n, p in params.items()}  # type: ignore[attr-defined]
    norm = torch.sqrt(torch.stack([(v**2).sum() for v in summed.values()]).sum())
    assert float(norm) <= c * (1 + 1e-5)
    assert float(norm) == pytest.approx(c, rel=1e-4)
    for name, k in keep.items():
        assert torch.all(summed[name][~k] == 0.0)


# -- noise calibration ------------------------------------------------------------------------


def test_calibrated_sigma_meets_target() -> None:
    cfg = DPConfig(enabled=True, target_epsilon=2.0, target_delta=1e-5)
    sigma = calibrate_noise(cfg, sample_rate=0.05, total_steps=300)
    acc = RDPAccountant()
    acc.history = [(sigma, 0.05, 300)]
    eps = acc.get_epsilon(delta=1e-5)
    assert eps <= 2.0
    assert eps > 2.0 - cfg.epsilon_tolerance
    acc.history = [(sigma * 0.98, 0.05, 300)]
    assert acc.get_epsilon(delta=1e-5) > eps  # less noise, more epsilon


def test_target_epsilon_sigma_stable_across_rounds() -> None:
    cfg = DPConfig(enabled=True, target_epsilon=5.0, target_delta=1e-5)
    loader = _loader(n=32, batch_size=8)
    total = planned_total_steps(loader, num_rounds=3, local_epochs=1)
    assert total == 12
    model = _mlp()
    gen = torch.Generator().manual_seed(0)
    saved: dict[str, np.ndarray] | None = None
    sigmas = []
    for _ in range(3):
        trainer = make_private(
            model, _sgd, loader, cfg, generator=gen, accountant_state=saved, total_steps=total
        )
        _epoch(trainer)
        saved = trainer.accountant_state()
        sigmas.append(trainer.noise_multiplier)
        trainer.close()
    assert saved is not None
    assert sigmas[0] == sigmas[1] == sigmas[2]
    assert sigmas[0] == calibrate_noise(cfg, sample_rate=0.25, total_steps=12)
    assert accountant_state_from_arrays(saved)["history"] == [(sigmas[0], 0.25, 12)]
    final = epsilon_spent(saved, delta=1e-5)
    assert 5.0 - cfg.epsilon_tolerance < final <= 5.0


def test_target_epsilon_requires_total_steps() -> None:
    cfg = DPConfig(enabled=True, target_epsilon=5.0)
    with pytest.raises(ValueError, match="total_steps"):
        make_private(_mlp(), _sgd, _loader(), cfg, generator=torch.Generator())
    with pytest.raises(ValueError, match="total_steps"):
        calibrate_noise(cfg, sample_rate=0.1, total_steps=0)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(cfg, sample_rate=1.5, total_steps=10)


def test_planned_steps_match_opacus_loader() -> None:
    # len(loader) == 93 -> Opacus runs int(1 / (1 / 93)) == 92 batches per epoch.
    loader = _loader(n=93, batch_size=1)
    assert planned_total_steps(loader, num_rounds=2, local_epochs=3) == 2 * 3 * 92
    trainer = make_private(_mlp(), _sgd, loader, _dp(), generator=torch.Generator())
    assert isinstance(trainer.loader, DPDataLoader)
    assert len(trainer.loader) == 92
    assert trainer.sample_rate == 1 / 92
    with pytest.raises(ValueError, match="num_rounds"):
        planned_total_steps(loader, num_rounds=0, local_epochs=1)


# -- randomness, models -----------------------------------------------------------------------


def test_same_generator_seed_same_training() -> None:
    results = []
    for _ in range(2):
        model = _mlp()
        trainer = make_private(
            model, _sgd, _loader(), _dp(), generator=torch.Generator().manual_seed(5)
        )
        _epoch(trainer)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    model = _mlp()
    trainer = make_private(
        model, _sgd, _loader(), _dp(), generator=torch.Generator().manual_seed(6)
    )
    _epoch(trainer)
    assert not torch.equal(
        results[0], torch.cat([p.detach().flatten() for p in model.parameters()])
    )


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class ScaleWithBuffer(nn.Module):
    """A trainable layer with a buffer: Opacus cannot make it private, nor fix it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_batchnorm_model_fixed_automatically() -> None:
    model = ConvBN().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    y = torch.randint(0, N_CLASSES, (16,), generator=g)
    keep = {"conv.weight": torch.rand(4, 1, 3, 3, generator=g) < 0.5}
    trainer = make_private(
        model,
        _sgd,
        DataLoader(TensorDataset(x, y), batch_size=4),
        _dp(),
        generator=g,
        masks=keep,
    )
    module = trainer.module
    assert isinstance(module, ConvBN)
    assert module is not model
    assert isinstance(module.bn, nn.GroupNorm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    assert module.training
    assert torch.equal(module.fc.weight, model.fc.weight)  # weights carried over
    _epoch(trainer)
    assert torch.all(module.conv.weight[~keep["conv.weight"]] == 0.0)
    # The fixed model is what dp_compatible builds; a valid model comes back as is.
    assert dp_compatible(module) is module


def test_unfixable_model_clear_error_before_training() -> None:
    called = []

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        called.append(True)
        return _sgd(params)

    model = nn.Sequential(nn.Linear(N_FEATURES, N_CLASSES), ScaleWithBuffer(N_CLASSES))
    with pytest.raises(DPCompatibilityError, match="buffers") as info:
        make_private(model, factory, _loader(), _dp(), generator=torch.Generator())
    assert isinstance(info.value, ValueError)
    assert info.value.reasons
    assert not called


def test_disabled_config_rejected() -> None:
    with pytest.raises(ValueError, match="enabled"):
        make_private(_mlp(), _sgd, _loader(), DPConfig(), generator=torch.Generator())


def test_bench_dp_smoke() -> None:
    from simulations.bench_dp import bench_dp

    result = bench_dp(steps=2, warmup=1)
    keys = {"dp_step_time_ratio", "dp_step_ms", "plain_step_ms"}
    keys |= {f"dp_step_time_ratio_{m}" for m in MODES}
    assert set(result) == keys
    assert all(math.isfinite(v) and v > 0.0 for v in result.values())
    assert result["dp_step_time_ratio"] == result["dp_step_time_ratio_hooks"]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_empty_poisson_batch_is_a_noise_only_step(mode: str) -> None:
    model = _mlp()
    keep = _masks()
    trainer = make_private(
        model,
        _sgd,
        _loader(),
        _dp(grad_sample_mode=mode),
        generator=torch.Generator().manual_seed(0),
        masks=keep,
    )
    weight = dict(model.named_parameters())["0.weight"]
    before = weight.detach().clone()
    trainer.zero_grad()
    x, y = torch.zeros(0, N_FEATURES), torch.zeros(0, dtype=torch.long)
    nn.functional.cross_entropy(trainer.model(x), y).backward()  # NaN loss, empty grad samples
    trainer.step()
    after = weight.detach()
    assert torch.isfinite(after).all()
    assert torch.all(after[~keep["0.weight"]] == 0.0)
    assert torch.all(after[keep["0.weight"]] != before[keep["0.weight"]])  # noise moved them
    assert accountant_state_from_arrays(trainer.accountant_state())["history"] == [(1.1, 0.25, 1)]


@pytest.mark.parametrize("dp", [False, True])
def test_the_client_reports_its_training_loss_only_without_dp(dp: bool, tmp_path: Path) -> None:
    """The loss on private batches is not noised: under DP it never leaves the node."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from boundary.records import to_record
    from clients import client_app
    from fedprune import keys, task
    from fedprune.config import RunConfig
    from fedprune.models import get_weights
    from simulations.grid import server_task_identity

    cfg = RunConfig(
        strategy="fedavg",
        target_density=1.0,
        results_dir=str(tmp_path),
        dp=dp,
        noise_multiplier=1.0 if dp else 0.0,
    )
    node: dict[str, bool | float | int | str] = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 4}
    context = Context(1, 7, node, RecordDict(), {})
    content = RecordDict(
        {
            keys.ARRAYS: to_record(get_weights(task.new_model(cfg))),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
        }
    )
    with server_task_identity():
        message = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
        reply = client_app.train(message, context, cfg)
    metrics = reply.content.metric_records[keys.METRICS]
    assert (keys.TRAIN_LOSS in metrics) == (not dp)
    assert (keys.EPSILON in metrics) == dp


def test_planned_steps_are_capped_by_local_steps() -> None:
    loader = _loader(n=93, batch_size=1)  # 92 Opacus batches per epoch
    assert planned_total_steps(loader, num_rounds=2, local_epochs=3, local_steps=50) == 2 * 50
    assert planned_total_steps(loader, num_rounds=2, local_epochs=1, local_steps=500) == 2 * 92
    assert planned_total_steps(loader, num_rounds=2, local_epochs=1, local_steps=0) == 2 * 92
    with pytest.raises(ValueError, match="local_steps"):
        planned_total_steps(loader, num_rounds=1, local_epochs=1, local_steps=-1)


@pytest.mark.parametrize(("local_steps", "taken"), [(0, None), (5, 5), (15, 15)])
def test_local_steps_cap_the_steps_a_round_takes(local_steps: int, taken: int | None) -> None:
    # 2 epochs of a digits partition; 0 = no cap: every batch of both epochs.
    from fedprune import task
    from fedprune.config import RunConfig

    cfg = RunConfig(
        dataset="digits",
        batch_size=64,
        local_epochs=2,
        local_steps=local_steps,
        dp=True,
        noise_multiplier=1.0,
        target_density=1.0,
    )
    data = task.local_train_data(cfg, 0, 2)
    per_epoch = int(1 / (1 / math.ceil(len(data) / cfg.batch_size)))
    assert per_epoch < 15 < 2 * per_epoch  # the cap of 15 stops in the second epoch
    if taken is None:
        taken = 2 * per_epoch
    result = task.train(cfg, task.new_model(cfg), data, masks=None, server_round=1, node_seed=0)
    assert result.accountant_state is not None
    assert int(result.accountant_state[NUM_STEPS_KEY].sum()) == taken
