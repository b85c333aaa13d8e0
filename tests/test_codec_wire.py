"""codec.wire_size against Flower 1.42's real serialization (the one codec test importing flwr).

Findings pinned here: ``ArrayRecord`` does not accept a ``dict[str, np.ndarray]`` (only
``dict[str, Array]``, a list of ndarrays or a torch ``state_dict``), so a payload is wrapped
by ``boundary.records.payload_record`` as raw ``Array`` objects (no npy header); the record
keeps key order, and an empty raw array (no chunk) survives Flower's serialization.
"""

from __future__ import annotations

import flwr.app.message.array as flwr_array
import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from boundary.records import from_record, payload_record
from fedprune import codec
from fedprune.codec import CodecConfig

to_record = payload_record


def flower_contents(payload: codec.Payload) -> tuple[str, dict[str, bytes]]:
    """Root object id and ``{object id: deflated bytes}`` of every unique object."""
    record = to_record(payload)
    objects = get_all_nested_objects(record)
    return record.object_id, {oid: obj.deflate() for oid, obj in objects.items()}


def flower_wire_size(payload: codec.Payload) -> int:
    return sum(len(content) for content in flower_contents(payload)[1].values())


def through_flower(payload: codec.Payload) -> dict[str, np.ndarray]:
    """Deflate every object, inflate the record from those bytes, read the arrays back."""
    root, contents = flower_contents(payload)
    record = inflate_object_from_contents(root, contents, keep_object_contents=True)
    assert isinstance(record, ArrayRecord)
    return from_record(record)


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "bn.num_batches_tracked": np.array(5.0, np.float32),
        "fc.weight": rng.standard_normal((10, 72)).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),
        "empty.weight": np.zeros((0, 4), np.float32),
    }


def _payloads() -> dict[str, codec.Payload]:
    rng = np.random.default_rng(0)
    model = _model(rng)
    masks = {
        "conv.weight": rng.random((8, 3, 3, 3)) < 0.3,
        "fc.weight": rng.random((10, 72)) < 0.1,
        "empty.weight": np.zeros((0, 4), bool),
    }
    zeros = {"z.weight": np.zeros((40, 30), np.float32), "b": np.ones(3, np.float32)}
    many = {  # ResNet-like: 62 tensors, still 5 arrays
        f"layer{i}.{'weight' if i % 2 == 0 else 'bias'}": (
            rng.standard_normal((16, 8, 3, 3) if i % 2 == 0 else (16,)).astype(np.float32)
        )
        for i in range(62)
    }
    many_masks = {name: rng.random(x.shape) < 0.3 for name, x in many.items() if x.ndim >= 2}
    return {
        "dense int8-channel": codec.encode(model, CodecConfig()),
        "dense int8": codec.encode(model, CodecConfig(quant="int8")),
        "dense float32": codec.encode(model, CodecConfig(quant="none")),
        "sparse int8-channel": codec.encode(model, CodecConfig(), masks=masks),
        "sparse cached masks": codec.encode(model, CodecConfig(), masks=masks, send_masks=False),
        "sparse float32": codec.encode(model, CodecConfig(quant="none"), masks=masks),
        "entropy": codec.encode(model, CodecConfig(entropy=True), masks=masks),
        "entropy compressible": codec.encode(
            zeros, CodecConfig(entropy=True), masks={"z.weight": np.eye(40, 30, dtype=bool)}
        ),
        "stochastic": codec.encode(
            model, CodecConfig(rounding="stochastic"), masks=masks, rng=np.random.default_rng(1)
        ),
        "tiny": codec.encode(
            {"s": np.array(1.5, np.float32), "v": np.ones(1, np.float32)}, CodecConfig()
        ),
        "many tensors": codec.encode(many, CodecConfig(), masks=many_masks),
        "many tensors entropy": codec.encode(many, CodecConfig(entropy=True), masks=many_masks),
        "many tensors float32 cached": codec.encode(
            many, CodecConfig(quant="none"), masks=many_masks, send_masks=False
        ),
        "top-k update": codec.encode(model, CodecConfig(topk=0.25), masks=masks),
        "top-k update entropy": codec.encode(model, CodecConfig(topk=0.1, entropy=True)),
        "empty model": codec.encode({}, CodecConfig()),
        "int4 top-k rice": codec.encode(
            model, CodecConfig(quant="int4-channel", topk=0.1, entropy=True)
        ),
        "ternary top-k sparse": codec.encode(
            model, CodecConfig(quant="ternary", topk=0.2, entropy=True), masks=masks
        ),
        "int4 log8 top-k": codec.encode(
            model, CodecConfig(quant="int4-channel", topk=0.2, entropy=True, scales="log8")
        ),
        "ternary log8 blob": codec.encode(
            model,
            CodecConfig(quant="ternary", topk=0.05, entropy=True, container="blob", scales="log8"),
        ),
        "ternary blocks of 4, model top-k, blob": codec.encode(
            model,
            CodecConfig(
                quant="ternary",
                topk=0.05,
                entropy=True,
                container="blob",
                topk_scope="model",
                topk_block=4,
            ),
        ),
        "ternary blob": codec.encode(
            model, CodecConfig(quant="ternary", topk=0.05, entropy=True, container="blob")
        ),
        "int8 blob sparse": codec.encode(model, CodecConfig(container="blob"), masks=masks),
        "unicode names": codec.encode(
            {"\u00e9t\u00e9.weight": np.ones((2, 2), np.float32), '"b" \\': np.ones(2)},
            CodecConfig(),
        ),
        "empty": {},
        "raw model": model,
        "duplicate arrays": {"a": np.arange(7, dtype=np.int64), "b": np.arange(7, dtype=np.int64)},
        "odd arrays": {
            "fortran": np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float32)),
            "strided": np.arange(40, dtype=np.int32)[::3],
            "big-endian": np.arange(6, dtype=">i8").reshape(2, 3),
            "float16": np.ones(3, np.float16),
            'unicode name \u00e9"': np.ones(2, np.uint8),
        },
    }


PAYLOADS = _payloads()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_wire_size_matches_flower(name: str) -> None:
    payload = PAYLOADS[name]
    assert codec.wire_size(payload) == flower_wire_size(payload)


NOT_CODEC = ("empty", "raw model", "duplicate arrays", "odd arrays")  # not codec payloads


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_survives_flower_serialization(name: str) -> None:
    payload = PAYLOADS[name]
    back = through_flower(payload)
    assert list(back) == list(payload)  # the record keeps key order
    for key, value in payload.items():
        assert back[key].dtype == value.dtype.newbyteorder("<"), key  # raw bytes: little-endian
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value)
    if name in NOT_CODEC:
        return
    masks = None
    if name == "sparse cached masks":
        masks = codec.payload_masks(PAYLOADS["sparse int8-channel"])
    elif name == "many tensors float32 cached":
        masks = codec.payload_masks(PAYLOADS["many tensors"])
    expected = codec.decode(payload, masks=masks)
    got = codec.decode(back, masks=masks)
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_raw_arrays_refuse_other_dtypes() -> None:
    for odd in (np.ones(2, np.float64), np.ones(2, bool), np.array([b"ab"]), np.ones(2, np.int16)):
        with pytest.raises(ValueError, match="cannot travel as a raw array"):
            codec.wire_size({"x": odd})
        with pytest.raises(ValueError, match="cannot travel as a raw array"):
            payload_record({"x": odd})


def test_from_raw_refuses_malformed_fields() -> None:
    assert codec.from_raw("int32", (2,), bytes(8)).tolist() == [0, 0]
    for dtype, shape, data, match in (
        ("float64", (1,), bytes(8), "dtype 'float64' not accepted"),
        ("object", (1,), bytes(8), "not accepted"),
        (3, (1,), bytes(8), "not accepted"),
        ("uint8", (-1,), b"", "non-negative ints"),
        ("uint8", (True,), b"", "non-negative ints"),
        ("uint8", "3", b"abc", "non-negative ints"),
        ("uint8", (3,), "abc", "not bytes"),
        ("int32", (2,), bytes(7), r"declares \[2\] int32 \(8 B\) but 7 B"),
        ("uint8", (2**40,), bytes(16), "but 16 B were sent"),  # nothing allocated
    ):
        with pytest.raises(ValueError, match=match):
            codec.from_raw(dtype, shape, data)


def test_array_record_needs_array_values() -> None:
    with pytest.raises(TypeError):
        ArrayRecord({"a": np.ones(3, np.float32)})


def test_multi_chunk_arrays_with_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower reads the chunk size once at import; patch the module global that slices arrays.
    monkeypatch.setattr(flwr_array, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 256)
    rng = np.random.default_rng(2)
    payloads: list[dict[str, np.ndarray]] = [
        {"zeros": np.zeros(1000, np.float32)},  # repeated all-zero chunks within one array
        {"zeros": np.zeros(1000, np.float32), "zeros_too": np.zeros(1100, np.float32)},
        {"a": np.zeros(1000, np.float32), "b": np.zeros(1000, np.float32)},  # identical arrays
        {"r": rng.standard_normal(700).astype(np.float32), "t": np.ones(64, np.int8)},
        {"exact": np.zeros(256, np.uint8)},  # exactly one chunk
        {"exact2": np.zeros(512, np.uint8), "one": np.zeros(128, np.uint8)},
        codec.encode(
            {"w": rng.standard_normal((30, 40)).astype(np.float32), "z": np.zeros((50, 50))},
            CodecConfig(),
            masks={"w": rng.random((30, 40)) < 0.5, "z": np.ones((50, 50), bool)},
        ),
        codec.encode(  # the zeros' codes repeat whole chunks inside the one codes array
            {"z": np.zeros((50, 50)), "w": rng.standard_normal((30, 40)), "b": np.ones(30)},
            CodecConfig(quant="int8"),
        ),
        codec.encode(
            {"w": rng.standard_normal((60, 40)).astype(np.float32), "b": np.zeros(60)},
            CodecConfig(quant="none", entropy=True),
            masks={"w": rng.random((60, 40)) < 0.2},
        ),
    ]
    for payload in payloads:
        assert codec.wire_size(payload, chunk_size=256) == flower_wire_size(payload)
        back = through_flower(payload)
        for key, value in payload.items():
            np.testing.assert_array_equal(back[key], value)


def test_tensor_larger_than_a_chunk() -> None:
    rng = np.random.default_rng(3)
    big = rng.standard_normal(1_500_000).astype(np.float32)  # 6 MB of float32: 2 chunks of 5 MiB
    payload = codec.encode(
        {"big": big, "zeros": np.zeros(3_000_000, np.float32)}, CodecConfig(quant="none")
    )
    assert list(payload) == ["meta", "names", "values"]
    assert payload["values"].nbytes > 2 * codec.FLWR_DEFAULT_CHUNK_SIZE  # one array, 4 chunks
    assert codec.wire_size(payload) == flower_wire_size(payload)
    assert codec.wire_size(payload, chunk_size=codec.FLWR_DEFAULT_CHUNK_SIZE) == flower_wire_size(
        payload
    )
    back = through_flower(payload)
    np.testing.assert_array_equal(codec.decode(back)["big"], big)


def test_flower_objects_do_not_grow_with_the_number_of_tensors() -> None:
    # One ArrayRecord, one Array per payload key and its chunk(s): the same object count for a
    # 2-tensor and a 62-tensor model (with one array per tensor and field it was ~250 Arrays).
    counts = {}
    for name in ("tiny", "many tensors", "dense int8-channel", "empty model"):
        objects = get_all_nested_objects(to_record(PAYLOADS[name]))
        kinds = [type(obj).__name__ for obj in objects.values()]
        counts[name] = (kinds.count("ArrayRecord"), kinds.count("Array"))
    assert counts["tiny"] == counts["dense int8-channel"] == counts["empty model"] == (1, 4)
    assert counts["many tensors"] == (1, 5)  # + the mask stream


def test_a_blob_payload_is_one_array_and_one_chunk() -> None:
    # A top-k update as five arrays (meta, names, codes, scale, select) is 11 Flower objects;
    # as one blob, 3. It survives Flower's serialization and decodes to the same tensors.
    for name in ("ternary blob", "int8 blob sparse"):
        objects = get_all_nested_objects(to_record(PAYLOADS[name]))
        kinds = sorted(type(obj).__name__ for obj in objects.values())
        assert kinds == ["Array", "ArrayChunk", "ArrayRecord"]
        back = through_flower(PAYLOADS[name])
        assert list(back) == [codec.KEY_BLOB]
        for tensor, value in codec.decode(PAYLOADS[name]).items():
            np.testing.assert_array_equal(codec.decode(back)[tensor], value)
