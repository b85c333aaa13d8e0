"""Tests of fedprune.codec (pure numpy; the Flower wire format is pinned in test_codec_wire)."""

from __future__ import annotations

import json
import zlib
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


@st.composite
def tensor_and_mask(draw: st.DrawFn, max_dims: int = 3) -> tuple[np.ndarray, np.ndarray | None]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=6))
    x = draw(hnp.arrays(np.float32, shape, elements=FINITE32))
    mask = draw(st.none() | hnp.arrays(np.bool_, shape))
    return x, mask


def _element_scales(payload: codec.Payload, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Per-element step size (float64) of tensor ``name``, broadcast to ``shape``."""
    scale = payload[f"{name}/scale"].astype(np.float64)
    if _flags(payload, name) & codec.QUANT_BITS == 2:  # per output channel
        return np.broadcast_to(scale.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
    assert scale.shape == (1,)
    return np.broadcast_to(scale[0], shape)


def _flags(payload: codec.Payload, name: str) -> int:
    return int(payload[f"{name}/meta"][1])


# -- hand-computed examples ----------------------------------------------------------------------
X_HAND = np.array(
    [[127.0, -3.2, 50.6, 0.4], [12.7, -6.34, 0.04, 1.26], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32
)
M_HAND = np.array(
    [[False, True, True, False], [True, False, False, True], [False, False, False, False]]
)


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
    payload = codec.encode({"w": X_HAND}, CodecConfig(), masks={"w": M_HAND})
    assert list(payload) == ["w/meta", "w/codes", "w/scale", "w/mask"]
    flags = 2 | codec.FLAG_MASKED | codec.FLAG_MASK_SENT
    np.testing.assert_array_equal(payload["w/meta"], [1, flags, 4, 2, 3, 4])
    assert payload["w/meta"].dtype == np.int64
    # row 0 keeps -3.2, 50.6 -> scale 50.6 / 127; row 1 keeps 12.7, 1.26 -> scale 0.1
    np.testing.assert_array_equal(payload["w/codes"], np.array([-8, 127, 127, 13], np.int8))
    assert payload["w/codes"].dtype == np.int8
    np.testing.assert_allclose(payload["w/scale"], [50.6 / 127, 0.1, 1.0], rtol=1e-6)
    # bits 0110 1001 | 0000 (zero padded)
    np.testing.assert_array_equal(payload["w/mask"], np.array([0b01101001, 0], np.uint8))
    out = codec.decode(payload)["w"]
    s0 = 50.6 / 127
    expected = np.array([[0, -8 * s0, 127 * s0, 0], [12.7, 0, 0, 1.3], [0, 0, 0, 0]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert (out[~M_HAND] == 0).all()


def test_hand_example_values_passthrough() -> None:
    payload = codec.encode({"w": X_HAND}, CodecConfig(quant="none"), masks={"w": M_HAND})
    assert list(payload) == ["w/meta", "w/values", "w/mask"]
    np.testing.assert_array_equal(payload["w/values"], X_HAND[M_HAND])
    np.testing.assert_array_equal(codec.decode(payload)["w"], np.where(M_HAND, X_HAND, 0))


def test_bias_per_channel_mode_is_per_tensor() -> None:
    payload = codec.encode({"b": np.array([1.0, -2.0, 0.5], np.float32)}, CodecConfig())
    assert _flags(payload, "b") & codec.QUANT_BITS == 1
    assert payload["b/scale"].shape == (1,)


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
    assert np.isfinite(payload["t/scale"]).all() and (payload["t/scale"] > 0).all()
    kept = np.ones(x.shape, bool) if mask is None else mask
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert (err[kept] <= scale[kept] * (0.5 + 1e-4)).all()
    assert (out[~kept] == 0).all()
    assert payload["t/codes"].min(initial=0) >= -127


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
    np.testing.assert_array_equal(second["t/codes"], first["t/codes"])
    np.testing.assert_array_equal(second["t/meta"], first["t/meta"])
    np.testing.assert_allclose(second["t/scale"], first["t/scale"], rtol=1e-6)


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
    ]
    keys = [list(codec.encode(t, config, masks=masks, send_masks=send)) for t in tensors]
    assert keys[0] == keys[1]


def test_entropy_kept_only_when_smaller() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "zeros": np.zeros((64, 64), np.float32),  # codes all 0: compressible
        "noise": rng.standard_normal((4, 5)).astype(np.float32),  # tiny: zlib overhead wins
        "big": rng.standard_normal((64, 128)).astype(np.float32),
    }
    masks = {"zeros": rng.random((64, 64)) < 0.05, "noise": rng.random((4, 5)) < 0.5}
    for quant in ("int8-channel", "none"):
        raw = codec.encode(tensors, CodecConfig(quant=quant), masks=masks)
        ent = codec.encode(tensors, CodecConfig(quant=quant, entropy=True), masks=masks)
        assert list(raw) == list(ent)
        stream_field = "values" if quant == "none" else "codes"
        for name in tensors:
            for field, flag in (
                (stream_field, codec.FLAG_CODES_ZLIB),
                ("mask", codec.FLAG_MASK_ZLIB),
            ):
                key = f"{name}/{field}"
                if key not in raw:
                    continue
                compressed = bool(_flags(ent, name) & flag)
                candidate = np.frombuffer(
                    zlib.compress(raw[key].tobytes(), codec.ZLIB_LEVEL), np.uint8
                )
                smaller = codec.wire_size({key: candidate}) < codec.wire_size({key: raw[key]})
                assert compressed == smaller, key
                if compressed:
                    assert ent[key].dtype == np.uint8
                    assert zlib.decompress(ent[key].tobytes()) == raw[key].tobytes()
                else:
                    assert ent[key].dtype == raw[key].dtype
                    np.testing.assert_array_equal(ent[key], raw[key])
        assert _flags(ent, "zeros") & codec.FLAG_CODES_ZLIB
        assert _flags(ent, "zeros") & codec.FLAG_MASK_ZLIB
        assert not _flags(ent, "noise") & (codec.FLAG_CODES_ZLIB | codec.FLAG_MASK_ZLIB)
        assert codec.wire_size(ent) < codec.wire_size(raw)


def test_stochastic_rounding_is_unbiased() -> None:
    # amax 127 makes the step exactly 1.0, so decoded values are the codes themselves.
    row = np.array([0.3, -1.7, 2.5, 10.25, -0.05, 127.0], np.float32)
    trials = 4000
    x = np.tile(row, (trials, 1))
    config = CodecConfig(quant="int8", rounding="stochastic")
    payload = codec.encode({"x": x}, config, rng=np.random.default_rng(1234))
    assert payload["x/scale"][0] == 1.0
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
    for name, x in tensors.items():
        scale = payload[f"{name}/scale"]
        assert np.isfinite(scale).all() and (scale > 0).all(), name
        assert out[name].shape == x.shape
    np.testing.assert_array_equal(payload["zero/scale"], 1.0)
    np.testing.assert_array_equal(payload["zero/codes"], 0)
    np.testing.assert_array_equal(out["zero"], 0.0)
    np.testing.assert_array_equal(payload["const/codes"], -127)
    np.testing.assert_allclose(out["const"], -2.5, rtol=1e-6)
    np.testing.assert_array_equal(payload["tiny/scale"], 1.0)
    np.testing.assert_array_equal(out["tiny"], 0.0)
    np.testing.assert_allclose(out["huge"], np.finfo(np.float32).max, rtol=1e-6)
    np.testing.assert_allclose(out["scalar"], 3.0, rtol=1e-6)


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
    out = codec.decode(codec.encode({"w": x}, CodecConfig(), masks={"w": mask}))["w"]
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


def test_encode_validates_masks() -> None:
    x = {"w": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match="not encoded"):
        codec.encode(x, CodecConfig(), masks={"v": np.ones((2, 3), bool)})
    with pytest.raises(ValueError, match="shape"):
        codec.encode(x, CodecConfig(), masks={"w": np.ones((3, 2), bool)})
    with pytest.raises(ValueError, match="bool"):
        codec.encode(x, CodecConfig(), masks={"w": np.ones((2, 3), np.uint8)})
    with pytest.raises(ValueError, match="config"):
        codec.encode(x, "int8")  # type: ignore[arg-type]


# -- masks ---------------------------------------------------------------------------------------
@SETTINGS
@given(mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0)))
def test_pack_unpack_mask_round_trip(mask: np.ndarray) -> None:
    bits = codec.pack_mask(mask)
    assert bits.dtype == np.uint8 and bits.shape == ((mask.size + 7) // 8,)
    np.testing.assert_array_equal(codec.unpack_mask(bits, mask.shape), mask)


def test_unpack_mask_validates_length() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        codec.unpack_mask(np.zeros(1, np.uint8), (3, 4))
    with pytest.raises(ValueError, match="bool"):
        codec.pack_mask(np.ones(3, np.int8))


def test_payload_masks_and_cached_masks() -> None:
    rng = np.random.default_rng(3)
    x = {"w": rng.standard_normal((5, 7)).astype(np.float32), "b": np.ones(5, np.float32)}
    masks = {"w": rng.random((5, 7)) < 0.4}
    sent = codec.encode(x, CodecConfig(), masks=masks)
    assert list(codec.payload_masks(sent)) == ["w"]
    np.testing.assert_array_equal(codec.payload_masks(sent)["w"], masks["w"])
    cached = codec.encode(x, CodecConfig(), masks=masks, send_masks=False)
    assert "w/mask" not in cached and codec.payload_masks(cached) == {}
    with pytest.raises(ValueError, match="without its mask bits"):
        codec.decode(cached)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(cached, masks={"w": np.ones((7, 5), bool)})
    with pytest.raises(ValueError, match="bool"):
        codec.decode(cached, masks={"w": masks["w"].astype(np.uint8)})
    other = masks["w"].copy()
    other[0, ~other[0]] = True  # different popcount
    with pytest.raises(ValueError, match="mask keeps"):
        codec.decode(cached, masks={"w": other})
    for key in sent:
        assert key in cached or key == "w/mask"
    a, b = codec.decode(sent), codec.decode(cached, masks=masks)
    for name in x:
        np.testing.assert_array_equal(a[name], b[name])


def test_decode_does_not_alias_payload() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for config in (CodecConfig(quant="none"), CodecConfig()):
        payload = codec.encode({"w": x}, config)
        before = {k: v.copy() for k, v in payload.items()}
        codec.decode(payload)["w"][...] = -1.0
        for k, v in payload.items():
            np.testing.assert_array_equal(v, before[k])
    payload = codec.encode({"w": x}, CodecConfig(quant="none"))
    x[0, 0] = 99.0  # encode copied the dense float32 values
    assert payload["w/values"][0] == 0.0


# -- decode validation ---------------------------------------------------------------------------
def _valid() -> tuple[codec.Payload, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    masks = {"w": rng.random((4, 6)) < 0.5}
    x = {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": np.ones(4, np.float32)}
    return codec.encode(x, CodecConfig(), masks=masks), masks


def _corrupt(change: str) -> codec.Payload:
    p, masks = _valid()
    n = int(masks["w"].sum())
    if change == "missing meta":
        del p["w/meta"]
    elif change == "missing codes":
        del p["w/codes"]
    elif change == "missing mask":
        del p["w/mask"]
    elif change == "extra field":
        p["w/values"] = np.zeros(n, np.float32)
    elif change == "unknown field":
        p["w/bogus"] = np.zeros(1, np.float32)
    elif change == "no separator":
        p["wcodes"] = np.zeros(1, np.int8)
    elif change == "codes dtype":
        p["w/codes"] = p["w/codes"].astype(np.int16)
    elif change == "codes 2-D":
        p["w/codes"] = p["w/codes"].reshape(1, -1)
    elif change == "codes short":
        p["w/codes"] = p["w/codes"][:-1]
    elif change == "popcount":
        p["w/codes"] = p["w/codes"][:-1]
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][2] = n - 1
    elif change == "code -128":
        p["w/codes"] = p["w/codes"].copy()
        p["w/codes"][0] = -128
    elif change == "scale nan":
        p["w/scale"] = p["w/scale"].copy()
        p["w/scale"][1] = np.nan
    elif change == "scale inf":
        p["w/scale"] = p["w/scale"].copy()
        p["w/scale"][1] = np.inf
    elif change == "scale zero":
        p["b/scale"] = np.zeros(1, np.float32)
    elif change == "scale overflow":
        p["w/scale"] = p["w/scale"].copy()
        p["w/scale"][0] = np.finfo(np.float32).max / 100
    elif change == "scale negative":
        p["w/scale"] = -p["w/scale"]
    elif change == "scale length":
        p["w/scale"] = p["w/scale"][:-1]
    elif change == "scale dtype":
        p["w/scale"] = p["w/scale"].astype(np.float64)
    elif change == "meta dtype":
        p["w/meta"] = p["w/meta"].astype(np.int32)
    elif change == "meta version":
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][0] = 99
    elif change == "meta flags":
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][1] |= 1 << 10
    elif change == "meta ndim":
        p["w/meta"] = p["w/meta"][:-1]
    elif change == "meta shape":
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][5] = 7  # mask bits no longer match
    elif change == "mask length":
        p["w/mask"] = np.append(p["w/mask"], np.uint8(0))
    elif change == "not an array":
        p["b/scale"] = [1.0]  # type: ignore[assignment]
    elif change == "zlib corrupt":
        p["w/codes"] = np.frombuffer(b"not zlib at all", np.uint8)
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][1] |= codec.FLAG_CODES_ZLIB
    elif change == "zlib length":
        p["w/codes"] = np.frombuffer(zlib.compress(bytes(n + 3)), np.uint8)
        p["w/meta"] = p["w/meta"].copy()
        p["w/meta"][1] |= codec.FLAG_CODES_ZLIB
    else:  # pragma: no cover
        raise AssertionError(change)
    return p


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing meta", "missing key 'w/meta'"),
        ("missing codes", "missing keys \\['w/codes'\\]"),
        ("missing mask", "missing keys \\['w/mask'\\]"),
        ("extra field", "unexpected keys \\['w/values'\\]"),
        ("unknown field", "'w/bogus' is not"),
        ("no separator", "'wcodes' is not"),
        ("codes dtype", "'w/codes' must be a 1-D int8"),
        ("codes 2-D", "'w/codes' must be a 1-D int8"),
        ("codes short", "'w/codes' has .* entries, expected"),
        ("popcount", "mask keeps"),
        ("code -128", "-128"),
        ("scale nan", "non-finite or non-positive"),
        ("scale inf", "non-finite or non-positive"),
        ("scale zero", "non-finite or non-positive"),
        ("scale negative", "non-finite or non-positive"),
        ("scale overflow", "overflows float32"),
        ("scale length", "scales, expected 4"),
        ("scale dtype", "'w/scale' must be a 1-D float32"),
        ("meta dtype", "'w/meta' must be a 1-D int64"),
        ("meta version", "format version 99"),
        ("meta flags", "unknown flags"),
        ("meta ndim", "ndim 2 does not match"),
        ("meta shape", "'w/mask' has 3 entries, expected 4"),
        ("mask length", "'w/mask' has 4 entries, expected 3"),
        ("not an array", "must be a numpy array"),
        ("zlib corrupt", "corrupt zlib"),
        ("zlib length", "does not expand"),
    ],
)
def test_decode_rejects_malformed_payload(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.decode(_corrupt(change))


def test_decode_ignores_masks_of_dense_tensors() -> None:
    x = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    payload = codec.encode(x, CodecConfig(quant="none"))
    out = codec.decode(payload, masks={"w": np.zeros((2, 3), bool), "other": np.ones(1, bool)})
    np.testing.assert_array_equal(out["w"], x["w"])


def test_key_order_follows_tensor_order() -> None:
    x = {n: np.ones((2, 2), np.float32) for n in ("z", "a", "m")}
    payload = codec.encode(x, CodecConfig(), masks={"a": np.eye(2, dtype=bool)})
    assert list(payload) == [
        "z/meta", "z/codes", "z/scale",
        "a/meta", "a/codes", "a/scale", "a/mask",
        "m/meta", "m/codes", "m/scale",
    ]  # fmt: skip
    assert list(codec.decode(payload)) == ["z", "a", "m"]


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
