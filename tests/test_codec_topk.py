"""Top-k update sparsification in the codec: which entries travel, and what error feedback keeps."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune import codec
from fedprune.codec import CodecConfig

X = np.array([[3.0, -1.0, 0.5], [-4.0, 2.0, 0.1]], dtype=np.float32)


def test_dense_selection_by_hand() -> None:
    payload = codec.encode({"w": X}, CodecConfig(quant="int8", topk=0.5))
    # k = ceil(0.5 * 6) = 3: |-4|, |3|, |2| -> C-order positions 0, 3, 4 of the 6 candidates.
    np.testing.assert_array_equal(payload["select"], [0b10011000])
    assert payload["meta"].tolist() == [3, 1, 1, 1 | codec.FLAG_SELECTED, 3, 2, 2, 3, 6]
    # One step for the tensor, from the transmitted values: 4 / 127.
    np.testing.assert_array_equal(payload["codes"], [95, -127, 64])
    got = codec.decode(payload)["w"]
    step = np.float32(4.0) / np.float32(127)
    np.testing.assert_array_equal(got, np.array([[95, 0, 0], [-127, 64, 0]], np.float32) * step)


def test_sparse_decode_by_hand_holds_only_the_sent_entries() -> None:
    payload = codec.encode({"w": X}, CodecConfig(quant="int8", topk=0.5))
    ((name, got),) = codec.decode_sparse(payload).items()
    step = np.float32(4.0) / np.float32(127)
    assert name == "w" and got.shape == (2, 3)
    np.testing.assert_array_equal(got.index, [0, 3, 4])
    np.testing.assert_array_equal(got.values, np.array([95, -127, 64], np.float32) * step)
    assert got.squared_norm() == pytest.approx(float(np.sum(got.values.astype(np.float64) ** 2)))
    out = np.ones((2, 3), np.float32)
    got.add_into(out, 0.5)
    expected = np.ones((2, 3), np.float32)
    expected.reshape(-1)[[0, 3, 4]] += np.float32(0.5) * got.values
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="cannot add"):
        got.add_into(np.ones((3, 2), np.float32).T)  # right shape, not C-contiguous


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, (6, 7), elements=st.floats(-100, 100, width=32)),
    quant=st.sampled_from(["none", "int8", "int8-channel", "int4-channel", "ternary"]),
    topk=st.sampled_from([0.05, 0.3, 1.0]),
    log8=st.booleans(),
)
def test_sparse_decode_equals_the_dense_decode(
    x: np.ndarray, quant: str, topk: float, log8: bool
) -> None:
    lowbit = quant in ("int4-channel", "ternary")
    config = CodecConfig(
        quant=quant,  # type: ignore[arg-type]
        topk=topk,
        scales="log8" if log8 and lowbit else "float16",
    )
    payload = codec.encode({"w": x, "b": x[0]}, config)
    dense = codec.decode(payload)
    for name, tensor in codec.decode_sparse(payload).items():
        np.testing.assert_array_equal(tensor.dense(), dense[name])
        sent = tensor.values.size if tensor.index is None else tensor.index.size
        assert sent == (x.size if name == "w" else 7) if topk == 1.0 else sent < dense[name].size
        if tensor.index is not None:
            assert (np.diff(tensor.index) > 0).all()  # sorted, distinct


def test_masked_selection_is_over_the_masked_entries_only() -> None:
    mask = np.array([[True, True, False], [True, True, False]])
    payload = codec.encode({"w": X}, CodecConfig(quant="int8", topk=0.5), masks={"w": mask})
    # Candidates 3, -1, -4, 2 (C order); k = 2 keeps -4 and 3: bits 1010 over 4 candidates.
    np.testing.assert_array_equal(payload["select"], [0b10100000])
    got = codec.decode(payload)["w"]
    assert np.count_nonzero(got) == 2
    assert got[0, 0] > 0 and got[1, 0] < 0
    # The mask bits travel too, and decoding without them needs the mask.
    cached = codec.encode(
        {"w": X}, CodecConfig(quant="int8", topk=0.5), masks={"w": mask}, send_masks=False
    )
    np.testing.assert_array_equal(codec.decode(cached, masks={"w": mask})["w"], got)
    with pytest.raises(ValueError, match="without its mask bits"):
        codec.decode(cached)
    wrong = mask.copy()
    wrong[0, 2] = True
    with pytest.raises(ValueError, match="candidates"):
        codec.decode(cached, masks={"w": wrong})


def test_select_key_depends_only_on_the_config() -> None:
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.ones(4, np.float32)}
    b = {"w": np.zeros((4, 5), np.float32), "b": -np.ones(4, np.float32)}
    for config in (CodecConfig(topk=0.3), CodecConfig(topk=0.3, entropy=True)):
        assert list(codec.encode(a, config)) == list(codec.encode(b, config))
        assert "select" in codec.encode(a, config)
    assert "select" not in codec.encode(a, CodecConfig(topk=1.0))


@pytest.mark.parametrize("topk", [0.0, -0.1, 1.5, float("nan")])
def test_topk_out_of_range_is_rejected(topk: float) -> None:
    with pytest.raises(ValueError, match="topk"):
        CodecConfig(topk=topk)


def _corrupt(edit: str) -> codec.Payload:
    # 6 + 3 candidate bits: "select" is 2 bytes, the last 7 bits of the second are padding.
    payload = codec.encode({"w": X, "b": np.ones(3, np.float32)}, CodecConfig(topk=0.5))
    select = payload["select"].copy()
    if edit == "short select":
        payload["select"] = select[:1]
    elif edit == "extra bit":  # b's third entry selected too: 3 selected, 2 values sent
        select[1] |= 0b10000000
        payload["select"] = select
    elif edit == "padding":
        select[1] |= 0b00000001
        payload["select"] = select
    elif edit == "missing select":
        del payload["select"]
    elif edit == "half flagged":
        meta = payload["meta"].copy()
        meta[3] &= ~codec.FLAG_SELECTED  # "w" unflagged, its candidate count now trails
        payload["meta"] = meta
    return payload


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("short select", "'select' has 1 entries, expected 2"),
        ("extra bit", "2 transmitted values but the mask and selection keeps 3"),
        ("padding", "'select' has non-zero padding bits"),
        ("missing select", "missing keys \\['select'\\]"),
        ("half flagged", "3 values for a tensor of 6 entries"),
    ],
)
def test_malformed_selections_are_rejected(edit: str, message: str) -> None:
    codec.decode(_corrupt("none"))  # the unedited payload decodes
    with pytest.raises(ValueError, match=message):
        codec.decode(_corrupt(edit))


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, (6, 7), elements=st.floats(-1e3, 1e3, width=32)),
    keep=hnp.arrays(np.bool_, (6, 7)),
    topk=st.floats(0.01, 0.99),
)
def test_the_largest_candidates_travel_and_the_residual_is_exact(
    x: np.ndarray, keep: np.ndarray, topk: float
) -> None:
    config = CodecConfig(quant="int8-channel", topk=topk)
    payload = codec.encode({"w": x}, config, masks={"w": keep}, send_masks=False)
    meta = payload["meta"].tolist()
    n_candidates = int(keep.sum())
    assert meta[-1] == n_candidates
    assert meta[4] == min(math.ceil(topk * n_candidates), n_candidates)
    got = codec.decode(payload, masks={"w": keep})["w"]
    assert np.all(got[~keep] == 0.0)
    chosen = np.unpackbits(payload["select"], count=n_candidates).astype(bool)
    flat = np.zeros(x.size, bool)
    flat[np.flatnonzero(keep)[chosen]] = True
    sent = flat.reshape(x.shape)
    if sent.any() and (keep & ~sent).any():
        assert np.abs(x[sent]).min() >= np.abs(x[keep & ~sent]).max()
    residual = codec.residual({"w": x}, payload, masks={"w": keep})["w"]
    np.testing.assert_array_equal(residual, x - got)


def test_error_feedback_delivers_the_whole_update_over_rounds() -> None:
    rng = np.random.default_rng(3)
    update = rng.normal(size=(20, 30)).astype(np.float32)
    config = CodecConfig(quant="int8-channel", topk=0.1)
    carried = np.zeros_like(update)
    delivered = np.zeros_like(update)
    rounds = 40
    for _ in range(rounds):
        corrected = {"w": update + carried}
        payload = codec.encode(corrected, config)
        delivered += codec.decode(payload)["w"]
        carried = codec.residual(corrected, payload)["w"]
    # Everything sent plus what is still carried is exactly everything produced.
    np.testing.assert_allclose(delivered + carried, rounds * update, rtol=1e-4, atol=1e-3)
    # ... and what is carried stays bounded: after 40 rounds it is under a tenth of the total.
    assert np.abs(carried).max() < 0.1 * np.abs(rounds * update).max()


def test_expected_shapes_are_checked_before_anything_is_allocated() -> None:
    payload = codec.encode({"w": X}, CodecConfig())
    assert codec.decode(payload, shapes={"w": (2, 3)})["w"].shape == (2, 3)
    with pytest.raises(ValueError, match="differ from the expected"):
        codec.decode(payload, shapes={"w": (3, 2)})
    with pytest.raises(ValueError, match="differ from the expected"):
        codec.decode(payload, shapes={"v": (2, 3)})
    # A sparse payload that claims a huge tensor: 10**12 float32 entries would be 4 TB.
    mask = {"w": np.ones((2, 3), bool)}
    sparse = codec.encode({"w": X}, CodecConfig(), masks=mask, send_masks=False)
    meta = sparse["meta"].copy()
    meta[-2:] = [10**6, 10**6]
    huge = {**sparse, "meta": meta}
    with pytest.raises(ValueError, match="differ from the expected"):
        codec.decode(huge, masks=mask, shapes={"w": (2, 3)})
