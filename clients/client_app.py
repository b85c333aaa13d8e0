"""The fedprune ClientApp: decode the global payload, train under the mask, reply encoded.

Per training message:

1. decode the downlink payload (global weights, int8/sparse) with the global mask — carried in
   the payload when this node does not hold the current version, else taken from
   ``context.state``;
2. train locally (SGD/Adam, optional FedProx term, optional DP-SGD) with pruned weights held at
   exactly zero;
3. reply with the encoded delta against the weights received (plus the error-feedback residual,
   which stays in ``context.state``), the metrics, and — on rounds where the schedule prunes —
   the client's mask vote;
4. with ``checkpoint`` on, save ``context.state`` under the run's checkpoint directory, so that
   a resumed run restores it (:func:`restore_node_state`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from boundary.install import install_guard_mod
from boundary.records import from_record, payload_record, scalar, to_record
from fedprune import codec, keys, task
from fedprune.checkpoint import (
    clear_round_states,
    client_state_dir,
    load_round_state,
    nested,
    prefixed,
    save_round_state,
)
from fedprune.config import RunConfig
from fedprune.models import get_weights, set_weights
from fedprune.node_data import read_info

VOTE_CODEC = codec.CodecConfig(quant="int8-channel")
"""Scores only rank entries: int8 per channel is plenty, whatever the run's payload codec."""


def data_dir(context: Context) -> str | None:
    """Return the node's ``data-dir`` (node config), or ``None`` for the default locations."""
    return _path_option(context, keys.DATA_DIR)


def data_path(context: Context) -> str | None:
    """Return the node's ``data-path`` (its own data file), or ``None`` (partition in memory)."""
    path = _path_option(context, keys.DATA_PATH)
    if path is not None and _path_option(context, keys.DATA_DIR) is not None:
        raise ValueError(
            f"node config sets both {keys.DATA_PATH} and {keys.DATA_DIR}: a node reads its "
            f"prepared file ({keys.DATA_PATH}) or partitions a dataset ({keys.DATA_DIR}), not both"
        )
    return path


def _path_option(context: Context, key: str) -> str | None:
    value = context.node_config.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"node config {key}={value!r} must be a path")
    return value or None


def node_partition(context: Context) -> tuple[int, int]:
    """Return (partition id, number of partitions) from the node config, validated.

    With a ``data-path``, the file says which partition it holds: ``partition-id`` and
    ``num-partitions`` may then be left out, and must match it when given.
    """
    path = data_path(context)
    given = {
        key: context.node_config[key]
        for key in (keys.PARTITION_ID, keys.NUM_PARTITIONS)
        if key in context.node_config
    }
    if path is not None:
        info = read_info(path)
        held = {keys.PARTITION_ID: info.partition_id, keys.NUM_PARTITIONS: info.num_partitions}
        wrong = [f"{k}={v!r} (file: {held[k]})" for k, v in given.items() if v != held[k]]
        if wrong:
            raise ValueError(
                f"node config {', '.join(wrong)} does not match its {keys.DATA_PATH} {path!r}"
            )
        return info.partition_id, info.num_partitions
    try:
        partition_id = given[keys.PARTITION_ID]
        num_partitions = given[keys.NUM_PARTITIONS]
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with --node-config "
            f"'{keys.DATA_PATH}=\"<file>\"' or '{keys.PARTITION_ID}=<i> "
            f"{keys.NUM_PARTITIONS}=<n>'"
        ) from err
    if not (isinstance(partition_id, int) and isinstance(num_partitions, int)):
        raise ValueError(
            f"node config {keys.PARTITION_ID}={partition_id!r} and "
            f"{keys.NUM_PARTITIONS}={num_partitions!r} must be integers"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"{keys.PARTITION_ID}={partition_id} not in [0, {num_partitions})")
    return partition_id, num_partitions


def partition_reply(msg: Message, context: Context) -> Message:
    """Answer the server's ``query.partition`` message with this node's ``partition-id``.

    Reproducible sampling (``strategies/sampling.py``) identifies nodes by it, not by their
    per-run node ids.
    """
    partition_id, _ = node_partition(context)
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.PARTITION_ID: partition_id})})
    return Message(content=content, reply_to=msg)


def _store(context: Context, name: str, version: int, arrays: dict[str, np.ndarray]) -> None:
    """Keep ``arrays`` in ``context.state`` under ``name``, tagged with ``version``."""
    context.state[name] = to_record(arrays)
    context.state[f"{name}-meta"] = ConfigRecord({keys.MASK_VERSION: version})


def _load(context: Context, name: str, version: int, what: str) -> dict[str, np.ndarray]:
    """Return the arrays kept under ``name`` if they carry ``version``, else raise."""
    meta = context.state.config_records.get(f"{name}-meta")
    cached = None if meta is None else scalar(meta, keys.MASK_VERSION, int)
    if cached != version:
        raise ValueError(
            f"the server assumes this node holds {what} v{version}; it holds v{cached}"
        )
    return from_record(context.state.array_records[name])


def _node_state(context: Context) -> dict[str, Any]:
    """Return ``context.state`` as a flat state dict (see :mod:`fedprune.checkpoint`)."""
    state: dict[str, Any] = {}
    for name, record in context.state.array_records.items():
        state.update(prefixed(f"arrays/{name}", from_record(record)))
    for name, config in context.state.config_records.items():
        if name != keys.STATE_RESTORED:
            state[f"configs/{name}"] = dict(config)
    return state


def restore_node_state(
    context: Context, cfg: RunConfig, partition_id: int, resumed_from: int
) -> None:
    """Once per run and node: restore the node's state as of round ``resumed_from``.

    A node's state (error-feedback residual, privacy accountant, mask and reference caches)
    lives in ``context.state``, which a restarted run does not have. When the server resumed
    from a checkpoint after round R, the node reloads its own checkpoint of the last round
    <= R it trained in, so that ε keeps counting and the run goes on as if it had not stopped
    (bit for bit, except with ``delta-downlink``: the first resumed round sends full weights).
    States of rounds after R (the attempt that died) are removed; in a fresh run (R = 0), all
    states of an earlier run of that name.
    """
    if keys.STATE_RESTORED in context.state.config_records:
        return
    directory = client_state_dir(cfg.results_dir, cfg.run_name, partition_id)
    found = load_round_state(directory, resumed_from) if resumed_from > 0 else None
    clear_round_states(directory, after=resumed_from)
    if found is not None:
        _, state = found
        for name in {k.split("/")[1] for k in state if k.startswith("arrays/")}:
            context.state[name] = to_record(nested(state, f"arrays/{name}"))
        for name, values in nested(state, "configs").items():
            context.state[name] = ConfigRecord(values)
    context.state[keys.STATE_RESTORED] = ConfigRecord({keys.RESUMED_FROM: resumed_from})


def receive(
    msg: Message, context: Context, cfg: RunConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Return the downlink's float32 weights and the global mask (``None`` if dense)."""
    if not cfg.compressed:
        return from_record(msg.content.array_records[keys.ARRAYS]), None
    return decode_downlink(msg, context, cfg)


def decode_downlink(
    msg: Message, context: Context, cfg: RunConfig | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Decode a compressed downlink into float32 weights and the global mask (``None``: dense).

    The mask comes from the payload when the server sent its bits, else from the node's cache
    (``context.state``). A ``delta`` downlink is added to the reference model the node kept from
    the last round (with newly pruned entries zeroed); the result becomes the new reference.
    Used by the fedprune ClientApp and by :func:`clients.mod.compression_mod`; a channel mask
    (``channel-mask``) needs the run's config (``cfg``) to rebuild the model's channel graph.
    """
    arrays = from_record(msg.content.array_records[keys.ARRAYS])
    config = msg.content.config_records.get(keys.CONFIG, ConfigRecord())
    if scalar(config, keys.PAYLOAD_KIND, str, "weights") == "seed":
        if cfg is None:
            raise ValueError("a seeded start needs the run config to build the initial model")
        return seeded_start(context, cfg, config), None
    mask_version = scalar(config, keys.MASK_VERSION, int, 0)
    masks: dict[str, np.ndarray] | None = codec.payload_masks(arrays) or None
    channel_record = msg.content.array_records.get(keys.CHANNEL_MASK)
    if channel_record is not None:  # channel pruning: one bit per channel, expanded here
        if cfg is None:
            raise ValueError(f"'{keys.CHANNEL_MASK}' received, but channel pruning needs a config")
        plan = task.channel_pruning(cfg, task.new_model(cfg))
        if plan is None:
            raise ValueError(f"'{keys.CHANNEL_MASK}' received, but prune-granularity is element")
        masks = plan.read_mask(from_record(channel_record))
    if masks is not None:
        _store(context, keys.STATE_MASK, mask_version, masks)
    elif mask_version > 0:
        masks = _load(context, keys.STATE_MASK, mask_version, "global mask")
    decoded = codec.decode(arrays, masks=masks)
    if keys.REF_VERSION not in config:
        return decoded, masks
    ref_version = scalar(config, keys.REF_VERSION, int)
    if scalar(config, keys.PAYLOAD_KIND, str) == "delta":
        reference = _load(context, keys.STATE_REF, ref_version - 1, "reference model")
        for name, change in decoded.items():
            base = reference[name]
            if masks is not None and name in masks:
                base = np.where(masks[name], base, np.float32(0.0))
            decoded[name] = base + change
    _store(context, keys.STATE_REF, ref_version, decoded)
    return decoded, masks


def seeded_start(context: Context, cfg: RunConfig, config: ConfigRecord) -> dict[str, np.ndarray]:
    """Build the run's initial model here and check it against the server's digest.

    The result becomes the node's reference model (with ``delta-downlink``).

    Raises
    ------
    ValueError
        If this node's initial model differs from the server's (another seed, model or
        dataset in the run config, or a library that initialises differently).
    """
    weights = get_weights(task.new_model(cfg))
    expected = scalar(config, keys.MODEL_DIGEST, str)
    got = codec.weights_digest(weights)
    if got != expected:
        raise ValueError(
            f"seeded start: this node's initial model (sha256 {got[:16]}...) differs from the "
            f"server's ({expected[:16]}...); the node and the server must build the model from "
            "the same run config (seed, model, dataset) and library versions"
        )
    if keys.REF_VERSION in config:
        _store(context, keys.STATE_REF, scalar(config, keys.REF_VERSION, int), weights)
    return weights


def private_teacher(context: Context, cfg: RunConfig, partition_id: int) -> torch.nn.Module | None:
    """Return this node's distillation teacher from ``context.state`` (new on its first round).

    ``None`` unless ``distill`` is on. The teacher lives only in ``context.state``; no message
    carries it.
    """
    if not cfg.distill:
        return None
    saved = context.state.array_records.get(keys.STATE_TEACHER)
    return task.new_teacher(cfg, partition_id, None if saved is None else from_record(saved))


def _encode_reply(
    cfg: RunConfig,
    context: Context,
    start: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None,
) -> ArrayRecord:
    """Return the reply's arrays: the model (``fedavg``) or the encoded update."""
    if not cfg.compressed:
        return to_record(trained)
    return encode_update(
        context, start, trained, masks, cfg.update_codec(), error_feedback=cfg.error_feedback
    )


def encode_update(
    context: Context,
    start: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None,
    codec_config: codec.CodecConfig,
    *,
    error_feedback: bool,
) -> ArrayRecord:
    """Encode the delta ``trained - start`` plus the error-feedback residual kept in the state.

    With ``error_feedback`` what the encoding left out is kept in ``context.state`` and added
    to the next round's delta. Used by the fedprune ClientApp and by
    :func:`clients.mod.compression_mod`.
    """
    delta = {name: trained[name] - start[name] for name in start}
    residual = context.state.array_records.get(keys.STATE_RESIDUAL)
    if error_feedback and residual is not None:
        for name, r in from_record(residual).items():
            delta[name] += r
    payload = codec.encode(delta, codec_config, masks=masks, send_masks=False)
    if error_feedback:
        context.state[keys.STATE_RESIDUAL] = to_record(codec.residual(delta, payload, masks=masks))
    return payload_record(payload)


def train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Decode, train under the mask, reply with the encoded delta, metrics and mask vote."""
    partition_id, num_partitions = node_partition(context)
    config = msg.content.config_records[keys.CONFIG]
    server_round = scalar(config, keys.SERVER_ROUND, int)
    if cfg.checkpoint:
        restore_node_state(context, cfg, partition_id, scalar(config, keys.RESUMED_FROM, int, 0))
    start, masks = receive(msg, context, cfg)
    model = task.new_model(cfg)
    set_weights(model, start)
    data = task.local_train_data(
        cfg, partition_id, num_partitions, data_dir(context), data_path(context)
    )
    torch_masks = task.to_torch_masks(masks)
    result = task.train(
        cfg,
        model,
        data,
        masks=torch_masks,
        server_round=server_round,
        node_seed=partition_id,
        proximal_mu=scalar(config, keys.PROXIMAL_MU, float, 0.0),
        accountant_state=(
            from_record(context.state.array_records[keys.STATE_ACCOUNTANT])
            if keys.STATE_ACCOUNTANT in context.state.array_records
            else None
        ),
        teacher=private_teacher(context, cfg, partition_id),
    )
    if result.teacher_weights is not None:  # the teacher stays on the node
        context.state[keys.STATE_TEACHER] = to_record(result.teacher_weights)
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: result.num_examples, keys.SERVER_ROUND: server_round}
    )
    if not cfg.dp:  # the loss on private batches is not noised: under DP it stays on the node
        metrics[keys.TRAIN_LOSS] = result.train_loss
    if result.epsilon is not None and result.accountant_state is not None:
        metrics[keys.EPSILON] = result.epsilon
        context.state[keys.STATE_ACCOUNTANT] = to_record(result.accountant_state)
    content = RecordDict(
        {
            keys.ARRAYS: _encode_reply(cfg, context, start, result.weights, masks),
            keys.METRICS: metrics,
        }
    )
    kind = scalar(config, keys.VOTE, str, "none")
    plan = task.channel_pruning(cfg, model)
    if kind != "none" and plan is not None:
        set_weights(model, result.weights)
        content[keys.CHANNEL_VOTE] = to_record(
            task.channel_vote(
                cfg,
                plan,
                model,
                data,
                density=scalar(config, keys.DENSITY, float),
                masks=torch_masks,
                node_seed=partition_id,
                server_round=server_round,
            )
        )
    elif kind != "none":
        set_weights(model, result.weights)
        ballot = task.vote(
            cfg,
            model,
            data,
            kind=kind,
            density=scalar(config, keys.DENSITY, float),
            masks=torch_masks,
            node_seed=partition_id,
            server_round=server_round,
        )
        if kind == "scores":
            vote_payload = codec.encode(ballot, VOTE_CODEC, masks=masks, send_masks=False)
        else:
            vote_payload = {name: codec.pack_mask(m) for name, m in ballot.items()}
        content[keys.MASK_VOTE] = payload_record(vote_payload)
    if cfg.checkpoint:
        directory = client_state_dir(cfg.results_dir, cfg.run_name, partition_id)
        save_round_state(directory, server_round, _node_state(context))
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Decode the global model and evaluate it on this node's shard of the held-out split."""
    partition_id, num_partitions = node_partition(context)
    weights, _ = receive(msg, context, cfg)
    model = task.new_model(cfg)
    set_weights(model, weights)
    data = task.local_eval_data(
        cfg, partition_id, num_partitions, data_dir(context), data_path(context)
    )
    loss, accuracy = task.evaluate(model, data)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(data), keys.LOSS: loss, keys.ACCURACY: accuracy})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """Return a ClientApp running :func:`train` and :func:`evaluate`.

    Parameters
    ----------
    cfg : RunConfig, optional
        A fixed configuration (in-process simulations). By default each message's
        ``context.run_config`` is parsed and validated, as under ``flwr run``.
    """
    client_app = ClientApp(mods=[install_guard_mod])  # this node's install is the server's

    def config_of(context: Context) -> RunConfig:
        return cfg if cfg is not None else RunConfig.from_mapping(context.run_config)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, config_of(context))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, config_of(context))

    client_app.query(keys.PARTITION_QUERY)(partition_reply)

    return client_app


app = make_client_app()
