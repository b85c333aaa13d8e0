"""A Flower client mod that puts fedprune's compression around any ClientApp.

Flower's convention for client-side wrappers is a *mod* (like its DP mods in
``flwr.clientapp.mod``): a function ``(msg, context, call_next) -> Message`` that runs around
the app's handler. :func:`compression_mod` pairs with the server wrappers
(``WireAccounting(FedPrune(<any strategy>, codec_config=...))``, see the README,
"Use it in your own Flower app"):

- downlink (``train`` and ``evaluate`` messages): the encoded payload in the ``arrays``
  ArrayRecord is decoded into float32 weights (the global mask from the payload or from the
  node's cache, a delta-downlink change added to the node's reference model), so the app's
  handler sees a plain ArrayRecord of its model's tensors;
- uplink (``train`` replies): the ``arrays`` the handler returns are replaced by the encoded
  update ``trained - received`` (int8 per channel, zlib, optionally top-k), with error feedback:
  what the encoding left out stays in ``context.state`` and joins the next round's update.

The handler must use Flower's default record names (``arrays``, ``config``, ``metrics`` with
``num-examples``), as Flower's ``FedAvg`` and its quickstarts do, and a model of float32
tensors. The decoding and encoding are the fedprune ClientApp's own
(:func:`clients.client_app.decode_downlink`, :func:`clients.client_app.encode_update`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from boundary.records import from_record, to_record
from clients.client_app import decode_downlink, encode_update
from fedprune import codec, keys


def make_compression_mod(
    codec_config: codec.CodecConfig | None = None, *, error_feedback: bool = True
) -> Mod:
    """Return a compression mod encoding train replies with ``codec_config``.

    Parameters
    ----------
    codec_config : codec.CodecConfig, optional
        How updates are encoded; default: int8 per output channel with the zlib stage.
    error_feedback : bool
        Keep what the encoding left out in the node's state and add it to the next update.

    Returns
    -------
    Mod
        A Flower mod for ``ClientApp(mods=[...])`` or ``@app.train(mods=[...])``.
    """
    update_codec = codec_config or codec.CodecConfig(quant="int8-channel", entropy=True)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, context)
        if keys.ARRAYS not in msg.content.array_records:
            raise ValueError(f"compression_mod: the message has no '{keys.ARRAYS}' ArrayRecord")
        start, masks = decode_downlink(msg, context)
        msg.content[keys.ARRAYS] = to_record(start)
        reply = call_next(msg, context)
        if kind != MessageType.TRAIN or reply.has_error():
            return reply
        if keys.ARRAYS not in reply.content.array_records:
            raise ValueError(f"compression_mod: the reply has no '{keys.ARRAYS}' ArrayRecord")
        trained = from_record(reply.content.array_records[keys.ARRAYS])
        if list(trained) != list(start) or any(trained[k].shape != start[k].shape for k in start):
            raise ValueError("compression_mod: the reply's arrays differ from the model received")
        reply.content[keys.ARRAYS] = encode_update(
            context, start, trained, masks, update_codec, error_feedback=error_feedback
        )
        return reply

    return mod


compression_mod: Mod = make_compression_mod()
"""The default mod: int8 per channel, zlib stage, error feedback."""
