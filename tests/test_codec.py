"""Tests of fedprune.codec (pure numpy; the Flower wire format is pinned in test_codec_wire)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune import codec
from fedprune.codec import CodecConfig
from simulations import bench

SETTINGS = settings(max_examples=40, deadline=None)
# Typical magnitudes mixed with the whole finite float32 range (subnormals, +-max, zeros).
FINITE32 = st.floats(-4, 4, width=32) | st.floats(width=32, allow_nan=False, allow_infinity=False)
CONFIGS = [
    CodecConfig(quant=q, entropy=e) for q in ("int8-channel", "int8", "none") for e in (False, True)
]
INT8_KEYS = ["meta", "names", "codes", "scale"]
VALUE_KEYS = ["meta", "names", "values"]
QUANT_CODE = {"none": 0, "int8": 1, "int8-channel": 2}  # meta[1] & QUANT_BITS


@st.composite
def tensor_and_mask(draw: st.DrawFn, max_dims: int = 3) -> tuple[np.ndarray, np.ndarray | None]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=6))
    x = draw(hnp.arrays(np.float32, shape, elements=FINITE32))
    mask = draw(st.none() | hnp.arrays(np.bool_, shape))
    return x, mask


# -- an independent reading of the layout (module docstring), used to check what encode wrote --
@dataclass(frozen=True)
class Tensor:
    flags: int
    n_values: int
    shape: tuple[int, ...]
    codes: slice  # into the code / value stream
    scales: slice  # into the scale stream


def read_meta(payload: codec.Payload) -> tuple[int, dict[str, Tensor]]:
    """Return the payload flags and, per tensor name, its entry and stream slices."""
    meta = payload["meta"].tolist()
    assert meta[0] == codec.FORMAT_VERSION
    flags, n = meta[1], meta[2]
    names = payload["names"].tobytes().decode("utf-8").split("\n") if n else []
    out: dict[str, Tensor] = {}
    pos, value, scale = 3, 0, 0
    for name in names:
        tflags, n_values, ndim = meta[pos : pos + 3]
        shape = tuple(meta[pos + 3 : pos + 3 + ndim])
        pos += 3 + ndim
        mode = tflags & codec.QUANT_BITS
        n_scales = 0 if mode == 0 else (shape[0] if mode == 2 else 1)
        out[name] = Tensor(
            tflags, n_values, shape, slice(value, value + n_values), slice(scale, scale + n_scales)
        )
        value += n_values
        scale += n_scales
    assert pos == len(meta)
    return flags, out


def codes_of(payload: codec.Payload, name: str) -> np.ndarray:
    return payload["codes"][read_meta(payload)[1][name].codes]


def scales_of(payload: codec.Payload, name: str) -> np.ndarray:
    return payload["scale"][read_meta(payload)[1][name].scales]


def tensor_flags(payload: codec.Payload, name: str) -> int:
    return read_meta(payload)[1][name].flags


def payload_flags(payload: codec.Payload) -> int:
    return read_meta(payload)[0]


def _element_scales(payload: codec.Payload, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Per-element step size (float64) of tensor ``name``, broadcast to ``shape``."""
    scale = scales_of(payload, name).astype(np.float64)
    if tensor_flags(payload, name) & codec.QUANT_BITS == 2:  # per output channel
        return np.broadcast_to(scale.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
    assert scale.shape == (1,)
    return np.broadcast_to(scale[0], shape)


# -- hand-computed examples ----------------------------------------------------------------------
X_HAND = np.array(
    [[127.0, -3.2, 50.6, 0.4], [12.7, -6.34, 0.04, 1.26], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32
)
M_HAND = np.array(
    [[False, True, True, False], [True, False, False, True], [False, False, False, False]]
)
B_HAND = np.array([0.5, -1.27, 0.3], np.float32)
V_HAND = np.array([[0.9, 5.0, -0.27], [3.0, 4.0, 2.54]], np.float32)
MV_HAND = np.array([[True, False, True], [False, False, True]])


def test_hand_example_per_channel() -> None:
    codes, scales = codec.quantize_int8(X_HAND, per_channel=True)
    assert codes.dtype == np.int8 and codes.shape == (3, 4)
    np.testing.assert_array_equal(codes, [[127, -3, 51, 0], [127, -63, 0, 13], [0, 0, 0, 0]])
    assert scales.dtype == np.float32
    np.testing.assert_allclose(scales, [1.0, 0.1, 1.0], rtol=1e-6)  # zero channel -> 1.0
    assert scales[0] == 1.0 and scales[2] == 1.0
    back = codec.dequantize_int8(codes, scales, per_channel=True)
    np.testing.assert_allclose(back[1], [12.7, -6.3, 0.0, 1.3], rtol=1e-6)


def test_hand_example_per_tensor() -> None:
    codes, scales = codec.quantize_int8(X_HAND, per_channel=False)
    np.testing.assert_array_equal(codes, [[127, -3, 51, 0], [13, -6, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(scales, np.array([1.0], dtype=np.float32))


def test_hand_example_encode_sparse() -> None:
    tensors = {"w": X_HAND, "b": B_HAND, "v": V_HAND}
    payload = codec.encode(tensors, CodecConfig(), masks={"w": M_HAND, "v": MV_HAND})
    assert list(payload) == ["meta", "names", "codes", "scale", "mask"]
    sparse = 2 | codec.FLAG_MASKED | codec.FLAG_MASK_SENT  # per channel, masked, bits sent
    meta = [
        [3, 2, 3],  # format version, payload flags (int8-channel, no zlib), 3 tensors
        [sparse, 4, 2, 3, 4],  # w: 4 kept of (3, 4)
        [1, 3, 1, 3],  # b: per tensor (1-D), dense, 3 values of (3,)
        [sparse, 3, 2, 2, 3],  # v: 3 kept of (2, 3)
    ]
    np.testing.assert_array_equal(payload["meta"], [v for entry in meta for v in entry])
    assert payload["meta"].dtype == np.int64
    assert payload["names"].dtype == np.uint8 and payload["names"].tobytes() == b"w\nb\nv"
    # w: row 0 keeps -3.2, 50.6 -> scale 50.6 / 127; row 1 keeps 12.7, 1.26 -> scale 0.1;
    # row 2 keeps nothing -> scale 1.0. b: absmax 1.27 -> scale 0.01. v: row 0 keeps 0.9,
    # -0.27 -> scale 0.9 / 127 (-0.27 -> -38.1); row 1 keeps 2.54 -> scale 0.02.
    expected_codes = [-8, 127, 127, 13, 50, -127, 30, 127, -38, 127]  # w | b | v
    np.testing.assert_array_equal(payload["codes"], np.array(expected_codes, np.int8))
    assert payload["codes"].dtype == np.int8
    expected_scales = [50.6 / 127, 0.1, 1.0, 0.01, 0.9 / 127, 0.02]  # w | b | v
    assert payload["scale"].dtype == np.float32
    np.testing.assert_array_equal(payload["scale"], np.array(expected_scales, np.float32))
    # mask bits, w then v, not byte-aligned per tensor: 0110 1001 0000 | 1010 01 (+ 6 zero bits)
    np.testing.assert_array_equal(
        payload["mask"], np.array([0b01101001, 0b00001010, 0b01000000], np.uint8)
    )
    out = codec.decode(payload)
    assert list(out) == ["w", "b", "v"]
    s0, s2 = np.float32(50.6 / 127), np.float32(0.9 / 127)
    expected_w = np.array([[0, -8 * s0, 127 * s0, 0], [12.7, 0, 0, 1.3], [0, 0, 0, 0]])
    np.testing.assert_allclose(out["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.5, -1.27, 0.3], rtol=1e-6)
    expected_v = np.array([[127 * s2, 0, -38 * s2], [0, 0, 2.54]])
    np.testing.assert_allclose(out["v"], expected_v, rtol=1e-6)
    assert (out["w"][~M_HAND] == 0).all() and (out["v"][~MV_HAND] == 0).all()
    masks = codec.payload_masks(payload)
    assert list(masks) == ["w", "v"]
    np.testing.assert_array_equal(masks["w"], M_HAND)
    np.testing.assert_array_equal(masks["v"], MV_HAND)


def test_hand_example_values_passthrough() -> None:
    tensors = {"w": X_HAND, "b": B_HAND}
    payload = codec.encode(tensors, CodecConfig(quant="none"), masks={"w": M_HAND})
    assert list(payload) == ["meta", "names", "values", "mask"]
    np.testing.assert_array_equal(
        payload["meta"], [3, 0, 2, codec.FLAG_MASKED | codec.FLAG_MASK_SENT, 4, 2, 3, 4, 0, 3, 1, 3]
    )
    np.testing.assert_array_equal(payload["values"], np.concatenate([X_HAND[M_HAND], B_HAND]))
    assert payload["values"].dtype == np.float32
    np.testing.assert_array_equal(payload["mask"], np.array([0b01101001, 0], np.uint8))
    out = codec.decode(payload)
    np.testing.assert_array_equal(out["w"], np.where(M_HAND, X_HAND, 0))
    np.testing.assert_array_equal(out["b"], B_HAND)


def test_hand_example_cached_masks() -> None:
    tensors = {"w": X_HAND, "b": B_HAND}
    payload = codec.encode(
        tensors, CodecConfig(quant="int8"), masks={"w": M_HAND}, send_masks=False
    )
    assert list(payload) == INT8_KEYS
    np.testing.assert_array_equal(
        payload["meta"], [3, 1, 2, 1 | codec.FLAG_MASKED, 4, 2, 3, 4, 1, 3, 1, 3]
    )
    # one step per tensor: w's kept absmax is 50.6, b's 1.27
    np.testing.assert_array_equal(payload["scale"], np.array([50.6 / 127, 0.01], np.float32))
    np.testing.assert_array_equal(
        payload["codes"], np.array([-8, 127, 32, 3, 50, -127, 30], np.int8)
    )
    out = codec.decode(payload, masks={"w": M_HAND})
    assert (out["w"][~M_HAND] == 0).all()


def test_bias_per_channel_mode_is_per_tensor() -> None:
    payload = codec.encode({"b": np.array([1.0, -2.0, 0.5], np.float32)}, CodecConfig())
    assert payload_flags(payload) & codec.QUANT_BITS == 2  # the payload is per channel
    assert tensor_flags(payload, "b") & codec.QUANT_BITS == 1  # the 1-D tensor per tensor
    assert payload["scale"].shape == (1,)


# -- property tests ------------------------------------------------------------------------------
@SETTINGS
@given(tm=tensor_and_mask(), per_channel=st.booleans())
def test_nearest_error_bound_and_masked_zeros(
    tm: tuple[np.ndarray, np.ndarray | None], per_channel: bool
) -> None:
    x, mask = tm
    config = CodecConfig(quant="int8-channel" if per_channel else "int8")
    payload = codec.encode({"t": x}, config, masks=None if mask is None else {"t": mask})
    out = codec.decode(payload)["t"]
    assert out.dtype == np.float32 and out.shape == x.shape
    scale = _element_scales(payload, "t", x.shape)
    assert np.isfinite(payload["scale"]).all() and (payload["scale"] > 0).all()
    kept = np.ones(x.shape, bool) if mask is None else mask
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert (err[kept] <= scale[kept] * (0.5 + 1e-4)).all()
    assert (out[~kept] == 0).all()
    assert payload["codes"].min(initial=0) >= -127


@SETTINGS
@given(tm=tensor_and_mask(), quant=st.sampled_from(["int8-channel", "int8"]))
def test_reencoding_decoded_tensor_gives_identical_codes(
    tm: tuple[np.ndarray, np.ndarray | None], quant: codec.QuantMode
) -> None:
    x, mask = tm
    masks = None if mask is None else {"t": mask}
    config = CodecConfig(quant=quant)
    first = codec.encode({"t": x}, config, masks=masks)
    second = codec.encode(codec.decode(first), config, masks=masks)
    np.testing.assert_array_equal(second["codes"], first["codes"])
    np.testing.assert_array_equal(second["meta"], first["meta"])
    np.testing.assert_allclose(second["scale"], first["scale"], rtol=1e-6)


@st.composite
def model_and_masks(
    draw: st.DrawFn,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Several named tensors (any shapes, including empty and 0-d) and masks for some."""
    n = draw(st.integers(0, 5))
    tensors: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for i in range(n):
        x, mask = draw(tensor_and_mask())
        tensors[f"layer{i}.w"] = x
        if mask is not None:
            masks[f"layer{i}.w"] = mask
    return tensors, masks


@SETTINGS
@given(model=model_and_masks(), config=st.sampled_from(CONFIGS), send=st.booleans())
def test_multi_tensor_round_trip(
    model: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], config: CodecConfig, send: bool
) -> None:
    tensors, masks = model
    payload = codec.encode(tensors, config, masks=masks, send_masks=send)
    out = codec.decode(payload, masks=None if send else masks)
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        kept = masks.get(name, np.ones(x.shape, bool))
        assert out[name].dtype == np.float32 and out[name].shape == x.shape
        assert (out[name][~kept] == 0).all()
        if config.quant == "none":
            np.testing.assert_array_equal(out[name][kept], x[kept])
        else:
            err = np.abs(out[name].astype(np.float64) - x.astype(np.float64))
            scale = _element_scales(payload, name, x.shape)
            assert (err[kept] <= scale[kept] * (0.5 + 1e-4)).all()
    carried = codec.payload_masks(payload)
    assert list(carried) == ([name for name in tensors if name in masks] if send else [])
    for name, mask in carried.items():
        np.testing.assert_array_equal(mask, masks[name])


@SETTINGS
@given(tm=tensor_and_mask(), config=st.sampled_from(CONFIGS), send=st.booleans())
def test_entropy_stage_is_lossless(
    tm: tuple[np.ndarray, np.ndarray | None], config: CodecConfig, send: bool
) -> None:
    x, mask = tm
    masks = None if mask is None else {"t": mask}
    plain = CodecConfig(quant=config.quant)
    a = codec.encode({"t": x}, plain, masks=masks, send_masks=send)
    b = codec.encode({"t": x}, config, masks=masks, send_masks=send)
    assert list(a) == list(b)
    np.testing.assert_array_equal(
        codec.decode(a, masks=masks)["t"], codec.decode(b, masks=masks)["t"]
    )
    if config.quant == "none" and mask is None:
        np.testing.assert_array_equal(codec.decode(b)["t"], x)


def _expected_keys(config: CodecConfig, masked: bool, send: bool) -> list[str]:
    keys = VALUE_KEYS if config.quant == "none" else INT8_KEYS
    return keys + (["mask"] if masked and send else [])


@SETTINGS
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8),
    data=st.data(),
    config=st.sampled_from(CONFIGS),
    send=st.booleans(),
)
def test_same_key_set_for_different_values(
    shape: tuple[int, ...], data: st.DataObject, config: CodecConfig, send: bool
) -> None:
    masks = {"w": data.draw(hnp.arrays(np.bool_, shape))}
    tensors = [
        {
            "w": data.draw(hnp.arrays(np.float32, shape, elements=FINITE32)),
            "b": data.draw(hnp.arrays(np.float32, (3,), elements=FINITE32)),
        },
        {"w": np.zeros(shape, np.float32), "b": np.zeros(3, np.float32)},  # compressible
        {"w": np.full(shape, 7.0, np.float32), "b": np.ones(3, np.float32)},
    ]
    keys = [list(codec.encode(t, config, masks=masks, send_masks=send)) for t in tensors]
    assert keys[0] == keys[1] == keys[2] == _expected_keys(config, True, send)


def test_key_set_is_a_function_of_config_masked_set_and_send_masks() -> None:
    # Clients of one round: different values, different mask *contents* (also empty masks and
    # a mask keeping everything), same config, same masked tensors, same send_masks flag.
    rng = np.random.default_rng(11)
    shapes = {"fc1.weight": (20, 16), "fc1.bias": (20,), "fc2.weight": (4, 20), "fc2.bias": (4,)}
    clients = []
    for density in (0.0, 0.05, 0.5, 1.0):
        tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        masks = {n: rng.random(s) < density for n, s in shapes.items() if len(s) == 2}
        clients.append((tensors, masks))
    clients.append(({n: np.zeros(s, np.float32) for n, s in shapes.items()}, clients[0][1]))
    for config in [*CONFIGS, CodecConfig(rounding="stochastic")]:
        for send in (True, False):
            for masked in (True, False):
                keys = {
                    tuple(
                        codec.encode(
                            tensors,
                            config,
                            masks=masks if masked else None,
                            send_masks=send,
                            rng=np.random.default_rng(0),
                        )
                    )
                    for tensors, masks in clients
                }
                assert keys == {tuple(_expected_keys(config, masked, send))}, (config, send)


def test_entropy_kept_only_when_smaller() -> None:
    rng = np.random.default_rng(0)
    cases = {
        # codes all 0 and a 5 % mask: both streams compress
        "compressible": (
            {"zeros": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float32)},
            {"zeros": rng.random((64, 64)) < 0.05},
        ),
        # tiny random streams: zlib's header and the npy framing win
        "incompressible": (
            {"noise": rng.standard_normal((4, 5)).astype(np.float32)},
            {"noise": rng.random((4, 5)) < 0.5},
        ),
    }
    for quant in ("int8-channel", "none"):
        stream_key = "values" if quant == "none" else "codes"
        for label, (tensors, masks) in cases.items():
            raw = codec.encode(tensors, CodecConfig(quant=quant), masks=masks)
            ent = codec.encode(tensors, CodecConfig(quant=quant, entropy=True), masks=masks)
            assert list(raw) == list(ent)
            # The mask stream may also be Rice-coded (tests/test_codec_rice.py): here the
            # compressible 5 % mask must be coded one way or the other, the tiny one not by zlib.
            mask_coded = payload_flags(ent) & (codec.FLAG_MASK_ZLIB | codec.FLAG_MASK_RICE)
            assert bool(mask_coded) or label != "compressible"
            assert not payload_flags(ent) & codec.FLAG_MASK_ZLIB or label == "compressible"
            if payload_flags(ent) & codec.FLAG_MASK_RICE:
                for name, mask in codec.payload_masks(ent).items():
                    np.testing.assert_array_equal(mask, masks[name])
                continue
            for key, flag in ((stream_key, codec.FLAG_CODES_ZLIB), ("mask", codec.FLAG_MASK_ZLIB)):
                compressed = bool(payload_flags(ent) & flag)
                candidate = np.frombuffer(
                    zlib.compress(raw[key].tobytes(), codec.ZLIB_LEVEL), np.uint8
                )
                smaller = codec.wire_size({key: candidate}) < codec.wire_size({key: raw[key]})
                assert compressed == smaller == (label == "compressible"), (label, key)
                if compressed:
                    assert ent[key].dtype == np.uint8
                    assert zlib.decompress(ent[key].tobytes()) == raw[key].tobytes()
                else:
                    assert ent[key].dtype == raw[key].dtype
                    np.testing.assert_array_equal(ent[key], raw[key])
            # only the code/value stream and the mask stream are ever compressed; meta differs
            # only in the payload flags
            np.testing.assert_array_equal(ent["meta"][2:], raw["meta"][2:])
            for key in raw:
                if key not in (stream_key, "mask", "meta"):
                    np.testing.assert_array_equal(ent[key], raw[key])
            if label == "compressible":
                assert codec.wire_size(ent) < codec.wire_size(raw)
            else:
                assert codec.wire_size(ent) == codec.wire_size(raw)
            for name, x in codec.decode(ent).items():
                np.testing.assert_array_equal(x, codec.decode(raw)[name])


def test_stochastic_rounding_is_unbiased() -> None:
    # amax 127 makes the step exactly 1.0, so decoded values are the codes themselves.
    row = np.array([0.3, -1.7, 2.5, 10.25, -0.05, 127.0], np.float32)
    trials = 4000
    x = np.tile(row, (trials, 1))
    config = CodecConfig(quant="int8", rounding="stochastic")
    payload = codec.encode({"x": x}, config, rng=np.random.default_rng(1234))
    assert payload["scale"][0] == 1.0
    out = codec.decode(payload)["x"]
    # every entry rounds to one of its two neighbouring steps
    assert ((out == np.floor(x)) | (out == np.ceil(x))).all()
    # std of a mean of Bernoulli(p) steps <= 0.5 / sqrt(trials) = 0.0079; allow 5 sigma
    tol = 5 * 0.5 / np.sqrt(trials)
    np.testing.assert_allclose(out.mean(axis=0), row, atol=tol)
    # the test can fail: nearest rounding is biased by more than the tolerance
    nearest = codec.decode(codec.encode({"x": x}, CodecConfig(quant="int8")))["x"]
    assert (np.abs(nearest.mean(axis=0) - row)[:5] > tol).all()


def test_stochastic_rounding_needs_rng_and_is_reproducible() -> None:
    x = {"x": np.linspace(-1, 1, 50, dtype=np.float32).reshape(5, 10)}
    config = CodecConfig(rounding="stochastic")
    with pytest.raises(ValueError, match="rng"):
        codec.encode(x, config)
    a = codec.encode(x, config, rng=np.random.default_rng(7))
    b = codec.encode(x, config, rng=np.random.default_rng(7))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@SETTINGS
@given(tm=tensor_and_mask(), config=st.sampled_from(CONFIGS))
def test_residual_is_update_minus_decode(
    tm: tuple[np.ndarray, np.ndarray | None], config: CodecConfig
) -> None:
    x, mask = tm
    masks = None if mask is None else {"t": mask}
    payload = codec.encode({"t": x}, config, masks=masks, send_masks=False)
    res = codec.residual({"t": x}, payload, masks=masks)["t"]
    dec = codec.decode(payload, masks=masks)["t"]
    assert res.dtype == np.float32
    np.testing.assert_array_equal(res, x - dec)
    if mask is not None:
        np.testing.assert_array_equal(res[~mask], x[~mask])


def test_residual_rejects_mismatched_update() -> None:
    payload = codec.encode({"a": np.ones((2, 2), np.float32)}, CodecConfig())
    with pytest.raises(ValueError, match="differ"):
        codec.residual({"b": np.ones((2, 2), np.float32)}, payload)
    with pytest.raises(ValueError, match="shape"):
        codec.residual({"a": np.ones(4, np.float32)}, payload)


# -- special values ------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["int8-channel", "int8"])
def test_all_zero_constant_and_tiny_tensors(quant: codec.QuantMode) -> None:
    tensors = {
        "zero": np.zeros((3, 4), np.float32),
        "const": np.full((3, 4), -2.5, np.float32),
        "tiny": np.full((2, 2), 1e-45, np.float32),  # amax / 127 underflows to 0
        "huge": np.full((2, 2), np.finfo(np.float32).max, np.float32),
        "scalar": np.array(3.0, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "empty_rows": np.zeros((3, 0), np.float32),
    }
    payload = codec.encode(tensors, CodecConfig(quant=quant))
    out = codec.decode(payload)
    assert np.isfinite(payload["scale"]).all() and (payload["scale"] > 0).all()
    for name, x in tensors.items():
        assert out[name].shape == x.shape
    np.testing.assert_array_equal(scales_of(payload, "zero"), 1.0)
    np.testing.assert_array_equal(codes_of(payload, "zero"), 0)
    np.testing.assert_array_equal(out["zero"], 0.0)
    np.testing.assert_array_equal(codes_of(payload, "const"), -127)
    np.testing.assert_allclose(out["const"], -2.5, rtol=1e-6)
    np.testing.assert_array_equal(scales_of(payload, "tiny"), 1.0)
    np.testing.assert_array_equal(out["tiny"], 0.0)
    np.testing.assert_allclose(out["huge"], np.finfo(np.float32).max, rtol=1e-6)
    np.testing.assert_allclose(out["scalar"], 3.0, rtol=1e-6)
    assert codes_of(payload, "empty").size == 0 and codes_of(payload, "empty_rows").size == 0


def test_empty_model_and_empty_masks() -> None:
    for config in CONFIGS:
        payload = codec.encode({}, config)
        assert list(payload) == _expected_keys(config, False, True)
        np.testing.assert_array_equal(payload["meta"], [3, QUANT_CODE[config.quant], 0])
        assert payload["names"].size == 0
        assert codec.decode(payload) == {} and codec.payload_masks(payload) == {}
    # a single tensor named "" is not the empty model
    payload = codec.encode({"": np.ones(2, np.float32)}, CodecConfig())
    assert list(codec.decode(payload)) == [""]
    # masks of empty tensors and masks keeping nothing
    tensors = {"e": np.zeros((0, 4), np.float32), "w": np.ones((3, 3), np.float32)}
    masks = {"e": np.zeros((0, 4), bool), "w": np.zeros((3, 3), bool)}
    payload = codec.encode(tensors, CodecConfig(), masks=masks)
    assert payload["codes"].size == 0 and payload["mask"].tolist() == [0, 0]
    out = codec.decode(payload)
    assert out["e"].shape == (0, 4)
    np.testing.assert_array_equal(out["w"], 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("config", CONFIGS[::2])
@pytest.mark.parametrize("masked", [False, True])
def test_non_finite_input_raises(bad: float, config: CodecConfig, masked: bool) -> None:
    x = np.ones((3, 4), np.float32)
    x[1, 2] = bad
    masks = {"w": np.ones((3, 4), bool)} if masked else None
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode({"w": x}, config, masks=masks)


def test_non_finite_entry_under_the_mask_is_never_read() -> None:
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    mask = np.ones((3, 4), bool)
    mask[1, 2] = False
    for config in CONFIGS:
        out = codec.decode(codec.encode({"w": x}, config, masks={"w": mask}))["w"]
        assert out[1, 2] == 0 and np.isfinite(out).all()


def test_quantize_int8_rejects_non_finite_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        codec.quantize_int8(np.array([1.0, np.nan]), per_channel=False)
    with pytest.raises(ValueError, match="rounding"):
        codec.quantize_int8(np.ones(3), per_channel=False, rounding="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rng"):
        codec.quantize_int8(np.ones(3), per_channel=False, rounding="stochastic")
    with pytest.raises(ValueError, match="real numeric"):
        codec.quantize_int8(np.ones(3, np.complex64), per_channel=False)


def test_dequantize_int8_validates() -> None:
    codes = np.ones((2, 3), np.int8)
    with pytest.raises(ValueError, match="int8"):
        codec.dequantize_int8(codes.astype(np.int16), np.ones(2, np.float32), per_channel=True)
    with pytest.raises(ValueError, match="expected 2"):
        codec.dequantize_int8(codes, np.ones(3, np.float32), per_channel=True)
    with pytest.raises(ValueError, match="non-positive"):
        codec.dequantize_int8(codes, np.array([1.0, 0.0], np.float32), per_channel=True)
    out = codec.dequantize_int8(codes, np.array([2.0, 3.0], np.float32), per_channel=True)
    np.testing.assert_array_equal(out, [[2, 2, 2], [3, 3, 3]])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="quant"):
        CodecConfig(quant="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding"):
        CodecConfig(rounding="down")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entropy"):
        CodecConfig(entropy=1)  # type: ignore[arg-type]


def test_encode_validates_masks_and_names() -> None:
    x = {"w": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match="not encoded"):
        codec.encode(x, CodecConfig(), masks={"v": np.ones((2, 3), bool)})
    with pytest.raises(ValueError, match="shape"):
        codec.encode(x, CodecConfig(), masks={"w": np.ones((3, 2), bool)})
    with pytest.raises(ValueError, match="bool"):
        codec.encode(x, CodecConfig(), masks={"w": np.ones((2, 3), np.uint8)})
    with pytest.raises(ValueError, match="config"):
        codec.encode(x, "int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="separator"):
        codec.encode({"a\nb": np.ones(2, np.float32)}, CodecConfig())
    with pytest.raises(ValueError, match="must be str"):
        codec.encode({3: np.ones(2, np.float32)}, CodecConfig())  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="UTF-8"):
        codec.encode({"\ud800": np.ones(2, np.float32)}, CodecConfig())


# -- masks ---------------------------------------------------------------------------------------
@SETTINGS
@given(mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0)))
def test_pack_unpack_mask_round_trip(mask: np.ndarray) -> None:
    bits = codec.pack_mask(mask)
    assert bits.dtype == np.uint8 and bits.shape == ((mask.size + 7) // 8,)
    np.testing.assert_array_equal(codec.unpack_mask(bits, mask.shape), mask)


@SETTINGS
@given(
    masks=st.lists(
        hnp.arrays(np.bool_, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=11)),
        max_size=6,
    )
)
def test_mask_stream_is_packbits_of_the_concatenated_masks(masks: list[np.ndarray]) -> None:
    tensors = {f"t{i}": np.ones(m.shape, np.float32) for i, m in enumerate(masks)}
    named = {f"t{i}": m for i, m in enumerate(masks)}
    payload = codec.encode(tensors, CodecConfig(), masks=named)
    flat = np.concatenate([m.reshape(-1) for m in masks]) if masks else np.zeros(0, bool)
    if masks:
        np.testing.assert_array_equal(payload["mask"], np.packbits(flat))
    else:
        assert "mask" not in payload
    carried = codec.payload_masks(payload)
    assert list(carried) == list(named)
    for name, mask in named.items():
        assert carried[name].shape == mask.shape
        np.testing.assert_array_equal(carried[name], mask)


def test_unpack_mask_validates_length() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        codec.unpack_mask(np.zeros(1, np.uint8), (3, 4))
    with pytest.raises(ValueError, match="bool"):
        codec.pack_mask(np.ones(3, np.int8))
    # 12 bits in 2 bytes: the last 4 bits of byte 2 are padding and must be zero.
    codec.unpack_mask(np.array([0xFF, 0xF0], np.uint8), (3, 4))
    with pytest.raises(ValueError, match="padding"):
        codec.unpack_mask(np.array([0xFF, 0xF1], np.uint8), (3, 4))


def test_payload_masks_and_cached_masks() -> None:
    rng = np.random.default_rng(3)
    x = {"w": rng.standard_normal((5, 7)).astype(np.float32), "b": np.ones(5, np.float32)}
    masks = {"w": rng.random((5, 7)) < 0.4}
    sent = codec.encode(x, CodecConfig(), masks=masks)
    assert list(codec.payload_masks(sent)) == ["w"]
    np.testing.assert_array_equal(codec.payload_masks(sent)["w"], masks["w"])
    cached = codec.encode(x, CodecConfig(), masks=masks, send_masks=False)
    assert "mask" not in cached and codec.payload_masks(cached) == {}
    assert tensor_flags(cached, "w") == 2 | codec.FLAG_MASKED
    with pytest.raises(ValueError, match="without its mask bits"):
        codec.decode(cached)
    with pytest.raises(ValueError, match="without its mask bits"):
        codec.decode(cached, masks={"b": np.ones(5, bool)})
    with pytest.raises(ValueError, match="shape"):
        codec.decode(cached, masks={"w": np.ones((7, 5), bool)})
    with pytest.raises(ValueError, match="bool"):
        codec.decode(cached, masks={"w": masks["w"].astype(np.uint8)})
    other = masks["w"].copy()
    other[0, ~other[0]] = True  # different popcount
    with pytest.raises(ValueError, match="mask keeps"):
        codec.decode(cached, masks={"w": other})
    assert list(sent) == [*cached, "mask"]
    a, b = codec.decode(sent), codec.decode(cached, masks=masks)
    for name in x:
        np.testing.assert_array_equal(a[name], b[name])
    # carried masks take precedence over the masks argument
    c = codec.decode(sent, masks={"w": other})
    np.testing.assert_array_equal(c["w"], a["w"])


def test_decode_does_not_alias_payload() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for config in (CodecConfig(quant="none"), CodecConfig()):
        payload = codec.encode({"w": x, "v": x + 1}, config)
        before = {k: v.copy() for k, v in payload.items()}
        for out in codec.decode(payload).values():
            out[...] = -1.0
        for k, v in payload.items():
            np.testing.assert_array_equal(v, before[k])
    payload = codec.encode({"w": x}, CodecConfig(quant="none"))
    x[0, 0] = 99.0  # encode copied the dense float32 values
    assert payload["values"][0] == 0.0


# -- decode validation ---------------------------------------------------------------------------
# _valid(): meta = [3, 2, 2,  w: flags 3, n_values 4, ndim 5, shape 6 7,  b: flags 8, n 9, ndim 10,
# shape 11]; w is (4, 5) = 20 mask bits (3 bytes, 4 padding bits), b is dense (4,).
W_FLAGS, W_N, W_SHAPE1, B_FLAGS, B_N, B_SHAPE0 = 3, 4, 7, 8, 9, 11


def _valid() -> tuple[codec.Payload, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    masks = {"w": rng.random((4, 5)) < 0.5}
    x = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": np.ones(4, np.float32)}
    payload = codec.encode(x, CodecConfig(), masks=masks)
    return {k: v.copy() for k, v in payload.items()}, masks


def _names(text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8)


def _corrupt(change: str) -> codec.Payload:
    p, masks = _valid()
    n = int(masks["w"].sum())
    meta = p["meta"]
    if change == "missing meta":
        del p["meta"]
    elif change == "missing names":
        del p["names"]
    elif change == "missing codes":
        del p["codes"]
    elif change == "missing scale":
        del p["scale"]
    elif change == "missing mask":
        del p["mask"]
    elif change == "extra field":
        p["values"] = np.zeros(n + 4, np.float32)
    elif change == "unknown key":
        p["bogus"] = np.zeros(1, np.float32)
    elif change == "per-tensor key":
        p["w/codes"] = p["codes"]
    elif change == "names count":
        p["names"] = _names(b"w")
    elif change == "names extra":
        p["names"] = _names(b"w\nb\nc")
    elif change == "names duplicate":
        p["names"] = _names(b"w\nw")
    elif change == "names utf8":
        p["names"] = _names(b"\xff\nb")
    elif change == "names dtype":
        p["names"] = p["names"].astype(np.int8)
    elif change == "codes dtype":
        p["codes"] = p["codes"].astype(np.int16)
    elif change == "codes 2-D":
        p["codes"] = p["codes"].reshape(1, -1)
    elif change == "codes short":
        p["codes"] = p["codes"][:-1]
    elif change == "codes trailing":
        p["codes"] = np.append(p["codes"], np.int8(0))
    elif change == "popcount":
        p["codes"] = p["codes"][1:]
        meta[W_N] = n - 1
    elif change == "code -128":
        p["codes"][0] = -128
    elif change == "scale nan":
        p["scale"][1] = np.nan
    elif change == "scale inf":
        p["scale"][1] = np.inf
    elif change == "scale zero":
        p["scale"][-1] = 0.0  # b's step
    elif change == "scale overflow":
        p["scale"][0] = np.finfo(np.float32).max / 100
    elif change == "scale negative":
        p["scale"] = -p["scale"]
    elif change == "scale length":
        p["scale"] = p["scale"][:-1]
    elif change == "scale dtype":
        p["scale"] = p["scale"].astype(np.float64)
    elif change == "meta dtype":
        p["meta"] = meta.astype(np.int32)
    elif change == "meta short":
        p["meta"] = meta[:2]
    elif change == "meta version":
        meta[0] = 99
    elif change == "payload flags":
        meta[1] |= 1 << 20
    elif change == "payload quant":
        meta[1] = 3
    elif change == "tensor flags":
        meta[W_FLAGS] |= 1 << 10
    elif change == "tensor mode":
        meta[B_FLAGS] = 2  # per channel for a 1-D tensor
    elif change == "n_tensors":
        meta[2] = 3
    elif change == "n_tensors large":
        meta[2] = 9
    elif change == "n_tensors negative":
        meta[2] = -1
    elif change == "meta ndim":
        p["meta"] = meta[:-1]
    elif change == "meta truncated":
        p["meta"] = meta[: B_FLAGS + 2]
    elif change == "meta trailing":
        p["meta"] = np.append(meta, np.int64(0))
    elif change == "negative dim":
        meta[B_SHAPE0] = -4
    elif change == "dense n_values":
        meta[B_N] = 3
    elif change == "masked n_values":
        meta[W_N] = 21
    elif change == "meta shape":
        meta[W_SHAPE1] = 7  # 28 mask bits: the mask stream no longer matches
    elif change == "mask length":
        p["mask"] = np.append(p["mask"], np.uint8(0))
    elif change == "mask padding":
        p["mask"][-1] |= 1
    elif change == "mask of a dense tensor":
        meta[B_FLAGS] |= codec.FLAG_MASK_SENT
    elif change == "mask zlib without mask":
        del p["mask"]
        meta[W_FLAGS] &= ~codec.FLAG_MASK_SENT
        meta[1] |= codec.FLAG_MASK_ZLIB
    elif change == "not an array":
        p["scale"] = [1.0]  # type: ignore[assignment]
    elif change == "not a mapping":
        return list(p.items())  # type: ignore[return-value]
    elif change == "zlib corrupt":
        p["codes"] = _names(b"not zlib at all")
        meta[1] |= codec.FLAG_CODES_ZLIB
    elif change == "zlib length":
        p["codes"] = _names(zlib.compress(bytes(n + 4 + 3)))
        meta[1] |= codec.FLAG_CODES_ZLIB
    elif change == "zlib trailing":
        p["codes"] = _names(zlib.compress(p["codes"].tobytes()) + b"\x00")
        meta[1] |= codec.FLAG_CODES_ZLIB
    elif change == "zlib not uint8":
        meta[1] |= codec.FLAG_CODES_ZLIB
    elif change == "mask zlib corrupt":
        meta[1] |= codec.FLAG_MASK_ZLIB
    else:  # pragma: no cover
        raise AssertionError(change)
    return p


MALFORMED = [
    ("missing meta", "missing key 'meta'"),
    ("missing names", "missing key 'names'"),
    ("missing codes", "missing keys \\['codes'\\]"),
    ("missing scale", "missing keys \\['scale'\\]"),
    ("missing mask", "missing keys \\['mask'\\]"),
    ("extra field", "unexpected keys \\['values'\\]"),
    ("unknown key", "unknown keys \\['bogus'\\]"),
    ("per-tensor key", "unknown keys \\['w/codes'\\]"),
    ("names count", "'names' holds 1 names, but 'meta' describes 2"),
    ("names extra", "'names' holds 3 names"),
    ("names duplicate", "repeats tensor names \\['w'\\]"),
    ("names utf8", "not valid UTF-8"),
    ("names dtype", "'names' must be a 1-D uint8"),
    ("codes dtype", "'codes' must be a 1-D int8"),
    ("codes 2-D", "'codes' must be a 1-D int8"),
    ("codes short", "'codes' has .* entries, expected"),
    ("codes trailing", "'codes' has .* entries, expected"),
    ("popcount", "mask keeps"),
    ("code -128", "-128"),
    ("scale nan", "non-finite or non-positive"),
    ("scale inf", "non-finite or non-positive"),
    ("scale zero", "non-finite or non-positive"),
    ("scale negative", "non-finite or non-positive"),
    ("scale overflow", "overflows float32"),
    ("scale length", "4 scales, expected 5"),
    ("scale dtype", "'scale' must be a 1-D float32"),
    ("meta dtype", "'meta' must be a 1-D int64"),
    ("meta short", "'meta' must be a 1-D int64 array of >= 3 entries"),
    ("meta version", "format version 99"),
    ("payload flags", "unknown payload flags"),
    ("payload quant", "does not follow the payload's mode"),  # 3 is the low-bit mode
    ("tensor flags", "tensor 'w': unknown tensor flags"),
    ("tensor mode", "tensor 'b': quantization mode 2 does not follow"),
    ("n_tensors", "'names' holds 2 names, but 'meta' describes 3"),
    ("n_tensors large", "9 tensors do not fit"),
    ("n_tensors negative", "-1 tensors do not fit"),
    ("meta ndim", "tensor 'b': ndim 1 does not match"),
    ("meta truncated", "tensor 'b': truncated entry"),
    ("meta trailing", "1 trailing entries"),
    ("negative dim", "negative dimension"),
    ("dense n_values", "3 values for a tensor of 4 entries"),
    ("masked n_values", "21 values for a tensor of 20 entries"),
    ("meta shape", "'mask' has 3 entries, expected 4"),
    ("mask length", "'mask' has 4 entries, expected 3"),
    ("mask padding", "non-zero padding bits"),
    ("mask of a dense tensor", "mask sent for a dense tensor"),
    ("mask zlib without mask", "compressed mask flagged but no mask sent"),
    ("not an array", "'scale' must be a numpy array"),
    ("not a mapping", "must be a mapping"),
    ("zlib corrupt", "'codes': corrupt zlib"),
    ("zlib length", "does not expand"),
    ("zlib trailing", "trailing bytes"),
    ("zlib not uint8", "flagged zlib but is not a 1-D uint8"),
    ("mask zlib corrupt", "'mask': corrupt zlib"),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_decode_rejects_malformed_payload(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.decode(_corrupt(change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (c, m)
        for c, m in MALFORMED
        if c.startswith(("missing meta", "missing names", "missing mask", "meta", "names", "mask"))
    ],
)
def test_payload_masks_rejects_malformed_payload(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.payload_masks(_corrupt(change))


def test_decode_rejects_malformed_values_stream() -> None:
    x = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    good = codec.encode(x, CodecConfig(quant="none"))
    cases: list[tuple[np.ndarray, str]] = [
        (np.array([0, 1, 2, np.nan, 4, 5, 1, 1], np.float32), "NaN or inf"),
        (np.array([0, 1, 2, 3, 4, 5, 1, np.inf], np.float32), "NaN or inf"),
        (good["values"].astype(np.float64), "'values' must be a 1-D float32"),
        (good["values"][:-1], "'values' has 7 entries, expected 8"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            codec.decode({**good, "values": bad})
    with pytest.raises(ValueError, match="unexpected keys \\['codes'\\]"):
        codec.decode({**good, "codes": np.zeros(8, np.int8)})
    meta = good["meta"].copy()
    meta[1] = 2  # the payload claims int8-channel, its tensors say float32
    with pytest.raises(ValueError, match="tensor 'w': quantization mode 0 does not follow"):
        codec.decode({**good, "meta": meta})


def test_decode_ignores_masks_of_dense_tensors() -> None:
    x = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    payload = codec.encode(x, CodecConfig(quant="none"))
    out = codec.decode(payload, masks={"w": np.zeros((2, 3), bool), "other": np.ones(1, bool)})
    np.testing.assert_array_equal(out["w"], x["w"])


def test_tensor_order_is_kept() -> None:
    x = {n: np.full((2, 2), i + 1, np.float32) for i, n in enumerate(("z", "a", "m"))}
    payload = codec.encode(x, CodecConfig(), masks={"a": np.eye(2, dtype=bool)})
    assert list(payload) == ["meta", "names", "codes", "scale", "mask"]
    assert payload["names"].tobytes() == b"z\na\nm"
    np.testing.assert_array_equal(payload["codes"], [127] * 4 + [127] * 2 + [127] * 4)
    np.testing.assert_array_equal(payload["scale"], np.array([1, 1, 2, 2, 3, 3], np.float32) / 127)
    np.testing.assert_array_equal(payload["mask"], [0b10010000])
    assert list(codec.decode(payload)) == ["z", "a", "m"]


def test_names_may_be_any_text_without_a_newline() -> None:
    x = {n: np.ones(2, np.float32) for n in ("", "a b", "\u00e9t\u00e9/0.weight", "x\ty", '"q"')}
    payload = codec.encode(x, CodecConfig())
    assert list(codec.decode(payload)) == list(x)


# -- the point of the layout: a fixed set of arrays ----------------------------------------------
# The digits MLP (64 -> 200 -> 200 -> 10): 6 tensors, 55,210 parameters.
MLP_SHAPES = {
    "1.weight": (200, 64),
    "1.bias": (200,),
    "3.weight": (200, 200),
    "3.bias": (200,),
    "5.weight": (10, 200),
    "5.bias": (10,),
}


def _model(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(s).astype(np.float32) for name, s in shapes.items()}


def _many_tensors(n: int) -> dict[str, tuple[int, ...]]:
    """A ResNet-like list of ``n`` tensors (conv weights, norm parameters)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        shapes[f"layer{i}.{'weight' if i % 2 == 0 else 'bias'}"] = (
            (8, 4, 3, 3) if i % 2 == 0 else (8,)
        )
    return shapes


def test_number_of_arrays_does_not_depend_on_the_number_of_tensors() -> None:
    names = list(MLP_SHAPES)
    models = [{n: MLP_SHAPES[n] for n in names[:k]} for k in range(1, 7)]
    models += [_many_tensors(62), _many_tensors(250)]
    for config in CONFIGS:
        for masked in (False, True):
            for send in (False, True):
                counts = set()
                for shapes in models:
                    tensors = _model(shapes)
                    masks = {n: np.ones(s, bool) for n, s in shapes.items() if len(s) >= 2}
                    payload = codec.encode(
                        tensors, config, masks=masks if masked else None, send_masks=send
                    )
                    counts.add(len(payload))
                    assert len(codec.decode(payload, masks=masks)) == len(shapes)
                assert counts == {len(_expected_keys(config, masked, send))}
                assert max(counts) <= 5


def _framing(payload: codec.Payload) -> int:
    """Bytes on the wire beyond the arrays' own data."""
    return codec.wire_size(payload) - sum(a.nbytes for a in payload.values())


def test_dense_int8_mlp_payload_is_parameter_bytes_plus_scales() -> None:
    tensors = _model(MLP_SHAPES)
    n_params = sum(x.size for x in tensors.values())
    assert n_params == 55_210
    fp32 = codec.wire_size(tensors)  # the float32 model as Flower sends it, one array per tensor
    cases: list[tuple[codec.QuantMode, int]] = [
        ("int8-channel", 200 + 1 + 200 + 1 + 10 + 1),
        ("int8", 6),
    ]
    for quant, n_scales in cases:
        payload = codec.encode(tensors, CodecConfig(quant=quant))
        assert len(payload) == 4
        assert payload["scale"].size == n_scales
        data = n_params + 4 * n_scales  # int8 codes + float32 scales
        size = codec.wire_size(payload)
        # meta (27 int64), names (41 bytes) and the framing of 4 arrays: ~2 kB in all
        assert data < size <= 1.02 * data + 1_000, (quant, size, data)
        assert fp32 / size > 3.75  # was 3.4 with 3 arrays per tensor (64,847 bytes)
    # The framing is the same for 1, 6, 62 or 250 tensors (up to digits of lengths in JSON).
    models: list[dict[str, tuple[int, ...]]] = [
        {"w": (200, 64)},
        MLP_SHAPES,
        _many_tensors(62),
        _many_tensors(250),
    ]
    framings = [_framing(codec.encode(_model(shapes), CodecConfig())) for shapes in models]
    assert max(framings) - min(framings) <= 16, framings
    sparse = codec.encode(tensors, CodecConfig(), masks={"1.weight": np.ones((200, 64), bool)})
    assert _framing(sparse) - framings[1] <= 500  # one more array, for all the mask bits


def test_wire_size_counts_identical_arrays_once() -> None:
    a = np.arange(10, dtype=np.float32)
    one = codec.wire_size({"a": a})
    two = codec.wire_size({"a": a, "b": a.copy()})
    # The copy adds only its ArrayRecord entry ', "b": "<64 hex id>"' (73 bytes), and the
    # record's body length in its header grows from 73 to 146 (one more digit).
    assert two - one == 73 + 1
    with pytest.raises(ValueError, match="numpy array"):
        codec.wire_size({"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="pickle"):
        codec.wire_size({"a": np.array([object()])})
    with pytest.raises(ValueError, match="chunk_size"):
        codec.wire_size({"a": a}, chunk_size=0)


# -- benchmark plumbing (simulations/bench.py; the codec benchmark itself runs in `make bench`) --
def test_bench_record_merges_into_existing_json(tmp_path: Path) -> None:
    path = tmp_path / "bench" / "bench.json"
    assert bench.record({"a": 1.0}, path) == {"a": 1.0}
    assert bench.record({"b": 2, "a": 3.0}, path) == {"a": 3.0, "b": 2.0}
    assert json.loads(path.read_text()) == {"a": 3.0, "b": 2.0}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        bench.record({"a": 1.0}, path)


def test_bench_cli_selects_benchmarks_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def make(name: str) -> bench.BenchFn:
        def run() -> dict[str, float]:
            calls.append(name)
            return {f"{name}_key": float(len(calls))}

        return run

    registry = {"one": make("one"), "two": make("two")}
    monkeypatch.setattr(bench, "_REGISTRY", registry)
    out = tmp_path / "b.json"
    assert bench.main(["two", "--out", str(out)]) == {"two_key": 1.0}
    assert calls == ["two"]
    assert bench.main(["--out", str(out)]) == {"one_key": 2.0, "two_key": 3.0}
    assert calls == ["two", "one", "two"]
    assert json.loads(out.read_text()) == {"one_key": 2.0, "two_key": 3.0}
    with pytest.raises(SystemExit):
        bench.main(["three", "--out", str(out)])
    timings = bench.interleaved_medians({"noop": lambda: None}, repeats=3)
    assert set(timings) == {"noop"} and timings["noop"] >= 0.0
