"""Client-side pruning: scores, masks and schedules as pure functions on plain tensors.

Masks are ``name -> bool tensor`` dicts over the prunable tensors (the weights of ``Linear`` and
``Conv{1,2,3}d`` layers, named by ``state_dict`` keys). They are applied by writing exact zeros
into the weights (:func:`apply_mask`), never by ``torch.nn.utils.prune``: its forward pre-hooks and
``weight_orig`` / ``weight_mask`` reparametrisation break Opacus' per-sample gradients, so the
training loop re-applies the mask after every optimizer step instead.

Tie-breaking is positional everywhere: tensors are ordered by sorted name, entries within a tensor
by C-order flat index (channels by index), and among equal scores the lower position is kept.
Counts use Python's ``round`` (halves go to the even integer), as :mod:`fedprune.masks` does.

Structured pruning (:func:`l1_channel_scores`, :func:`l1_channel_mask`,
:func:`shrink_sequential`) removes whole hidden channels by L1 norm and builds a physically
smaller ``nn.Sequential``. It supports plain chains only (see :func:`shrink_sequential`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

__all__ = [
    "MaskScope",
    "apply_mask",
    "compute_mask",
    "l1_channel_mask",
    "l1_channel_scores",
    "magnitude_scores",
    "polynomial_density",
    "prunable_names",
    "sensitivity_scores",
    "shrink_sequential",
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


# -- structured (channel) pruning of plain chains --------------------------------------------

_ELEMENTWISE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Layer:
    """One ``Linear``/``Conv`` of the chain and the channels it keeps."""

    name: str  # state_dict key of the weight
    module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
    in_keep: Tensor  # bool over weight.shape[1] (input columns / channels)
    out_keep: Tensor  # bool over weight.shape[0]


@dataclass
class _Norm:
    """A channel-wise norm layer and the channels it keeps."""

    module: nn.Module
    keep: Tensor  # bool over its channels / features


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules of a (nested) plain ``nn.Sequential`` in execution order."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError(
            "model must be a plain nn.Sequential (nested plain nn.Sequential allowed); "
            f"got {type(model).__name__}. Residual or branching networks are not supported."
        )
    out: list[tuple[str, nn.Module]] = []
    for prefix, module in model.named_children():
        if isinstance(module, nn.Sequential):
            out.extend((f"{prefix}.{name}", m) for name, m in _leaves(module))
        elif next(module.children(), None) is not None:
            raise ValueError(
                f"model: submodule {prefix!r} ({type(module).__name__}) is a container; only "
                "plain nn.Sequential chains are supported (no residual or branching networks)"
            )
        else:
            out.append((prefix, module))
    return out


def l1_channel_scores(model: nn.Module) -> dict[str, Tensor]:
    """L1 norm of each output channel (row / filter) of every ``Linear``/``Conv`` weight.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    dict[str, torch.Tensor]
        ``weight name -> 1-D tensor`` of length ``out_features`` / ``out_channels``, in the order
        of :func:`prunable_names`.
    """
    weights = _tensors(model)
    with torch.no_grad():
        return {name: w.detach().abs().flatten(1).sum(dim=1) for name, w in weights.items()}


def _plan(
    model: nn.Module, keep: float
) -> tuple[list[tuple[str, nn.Module]], list[_Layer | _Norm | None]]:
    """Walk the chain and decide the kept channels of every hidden layer.

    Returns the leaves and, aligned with them, a ``_Layer``, a ``_Norm`` or ``None`` (left as is).
    """
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    leaves = _leaves(model)
    layer_idx = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _PRUNABLE_TYPES)]
    if not layer_idx:
        raise ValueError("model has no Linear or Conv layer")
    last = layer_idx[-1]
    plan: list[_Layer | _Norm | None] = [None] * len(leaves)

    # Current activation: its kept channels (None: all, e.g. the input), and its layout:
    # "flat" (N, F) or "spatial" (N, C, *S). `pending_flatten` holds the channel keep of a
    # spatial activation that went through Flatten and awaits the per-channel block size.
    cur: Tensor | None = None
    layout: Literal["flat", "spatial", "input"] = "input"
    pending_flatten: Tensor | None = None

    def features(n: int, where: str) -> Tensor | None:
        """Keep over the ``n`` features of a flat activation, expanding a pending Flatten."""
        nonlocal cur, pending_flatten
        if pending_flatten is not None:
            channels = pending_flatten.numel()
            if n % channels != 0:
                raise ValueError(
                    f"model: {where} takes {n} features after Flatten of {channels} channels; "
                    "not a whole number of positions per channel"
                )
            cur = pending_flatten.repeat_interleave(n // channels)
            pending_flatten = None
        if cur is not None and cur.numel() != n:
            raise ValueError(f"model: {where} expects {n} features, got {cur.numel()}")
        return cur

    for i, (name, module) in enumerate(leaves):
        if i > last:
            break  # after the final layer nothing is pruned; modules are kept as they are
        if isinstance(module, _PRUNABLE_TYPES):
            is_conv = isinstance(module, _CONV_TYPES)
            if is_conv:
                conv = module
                assert isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
                if conv.groups != 1:
                    raise ValueError(f"model: grouped convolution {name!r} is not supported")
                if layout == "flat" or pending_flatten is not None:
                    raise ValueError(f"model: Conv {name!r} after a flat activation")
                if cur is not None and cur.numel() != conv.in_channels:
                    raise ValueError(f"model: {name!r} expects {conv.in_channels} channels")
                in_keep = cur
            else:
                if layout == "spatial":
                    raise ValueError(
                        f"model: Linear {name!r} applied to a spatial activation without Flatten"
                    )
                in_keep = features(module.weight.shape[1], repr(name))
            w = module.weight
            if in_keep is None:
                in_keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            out_channels = w.shape[0]
            if i == last:
                out_keep = torch.ones(out_channels, dtype=torch.bool, device=w.device)
            else:
                out_keep = _choose_channels(leaves, i, w, keep)
            plan[i] = _Layer(f"{name}.weight", module, in_keep, out_keep)
            cur = out_keep
            layout = "spatial" if is_conv else "flat"
        elif isinstance(module, _NORM_TYPES):
            n = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
            if layout == "input":
                continue  # normalises the input: nothing pruned before it
            norm_keep = features(n, repr(name)) if layout == "flat" else cur
            if norm_keep is None or norm_keep.numel() != n:
                raise ValueError(f"model: norm {name!r} does not match the preceding channels")
            if isinstance(module, nn.GroupNorm):
                per_group = norm_keep.view(module.num_groups, -1)
                if not bool((per_group.all(dim=1) | ~per_group.any(dim=1)).all()):
                    raise ValueError(
                        f"model: GroupNorm {name!r} would lose part of a group; only whole "
                        "groups of the preceding layer's channels can be pruned"
                    )
            plan[i] = _Norm(module, norm_keep)
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError(f"model: Flatten {name!r} must use start_dim=1, end_dim=-1")
            if layout == "spatial":
                pending_flatten = cur
                layout = "flat"
        elif isinstance(module, _POOL_TYPES):
            if layout == "flat":
                raise ValueError(f"model: pooling {name!r} after a flat activation")
        elif not isinstance(module, _ELEMENTWISE_TYPES):
            raise ValueError(
                f"model: {type(module).__name__} ({name!r}) before the final layer is not "
                "supported; allowed: Linear, Conv, BatchNorm, GroupNorm, Flatten, pooling, "
                "element-wise activations and dropout"
            )
    return leaves, plan


def _choose_channels(
    leaves: Sequence[tuple[str, nn.Module]], i: int, w: Tensor, keep: float
) -> Tensor:
    """Kept output channels of hidden layer ``i``: top L1, whole groups if a GroupNorm follows."""
    with torch.no_grad():
        scores = w.detach().abs().flatten(1).sum(dim=1)
    out_channels = scores.numel()
    group = 1
    for _, nxt in leaves[i + 1 :]:
        if isinstance(nxt, _PRUNABLE_TYPES):
            break
        if isinstance(nxt, nn.GroupNorm) and nxt.num_channels == out_channels:
            group = out_channels // nxt.num_groups
            break
    groups = out_channels // group
    count = max(1, round(keep * groups))
    group_keep = _topk_flat(scores.view(groups, group).sum(dim=1), count)
    return group_keep.repeat_interleave(group)


def _element_mask(layer: _Layer) -> Tensor:
    """Element mask of a layer's weight: kept output rows and kept input columns."""
    w = layer.module.weight
    extra = (1,) * (w.ndim - 2)
    rows_cols = layer.out_keep.view(-1, 1, *extra) & layer.in_keep.view(1, -1, *extra)
    return rows_cols.expand(w.shape).contiguous()


def l1_channel_mask(model: nn.Module, keep: float) -> dict[str, Tensor]:
    """Element masks of L1 channel (filter) pruning of a plain ``nn.Sequential``.

    Each hidden ``Linear``/``Conv`` keeps its ``max(1, round(keep * C))`` output channels with the
    largest L1 norm (:func:`l1_channel_scores`; ties: lower index). A pruned channel's row is
    masked in its layer, and its input columns (a block of ``H * W`` columns per channel after a
    ``Flatten``) in the next layer, so that bias and norm shifts of dead channels cannot leak
    through. See :func:`shrink_sequential` for the supported layers.

    Parameters
    ----------
    model : torch.nn.Sequential
        A plain chain of layers.
    keep : float
        Fraction of hidden channels to keep, in ``(0, 1]``.

    Returns
    -------
    dict[str, torch.Tensor]
        ``weight name -> bool element mask`` for every prunable tensor, in
        :func:`prunable_names` order.

    Raises
    ------
    ValueError
        If ``keep`` is out of range or the model is not a supported chain.
    """
    _, plan = _plan(model, keep)
    by_name = {p.name: _element_mask(p) for p in plan if isinstance(p, _Layer)}
    return {name: by_name[name] for name in prunable_names(model)}


def _sliced(t: Tensor, keep: Tensor, dim: int = 0) -> Tensor:
    """Restrict ``t`` to the kept indices along ``dim`` (a new, contiguous tensor)."""
    return t.detach().index_select(dim, torch.nonzero(keep).view(-1)).contiguous()


def _shrink_layer(small: nn.Module, layer: _Layer) -> None:
    """Replace the weight and bias of a (copied) layer by the kept rows and columns."""
    assert isinstance(small, _PRUNABLE_TYPES)
    w = _sliced(_sliced(layer.module.weight, layer.out_keep, 0), layer.in_keep, 1)
    small.weight = nn.Parameter(w, requires_grad=layer.module.weight.requires_grad)
    if layer.module.bias is not None:
        b = _sliced(layer.module.bias, layer.out_keep)
        small.bias = nn.Parameter(b, requires_grad=layer.module.bias.requires_grad)
    out_n, in_n = w.shape[0], w.shape[1]
    if isinstance(small, nn.Linear):
        small.in_features, small.out_features = in_n, out_n
    else:
        small.in_channels, small.out_channels = in_n, out_n


def _shrink_norm(small: nn.Module, norm: _Norm) -> None:
    """Replace the per-channel parameters and statistics of a (copied) norm layer."""
    src = norm.module
    for attr in ("weight", "bias"):
        p = getattr(src, attr, None)
        if isinstance(p, nn.Parameter):
            setattr(small, attr, nn.Parameter(_sliced(p, norm.keep), p.requires_grad))
    n = int(norm.keep.sum())
    if isinstance(small, nn.GroupNorm):
        assert isinstance(src, nn.GroupNorm)
        small.num_groups = n // (src.num_channels // src.num_groups)
        small.num_channels = n
    else:
        assert isinstance(small, nn.modules.batchnorm._BatchNorm)
        for attr in ("running_mean", "running_var"):
            buf = getattr(src, attr, None)
            if isinstance(buf, Tensor):
                setattr(small, attr, _sliced(buf, norm.keep))
        small.num_features = n


def shrink_sequential(model: nn.Module, keep: float) -> tuple[nn.Sequential, dict[str, Tensor]]:
    """Physically smaller copy of a plain ``nn.Sequential`` by L1 channel pruning.

    The hidden ``Linear``/``Conv`` layers keep the channels chosen by :func:`l1_channel_mask`;
    the final layer's outputs (the classes) are never pruned, and the first layer's inputs are
    the data. The copy has the same structure and ``state_dict`` key names as ``model``, and
    computes what ``model`` computes after ``apply_mask(model, masks)`` (exactly, up to float
    summation order). ``model`` is not modified.

    Supported chains (possibly nested plain ``nn.Sequential``): ``Linear``, ``Conv{1,2,3}d``
    (``groups == 1``), ``BatchNorm{1,2,3}d``, ``GroupNorm`` (whole groups are kept or pruned),
    ``Flatten`` (default dims; a ``Conv -> Flatten -> Linear`` transition maps each channel to
    its block of spatial positions), pooling, element-wise activations and dropout. After the
    final layer any module is allowed. Residual or branching networks, subclasses of
    ``nn.Sequential`` with their own ``forward``, grouped convolutions and ``Conv`` after a flat
    activation are rejected with a ``ValueError``.

    Parameters
    ----------
    model : torch.nn.Sequential
        A plain chain of layers.
    keep : float
        Fraction of hidden channels to keep, in ``(0, 1]``.

    Returns
    -------
    small : torch.nn.Sequential
        The smaller model (new parameters; same dtype, device and train/eval mode).
    masks : dict[str, torch.Tensor]
        The equivalent element masks for ``model`` (as :func:`l1_channel_mask`).

    Raises
    ------
    ValueError
        If ``keep`` is out of range or the model is not a supported chain.
    """
    _, plan = _plan(model, keep)
    small = copy.deepcopy(model)
    assert isinstance(small, nn.Sequential)
    small_leaves = _leaves(small)
    with torch.no_grad():
        for (_, copied), step in zip(small_leaves, plan, strict=True):
            if isinstance(step, _Layer):
                _shrink_layer(copied, step)
            elif isinstance(step, _Norm):
                _shrink_norm(copied, step)
    by_name = {p.name: _element_mask(p) for p in plan if isinstance(p, _Layer)}
    return small, {name: by_name[name] for name in prunable_names(model)}
