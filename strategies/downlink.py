"""Encode the downlink: the global model as a compressed payload, per node.

Stock Flower aggregators average whatever arrays they receive, so only float32 models may reach
them; on the wire only encoded payloads travel. :class:`Downlink` replaces the float32 arrays of
the messages an inner strategy configured by an encoded payload of the global **weights** (int8
per tensor or per channel, sparse under the global mask, optional entropy stage). Mask bits
travel only to nodes that do not hold the current mask version. With ``delta_downlink``, nodes
that hold last round's reference model get only its change, encoded like an update.

The uplink (each reply's encoded **delta** against the weights the client received) is read in
:mod:`strategies.replies`. See ``docs/design.md`` for why weights go down and deltas come up.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from boundary.records import payload_record
from fedprune import codec, keys
from strategies.state import RoundState


class Downlink:
    """Encode each round's messages, remembering what every node holds.

    Parameters
    ----------
    codec_config : codec.CodecConfig
        How the global weights are encoded (every kept entry travels).
    update_codec : codec.CodecConfig, optional
        How a downlink *change* is encoded with ``delta_downlink`` (e.g. top-k); defaults to
        ``codec_config``.
    delta_downlink : bool
        Send nodes that hold last round's reference model only its change (see
        :meth:`encode`).
    """

    def __init__(
        self,
        codec_config: codec.CodecConfig,
        *,
        update_codec: codec.CodecConfig | None = None,
        delta_downlink: bool = False,
    ) -> None:
        self.codec_config = codec_config
        self.update_codec = update_codec or codec_config
        self.delta_downlink = delta_downlink
        self._node_mask_version: dict[int, int] = {}
        self._ref: dict[str, np.ndarray] | None = None
        self._ref_version = 0
        self._node_ref_version: dict[int, int] = {}
        self._mask_version = 0
        self._seed_digest: str | None = None

    def expect_seeded_start(self, digest: str) -> None:
        """Send no model in the first training round if the global weights have ``digest``.

        Every node builds the initial model from the run config and seed and checks it against
        ``digest`` (``payload-kind = "seed"``); a resumed run or a pruned start sends weights.
        """
        self._seed_digest = digest

    def delivered(self, node: int) -> None:
        """Record that ``node`` answered this round: it holds what the round sent it."""
        self._node_mask_version[node] = self._mask_version
        if self.delta_downlink:
            self._node_ref_version[node] = self._ref_version

    @staticmethod
    def _masked(arrays: dict[str, np.ndarray], state: RoundState) -> dict[str, np.ndarray]:
        """Zero the entries of ``arrays`` that the round's global mask prunes."""
        if state.mask is None:
            return arrays
        return {
            name: np.where(state.mask[name], a, np.float32(0.0)) if name in state.mask else a
            for name, a in arrays.items()
        }

    def encode(
        self, messages: Iterable[Message], state: RoundState, *, train: bool = True
    ) -> list[Message]:
        """Replace each message's float32 arrays by an encoded payload of ``state.weights``.

        Every node gets the global weights, except with ``delta_downlink`` (training messages
        only): a node known to hold the reference model of the previous round gets the change
        ``g - reference`` instead, encoded like an update (top-k, error carried by the
        reference: next round's change is computed against what the nodes really hold).
        When the run prunes, each message's config gains the round's density, vote request and
        mask version.
        """
        messages = list(messages)
        if not messages:
            return []
        masks = state.mask
        self._mask_version = state.mask_version
        use_delta = train and self.delta_downlink
        seed_digest = self._seed_digest if train else None
        if train:
            self._seed_digest = None  # only the first training round can start from the seed
        seeded = (
            seed_digest is not None
            and masks is None
            and codec.weights_digest(state.weights) == seed_digest
        )
        base: dict[str, np.ndarray] | None = None
        if use_delta and self._ref is not None:
            base = self._masked(self._ref, state)
        sends_mask = {
            message.metadata.dst_node_id: masks is not None
            and self._node_mask_version.get(message.metadata.dst_node_id) != state.mask_version
            for message in messages
        }
        # Channel pruning: the mask travels as one bit per channel (its own record, computed
        # once), only to nodes without the current version; payloads then carry no mask bits.
        channel_bits: ArrayRecord | None = None
        if masks is not None and state.channels is not None:
            channel_bits = payload_record(state.channels.wire_mask(masks))
        holds_ref = {
            node: base is not None and self._node_ref_version.get(node) == self._ref_version
            for node in sends_mask
        }
        # The weights every receiver of full weights gets: the global model, or, in a round
        # where others get a delta, the new reference itself, so that every node holds the same
        # reference (up to int8 rounding) and later deltas apply to it. Otherwise the part of
        # ``g - reference`` that top-k held back would never reach the weights receivers.
        weights = state.weights
        change: dict[str, np.ndarray] | None = None
        delta_payloads: dict[bool, codec.Payload] = {}
        if any(holds_ref.values()):
            assert base is not None
            tensors = {k: g - base[k] for k, g in state.weights.items()}
            for send_masks in {sends_mask[n] for n, held in holds_ref.items() if held}:
                delta_payloads[send_masks] = codec.encode(
                    tensors,
                    self.update_codec,
                    masks=masks,
                    send_masks=send_masks and channel_bits is None,
                )
            change = codec.decode(next(iter(delta_payloads.values())), masks=masks)
            weights = {k: base[k] + change[k] for k in base}
        # At most four variants per round (weights/delta x with/without mask bits), each encoded
        # and serialized once however many nodes receive it.
        records: dict[tuple[str, bool], ArrayRecord] = {}
        weights_payload: codec.Payload | None = None

        def record(kind: str, send_masks: bool) -> ArrayRecord:
            nonlocal weights_payload
            if (kind, send_masks) not in records:
                if kind == "seed":
                    payload: codec.Payload = {}
                elif kind == "delta":
                    payload = delta_payloads[send_masks]
                else:
                    payload = codec.encode(
                        weights,
                        self.codec_config,
                        masks=masks,
                        send_masks=send_masks and channel_bits is None,
                    )
                    weights_payload = payload
                records[kind, send_masks] = payload_record(payload)
            return records[kind, send_masks]

        out: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            kind = "seed" if seeded else "delta" if holds_ref[node] else "weights"
            config = message.content.config_records.get(keys.CONFIG, ConfigRecord())
            node_config = ConfigRecord(dict(config))
            if masks is not None:
                node_config[keys.DENSITY] = state.density
                node_config[keys.VOTE] = state.vote_kind
                node_config[keys.MASK_VERSION] = state.mask_version
            node_config[keys.PAYLOAD_KIND] = kind
            if seeded:
                assert seed_digest is not None
                node_config[keys.MODEL_DIGEST] = seed_digest
            if use_delta:
                node_config[keys.REF_VERSION] = self._ref_version + 1
            content = RecordDict(
                {
                    name: value
                    for name, value in message.content.items()
                    if name not in (keys.ARRAYS, keys.CONFIG)
                }
            )
            content[keys.ARRAYS] = record(kind, sends_mask[node])
            if channel_bits is not None and sends_mask[node]:
                content[keys.CHANNEL_MASK] = channel_bits
            content[keys.CONFIG] = node_config
            out.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=message.metadata.message_type,
                    group_id=message.metadata.group_id,
                )
            )
        if use_delta:
            # The reference every node holds after this round: exactly, for delta receivers;
            # weights receivers hold its int8 image, an error that does not accumulate.
            if change is not None:
                assert base is not None
                self._ref = {k: base[k] + change[k] for k in base}
            elif seeded:
                self._ref = {k: g.copy() for k, g in state.weights.items()}
            else:
                assert weights_payload is not None
                self._ref = codec.decode(weights_payload, masks=masks)
            self._ref_version += 1
        return out

    def __repr__(self) -> str:
        return f"Downlink({self.codec_config}, delta_downlink={self.delta_downlink})"
