"""Wire keys, defined once.

Every name that crosses the wire between the server and the clients (record names in a
message's ``RecordDict``, config keys, metric keys) is a kebab-case constant here. Code on
both sides imports these; no other module spells a wire key as a string literal.
"""

from typing import Final

# -- Records inside a message's RecordDict ---------------------------------------------------
ARRAYS: Final = "arrays"
"""ArrayRecord: the model payload (encoded on the wire, decoded float32 inside the server)."""
CONFIG: Final = "config"
"""ConfigRecord: per-round instructions from the server."""
METRICS: Final = "metrics"
"""MetricRecord: a client's reply metrics."""
MASK_VOTE: Final = "mask-vote"
"""ArrayRecord: a client's proposed mask (bool) or scores (float32) for reconciliation."""
# Channel pruning (prune-granularity = "channel"): one flat vector over the model's channel
# groups in graph order (fedprune.channels.flatten).
CHANNEL_MASK: Final = "channel-mask"
"""ArrayRecord {CHANNEL_BITS}: the global channel mask, one bit per channel (downlink)."""
CHANNEL_VOTE: Final = "channel-vote"
"""ArrayRecord {CHANNEL_BITS} (mask rules) or {CHANNEL_SCORES} (top-k): a client's channel vote."""
CHANNEL_BITS: Final = "bits"
CHANNEL_SCORES: Final = "scores"

# -- Config keys (server -> client) ----------------------------------------------------------
SERVER_ROUND: Final = "server-round"
DENSITY: Final = "density"
"""Scheduled global density for this round; clients propose masks at this density."""
VOTE: Final = "vote"
"""What the client should send as its mask vote: 'none', 'mask' or 'scores'."""
MASK_VERSION: Final = "mask-version"
"""Version of the global mask; the payload omits the mask bits when the node already has it."""
PAYLOAD_KIND: Final = "payload-kind"
"""Downlink: 'weights' (the global model), 'delta' (its change since REF_VERSION - 1) or
'seed' (none: the node builds the initial model from the run config, see MODEL_DIGEST)."""
MODEL_DIGEST: Final = "model-digest"
"""Seeded start: sha256 of the initial weights (:func:`fedprune.codec.weights_digest`)."""
REF_VERSION: Final = "ref-version"
"""Version of the reference model a node holds after applying this downlink (delta-downlink)."""
RESUMED_FROM: Final = "resumed-from"
"""The checkpointed round this run resumed from (0: a fresh run); a node restores its state as
of that round from its own checkpoint directory."""
INSTALL: Final = "fedprune-install"
"""The ServerApp's installed fedprune, ``"<version> code <digest>"``; a node whose own differs
fails (``boundary.install``). Sent until every connected node has replied once."""

# -- Metric keys (client -> server, and the server's per-round record) -----------------------
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train-loss"
EPSILON: Final = "epsilon"
BYTES_UP: Final = "bytes-up"
BYTES_DOWN: Final = "bytes-down"
ACCURACY: Final = "accuracy"
LOSS: Final = "loss"
NUM_REJECTED: Final = "num-rejected"

UPLINK_BITS: Final = "uplink-bits"
"""Prefix of the round's mean uplink bits per parameter: ``uplink-bits-<part>`` for every part of
:data:`fedprune.codec.BREAKDOWN_KEYS` (positions, their entropy, values, scales, framing)."""

# -- Client state (context.state; never on the wire) ----------------------------------------
STATE_MASK: Final = "mask-cache"
"""ArrayRecord: the last global mask this node received (its version: '<name>-meta')."""
STATE_REF: Final = "ref-model"
"""ArrayRecord: the global model as this node reconstructed it (delta-downlink reference)."""
STATE_RESIDUAL: Final = "ef-residual"
"""ArrayRecord: the error-feedback residual of the last uplink."""
STATE_ACCOUNTANT: Final = "dp-accountant"
"""ArrayRecord: the privacy accountant's state (history of steps), for cumulative ε."""
STATE_RESTORED: Final = "state-restored"
"""ConfigRecord: set once this node has restored (or cleared) its on-disk state in this run."""
STATE_TEACHER: Final = "kd-teacher"
"""ArrayRecord: this node's private distillation teacher (``distill``); it never travels."""

# -- Node config (SuperNode --node-config; set by Flower in simulation) ---------------------
PARTITION_ID: Final = "partition-id"
NUM_PARTITIONS: Final = "num-partitions"
DATA_DIR: Final = "data-dir"
"""Optional: where this node's dataset files are (see ``fedprune.data.load_dataset``)."""
DATA_PATH: Final = "data-path"
"""Optional: this node's own data file (``python -m simulations.node_data``); no partitioning."""

# -- Reproducible sampling (strategies/sampling.py) ------------------------------------------
PARTITION_QUERY: Final = "partition"
"""Action of the ``query.partition`` message: the node replies with its ``partition-id``."""

PROXIMAL_MU: Final = "proximal-mu"
"""Set by Flower's FedProx in the train config."""
