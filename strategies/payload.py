"""Encode the downlink, decode every reply before the inner strategy sees it.

Stock Flower aggregators average whatever arrays they receive: int8 codes would be averaged raw
(or overflow), bit-packed masks would be averaged as numbers, and replies whose ArrayRecord keys
differ end the run. :class:`CompressedPayload` therefore sits *outside* the aggregating strategy:

- downlink: the inner strategy configures float32 messages; this wrapper replaces each message's
  arrays by an encoded payload of the global **weights** (int8 per tensor or per channel, sparse
  under the global mask, optional entropy stage). Mask bits travel only to nodes that do not hold
  the current mask version. With ``delta_downlink``, nodes that hold last round's reference model
  get only its change, encoded like an update.
- uplink: each reply carries an encoded **delta** against the weights the client received. The
  wrapper decodes it, reconstructs the client's model as ``g + delta`` with its own
  full-precision global ``g``, and hands float32 replies to the inner strategy. A reply that fails
  to decode is dropped, with its reason logged and counted (``num-rejected``).

See ``docs/design.md`` for why weights go down and deltas come up.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprune import codec, keys
from fedprune.masks import mask_density
from strategies.records import from_record, scalar, to_record
from strategies.wrapper import StrategyWrapper

VOTE_DENSITY_TOLERANCE = 0.01
"""How far a mask vote's density may be from the scheduled density (clients compute exact top-k
masks; ties and rounding move them by a few entries)."""


class CompressedPayload(StrategyWrapper):
    """Wrap a strategy so that only encoded payloads travel and only decoded floats aggregate.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy (FedAvg, FedAdam, FedMedian, ... or a :class:`MaskReconciliation`
        around one). It sees float32 arrays keyed by parameter name, never codes.
    codec_config : codec.CodecConfig
        How the global weights are encoded (every kept entry travels).
    update_codec : codec.CodecConfig, optional
        How a downlink *change* is encoded with ``delta_downlink`` (e.g. top-k); defaults to
        ``codec_config``. Uplink replies are decoded whatever their settings.
    delta_downlink : bool
        Send nodes that hold last round's reference model only its change (see
        :meth:`encode_messages`).
    """

    def __init__(
        self,
        strategy: Strategy,
        codec_config: codec.CodecConfig,
        *,
        update_codec: codec.CodecConfig | None = None,
        delta_downlink: bool = False,
    ) -> None:
        super().__init__(strategy)
        self.codec_config = codec_config
        self.update_codec = update_codec or codec_config
        self.delta_downlink = delta_downlink
        self._global: dict[str, np.ndarray] = {}
        self._max_reply_bytes = 0
        self._masks: dict[str, np.ndarray] | None = None
        self._mask_version = 0
        self._vote_kind = "none"
        self._vote_density = 1.0
        self._node_mask_version: dict[int, int] = {}
        self._ref: dict[str, np.ndarray] | None = None
        self._ref_version = 0
        self._node_ref_version: dict[int, int] = {}
        self.num_rejected: dict[int, int] = {}
        self._seed_digest: str | None = None
        self._uplink_bits: list[dict[str, float]] = []

    def expect_seeded_start(self, digest: str) -> None:
        """Send no model in the first training round if the global weights have ``digest``.

        Every node builds the initial model from the run config and seed and checks it against
        ``digest`` (``payload-kind = "seed"``); a resumed run or a pruned start sends weights.
        """
        self._seed_digest = digest

    # -- downlink ---------------------------------------------------------------------------
    def _round_state(self, content: RecordDict) -> ConfigRecord:
        """Read the mask and config that the inner wrappers attached to this round's messages."""
        mask_record = content.array_records.get(keys.GLOBAL_MASK)
        config = content.config_records.get(keys.CONFIG, ConfigRecord())
        self._vote_kind = scalar(config, keys.VOTE, str, "none")
        self._vote_density = scalar(config, keys.DENSITY, float, 1.0)
        if mask_record is not None:
            self._masks = {k: v.astype(bool) for k, v in from_record(mask_record).items()}
            self._mask_version = scalar(config, keys.MASK_VERSION, int, 0)
        else:
            self._masks = None
        return config

    def _masked(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero the entries of ``arrays`` that the current global mask prunes."""
        if self._masks is None:
            return arrays
        return {
            name: np.where(self._masks[name], a, np.float32(0.0)) if name in self._masks else a
            for name, a in arrays.items()
        }

    def encode_messages(
        self, messages: Iterable[Message], arrays: ArrayRecord, *, train: bool = True
    ) -> list[Message]:
        """Replace each message's float32 arrays by an encoded payload.

        Every node gets the global weights, except with ``delta_downlink`` (training messages
        only): a node known to hold the reference model of the previous round gets the change
        ``g - reference`` instead, encoded like an update (top-k, error carried by the
        reference: next round's change is computed against what the nodes really hold).
        """
        self._global = from_record(arrays)
        # No valid reply is larger than the dense float32 model plus its bit streams.
        self._max_reply_bytes = 2 * sum(a.nbytes for a in self._global.values()) + 2**20
        messages = list(messages)
        if not messages:
            return []
        config = self._round_state(messages[0].content)
        use_delta = train and self.delta_downlink
        seed_digest = self._seed_digest if train else None
        if train:
            self._seed_digest = None  # only the first training round can start from the seed
        seeded = (
            seed_digest is not None
            and self._masks is None
            and codec.weights_digest(self._global) == seed_digest
        )
        base: dict[str, np.ndarray] | None = None
        if use_delta and self._ref is not None:
            base = self._masked(self._ref)
        sends_mask = {
            message.metadata.dst_node_id: self._masks is not None
            and self._node_mask_version.get(message.metadata.dst_node_id) != self._mask_version
            for message in messages
        }
        holds_ref = {
            node: base is not None and self._node_ref_version.get(node) == self._ref_version
            for node in sends_mask
        }
        # The weights every receiver of full weights gets: the global model, or, in a round
        # where others get a delta, the new reference itself, so that every node holds the same
        # reference (up to int8 rounding) and later deltas apply to it. Otherwise the part of
        # ``g - reference`` that top-k held back would never reach the weights receivers.
        weights = self._global
        change: dict[str, np.ndarray] | None = None
        delta_payloads: dict[bool, codec.Payload] = {}
        if any(holds_ref.values()):
            assert base is not None
            tensors = {k: g - base[k] for k, g in self._global.items()}
            for send_masks in {sends_mask[n] for n, held in holds_ref.items() if held}:
                delta_payloads[send_masks] = codec.encode(
                    tensors, self.update_codec, masks=self._masks, send_masks=send_masks
                )
            change = codec.decode(next(iter(delta_payloads.values())), masks=self._masks)
            weights = {k: base[k] + change[k] for k in base}
        # At most four variants per round (weights/delta x with/without mask bits), each encoded
        # and serialized once however many nodes receive it.
        records: dict[tuple[str, bool], ArrayRecord] = {}
        weights_payload: codec.Payload | None = None

        def record(kind: str, send_masks: bool) -> ArrayRecord:
            nonlocal weights_payload
            if (kind, send_masks) not in records:
                if kind == "seed":
                    payload = {}
                elif kind == "delta":
                    payload = delta_payloads[send_masks]
                else:
                    payload = codec.encode(
                        weights, self.codec_config, masks=self._masks, send_masks=send_masks
                    )
                    weights_payload = payload
                records[kind, send_masks] = to_record(payload)
            return records[kind, send_masks]

        out: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            kind = "seed" if seeded else "delta" if holds_ref[node] else "weights"
            node_config = ConfigRecord(dict(config))
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
                    if name not in (keys.ARRAYS, keys.GLOBAL_MASK, keys.CONFIG)
                }
            )
            content[keys.ARRAYS] = record(kind, sends_mask[node])
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
                self._ref = {k: g.copy() for k, g in self._global.items()}
            else:
                assert weights_payload is not None
                self._ref = codec.decode(weights_payload, masks=self._masks)
            self._ref_version += 1
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training with the inner strategy, then encode the downlink."""
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return self.encode_messages(messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the inner strategy, then encode the downlink."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self.encode_messages(messages, arrays, train=False)

    # -- uplink -----------------------------------------------------------------------------
    def decode_reply(self, reply: Message) -> None:
        """Decode ``reply`` in place: delta payload -> float32 weights, vote -> floats/bools.

        Raises
        ------
        ValueError
            If the payload is malformed or does not match the global model.
        """
        content = reply.content
        if keys.ARRAYS not in content.array_records:
            raise ValueError(f"reply has no '{keys.ARRAYS}' ArrayRecord")
        record = content.array_records[keys.ARRAYS]
        size = sum(len(array.data) for array in record.values())
        if size > self._max_reply_bytes:
            raise ValueError(f"payload of {size} B exceeds the cap of {self._max_reply_bytes} B")
        shapes = {name: g.shape for name, g in self._global.items()}
        payload = from_record(record)
        delta = codec.decode(payload, masks=self._masks, shapes=shapes)
        self._uplink_bits.append(codec.bits_breakdown(payload))
        weights = {name: g + delta[name] for name, g in self._global.items()}
        content[keys.ARRAYS] = to_record(weights)
        vote_record = content.array_records.get(keys.MASK_VOTE)
        if vote_record is not None:
            content[keys.MASK_VOTE] = to_record(self._decode_vote(from_record(vote_record)))

    def _decode_vote(self, vote: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decode a mask vote: bit-packed masks, or an encoded score payload."""
        if self._masks is None or self._vote_kind == "none":
            raise ValueError("reply carries a mask vote that was not asked for")
        if self._vote_kind == "scores":
            shapes = {name: m.shape for name, m in self._masks.items()}
            return codec.decode(vote, masks=self._masks, shapes=shapes)
        if set(vote) != set(self._masks):
            raise ValueError(f"mask vote covers {sorted(vote)}, expected {sorted(self._masks)}")
        masks = {
            name: codec.unpack_mask(bits, self._masks[name].shape) for name, bits in vote.items()
        }
        density = mask_density(masks)
        if abs(density - self._vote_density) > VOTE_DENSITY_TOLERANCE:
            raise ValueError(
                f"mask vote keeps {density:.4f} of the entries; the round asked for "
                f"{self._vote_density:.4f}"
            )
        return masks

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply, drop the malformed ones, aggregate with the inner strategy."""
        accepted: list[Message] = []
        rejected = 0
        self._uplink_bits = []
        for reply in replies:
            if not reply.has_error():
                try:
                    self.decode_reply(reply)
                except ValueError as err:
                    rejected += 1
                    log(
                        WARNING,
                        "round %d: rejected reply from node %d: %s",
                        server_round,
                        reply.metadata.src_node_id,
                        err,
                    )
                    continue
                self._node_mask_version[reply.metadata.src_node_id] = self._mask_version
                if self.delta_downlink:
                    self._node_ref_version[reply.metadata.src_node_id] = self._ref_version
            accepted.append(reply)
        self.num_rejected[server_round] = rejected
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        metrics = MetricRecord() if metrics is None else metrics
        # Replies that failed to decode, plus those the inner validation dropped.
        metrics[keys.NUM_REJECTED] = rejected + scalar(metrics, keys.NUM_REJECTED, int, 0)
        for part in codec.BREAKDOWN_KEYS if self._uplink_bits else ():
            mean = sum(bits[part] for bits in self._uplink_bits) / len(self._uplink_bits)
            metrics[f"{keys.UPLINK_BITS}-{part}"] = mean
        return arrays, metrics

    def summary(self) -> None:
        """Log the codec settings and the inner strategy."""
        log(INFO, "\t├──> Compressed payloads: %s", self.codec_config)
        self.strategy.summary()
