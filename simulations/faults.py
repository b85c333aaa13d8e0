"""Fault injection for robustness experiments: crashing clients and model-poisoning attackers.

:func:`make_faulty_client_app` returns the fedprune ClientApp with some partitions misbehaving:

- *failing* partitions raise inside ``train`` (Flower turns that into an error reply);
- *attacker* partitions train honestly, then scale their encoded update by ``attack_scale`` on
  the wire (``-10``: a sign flip, ten times as large) — the codes are negated for a negative
  scale and the int8 step sizes multiplied, so the payload stays well-formed and passes every
  structural check; only a robust aggregator (or update clipping) can resist it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.client_app import node_partition, train
from fedprune import codec, keys
from fedprune.config import RunConfig
from strategies.records import from_record, to_record


def scale_update(payload: codec.Payload, factor: float) -> codec.Payload:
    """Return ``payload`` (an int8 update) decoding to ``factor`` times its update."""
    if codec.KEY_CODES not in payload or payload[codec.KEY_CODES].dtype != np.int8:
        raise ValueError("scale_update needs an uncompressed int8 payload")
    out = dict(payload)
    if factor < 0:
        out[codec.KEY_CODES] = -payload[codec.KEY_CODES]
    out[codec.KEY_SCALE] = payload[codec.KEY_SCALE] * np.float32(abs(factor))
    return out


def make_faulty_client_app(
    cfg: RunConfig,
    *,
    failing: frozenset[int] = frozenset(),
    attackers: frozenset[int] = frozenset(),
    attack_scale: float = -10.0,
) -> ClientApp:
    """Return the ClientApp with ``failing`` partitions raising and ``attackers`` poisoning."""
    if attackers and (cfg.entropy or cfg.quant == "none" or not cfg.compressed):
        raise ValueError("attackers need strategy='compressed', int8 quant and entropy off")
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition_id, _ = node_partition(context)
        if partition_id in failing:
            raise RuntimeError(f"injected failure of partition {partition_id}")
        reply = train(msg, context, cfg)
        if partition_id in attackers:
            payload = from_record(reply.content.array_records[keys.ARRAYS])
            reply.content[keys.ARRAYS] = to_record(scale_update(payload, attack_scale))
        return reply

    return client_app
