"""Fault injection for robustness experiments: crashing, malformed and attacking clients.

:func:`make_faulty_client_app` returns the fedprune ClientApp with some partitions misbehaving,
each in one of the ways :data:`FAULTS` names. Every fault but ``raise`` trains honestly first,
then changes what goes on the wire:

- ``raise``: the client raises inside ``train`` (Flower turns that into an error reply);
- ``extra-record`` / ``no-metrics``: a record the round did not ask for / no metrics record;
- ``extra-metric`` / ``no-loss``: a metric key the others do not send / one they do send is
  missing (harmless: the server aggregates only the keys every reply has);
- ``foreign-array``: an ``Array`` whose serialization type is not numpy;
- ``header-bomb``: an ``Array`` whose npy header declares 2⁴⁰ floats over 16 bytes of data;
- ``claims-examples``: ``num-examples`` of 10,000,000, the largest a reply may claim;
- ``scales-update``: the update scaled by ``10⁶`` (the payload's step sizes multiplied: still a
  well-formed payload);
- ``sign-flip``: the update scaled by ``-10`` (needs an uncompressed int8 stream: the codes
  are negated).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from boundary.records import from_record, payload_record
from clients.client_app import node_partition, train
from fedprune import codec, keys
from fedprune.config import RunConfig

FAULTS = (
    "raise",
    "extra-record",
    "no-metrics",
    "extra-metric",
    "no-loss",
    "foreign-array",
    "header-bomb",
    "claims-examples",
    "scales-update",
    "sign-flip",
)


def scale_update(payload: codec.Payload, factor: float) -> codec.Payload:
    """Return ``payload`` (an int8 update) decoding to ``factor`` times its update.

    A positive factor multiplies the step sizes (any int8 payload, entropy stage or not); a
    negative one also negates the codes, which needs an uncompressed int8 stream.
    """
    if codec.KEY_SCALE not in payload:
        raise ValueError("scale_update needs an int8 payload")
    out = dict(payload)
    if factor < 0:
        if payload[codec.KEY_CODES].dtype != np.int8:
            raise ValueError("a negative factor needs an uncompressed int8 stream (entropy off)")
        out[codec.KEY_CODES] = -payload[codec.KEY_CODES]
    out[codec.KEY_SCALE] = payload[codec.KEY_SCALE] * np.float32(abs(factor))
    return out


def _header_bomb() -> Array:
    """Return an npy buffer whose header declares 2**40 float32 values over 16 bytes."""
    buffer = io.BytesIO()
    shape = (2**40,)
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return Array(
        dtype="float32", shape=shape, stype="numpy.ndarray", data=buffer.getvalue() + bytes(16)
    )


def _replace_first_array(reply: Message, array: Array) -> None:
    record = reply.content.array_records[keys.ARRAYS]
    first = next(iter(record.keys()))
    reply.content[keys.ARRAYS] = ArrayRecord({**dict(record.items()), first: array})


def inject(fault: str, reply: Message) -> None:
    """Change ``reply`` in place as ``fault`` says (see :data:`FAULTS`)."""
    metrics = reply.content.metric_records.get(keys.METRICS)
    if fault == "extra-record":
        reply.content["extra"] = ConfigRecord({"note": "not asked for"})
    elif fault == "no-metrics":
        del reply.content[keys.METRICS]
    elif fault == "extra-metric" and metrics is not None:
        metrics["extra-metric"] = 1.0
    elif fault == "no-loss" and metrics is not None:
        del metrics[keys.TRAIN_LOSS]
    elif fault == "foreign-array":
        _replace_first_array(reply, Array("float32", (2,), "torch.Tensor", bytes(8)))
    elif fault == "header-bomb":
        _replace_first_array(reply, _header_bomb())
    elif fault == "claims-examples" and metrics is not None:
        metrics[keys.NUM_EXAMPLES] = 10_000_000
    elif fault in ("scales-update", "sign-flip"):
        payload = from_record(reply.content.array_records[keys.ARRAYS])
        factor = 1e6 if fault == "scales-update" else -10.0
        reply.content[keys.ARRAYS] = payload_record(scale_update(payload, factor))
    else:
        raise ValueError(f"unknown fault {fault!r} (or nothing to change); one of {FAULTS}")


def make_faulty_client_app(cfg: RunConfig, faults: Mapping[int, str]) -> ClientApp:
    """Return the ClientApp with the partitions in ``faults`` misbehaving as named there."""
    unknown = sorted(set(faults.values()) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
    if {"scales-update", "sign-flip"} & set(faults.values()) and (
        cfg.quant == "none" or not cfg.compressed
    ):
        raise ValueError("update attacks need strategy='compressed' and int8 quant")
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition_id, _ = node_partition(context)
        fault = faults.get(partition_id)
        if fault == "raise":
            raise RuntimeError(f"injected failure of partition {partition_id}")
        reply = train(msg, context, cfg)
        if fault is not None:
            inject(fault, reply)
        return reply

    return client_app
