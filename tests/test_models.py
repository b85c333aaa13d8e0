"""Tests of fedprune.models: architectures, initialisation, weights as numpy dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.validators import ModuleValidator
from torch import nn
from torchvision.models import ResNet

from fedprune.models import MODELS, build_model, get_weights, model_num_params, set_weights

torch.set_num_threads(1)

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def conv_params(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def resnet18_params(c_in: int, num_classes: int) -> int:
    """ResNet-18 with a 3x3 stem, counted block by block (GroupNorm: weight + bias)."""
    norm = 2
    total = conv_params(c_in, 64, bias=False) + norm * 64
    c = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            total += conv_params(c, width, bias=False) + norm * width
            total += conv_params(width, width, bias=False) + norm * width
            if block == 0 and c != width:  # 1x1 stride-2 downsample
                total += conv_params(c, width, k=1, bias=False) + norm * width
            c = width
    return total + linear_params(512, num_classes)


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_dtypes(name: str, dataset: str) -> None:
    shape = SHAPES[dataset]
    model = build_model(name, input_shape=shape, num_classes=10)
    out = model(torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert ModuleValidator.validate(model, strict=False) == []


def test_mlp_accepts_flat_inputs_and_custom_widths() -> None:
    model = build_model("mlp", input_shape=(64,), num_classes=3, hidden=(5,))
    assert model(torch.zeros(4, 64)).shape == (4, 3)
    assert isinstance(model, nn.Sequential)
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    linear = build_model("mlp", input_shape=(64,), num_classes=3, hidden=())
    assert model_num_params(linear) == 64 * 3 + 3


def test_cnn_layout() -> None:
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(model, nn.Sequential)
    assert [type(m) for m in model] == [
        nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear
    ]  # fmt: skip
    assert model[-1].in_features == 64 * 7 * 7


# Hand-computed counts, as in the module docstring's table.
EXPECTED_PARAMS = {
    ("mlp", "digits"): 55_210,  # 64*200+200 + 200*200+200 + 200*10+10
    ("mlp", "mnist"): 199_210,  # 784*200+200 + 40_200 + 2_010
    ("mlp", "cifar10"): 656_810,  # 3072*200+200 + 40_200 + 2_010
    ("cnn", "digits"): 21_386,  # 320 + 18_496 + (64*2*2)*10+10
    ("cnn", "mnist"): 50_186,  # 320 + 18_496 + (64*7*7)*10+10
    ("cnn", "cifar10"): 60_362,  # 896 + 18_496 + (64*8*8)*10+10
    # McMahan et al.'s CNN: 5*5*32+32 + 5*5*32*64+64 + (64*7*7)*512+512 + 512*10+10
    ("cnn-mcmahan", "mnist"): 1_663_370,
    ("cnn-mcmahan", "digits"): 188_810,  # (64*2*2)*512+512 for the dense layer
    ("cnn-mcmahan", "cifar10"): 2_156_490,  # 5*5*3*32+32, (64*8*8)*512+512
    ("resnet18", "digits"): 11_172_810,
    ("resnet18", "mnist"): 11_172_810,
    ("resnet18", "cifar10"): 11_173_962,  # the usual CIFAR ResNet-18 count
}


@pytest.mark.parametrize(("name", "dataset"), EXPECTED_PARAMS)
def test_parameter_counts(name: str, dataset: str) -> None:
    shape = SHAPES[dataset]
    model = build_model(name, input_shape=shape, num_classes=10)
    assert model_num_params(model) == EXPECTED_PARAMS[(name, dataset)]
    if name == "cnn":
        c, h, w = shape
        assert EXPECTED_PARAMS[(name, dataset)] == (
            conv_params(c, 32) + conv_params(32, 64) + linear_params(64 * (h // 4) * (w // 4), 10)
        )
    if name == "cnn-mcmahan":
        c, h, w = shape
        conv = (c * 25 * 32 + 32) + (32 * 25 * 64 + 64)
        dense = linear_params(64 * (h // 4) * (w // 4), 512) + linear_params(512, 10)
        assert EXPECTED_PARAMS[(name, dataset)] == conv + dense
    if name == "resnet18":
        assert EXPECTED_PARAMS[(name, dataset)] == resnet18_params(shape[0], 10)


def test_model_num_params_trainable_only() -> None:
    model = build_model("mlp", input_shape=(4,), num_classes=2, hidden=(3,))
    assert isinstance(model, nn.Sequential)
    assert model_num_params(model) == 4 * 3 + 3 + 3 * 2 + 2
    model[1].requires_grad_(False)
    assert model_num_params(model, trainable_only=True) == 3 * 2 + 2


def test_resnet18_has_group_norm_and_a_cifar_stem() -> None:
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=7)
    assert isinstance(model, ResNet)
    modules = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20  # stem + 2 per basic block (8) + 3 downsamples
    assert all(m.num_groups == 32 for m in norms)
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)
    conv1 = model.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 7
    assert not any(t.dtype == torch.long for t in model.state_dict().values())


def test_generator_makes_init_deterministic_and_leaves_global_rng_alone() -> None:
    for name in ("mlp", "cnn"):
        state = torch.get_rng_state()
        a = build_model(
            name, input_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(torch.get_rng_state(), state)
        b = build_model(
            name, input_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(3)
        )
        c = build_model(
            name, input_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(4)
        )
        wa, wb, wc = get_weights(a), get_weights(b), get_weights(c)
        assert all(np.array_equal(wa[k], wb[k]) for k in wa)
        assert not all(np.array_equal(wa[k], wc[k]) for k in wa)


def test_global_seed_makes_init_deterministic() -> None:
    torch.manual_seed(11)
    a = get_weights(build_model("resnet18", input_shape=(3, 32, 32), num_classes=10))
    torch.manual_seed(11)
    b = get_weights(build_model("resnet18", input_shape=(3, 32, 32), num_classes=10))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model name 'vgg'"):
        build_model("vgg", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\) for model 'cnn'"):
        build_model("cnn", input_shape=(64,), num_classes=10)
    with pytest.raises(ValueError, match="H, W >= 4"):
        build_model("cnn", input_shape=(1, 3, 8), num_classes=10)
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("mlp", input_shape=(1, 0, 8), num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_model("mlp", input_shape=(4,), num_classes=0)
    with pytest.raises(ValueError, match="hidden widths"):
        build_model("mlp", input_shape=(4,), num_classes=2, hidden=(3, 0))


# -- weights ------------------------------------------------------------------------------


def test_get_weights_float32_copies_in_state_dict_order() -> None:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    assert isinstance(model, nn.Sequential)
    weights = get_weights(model)
    assert list(weights) == list(model.state_dict())
    assert list(weights) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    assert all(w.dtype == np.float32 for w in weights.values())
    weights["0.weight"][...] = 5.0
    conv = model[0]
    assert isinstance(conv, nn.Conv2d)
    assert float(conv.weight.detach().abs().max()) < 5.0


def test_float_buffers_kept_integer_buffers_dropped() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    weights = get_weights(model)
    assert list(weights) == [
        *("0.weight", "0.bias", "1.weight", "1.bias"),
        *("1.running_mean", "1.running_var"),
    ]
    weights["1.running_mean"] = np.arange(4, dtype=np.float32)
    set_weights(model, weights)
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm1d) and norm.running_mean is not None
    np.testing.assert_array_equal(norm.running_mean.numpy(), [0, 1, 2, 3])


def _randomise(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}


@pytest.mark.parametrize("name", MODELS)
def test_set_get_round_trip_is_exact(name: str) -> None:
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10)
    new = _randomise(get_weights(model), 0)
    set_weights(model, new)
    back = get_weights(model)
    assert list(back) == list(new)
    for k in new:
        np.testing.assert_array_equal(back[k], new[k])
    # the parameters themselves changed (not a detached copy)
    first = next(iter(model.parameters()))
    np.testing.assert_array_equal(first.detach().numpy(), new[next(iter(new))])


def test_set_weights_accepts_read_only_and_float64_arrays() -> None:
    model = build_model("mlp", input_shape=(4,), num_classes=2, hidden=(3,))
    new = {k: v.astype(np.float64) + 0.25 for k, v in get_weights(model).items()}
    for v in new.values():
        v.flags.writeable = False
    set_weights(model, new)
    for k, got in get_weights(model).items():
        np.testing.assert_array_equal(got, new[k].astype(np.float32))


def test_set_weights_errors_name_the_problem() -> None:
    model = build_model("mlp", input_shape=(4,), num_classes=2, hidden=(3,))
    weights = get_weights(model)
    missing = {k: v for k, v in weights.items() if k != "1.bias"}
    with pytest.raises(ValueError, match=r"missing \['1.bias'\], unexpected \[\]"):
        set_weights(model, missing)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        set_weights(model, {**weights, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"weights\['1.weight'\] has shape \(4, 3\)"):
        set_weights(model, {**weights, "1.weight": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match=r"weights\['3.bias'\] must be a floating array"):
        set_weights(model, {**weights, "3.bias": np.zeros(2, np.int64)})
    # nothing was written by the failed calls
    for k, v in get_weights(model).items():
        np.testing.assert_array_equal(v, weights[k])


@settings(max_examples=20, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 16), max_size=3),
    in_features=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(hidden: list[int], in_features: int, seed: int) -> None:
    model = build_model("mlp", input_shape=(in_features,), num_classes=3, hidden=hidden)
    new = _randomise(get_weights(model), seed)
    set_weights(model, new)
    back = get_weights(model)
    assert back.keys() == new.keys()
    assert all(np.array_equal(back[k], new[k]) for k in new)
