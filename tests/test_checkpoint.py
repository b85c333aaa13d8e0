"""Checkpoint files (no pickle, atomic), node states, strategy state and config compatibility."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.checkpoint import (
    clear_round_states,
    load_round_state,
    load_state,
    nested,
    prefixed,
    save_round_state,
    save_state,
)
from fedprune.codec import CodecConfig
from fedprune.config import ConfigError, RunConfig
from fedprune.masks import ReconcileConfig
from strategies.masking import DensitySchedule, MaskPolicy
from strategies.strategy import FedPrune
from strategies.wrapper import load_strategy_state, strategy_state

names = st.text(alphabet="abcdefghij0123456789._-", min_size=1, max_size=12)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(names, arrays, max_size=4), st.dictionaries(names, json_values, max_size=4))
def test_state_round_trip_is_exact(
    tmp_path_factory: pytest.TempPathFactory,
    tensors: dict[str, np.ndarray],
    meta: dict[str, Any],
) -> None:
    path = tmp_path_factory.mktemp("state") / "s.npz"
    state = {**prefixed("a", tensors), **prefixed("m", meta)}
    save_state(path, state)
    loaded = load_state(path)
    assert set(loaded) == set(state)
    assert nested(loaded, "m") == meta
    for name, array in tensors.items():
        got = loaded[f"a/{name}"]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)


def test_object_arrays_are_refused_on_save_and_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object array"):
        save_state(tmp_path / "s.npz", {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="object array"):  # an object field in a record dtype
        save_state(tmp_path / "s.npz", {"x": np.zeros(1, dtype=[("a", object)])})
    meta = np.frombuffer(b"{}", dtype=np.uint8)
    evil = {"x": np.array([{"a": 1}], dtype=object), "__meta__.json": meta}
    np.savez(tmp_path / "evil.npz", allow_pickle=True, **evil)
    with pytest.raises(ValueError, match="Object arrays cannot be loaded"):  # never unpickled
        load_state(tmp_path / "evil.npz")


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "plain.npz").read_bytes()[:100])
    list_meta: dict[str, Any] = {"__meta__.json": np.frombuffer(b"[1]", np.uint8)}
    np.savez(tmp_path / "list-meta.npz", **list_meta)
    for name in ("plain.npz", "array.npy", "truncated.npz", "list-meta.npz"):
        with pytest.raises(ValueError, match="not a fedprune checkpoint"):
            load_state(tmp_path / name)


def test_save_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    save_state(path, {"round": 1})
    save_state(path, {"round": 2})
    assert load_state(path) == {"round": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_node_keeps_its_two_newest_states_and_loads_the_newest_not_after_r(
    tmp_path: Path,
) -> None:
    for r in (1, 3, 4, 6):
        save_round_state(tmp_path, r, {"r": r, "x": np.full(2, r)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-4.npz", "round-6.npz"]
    found = load_round_state(tmp_path, 5)
    assert found is not None and found[0] == 4 and found[1]["r"] == 4
    found = load_round_state(tmp_path, 6)
    assert found is not None and found[0] == 6
    assert load_round_state(tmp_path, 3) is None
    assert load_round_state(tmp_path / "missing", 9) is None
    clear_round_states(tmp_path, after=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-4.npz"]
    clear_round_states(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _record(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.standard_normal((3, 2)).astype(np.float32), "0.bias": np.ones(3)}


def _flat(value: object) -> list[tuple[str, np.ndarray]]:
    """(name, array) pairs of a Flower state attribute, whatever its container."""
    if isinstance(value, ArrayRecord):
        return [(k, a.numpy()) for k, a in value.items()]
    if isinstance(value, dict):
        return list(value.items())
    assert isinstance(value, list)
    return [(str(i), a) for i, a in enumerate(value)]


def test_flower_server_optimizer_state_round_trips_through_a_file(tmp_path: Path) -> None:
    adam, avgm = FedAdam(), FedAvgM()
    adam.m_t, adam.v_t, adam.current_arrays = _record(1), _record(2), _record(3)
    avgm.current_arrays = ArrayRecord({k: Array(v) for k, v in _record(4).items()})
    avgm.momentum_vector = list(_record(5).values())
    for strategy, fresh in ((adam, FedAdam()), (avgm, FedAvgM())):
        save_state(tmp_path / "s.npz", strategy_state(strategy))
        load_strategy_state(fresh, load_state(tmp_path / "s.npz"))
        for attr in ("m_t", "v_t", "current_arrays", "momentum_vector"):
            want, got = getattr(strategy, attr, None), getattr(fresh, attr, None)
            if want is None:
                assert got is None
                continue
            assert type(got) is type(want)
            for (wk, w), (gk, g) in zip(_flat(want), _flat(got), strict=True):
                assert gk == wk and g.dtype == w.dtype
                np.testing.assert_array_equal(g, w)


def test_wrapper_chain_state_keeps_the_mask_and_its_version(tmp_path: Path) -> None:
    def chain() -> FedPrune:
        policy = MaskPolicy(["0.weight"], DensitySchedule(1.0, 0.5, 1, 3), ReconcileConfig())
        return FedPrune(FedAvg(), codec_config=CodecConfig(), masking=policy)

    saved = chain()
    assert saved.masking is not None
    saved.masking.load_state(
        {"version": 3, "names": ["0.weight"], "mask/0.weight": np.array([[1, 0], [0, 1]])}
    )
    save_state(tmp_path / "s.npz", strategy_state(saved))
    restored = chain()
    load_strategy_state(restored, load_state(tmp_path / "s.npz"))
    masking = restored.masking
    assert masking is not None and masking.version == 3 and masking.mask is not None
    assert masking.mask["0.weight"].dtype == np.bool_
    np.testing.assert_array_equal(masking.mask["0.weight"], [[True, False], [False, True]])
    assert masking.density == 0.5


def test_resume_accepts_only_more_rounds_and_the_flag() -> None:
    saved = RunConfig(num_server_rounds=5).to_mapping()
    RunConfig(num_server_rounds=8, resume=True).check_resumable(saved)
    with pytest.raises(ConfigError, match=r"\['lr', 'target-density'\]"):
        RunConfig(lr=0.05, target_density=0.5, resume=True).check_resumable(saved)
