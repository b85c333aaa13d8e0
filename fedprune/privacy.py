"""Differentially private local training (DP-SGD with Opacus) on pruned models.

One entry point, :func:`make_private`, turns a model, an optimizer factory and a data loader
into a :class:`PrivateTrainer` under a validated :class:`DPConfig`:

- the model is made Opacus-compatible first (:func:`dp_compatible`: BatchNorm -> GroupNorm via
  ``ModuleValidator.fix``; anything that cannot be fixed raises :class:`DPCompatibilityError`
  with the validator's reasons, before any training);
- the loader is replaced by Opacus's Poisson-sampling ``DPDataLoader`` (the sampling its
  accountants assume), drawing from the generator passed in;
- pruning masks are plain boolean tensors (never ``torch.nn.utils.prune`` hooks). Per-sample
  gradients of pruned coordinates are zeroed *before* clipping, so the clipping norm is spent
  on live coordinates only; the noised gradient, the weights and the optimizer state (momentum,
  Adam moments) of pruned coordinates are zeroed at every step, so pruned weights stay exactly
  ``0.0``;
- the accountant's history persists across rounds as plain numpy arrays
  (:func:`accountant_state_to_arrays` / :func:`accountant_state_from_arrays`), which a Flower
  ``context.state`` ``ArrayRecord`` holds without pickle; restoring it into the next round's
  fresh ``PrivacyEngine`` makes epsilon cumulative over the whole run;
- in target-epsilon mode the noise multiplier is calibrated once for the run's planned number
  of steps (:func:`calibrate_noise`), from run-level quantities only, so every round of a run
  uses the same sigma.

The training loop (``criterion`` must use ``reduction="mean"``, Opacus's default)::

    trainer = make_private(
        model,
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        train_loader,
        dp_config,
        generator=torch.Generator().manual_seed(seed),
        masks=masks,                               # name -> bool tensor / array, or None
        accountant_state=saved_arrays,             # None on the client's first round
        total_steps=planned_total_steps(train_loader, num_rounds=R, local_epochs=E),
    )
    for _ in range(local_epochs):
        for x, y in trainer.loader:                # Poisson-sampled, possibly empty:
            trainer.zero_grad()                    # never skip a batch (noise-only step)
            criterion(trainer.model(x), y).backward()
            trainer.step()                         # never trainer.optimizer.step() directly
    weights = trainer.module.state_dict()          # unwrapped names (no "_module." prefix)
    saved_arrays = trainer.accountant_state()      # dict[str, np.ndarray] for context.state
    epsilon = trainer.epsilon()                    # cumulative over all rounds so far
    trainer.close()                                # remove Opacus hooks from trainer.module

Only gradients that flow through module outputs reach Opacus's per-sample gradients: a loss
term on the parameters themselves (e.g. FedProx's proximal term) is dropped by the DP optimizer.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedprune.catalog import AccountantName

# Opacus (~120 MB resident with what it imports) is imported by the functions that use it, so
# that a node importing the app without training under DP does not hold it.
if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule
    from opacus.optimizers import DPOptimizer

__all__ = [
    "MECHANISM_KEY",
    "NOISE_MULTIPLIER_KEY",
    "NUM_STEPS_KEY",
    "SAMPLE_RATE_KEY",
    "AccountantName",
    "DPCompatibilityError",
    "DPConfig",
    "GradSampleMode",
    "PrivateTrainer",
    "accountant_state_from_arrays",
    "accountant_state_to_arrays",
    "calibrate_noise",
    "dp_compatible",
    "epsilon_spent",
    "make_private",
    "planned_total_steps",
    "resolve_noise_multiplier",
]

GradSampleMode = Literal["hooks", "functorch", "ew"]
"""Opacus per-sample-gradient engines that materialise ``p.grad_sample`` (needed for masking).

``"ew"`` (torch's ExpandedWeights) cannot run an empty Poisson batch (it raises), which
``"hooks"`` (the default) and ``"functorch"`` turn into a noise-only step, as DP-SGD requires.
"""
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""Builds the (non-private) optimizer over the parameters of the DP-compatible model."""
MaskLike = torch.Tensor | npt.NDArray[np.bool_]

MECHANISM_KEY: Final = "mechanism"
"""Accountant-state array: 0-d unicode array holding the accountant name (``'rdp'``/``'prv'``)."""
NOISE_MULTIPLIER_KEY: Final = "noise-multiplier"
"""Accountant-state array: float64 ``(k,)``, sigma of each history entry."""
SAMPLE_RATE_KEY: Final = "sample-rate"
"""Accountant-state array: float64 ``(k,)``, Poisson sample rate q of each history entry."""
NUM_STEPS_KEY: Final = "num-steps"
"""Accountant-state array: int64 ``(k,)``, number of steps of each history entry."""

_GSM_PREFIX: Final = "_module."
_SECURE_RNG_WARNING: Final = "Secure RNG turned off"
_LARGEST_ALPHA_WARNING: Final = "Optimal order is the largest alpha"


# -- Configuration ----------------------------------------------------------------------------


class _DPRunFields(Protocol):
    """The DP fields of ``fedprune.config.RunConfig`` (``0.0`` means "not set")."""

    @property
    def dp(self) -> bool: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def target_epsilon(self) -> float: ...
    @property
    def target_delta(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...
    @property
    def accountant(self) -> str: ...


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DPConfig:
    """Client-side DP-SGD settings, validated on construction.

    Parameters
    ----------
    enabled : bool
        Whether local training is differentially private.
    noise_multiplier : float or None
        Fixed noise multiplier sigma (noise std / ``max_grad_norm``). Exactly one of
        ``noise_multiplier`` and ``target_epsilon`` is set when ``enabled``.
    target_epsilon : float or None
        Run-level epsilon budget; sigma is then calibrated once for the run's planned steps.
    target_delta : float
        Delta of the (epsilon, delta) guarantee, in ``(0, 1)``; also the delta ε is reported at.
    max_grad_norm : float
        Per-sample L2 clipping bound C over all (live) coordinates of the model.
    accountant : {"rdp", "prv"}
        Opacus privacy accountant.
    grad_sample_mode : {"hooks", "functorch", "ew"}
        Opacus per-sample gradient engine.
    epsilon_tolerance : float
        Precision of the binary search in target-epsilon mode.

    Raises
    ------
    ValueError
        Naming the offending field.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    grad_sample_mode: GradSampleMode = "hooks"
    epsilon_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.accountant not in get_args(AccountantName):
            raise ValueError(
                f"accountant must be one of {get_args(AccountantName)}, got {self.accountant!r}"
            )
        if self.grad_sample_mode not in get_args(GradSampleMode):
            raise ValueError(
                f"grad_sample_mode must be one of {get_args(GradSampleMode)}, "
                f"got {self.grad_sample_mode!r}"
            )
        if not (0.0 < self.target_delta < 1.0):
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}")
        _positive(self.max_grad_norm, "max_grad_norm")
        _positive(self.epsilon_tolerance, "epsilon_tolerance")
        if self.noise_multiplier is not None:
            _positive(self.noise_multiplier, "noise_multiplier")
        if self.target_epsilon is not None:
            _positive(self.target_epsilon, "target_epsilon")
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "noise_multiplier / target_epsilon: with DP enabled set exactly one of them, got "
                f"noise_multiplier={self.noise_multiplier!r}, "
                f"target_epsilon={self.target_epsilon!r}"
            )

    @classmethod
    def from_run_config(cls, config: _DPRunFields) -> DPConfig:
        """Build from a run config's DP fields, where ``0.0`` means "not set".

        Parameters
        ----------
        config : RunConfig-like
            Any object with ``dp``, ``noise_multiplier``, ``target_epsilon``,
            ``target_delta``, ``max_grad_norm`` and ``accountant`` attributes
            (``fedprune.config.RunConfig``).

        Returns
        -------
        DPConfig
            The validated DP configuration.
        """
        accountant = config.accountant
        if accountant not in get_args(AccountantName):
            raise ValueError(
                f"accountant must be one of {get_args(AccountantName)}, got {accountant!r}"
            )
        return cls(
            enabled=config.dp,
            noise_multiplier=config.noise_multiplier or None,
            target_epsilon=config.target_epsilon or None,
            target_delta=config.target_delta,
            max_grad_norm=config.max_grad_norm,
            accountant=accountant,  # type: ignore[arg-type]
        )


# -- Noise calibration ------------------------------------------------------------------------


def planned_total_steps(
    loader: DataLoader[Any], *, num_rounds: int, local_epochs: int, local_steps: int = 0
) -> int:
    """Count the DP-SGD steps a client takes over the whole run, as Opacus will count them.

    Opacus's Poisson loader runs ``int(1 / q)`` batches per epoch with ``q = 1 / len(loader)``
    (one fewer than ``len(loader)`` for a few lengths, e.g. 93, through float rounding).

    Parameters
    ----------
    loader : DataLoader
        The client's plain (non-private) training loader.
    num_rounds : int
        Server rounds in the run (an upper bound when the client is not sampled every round).
    local_epochs : int
        Local epochs per round.
    local_steps : int
        Cap on the steps of one round (``local-steps``; 0: no cap).

    Returns
    -------
    int
        ``num_rounds * min(local_epochs * int(1 / (1 / len(loader))), local_steps or inf)``.
    """
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds!r}")
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be >= 1, got {local_epochs!r}")
    if local_steps < 0:
        raise ValueError(f"local_steps must be >= 0, got {local_steps!r}")
    batches = len(loader)
    if batches < 1:
        raise ValueError("loader must yield at least one batch")
    per_round = local_epochs * int(1 / (1 / batches))
    return num_rounds * (min(per_round, local_steps) if local_steps else per_round)


@functools.lru_cache(maxsize=64)
def _calibrated_sigma(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The bisection starts at sigma = 20, where RDP's best order is the largest one.
        warnings.filterwarnings("ignore", message=_LARGEST_ALPHA_WARNING, category=UserWarning)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    return float(sigma)


def calibrate_noise(cfg: DPConfig, *, sample_rate: float, total_steps: int) -> float:
    """Smallest sigma (within tolerance) whose epsilon after ``total_steps`` is <= the target.

    A pure, cached function of run-level quantities: every round of a run gets the same sigma.

    Parameters
    ----------
    cfg : DPConfig
        Must have ``target_epsilon`` set.
    sample_rate : float
        Poisson sample rate q in ``(0, 1]`` (``1 / len(dp_loader)``).
    total_steps : int
        Planned DP-SGD steps over the whole run (:func:`planned_total_steps`).

    Returns
    -------
    float
        The noise multiplier, with ``target - tolerance < epsilon(sigma) <= target``.
    """
    if cfg.target_epsilon is None:
        raise ValueError("cfg.target_epsilon must be set to calibrate the noise")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    return _calibrated_sigma(
        float(cfg.target_epsilon),
        float(cfg.target_delta),
        float(sample_rate),
        int(total_steps),
        cfg.accountant,
        float(cfg.epsilon_tolerance),
    )


def resolve_noise_multiplier(
    cfg: DPConfig, *, sample_rate: float, total_steps: int | None = None
) -> float:
    """Return the run's sigma: ``cfg.noise_multiplier``, or calibrated to ``cfg.target_epsilon``.

    Parameters
    ----------
    cfg : DPConfig
        DP configuration with exactly one of the two set.
    sample_rate : float
        Poisson sample rate q.
    total_steps : int or None
        Planned steps of the run; required in target-epsilon mode.

    Returns
    -------
    float
        The noise multiplier.
    """
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    if total_steps is None:
        raise ValueError("total_steps is required when cfg.target_epsilon is set")
    return calibrate_noise(cfg, sample_rate=sample_rate, total_steps=total_steps)


# -- Accountant state <-> arrays --------------------------------------------------------------


def accountant_state_to_arrays(state: Mapping[str, Any]) -> dict[str, npt.NDArray[Any]]:
    """Flatten an Opacus accountant ``state_dict()`` into pickle-free numpy arrays.

    Parameters
    ----------
    state : Mapping
        ``{"history": [(sigma, q, steps), ...], "mechanism": "rdp" | "prv"}``.

    Returns
    -------
    dict[str, np.ndarray]
        :data:`MECHANISM_KEY` (0-d unicode), :data:`NOISE_MULTIPLIER_KEY`,
        :data:`SAMPLE_RATE_KEY` (float64) and :data:`NUM_STEPS_KEY` (int64), one entry per
        history element.
    """
    for key in ("history", "mechanism"):
        if key not in state:
            raise ValueError(f"state is missing the key {key!r}")
    mechanism = state["mechanism"]
    if mechanism not in get_args(AccountantName):
        raise ValueError(f"state['mechanism'] must be one of {get_args(AccountantName)}")
    table = np.asarray(state["history"], dtype=np.float64).reshape(-1, 3)
    steps = table[:, 2].astype(np.int64)
    if not np.array_equal(steps, table[:, 2]):
        raise ValueError("state['history'] step counts must be integers")
    arrays = {
        MECHANISM_KEY: np.array(mechanism),
        NOISE_MULTIPLIER_KEY: np.ascontiguousarray(table[:, 0]),
        SAMPLE_RATE_KEY: np.ascontiguousarray(table[:, 1]),
        NUM_STEPS_KEY: steps,
    }
    _check_arrays(arrays)
    return arrays


def _check_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    keys = (MECHANISM_KEY, NOISE_MULTIPLIER_KEY, SAMPLE_RATE_KEY, NUM_STEPS_KEY)
    for key in keys:
        if key not in arrays:
            raise ValueError(f"accountant arrays are missing the key {key!r}")
    extra = sorted(set(arrays) - set(keys))
    if extra:
        raise ValueError(f"accountant arrays have unknown key(s) {extra}")
    mechanism = arrays[MECHANISM_KEY]
    if mechanism.ndim != 0 or str(mechanism) not in get_args(AccountantName):
        raise ValueError(
            f"{MECHANISM_KEY!r} must be a 0-d array holding one of {get_args(AccountantName)}"
        )
    sigma, rate, steps = (arrays[k] for k in keys[1:])
    if not (sigma.ndim == rate.ndim == steps.ndim == 1 and len(sigma) == len(rate) == len(steps)):
        raise ValueError(
            f"{NOISE_MULTIPLIER_KEY!r}, {SAMPLE_RATE_KEY!r} and {NUM_STEPS_KEY!r} must be 1-d "
            f"and of equal length, got shapes {sigma.shape}, {rate.shape}, {steps.shape}"
        )
    if not np.issubdtype(steps.dtype, np.integer) or np.any(steps < 1):
        raise ValueError(f"{NUM_STEPS_KEY!r} must hold integers >= 1")
    if not np.all(np.isfinite(sigma) & (sigma >= 0.0)):
        raise ValueError(f"{NOISE_MULTIPLIER_KEY!r} must hold finite values >= 0")
    if not np.all((rate > 0.0) & (rate <= 1.0)):
        raise ValueError(f"{SAMPLE_RATE_KEY!r} must hold values in (0, 1]")


def accountant_state_from_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """Inverse of :func:`accountant_state_to_arrays`: an Opacus accountant ``state_dict``.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        As produced by :func:`accountant_state_to_arrays` (e.g. read back from an
        ``ArrayRecord``).

    Returns
    -------
    dict
        ``{"history": [(sigma, q, steps), ...], "mechanism": str}`` with Python scalars, ready
        for ``accountant.load_state_dict``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    _check_arrays(arrays)
    history = list(
        zip(
            arrays[NOISE_MULTIPLIER_KEY].astype(np.float64).tolist(),
            arrays[SAMPLE_RATE_KEY].astype(np.float64).tolist(),
            arrays[NUM_STEPS_KEY].astype(np.int64).tolist(),
            strict=True,
        )
    )
    return {"history": history, "mechanism": str(arrays[MECHANISM_KEY])}


def epsilon_spent(arrays: Mapping[str, npt.NDArray[Any]], *, delta: float) -> float:
    """Epsilon at ``delta`` of a persisted accountant state (0.0 for an empty history).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        Accountant state as produced by :func:`accountant_state_to_arrays`.
    delta : float
        Target delta in ``(0, 1)``.

    Returns
    -------
    float
        The accountant's epsilon.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    state = accountant_state_from_arrays(arrays)
    if not state["history"]:
        return 0.0
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=state["mechanism"])
    accountant.load_state_dict(state)
    return float(accountant.get_epsilon(delta=delta))


# -- Model compatibility ----------------------------------------------------------------------


class DPCompatibilityError(ValueError):
    """The model cannot be trained with Opacus DP-SGD, even after ``ModuleValidator.fix``.

    Attributes
    ----------
    reasons : tuple[str, ...]
        The validators' messages.
    """

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("model cannot be made differentially private: " + "; ".join(self.reasons))


@contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


def _incompatibilities(model: nn.Module) -> list[str]:
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    with _training_mode(model):
        errors: list[Exception] = list(ModuleValidator.validate(model, strict=False))
    # Trainable layers with buffers (e.g. a custom layer) leak the buffers; Opacus's
    # GradSampleModule rejects them at wrap time, report them here instead.
    errors.extend(GradSampleModule.validate(model, strict=False))
    return [str(e) for e in errors]


def dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` if Opacus accepts it, else a fixed copy (BatchNorm -> GroupNorm).

    Fixing changes the ``state_dict`` keys (no running statistics), so when DP is on, build
    the model through this function on *both* the server and the clients.

    Parameters
    ----------
    model : nn.Module
        A plain module (not an Opacus ``GradSampleModule``); its classes must be importable
        (``ModuleValidator.fix`` clones through ``torch.save``).

    Returns
    -------
    nn.Module
        ``model`` itself when already valid, otherwise the fixed clone.

    Raises
    ------
    DPCompatibilityError
        When the fixed model still fails Opacus's validators, with their reasons.
    """
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule
    from opacus.validators import ModuleValidator

    if isinstance(model, AbstractGradSampleModule):
        raise ValueError("model must be a plain nn.Module, not an Opacus GradSampleModule")
    if not _incompatibilities(model):
        return model
    fixed = ModuleValidator.fix(model)
    reasons = _incompatibilities(fixed)
    if reasons:
        raise DPCompatibilityError(reasons)
    return fixed


# -- Training ---------------------------------------------------------------------------------


def _strip_gsm_prefix(name: str) -> str:
    while name.startswith(_GSM_PREFIX):
        name = name[len(_GSM_PREFIX) :]
    return name


def _resolve_masks(
    module: nn.Module, masks: Mapping[str, MaskLike] | None
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Map mask names (with or without Opacus's ``_module.`` prefix) to ``(param, pruned)``."""
    if not masks:
        return []
    params = dict(module.named_parameters())
    resolved: list[tuple[nn.Parameter, torch.Tensor]] = []
    for raw_name, mask in masks.items():
        name = _strip_gsm_prefix(raw_name)
        if name not in params:
            raise ValueError(
                f"masks: {raw_name!r} is not a parameter of the model "
                f"(parameters: {sorted(params)})"
            )
        param = params[name]
        keep = torch.as_tensor(mask)
        if keep.dtype != torch.bool:
            raise ValueError(f"masks: {raw_name!r} must be boolean, got {keep.dtype}")
        if keep.shape != param.shape:
            raise ValueError(
                f"masks: {raw_name!r} has shape {tuple(keep.shape)}, "
                f"parameter has {tuple(param.shape)}"
            )
        pruned = torch.logical_not(keep).to(param.device)
        if bool(pruned.any()):
            resolved.append((param, pruned))
    return resolved


class PrivateTrainer:
    """DP-SGD stepping with pruning masks; built by :func:`make_private`.

    Attributes
    ----------
    model : AbstractGradSampleModule
        Opacus wrapper to call in the training loop.
    module : nn.Module
        The wrapped (DP-compatible) model; its ``state_dict`` has the original names.
    optimizer : DPOptimizer
        Clipping/noising optimizer; step it only through :meth:`step`.
    loader : DataLoader
        Poisson-sampling loader (``DPDataLoader``).
    noise_multiplier : float
        Sigma used in every step of the run.
    sample_rate : float
        Poisson sample rate q the accountant records.
    steps : int
        Optimizer steps taken by this trainer (this round).
    """

    def __init__(
        self,
        *,
        engine: PrivacyEngine,
        model: AbstractGradSampleModule,
        module: nn.Module,
        optimizer: DPOptimizer,
        loader: DataLoader[Any],
        pruned: Sequence[tuple[nn.Parameter, torch.Tensor]],
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.loader = loader
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.steps = 0
        self._engine = engine
        self._delta = delta
        self._pruned = list(pruned)  # (parameter, bool tensor: True where pruned)
        self._params = [param for param, _ in self._pruned]
        self._keep = [torch.logical_not(pruned).to(param.dtype) for param, pruned in self._pruned]
        if self._pruned:
            accounting_hook = optimizer.step_hook

            # Runs after clipping, noising and scaling, right before the inner optimizer
            # step: the noise drawn for pruned coordinates never reaches the update.
            def mask_then_account(opt: DPOptimizer) -> None:
                self._mask_grads()
                if accounting_hook is not None:
                    accounting_hook(opt)

            optimizer.attach_step_hook(mask_then_account)
        self.apply_masks()

    def zero_grad(self) -> None:
        """Clear gradients and per-sample gradients (call before each forward pass)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Mask per-sample grads, clip, noise, account, step, and re-apply the masks."""
        # A broadcast multiply by a 0/1 float mask is ~20x faster than a broadcast
        # masked_fill_ on CPU, and per-sample gradients are the largest tensors of the step.
        for param, keep in zip(self._params, self._keep, strict=True):
            grad_sample = getattr(param, "grad_sample", None)
            if isinstance(grad_sample, torch.Tensor):
                grad_sample.mul_(keep)  # broadcasts over the batch dim
            elif isinstance(grad_sample, list):
                for g in grad_sample:
                    g.mul_(keep)
        self.optimizer.step()
        self.apply_masks()
        self.steps += 1

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for param, pruned in self._pruned:
            if param.grad is not None:
                param.grad.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set pruned weights and their optimizer state (momentum, moments) to exactly 0."""
        state = self.optimizer.state
        for param, pruned in self._pruned:
            param.masked_fill_(pruned, 0.0)
            for value in state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(pruned, 0)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent over the whole run so far (restored history plus this round).

        Parameters
        ----------
        delta : float or None
            Target delta; defaults to ``DPConfig.target_delta``.

        Returns
        -------
        float
            The accountant's epsilon (0.0 before any step).
        """
        delta = self._delta if delta is None else delta
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not self._engine.accountant.history:
            return 0.0
        return float(self._engine.accountant.get_epsilon(delta=delta))

    def accountant_state(self) -> dict[str, npt.NDArray[Any]]:
        """Return the accountant's state as arrays for ``context.state`` (next round's input)."""
        return accountant_state_to_arrays(self._engine.accountant.state_dict())

    def close(self) -> nn.Module:
        """Remove Opacus hooks and per-sample attributes; return :attr:`module`."""
        self.model.cleanup()
        return self.module


def make_private(
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    loader: DataLoader[Any],
    cfg: DPConfig,
    *,
    generator: torch.Generator,
    masks: Mapping[str, MaskLike] | None = None,
    accountant_state: Mapping[str, npt.NDArray[Any]] | None = None,
    total_steps: int | None = None,
) -> PrivateTrainer:
    """Prepare DP-SGD training of ``model`` for one round.

    Parameters
    ----------
    model : nn.Module
        Plain model; fixed with :func:`dp_compatible` if needed (then the trainer trains the
        fixed copy, :attr:`PrivateTrainer.module`). Put in training mode.
    make_optimizer : callable
        ``params -> torch.optim.Optimizer``, called on the DP-compatible model's trainable
        parameters (a factory, because fixing the model replaces its parameters).
    loader : DataLoader
        Plain training loader over a map-style dataset; its ``len`` sets the sample rate
        ``q = 1 / len(loader)`` of the Poisson loader that replaces it.
    cfg : DPConfig
        Must have ``enabled=True``.
    generator : torch.Generator
        Source of both the Poisson sampling and the Gaussian noise (same device as the model).
    masks : Mapping[str, bool tensor or array] or None
        Pruning masks keyed by the model's parameter names (a ``_module.`` prefix is accepted);
        ``True`` keeps an entry.
    accountant_state : Mapping[str, np.ndarray] or None
        The previous round's :meth:`PrivateTrainer.accountant_state`; ``None`` on the first.
    total_steps : int or None
        The run's planned steps (:func:`planned_total_steps`); required with
        ``cfg.target_epsilon``.

    Returns
    -------
    PrivateTrainer
        See the module docstring for the training loop.

    Raises
    ------
    DPCompatibilityError
        If the model cannot be made private.
    ValueError
        On a bad argument, named in the message.
    """
    if not cfg.enabled:
        raise ValueError("cfg.enabled is False: train without make_private")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    module = dp_compatible(model)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if generator.device != params[0].device:
        raise ValueError(
            f"generator is on {generator.device}, the model on {params[0].device}; they must match"
        )
    pruned = _resolve_masks(module, masks)
    optimizer = make_optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("make_optimizer must return a torch.optim.Optimizer")
    restored = None if accountant_state is None else accountant_state_from_arrays(accountant_state)
    if restored is not None and restored["mechanism"] != cfg.accountant:
        raise ValueError(
            f"accountant_state was kept by the {restored['mechanism']!r} accountant, "
            f"cfg.accountant is {cfg.accountant!r}"
        )

    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    # What make_private(poisson_sampling=True) does, with our generator for the sampling.
    dp_loader = DPDataLoader.from_data_loader(loader, generator=generator)
    sample_rate = 1.0 / len(dp_loader)  # the rate PrivacyEngine.make_private accounts with
    sigma = resolve_noise_multiplier(cfg, sample_rate=sample_rate, total_steps=total_steps)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SECURE_RNG_WARNING, category=UserWarning)
        engine = PrivacyEngine(accountant=cfg.accountant)
    if restored is not None:
        engine.accountant.load_state_dict(restored)
    private_model, dp_optimizer, private_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=dp_loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,  # dp_loader already samples Poisson
        noise_generator=generator,
        grad_sample_mode=cfg.grad_sample_mode,
    )
    private_model.forbid_grad_accumulation()
    return PrivateTrainer(
        engine=engine,
        model=private_model,
        module=module,
        optimizer=dp_optimizer,
        loader=private_loader,
        pruned=pruned,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        delta=cfg.target_delta,
    )
