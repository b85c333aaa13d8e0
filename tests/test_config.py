import tomllib
from pathlib import Path

import pytest

from fedprune.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_app_config_equals_the_defaults() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(config) == RunConfig()
    assert set(config) == set(RunConfig().to_mapping())


def test_round_trip_through_the_flat_mapping() -> None:
    cfg = RunConfig(dataset="fashion-mnist", lr=0.01, dp=True, noise_multiplier=1.1)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_ints_are_accepted_as_floats() -> None:
    assert RunConfig.from_mapping({"lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"learning-rate": 0.1}, "learning-rate"),
        ({"lr": "fast"}, "lr"),
        ({"lr": True}, "lr"),
        ({"num-server-rounds": 2.5}, "num-server-rounds"),
        ({"entropy": 1}, "entropy"),
        ({"quant": "int4"}, "quant"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"target-density": 0.0}, "target-density"),
        ({"target-density": 0.5, "initial-density": 0.4}, "initial-density"),
        ({"prune-start-round": 3, "prune-end-round": 2}, "prune-end-round"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"run-name": "../escape"}, "run-name"),
        ({"strategy": "fedavg"}, "target-density"),
        ({"dp": True}, "noise-multiplier"),
        ({"dp": True, "noise-multiplier": 1.0, "target-epsilon": 3.0}, "noise-multiplier"),
        ({"dp": True, "noise-multiplier": 1.0, "inner-strategy": "fedprox"}, "inner-strategy"),
        ({"dp": True, "noise-multiplier": 1.0, "prune-method": "sensitivity"}, "prune-method"),
        ({"lowbit-scales": "log8"}, "lowbit-scales"),  # quant int8-channel has no row steps
        ({"lowbit-scales": "log4", "quant": "ternary"}, "lowbit-scales"),
        ({"topk-scope": "layer"}, "topk-scope"),
        ({"topk-block": 3}, "topk-block"),
        ({"topk-block": 0}, "topk-block"),
        ({"distill-temperature": 0.0}, "distill-temperature"),
        ({"distill-alpha": -0.5}, "distill-alpha"),
        ({"distill-beta": -0.5}, "distill-beta"),
        ({"teacher-model": "gpt"}, "teacher-model"),
        ({"distill": True, "teacher-model": "mlp"}, "teacher-model"),
        ({"distill": True, "teacher-model": "mlp-small"}, "teacher-model"),
        ({"distill": True, "teacher-model": "cnn"}, "teacher-model"),  # 21k < 55k on digits
        ({"distill": True, "model": "mlp-large", "teacher-model": "cnn"}, "teacher-model"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping(values)


def test_lowbit_scales_reach_the_low_bit_codecs_only() -> None:
    cfg = RunConfig.from_mapping(
        {"quant": "ternary", "update-topk": 0.05, "downlink-quant": "int8-channel"}
        | {"lowbit-scales": "log8", "delta-downlink": True}
    )
    assert cfg.update_codec().scales == "log8"
    assert cfg.downlink_update_codec().scales == "float16"
    assert cfg.codec().scales == "float16"


def test_topk_scope_reaches_both_update_codecs() -> None:
    cfg = RunConfig.from_mapping(
        {"quant": "ternary", "update-topk": 0.05, "delta-downlink": True, "topk-scope": "model"}
    )
    assert cfg.update_codec().topk_scope == "model"
    assert cfg.downlink_update_codec().topk_scope == "model"
    assert RunConfig().update_codec().topk_scope == "tensor"
    blocks = RunConfig.from_mapping({"update-topk": 0.05, "topk-block": 4})
    assert blocks.update_codec().topk_block == blocks.downlink_update_codec().topk_block == 4


def test_fedavg_baseline_is_dense() -> None:
    cfg = RunConfig.from_mapping({"strategy": "fedavg", "target-density": 1.0})
    assert not cfg.compressed


def test_distillation_composes_with_every_strategy_and_dp() -> None:
    plain = RunConfig.from_mapping({"strategy": "fedavg", "target-density": 1.0, "distill": True})
    assert plain.distill and plain.teacher_model == "mlp-large"
    private = RunConfig.from_mapping({"distill": True, "dp": True, "noise-multiplier": 1.0})
    assert private.distill and private.dp
    small = RunConfig.from_mapping(
        {"distill": True, "model": "mlp-small", "teacher-model": "mlp", "dataset": "cifar10"}
    )
    assert small.teacher_model == "mlp"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "FedAvg"}, "'strategy': 'FedAvg' is not one of"),
        ({"quant": "int4"}, "'quant': 'int4' is not one of"),
        ({"num_server_rounds": 2.5}, "'num-server-rounds': expected an integer"),
        ({"lr": "0.1"}, "'lr': expected a number"),
        ({"proximal_mu": float("inf")}, "'proximal-mu': must be finite"),
        ({"dp": 1}, "'dp': expected true/false"),
        ({"seed": -1}, "'seed': must be >= 0"),
    ],
)
def test_replace_checks_types_like_from_mapping(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().replace(**changes)


def test_parsing_a_config_imports_neither_torch_nor_opacus_nor_flower() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from fedprune.config import RunConfig; RunConfig.from_mapping({'lr': 0.05});"
        "print(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
