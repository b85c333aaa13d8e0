"""The run configuration, parsed once and validated.

``[tool.flwr.app.config]`` in ``pyproject.toml`` (overridable with ``flwr run --run-config``)
arrives in the ServerApp and in every ClientApp as a flat mapping of kebab-case keys. Both sides
call :func:`RunConfig.from_mapping` on it: an unknown key, a value of the wrong type or a value out
of range raises :class:`ConfigError` naming the key, before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

from fedprune.catalog import (
    DATASET_SHAPES,
    AccountantName,
    DatasetName,
    ModelName,
    PartitionScheme,
)
from fedprune.codec import MAX_BLOCK, CodecConfig, Container, QuantMode, ScaleFormat, TopkScope
from fedprune.masks import ReconcileRule

StrategyName = Literal["fedavg", "compressed"]
InnerStrategyName = Literal[
    "fedavg", "fedavgm", "fedadam", "fedprox", "fedmedian", "fedtrimmedavg", "krum"
]
OptimizerName = Literal["sgd", "adam"]
PruneMethod = Literal["magnitude", "sensitivity"]
PruneGranularity = Literal["element", "channel"]
ChannelNormName = Literal["l1", "l2"]
DownlinkQuant = Literal["same", "none", "int8", "int8-channel", "int4-channel", "ternary"]


_LOWBIT = frozenset({"int4-channel", "ternary"})
"""The quant modes with per-row float16 or log8 step sizes."""

RESUMABLE_KEYS = frozenset({"resume", "num-server-rounds", "log-tensorboard", "log-mlflow"})
"""Config keys a resumed run may change: the flag itself, the rounds (to extend a run), and
where the metrics are also logged."""


class ConfigError(ValueError):
    """A run-config key is unknown, of the wrong type, or out of range."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, shared verbatim by the server and the clients.

    Field ``foo_bar`` is the config key ``foo-bar``. See ``pyproject.toml`` for the defaults
    used by ``flwr run .`` and ``docs/design.md`` for what each stage does with them.
    """

    run_name: str = "flwr-run"
    results_dir: str = "results"
    # Strategy: "fedavg" is stock Flower FedAvg on float32 weights (the baseline);
    # "compressed" wraps the inner strategy with mask reconciliation and the payload codec.
    strategy: StrategyName = "compressed"
    inner_strategy: InnerStrategyName = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    proximal_mu: float = 0.01
    clip_update_norm: float = 0.0
    # Reply bounds (see strategies/validation.py): a reply weighs at most max-examples-ratio
    # times the round's lower-median example count; an update's norm is clipped to
    # max-norm-ratio times the round's lower-median update norm. 0 turns a bound off.
    max_examples_ratio: float = 4.0
    max_norm_ratio: float = 3.0
    # Data and model
    dataset: DatasetName = "digits"
    model: ModelName = "mlp"
    partitioning: PartitionScheme = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    # Rounds and sampling
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    # Local training
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.9
    # Pruning
    target_density: float = 0.3
    initial_density: float = 1.0
    prune_method: PruneMethod = "magnitude"
    prune_start_round: int = 1
    prune_end_round: int = 5
    reconcile_rule: ReconcileRule = "topk"
    vote_threshold: float = 0.5
    # Channel pruning: "channel" removes whole output channels (filters / neurons) and every
    # parameter that depends on them, scored by the channel-norm of their weights (magnitude) or
    # by summed |w * dL/dw| (sensitivity); target-density is then a fraction of all parameters.
    prune_granularity: PruneGranularity = "element"
    channel_norm: ChannelNormName = "l1"
    # Payload codec
    quant: QuantMode = "int8-channel"
    entropy: bool = True
    error_feedback: bool = True
    update_topk: float = 1.0
    delta_downlink: bool = False
    # Codec, issue 14: downlink settings of their own, one-array payloads, a seeded start.
    # "same" / 0.0 take the uplink's quant / update-topk; the full-weights downlink of a low-bit
    # downlink quant is int8 per channel (signs or int4 of a whole model lose too much).
    downlink_quant: DownlinkQuant = "same"
    downlink_topk: float = 0.0
    # "tensor": the top-k fraction of each tensor; "model": of all entries together (both ways).
    topk_scope: TopkScope = "tensor"
    # Top-k by blocks of this many consecutive entries (a power of two), one position per block.
    topk_block: int = 1
    container: Container = "arrays"
    seeded_start: bool = False
    # Step sizes of the low-bit modes (int4-channel, ternary), both directions: float16, or a
    # byte per row on a log scale ("log8", half the bytes).
    lowbit_scales: ScaleFormat = "float16"
    # Differential privacy (client-side DP-SGD with Opacus)
    dp: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    # Knowledge distillation (FedKD-style): each client trains a private teacher, never sent,
    # with the shared model (the student) by mutual distillation; see fedprune.distill.
    distill: bool = False
    teacher_model: ModelName = "mlp-large"
    distill_temperature: float = 3.0
    distill_alpha: float = 1.0
    distill_beta: float = 1.0
    # Reproducibility and recovery: a checkpoint after every round; resume from the latest
    seed: int = 0
    checkpoint: bool = True
    resume: bool = False
    # Comparisons and results (issue 16): a cap on the local steps of a round (0: none), the
    # server evaluates on the first eval-examples of the held-out split (0: all of it), and
    # where its per-round metrics also go (TensorBoard events, an MLflow file store)
    local_steps: int = 0
    eval_examples: int = 0
    log_tensorboard: bool = True
    log_mlflow: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a flat kebab-case mapping (e.g. ``context.run_config``).

        Parameters
        ----------
        values : Mapping[str, Any]
            Config keys to values; keys absent here take the dataclass defaults.

        Returns
        -------
        RunConfig
            The validated configuration.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value out of range.
        """
        hints = get_type_hints(cls)
        fields = {_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            f = fields[key]
            kwargs[f.name] = _coerce(key, value, hints[f.name])
        return cls(**kwargs)

    def __post_init__(self) -> None:
        self.validate()

    def to_mapping(self) -> dict[str, bool | int | float | str]:
        """Return the flat kebab-case mapping (inverse of :meth:`from_mapping`)."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` (snake_case field names) applied."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Check types, ranges and cross-field rules; raise :class:`ConfigError` naming the key."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _coerce(_key(f.name), getattr(self, f.name), hints[f.name])
        _check(self.seed >= 0, "seed", "must be >= 0")
        _check(bool(self.run_name.strip()), "run-name", "must not be empty")
        _check(
            "/" not in self.run_name and ".." not in self.run_name,
            "run-name",
            "must be a plain name (no '/' or '..')",
        )
        _check(self.alpha > 0.0 and math.isfinite(self.alpha), "alpha", "must be > 0")
        _check(self.classes_per_client >= 1, "classes-per-client", "must be >= 1")
        _check(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        _check(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        _check(0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]")
        _check(self.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
        _check(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        _check(self.local_steps >= 0, "local-steps", "must be >= 0 (0 = no cap)")
        _check(self.eval_examples >= 0, "eval-examples", "must be >= 0 (0 = the whole split)")
        _check(self.batch_size >= 1, "batch-size", "must be >= 1")
        for name in ("lr", "server_lr"):
            value = getattr(self, name)
            _check(value > 0.0 and math.isfinite(value), _key(name), "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        _check(0.0 <= self.server_momentum < 1.0, "server-momentum", "must be in [0, 1)")
        _check(self.proximal_mu >= 0.0, "proximal-mu", "must be >= 0")
        _check(self.clip_update_norm >= 0.0, "clip-update-norm", "must be >= 0 (0 = off)")
        for name in ("max_examples_ratio", "max_norm_ratio"):
            ratio = getattr(self, name)
            _check(ratio == 0.0 or 1.0 <= ratio < math.inf, _key(name), "must be 0 (off) or >= 1")
        _check(0.0 < self.target_density <= 1.0, "target-density", "must be in (0, 1]")
        _check(
            self.target_density <= self.initial_density <= 1.0,
            "initial-density",
            f"must be in [target-density={self.target_density}, 1]",
        )
        _check(self.prune_start_round >= 1, "prune-start-round", "must be >= 1")
        _check(
            self.prune_end_round >= self.prune_start_round,
            "prune-end-round",
            f"must be >= prune-start-round={self.prune_start_round}",
        )
        _check(0.0 < self.vote_threshold <= 1.0, "vote-threshold", "must be in (0, 1]")
        _check(0.0 < self.update_topk <= 1.0, "update-topk", "must be in (0, 1]")
        _check(0.0 <= self.downlink_topk <= 1.0, "downlink-topk", "must be in [0, 1] (0: same)")
        _check(
            1 <= self.topk_block <= MAX_BLOCK and not self.topk_block & (self.topk_block - 1),
            "topk-block",
            f"must be a power of two in [1, {MAX_BLOCK}]",
        )
        _check(
            self.lowbit_scales == "float16"
            or bool(_LOWBIT.intersection((self.quant, self._downlink_quant()))),
            "lowbit-scales",
            "'log8' needs quant or downlink-quant 'int4-channel' or 'ternary'",
        )
        if self.strategy == "fedavg":
            _check(
                self.target_density == 1.0,
                "target-density",
                "pruning needs strategy='compressed' (stock FedAvg sends dense float32)",
            )
            _check(
                self.inner_strategy == "fedavg",
                "inner-strategy",
                "only applies to strategy='compressed'",
            )
            _check(self.update_topk == 1.0, "update-topk", "needs strategy='compressed'")
            _check(not self.delta_downlink, "delta-downlink", "needs strategy='compressed'")
            _check(
                self.prune_granularity == "element",
                "prune-granularity",
                "channel pruning needs strategy='compressed'",
            )
            _check(not self.seeded_start, "seeded-start", "needs strategy='compressed'")
        if self.dp:
            _check(self.max_grad_norm > 0.0, "max-grad-norm", "must be > 0 when dp is on")
            _check(0.0 < self.target_delta < 1.0, "target-delta", "must be in (0, 1)")
            given = (self.noise_multiplier > 0.0) + (self.target_epsilon > 0.0)
            _check(
                self.inner_strategy != "fedprox",
                "inner-strategy",
                "FedProx's proximal term has no per-sample gradient for DP-SGD to clip",
            )
            _check(
                self.prune_method != "sensitivity" or self.target_density == 1.0,
                "prune-method",
                "sensitivity scores read raw gradients of private data; with dp on use "
                "'magnitude' (a mask from DP-trained weights is post-processing)",
            )
            _check(
                given == 1,
                "noise-multiplier",
                "with dp on, set exactly one of noise-multiplier and target-epsilon (> 0)",
            )
        _check(self.noise_multiplier >= 0.0, "noise-multiplier", "must be >= 0")
        _check(self.target_epsilon >= 0.0, "target-epsilon", "must be >= 0")
        _check(self.distill_temperature > 0.0, "distill-temperature", "must be > 0")
        _check(self.distill_alpha >= 0.0, "distill-alpha", "must be >= 0")
        _check(self.distill_beta >= 0.0, "distill-beta", "must be >= 0")
        if self.distill:
            from fedprune.models import model_size  # torch: only for configs that distil

            shape, num_classes = DATASET_SHAPES[self.dataset]
            try:
                student, teacher = (
                    model_size(name, input_shape=shape, num_classes=num_classes)
                    for name in (self.model, self.teacher_model)
                )
            except ValueError as err:
                raise ConfigError(f"config key 'teacher-model': {err}") from err
            _check(
                teacher > student,
                "teacher-model",
                f"the teacher must be larger than the student: {self.teacher_model!r} has "
                f"{teacher:,} parameters on {self.dataset}, model {self.model!r} has {student:,}",
            )

    def check_resumable(self, saved: Mapping[str, Any]) -> None:
        """Check that a checkpoint written under config ``saved`` may resume under this one.

        Only ``resume`` and ``num-server-rounds`` (to extend a run) may differ.

        Raises
        ------
        ConfigError
            Naming the keys whose values differ.
        """
        now = self.to_mapping()
        changed = sorted(
            k
            for k in set(saved) | set(now)
            if saved.get(k) != now.get(k) and k not in RESUMABLE_KEYS
        )
        if changed:
            raise ConfigError(
                f"cannot resume: the checkpoint was written with other values of {changed} "
                f"(only {sorted(RESUMABLE_KEYS)} may change)"
            )

    def codec(self) -> CodecConfig:
        """Return the codec of model weights (downlink; every kept entry travels)."""
        quant = self._downlink_quant()
        if quant in ("int4-channel", "ternary"):
            quant = "int8-channel"
        return CodecConfig(quant=quant, entropy=self.entropy, container=self.container)

    def update_codec(self) -> CodecConfig:
        """Return the codec of uplink updates (deltas): top-k sparsified."""
        return CodecConfig(
            quant=self.quant,
            entropy=self.entropy,
            topk=self.update_topk,
            topk_scope=self.topk_scope,
            topk_block=self.topk_block,
            container=self.container,
            scales=self._scales(self.quant),
        )

    def downlink_update_codec(self) -> CodecConfig:
        """Return the codec of the delta downlink (the global model's change)."""
        return CodecConfig(
            quant=self._downlink_quant(),
            entropy=self.entropy,
            topk=self.downlink_topk or self.update_topk,
            topk_scope=self.topk_scope,
            topk_block=self.topk_block,
            container=self.container,
            scales=self._scales(self._downlink_quant()),
        )

    def _downlink_quant(self) -> QuantMode:
        return self.quant if self.downlink_quant == "same" else self.downlink_quant

    def _scales(self, quant: QuantMode) -> ScaleFormat:
        return self.lowbit_scales if quant in _LOWBIT else "float16"

    @property
    def compressed(self) -> bool:
        """Whether the codec and mask wrappers are in play."""
        return self.strategy == "compressed"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to the field type ``hint`` or raise :class:`ConfigError`."""
    choices = get_args(hint)
    if choices and all(isinstance(c, str) for c in choices):  # a Literal of strings
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"config key '{key}': must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {hint!r}")  # pragma: no cover
