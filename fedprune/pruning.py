"""Client-side pruning: scores, masks and schedules as pure functions on plain tensors.

Masks are ``name -> bool tensor`` dicts over the prunable tensors (the weights of ``Linear`` and
``Conv{1,2,3}d`` layers, named by ``state_dict`` keys). They are applied by writing exact zeros
into the weights (:func:`apply_mask`), never by ``torch.nn.utils.prune``: its forward pre-hooks and
``weight_orig`` / ``weight_mask`` reparametrisation break Opacus' per-sample gradients, so the
training loop re-applies the mask after every optimizer step instead.

Tie-breaking is positional everywhere: tensors are ordered by sorted name, entries within a tensor
by C-order flat index (channels by index), and among equal scores the lower position is kept.
Counts use Python's ``round`` (halves go to the even integer), as :mod:`fedprune.masks` does.

Structured (channel) pruning lives in :mod:`fedprune.channels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

__all__ = [
    "MaskScope",
    "apply_mask",
    "compute_mask",
    "magnitude_scores",
    "polynomial_density",
    "prunable_names",
    "sensitivity_scores",
]

MaskScope = Literal["global", "layer"]
"""``"global"``: one top-k across all tensors; ``"layer"``: a top-k per tensor."""

_SCOPES: tuple[str, ...] = get_args(MaskScope)
_PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

MaskLike = Tensor | npt.NDArray[np.bool_]
"""A mask tensor: a ``bool`` torch tensor, or a ``bool`` numpy array (as decoded on the wire)."""


# -- names and scores ------------------------------------------------------------------------


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the prunable tensors of a model, in ``state_dict`` order.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    list[str]
        ``state_dict`` keys of the weights (``ndim >= 2``) of every ``nn.Linear``,
        ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` submodule. Biases, norm parameters,
        embeddings and buffers are not prunable.
    """
    wanted = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _PRUNABLE_TYPES) and module.weight.ndim >= 2
    }
    return [name for name in model.state_dict() if name in wanted]


def _tensors(
    model_or_params: nn.Module | Mapping[str, Tensor], names: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """``name -> tensor`` for a model (its parameters and buffers) or a mapping of tensors."""
    if isinstance(model_or_params, nn.Module):
        available: dict[str, Tensor] = dict(
            model_or_params.named_parameters(remove_duplicate=False)
        )
        available.update(model_or_params.named_buffers(remove_duplicate=False))
        if names is None:
            names = prunable_names(model_or_params)
    else:
        available = dict(model_or_params)
        if names is None:
            names = list(available)
    out: dict[str, Tensor] = {}
    for name in names:
        if name not in available:
            raise ValueError(f"no tensor named {name!r} (known: {sorted(available)})")
        out[name] = available[name]
    return out


def magnitude_scores(params: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Magnitude scores ``|w|``.

    Parameters
    ----------
    params : torch.nn.Module or Mapping[str, torch.Tensor]
        A model (scores for its :func:`prunable_names`) or ``name -> tensor``.

    Returns
    -------
    dict[str, torch.Tensor]
        ``name -> |w|`` (new tensors, detached from autograd).
    """
    return {name: t.detach().abs() for name, t in _tensors(params).items()}


def sensitivity_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """First-order (SNIP-style) sensitivity ``sum_batches |w * dL/dw|``.

    Gradients come from ``torch.autograd.grad``, so the parameters' ``.grad`` are left exactly as
    they were found. The model runs in eval mode (no dropout, norm statistics untouched) and each
    module's train/eval flag is restored afterwards. Pass the plain module, not an Opacus
    ``GradSampleModule`` (its hooks would record per-sample gradients).

    Parameters
    ----------
    model : torch.nn.Module
        The model to score.
    loss_fn : Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        ``loss_fn(model(x), y)`` returns a scalar loss.
    batches : Iterable[tuple[torch.Tensor, torch.Tensor]]
        A few ``(x, y)`` batches; moved to the device of the first scored parameter.
    names : Sequence[str] or None
        Parameters to score; defaults to :func:`prunable_names`.

    Returns
    -------
    dict[str, torch.Tensor]
        ``name -> scores`` (same shape, dtype and device as the parameter).

    Raises
    ------
    ValueError
        If a name is not a parameter that requires grad, ``names`` is empty, or ``batches`` is
        empty.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    names = prunable_names(model) if names is None else list(names)
    if not names:
        raise ValueError("names must not be empty")
    for name in names:
        if name not in named:
            raise ValueError(f"names: {name!r} is not a parameter of the model")
        if not named[name].requires_grad:
            raise ValueError(f"names: parameter {name!r} does not require grad")
    params = [named[n] for n in names]
    device = params[0].device
    scores = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    seen = 0
    try:
        for x, y in batches:
            with torch.enable_grad():
                loss = loss_fn(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for acc, p, g in zip(scores, params, grads, strict=True):
                    if g is not None:
                        acc.add_((p * g).abs_())
            seen += 1
    finally:
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ValueError("batches must not be empty")
    return dict(zip(names, scores, strict=True))


# -- masks -----------------------------------------------------------------------------------


def _as_bool_tensor(mask: MaskLike, *, device: torch.device, what: str) -> Tensor:
    """Convert a mask to a bool tensor on ``device``; ValueError naming ``what`` if not bool."""
    t = torch.as_tensor(mask, device=device)
    if t.dtype != torch.bool:
        raise ValueError(f"{what} must be a bool mask, got dtype {t.dtype}")
    return t


def _topk_flat(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of a 1-D tensor; on ties the lower index wins.

    ``k`` must not exceed the number of finite entries (``-inf`` marks excluded entries).
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    keep = scores > kth
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(scores == kth).view(-1)[:need]] = True
    return keep


def compute_mask(
    scores: Mapping[str, Tensor],
    density: float,
    *,
    scope: MaskScope = "global",
    prior: Mapping[str, MaskLike] | None = None,
) -> dict[str, Tensor]:
    """Top-k mask from importance scores (higher is more important).

    Parameters
    ----------
    scores : Mapping[str, torch.Tensor]
        ``name -> finite scores`` (e.g. :func:`magnitude_scores`), all on one device.
    density : float
        Fraction of entries to keep, in ``(0, 1]``.
    scope : {"global", "layer"}
        ``"global"`` keeps exactly ``round(density * N)`` entries over all ``N`` entries of all
        tensors; ``"layer"`` keeps ``round(density * n)`` entries of each tensor of ``n`` entries.
    prior : Mapping[str, torch.Tensor or numpy.ndarray] or None
        The current mask (same names and shapes); entries outside it are never kept. If it keeps
        fewer entries than the target count (globally, or in a layer), all of them are kept.

    Returns
    -------
    dict[str, torch.Tensor]
        ``name -> bool mask`` in the key order of ``scores``, on the scores' device. Ties are
        broken positionally: sorted tensor name, then flat index; the lower position wins.

    Raises
    ------
    ValueError
        If ``scores`` is empty or non-finite, ``density`` or ``scope`` is invalid, or ``prior``
        does not match ``scores``.
    """
    if not scores:
        raise ValueError("scores must not be empty")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if prior is not None and set(prior) != set(scores):
        raise ValueError(
            f"prior has names {sorted(prior)}, expected the names of scores {sorted(scores)}"
        )
    names = sorted(scores)
    flat: list[Tensor] = []
    allowed: list[Tensor] | None = None if prior is None else []
    for name in names:
        s = scores[name].detach()
        if s.dtype not in (torch.float32, torch.float64):
            s = s.float()
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{name!r}] has non-finite entries")
        flat.append(s.reshape(-1))
        if allowed is not None and prior is not None:
            p = _as_bool_tensor(prior[name], device=s.device, what=f"prior[{name!r}]")
            if p.shape != s.shape:
                raise ValueError(f"prior[{name!r}] has shape {tuple(p.shape)}, expected {s.shape}")
            allowed.append(p.reshape(-1))

    def select(s: Tensor, a: Tensor | None) -> Tensor:
        k = round(density * s.numel())
        if a is not None:
            k = min(k, int(a.sum()))
            s = s.masked_fill(~a, -math.inf)
        return _topk_flat(s, k)

    if scope == "global":
        keep = select(torch.cat(flat), None if allowed is None else torch.cat(allowed))
        parts = list(torch.split(keep, [s.numel() for s in flat]))
    else:
        parts = [select(s, None if allowed is None else allowed[i]) for i, s in enumerate(flat)]
    by_name = dict(zip(names, parts, strict=True))
    return {name: by_name[name].view(scores[name].shape) for name in scores}


def apply_mask(
    model_or_params: nn.Module | Mapping[str, Tensor], masks: Mapping[str, MaskLike]
) -> None:
    """Zero the pruned entries in place: ``w[~mask] = 0.0`` exactly (``+0.0``, even for NaN).

    Parameters
    ----------
    model_or_params : torch.nn.Module or Mapping[str, torch.Tensor]
        A model (tensors found by parameter or buffer name) or ``name -> tensor``.
    masks : Mapping[str, torch.Tensor or numpy.ndarray]
        ``name -> bool mask`` of the same shape as the tensor.

    Raises
    ------
    ValueError
        If a mask names no tensor, is not bool, or has the wrong shape.
    """
    tensors = _tensors(model_or_params, masks.keys())
    with torch.no_grad():
        for name, mask in masks.items():
            t = tensors[name]
            m = _as_bool_tensor(mask, device=t.device, what=f"masks[{name!r}]")
            if m.shape != t.shape:
                raise ValueError(
                    f"masks[{name!r}] has shape {tuple(m.shape)}, expected {tuple(t.shape)}"
                )
            t.masked_fill_(~m, 0.0)


# -- schedule --------------------------------------------------------------------------------


def polynomial_density(
    server_round: int,
    *,
    initial: float,
    final: float,
    start_round: int,
    end_round: int,
    power: float = 3.0,
) -> float:
    """Polynomial density schedule of Zhu & Gupta (2017).

    ``d_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** power`` for
    ``start <= t < end``; ``initial`` before ``start_round`` and ``final`` from ``end_round`` on.

    Parameters
    ----------
    server_round : int
        The round ``t``.
    initial, final : float
        Densities, ``0 < final <= initial <= 1``.
    start_round, end_round : int
        Pruning window, ``start_round <= end_round``.
    power : float
        Positive exponent; 3 prunes fast early and slowly near the end.

    Returns
    -------
    float
        The scheduled density.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if not (math.isfinite(final) and math.isfinite(initial) and 0.0 < final <= initial <= 1.0):
        raise ValueError(
            f"need 0 < final <= initial <= 1, got initial={initial!r}, final={final!r}"
        )
    if start_round > end_round:
        raise ValueError(
            f"start_round ({start_round}) must not be greater than end_round ({end_round})"
        )
    if not (math.isfinite(power) and power > 0.0):
        raise ValueError(f"power must be positive and finite, got {power!r}")
    if server_round < start_round:
        return float(initial)
    if server_round >= end_round:
        return float(final)
    progress = (server_round - start_round) / (end_round - start_round)
    return float(final + (initial - final) * (1.0 - progress) ** power)
