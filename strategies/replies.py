"""The one boundary around what a client sent: every reply is read here, once, into plain numpy.

Whatever a reply holds, turning it into numbers happens in :func:`read_train_reply` or
:func:`read_evaluate_reply`, and the caller wraps each call in a single ``except Exception``:
a reply that cannot be read — a malformed payload, an ``Array`` whose serialization is not
numpy, an npy header that declares more than the bytes sent, a metric of the wrong type, a
record the round did not ask for — is rejected with its reason, and the round goes on.

What comes out is a :class:`TrainReply` (the client's *update* against the global model the
round sent, its example count, its metrics and its mask vote) or an :class:`EvaluateReply`.
Nothing downstream reads a client's bytes again.

The form a reply must have (anything else is rejected, with the reason):

- a train reply has message type ``train``, exactly the records ``arrays`` and ``metrics``, plus
  ``mask-vote`` when the round asked for a vote; an evaluate reply has type ``evaluate`` and
  exactly the record ``metrics``;
- ``metrics`` holds ``num-examples`` (an int in ``[1, max_num_examples]``); ``server-round``, if
  present, is the current round; ``epsilon``, if present, is finite and ``>= 0``; every other
  metric is one finite int or float (no lists). Metric keys other than the known ones are
  kept only where every accepted reply of the round has them (:func:`common_metrics`), so the
  inner Flower strategy never sees replies whose keys differ.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedprune import codec, keys
from fedprune.masks import mask_density
from strategies.state import RoundState

VOTE_DENSITY_TOLERANCE = 0.01
"""How far a mask vote's density may be from the scheduled density (clients compute exact top-k
masks; ties and rounding move them by a few entries)."""

KNOWN_TRAIN_METRICS = (keys.NUM_EXAMPLES, keys.SERVER_ROUND, keys.EPSILON, keys.TRAIN_LOSS)

_ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in (np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64)
)
"""What a client's array may hold (little-endian numeric; never objects)."""

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass
class TrainReply:
    """A train reply read into numpy: what every later stage of the round works on."""

    node: int
    num_examples: int
    """The example count the reply claimed (the bounds may lower :attr:`weight`)."""
    update: dict[str, codec.SparseTensor]
    """The client's model minus the global model the round sent, in model order: only the
    entries the client transmitted (a plain float32 reply transmits all of them)."""
    metrics: dict[str, float]
    """Validated scalar metrics, ``num-examples`` and ``server-round`` excluded."""
    vote: dict[str, np.ndarray] | None = None
    """The decoded mask vote (bool masks or float32 scores), if the round asked for one."""
    bits: dict[str, float] | None = None
    """Bits per parameter of the encoded update, by payload part (compressed runs)."""
    sent_model: dict[str, np.ndarray] | None = None
    """The client's float32 model exactly as sent (plain replies), so that aggregating it is
    bit-identical to stock Flower; ``None`` for an encoded delta, or once a bound scaled the
    update (``weights + update`` is then the model)."""
    weight: float = field(init=False)
    """The example weight the aggregation uses (``num_examples`` unless bounded)."""

    def __post_init__(self) -> None:
        self.weight = float(self.num_examples)

    def model(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the client's model: ``weights`` (the round's global model) plus the update."""
        if self.sent_model is not None:
            return {name: self.sent_model[name].copy() for name in weights}
        model = {}
        for name, g in weights.items():
            model[name] = np.array(g, dtype=np.float32, order="C", copy=True)
            self.update[name].add_into(model[name])
        return model

    def norm(self) -> float:
        """Return the L2 norm of the update over all tensors."""
        return math.sqrt(sum(u.squared_norm() for u in self.update.values()))


@dataclass
class EvaluateReply:
    """An evaluate reply read into numbers."""

    node: int
    num_examples: int
    metrics: dict[str, float]


def read_array(array: Array, *, max_bytes: int) -> np.ndarray:
    """Return the numpy array in ``array``, refusing anything but a plain npy or raw buffer.

    A raw array (:mod:`fedprune.codec.raw`, how payloads travel) is read by
    :func:`fedprune.codec.from_raw`. An npy header is parsed and checked *before* anything is
    allocated. Either way the dtype must be a plain numeric one, the declared size must equal
    the bytes actually present, and those bytes may not exceed ``max_bytes``. The result is a
    read-only view of the received bytes.

    Raises
    ------
    ValueError
        If the serialization type is neither numpy nor raw, the header or raw fields are
        malformed, declare another size than the bytes sent, or (npy) a dtype/shape other than
        the ``Array``'s own fields.
    """
    if not isinstance(array, Array):
        raise ValueError(f"expected an Array, got {type(array).__name__}")
    if array.stype not in ("numpy.ndarray", codec.STYPE_RAW):
        raise ValueError(f"serialization type {array.stype!r} is neither numpy nor raw")
    data = array.data
    if not isinstance(data, bytes):
        raise ValueError("array data is not bytes")
    if len(data) > max_bytes:
        raise ValueError(f"array of {len(data)} B exceeds the cap of {max_bytes} B")
    if array.stype == codec.STYPE_RAW:
        return codec.from_raw(array.dtype, array.shape, data)
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"npy format version {version} not accepted")
        shape, fortran_order, dtype = read_header(stream, max_header_size=1024)
    except Exception as err:  # numpy raises ValueError, TypeError, SyntaxError, ...
        raise ValueError(f"unreadable npy header: {err}") from err
    if dtype.str not in _ALLOWED_DTYPES or fortran_order:
        raise ValueError(f"npy dtype {dtype.str!r} (fortran order {fortran_order}) not accepted")
    count = math.prod(shape)
    body = len(data) - stream.tell()
    if body != count * dtype.itemsize:
        raise ValueError(
            f"npy header declares {list(shape)} {dtype} ({count * dtype.itemsize} B) "
            f"but {body} B were sent"
        )
    if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != dtype:
        raise ValueError(
            f"Array fields say {array.dtype}{list(array.shape)}, its data {dtype}{list(shape)}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)


def read_record(record: object, *, max_bytes: int) -> dict[str, np.ndarray]:
    """Read every array of an ``ArrayRecord`` with :func:`read_array`, under one byte cap."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(record).__name__}")
    total = sum(len(a.data) for a in record.values() if isinstance(a, Array))
    if total > max_bytes:
        raise ValueError(f"payload of {total} B exceeds the cap of {max_bytes} B")
    return {str(name): read_array(a, max_bytes=max_bytes) for name, a in record.items()}


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric '{key}' must be one int or float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"metric '{key}'={value} is not finite")
    return float(value)


def _read_metrics(
    content: RecordDict, server_round: int, max_num_examples: int
) -> tuple[int, dict[str, float]]:
    """Return (num-examples, the other metrics) of a reply's ``metrics`` record, validated."""
    record = content.metric_records.get(keys.METRICS)
    if record is None:
        raise ValueError(f"no '{keys.METRICS}' MetricRecord")
    if not isinstance(record, MetricRecord):
        raise ValueError(f"'{keys.METRICS}' is a {type(record).__name__}")
    if keys.NUM_EXAMPLES not in record:
        raise ValueError(f"metrics lack '{keys.NUM_EXAMPLES}'")
    num_examples = record[keys.NUM_EXAMPLES]
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise ValueError(f"'{keys.NUM_EXAMPLES}' must be an int, got {num_examples!r}")
    if not 0 < num_examples <= max_num_examples:
        raise ValueError(f"'{keys.NUM_EXAMPLES}'={num_examples} not in [1, {max_num_examples}]")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if key == keys.NUM_EXAMPLES:
            continue
        number = _number(key, value)
        if key == keys.SERVER_ROUND:
            if number != server_round:
                raise ValueError(f"stale reply: it claims round {value}, this is {server_round}")
            continue
        if key == keys.EPSILON and number < 0:
            raise ValueError(f"'{keys.EPSILON}'={number} is not a finite number >= 0")
        metrics[key] = number
    return num_examples, metrics


def _check_form(reply: Message, message_type: str, records: Sequence[str]) -> None:
    if reply.metadata.message_type != message_type:
        raise ValueError(
            f"a {message_type} round got a reply of type {reply.metadata.message_type!r}"
        )
    names = sorted(reply.content.keys())
    if names != sorted(records):
        raise ValueError(f"reply holds the records {names}, the round expects {sorted(records)}")


def read_train_reply(
    reply: Message,
    state: RoundState,
    *,
    max_num_examples: int,
    compressed: bool,
) -> TrainReply:
    """Read a train reply into a :class:`TrainReply`; raise naming the first problem.

    Parameters
    ----------
    reply : Message
        A reply that is not an error reply.
    state : RoundState
        What the round sent: the global model, the mask, the vote asked for.
    max_num_examples : int
        The largest example count any reply may claim.
    compressed : bool
        Whether ``arrays`` holds an encoded delta (:mod:`fedprune.codec`) rather than the
        client's float32 model.
    """
    expected = [keys.ARRAYS, keys.METRICS]
    if state.vote_kind != "none":
        expected.append(state.vote_record)
    _check_form(reply, MessageType.TRAIN, expected)
    content = reply.content
    num_examples, metrics = _read_metrics(content, state.server_round, max_num_examples)
    arrays = read_record(content[keys.ARRAYS], max_bytes=state.max_reply_bytes)
    bits = sent_model = None
    if compressed:
        update = codec.decode_sparse(arrays, masks=state.mask, shapes=state.shapes)
        bits = codec.bits_breakdown(arrays)
    else:
        update = _plain_update(arrays, state.weights)
        sent_model = arrays
    vote = None
    if state.vote_kind != "none":
        raw = read_record(content[state.vote_record], max_bytes=state.max_reply_bytes)
        if state.channels is not None:
            vote = state.channels.read_vote(raw, state.vote_rule, state.density)  # type: ignore[arg-type]
        else:
            vote = decode_vote(raw, state)
    return TrainReply(
        reply.metadata.src_node_id, num_examples, update, metrics, vote, bits, sent_model
    )


def _plain_update(
    arrays: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
) -> dict[str, codec.SparseTensor]:
    """Return ``model - weights`` for a float32 model that must match ``weights`` exactly."""
    if list(arrays) != list(weights):
        raise ValueError(f"arrays {list(arrays)} differ from the model's {list(weights)}")
    update: dict[str, codec.SparseTensor] = {}
    for name, g in weights.items():
        a = arrays[name]
        if a.shape != g.shape or a.dtype != g.dtype:
            raise ValueError(
                f"'{name}' is {a.dtype}{list(a.shape)}, expected {g.dtype}{list(g.shape)}"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"'{name}' has non-finite values")
        update[name] = codec.SparseTensor.from_dense(a - g)
    return update


def decode_vote(vote: Mapping[str, np.ndarray], state: RoundState) -> dict[str, np.ndarray]:
    """Decode a mask vote: bit-packed masks, or an encoded score payload."""
    if state.mask is None:
        raise ValueError("reply carries a mask vote but the run does not prune")
    if state.vote_kind == "scores":
        shapes = {name: m.shape for name, m in state.mask.items()}
        return codec.decode(vote, masks=state.mask, shapes=shapes)
    if list(vote) != list(state.mask):
        raise ValueError(f"mask vote covers {list(vote)}, expected {list(state.mask)}")
    masks = {name: codec.unpack_mask(bits, state.mask[name].shape) for name, bits in vote.items()}
    density = mask_density(masks)
    if abs(density - state.density) > VOTE_DENSITY_TOLERANCE:
        raise ValueError(
            f"mask vote keeps {density:.4f} of the entries; the round asked for {state.density:.4f}"
        )
    return masks


def read_evaluate_reply(
    reply: Message, server_round: int, *, max_num_examples: int
) -> EvaluateReply:
    """Read an evaluate reply (only ``metrics``); raise naming the first problem."""
    _check_form(reply, MessageType.EVALUATE, [keys.METRICS])
    num_examples, metrics = _read_metrics(reply.content, server_round, max_num_examples)
    return EvaluateReply(reply.metadata.src_node_id, num_examples, metrics)


def common_metrics(metrics: Sequence[Mapping[str, float]]) -> set[str]:
    """Return the metric keys that every one of ``metrics`` has."""
    if not metrics:
        return set()
    common = set(metrics[0])
    for m in metrics[1:]:
        common &= set(m)
    return common
