"""Structured (channel) pruning: the channel dependency graph, channel masks, a smaller model.

A *channel group* is a set of channels that must be pruned together because the same index
addresses them in several tensors: the rows (dim 0) of the weights, biases and norm parameters
that produce them, and the input slices (dim 1) of the weights that consume them. In a plain
chain every hidden ``Linear``/``Conv`` output is one group; in a ResNet every stage's residual
stream is one group (the stem or a block's downsample, and every block's last convolution and
norm, write into it; the next blocks and the classifier read it). Inside a group, a
``GroupNorm`` forces whole norm groups (its *unit*) to go together: its statistics are taken
over a group, so removing part of one would change the others' outputs.

Derive the graph once per model (:func:`channel_graph`, a pure function of the architecture);
a channel mask (``group name -> bool`` per channel) expands to element masks over *every*
parameter (:func:`expand`), which is what the rest of the pipeline (training, DP, codec,
server enforcement) already understands. With a removed channel's producers and dependents held
at zero, the masked model computes exactly what the physically smaller model from
:func:`shrink` computes (up to float summation order).

Channel votes and the global channel mask travel as one flat vector in graph order
(:func:`flatten`, :func:`pack_channel_mask`, :func:`unpack_channel_mask`); scores are
example-weighted and summed in a canonical client order (:func:`reconcile_channels`), the same
rules as :mod:`fedprune.masks`, and the result is independent of the order of the replies.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from fedprune import keys
from fedprune.masks import ReconcileConfig, ReconcileRule, reconcile, weighted_score_sum

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelNorm",
    "ChannelPruning",
    "channel_graph",
    "channel_mask_of",
    "channel_scores",
    "check_channel_mask",
    "expand",
    "flatten",
    "kept_params",
    "model_macs",
    "pack_channel_mask",
    "reconcile_channels",
    "select_channels",
    "shrink",
    "unflatten",
    "unpack_channel_mask",
]

ChannelNorm = Literal["l1", "l2"]
"""How a channel's weights are scored: L1 or L2 norm of its rows in the producing weights."""
_NORMS: tuple[str, ...] = get_args(ChannelNorm)

ChannelMask = dict[str, npt.NDArray[np.bool_]]
"""``group name -> bool`` per channel (``True`` = kept)."""

_LINEAR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS_T = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels addressed by one index in several tensors, pruned together.

    Attributes
    ----------
    name : str
        The group's name (the state_dict key of its first producing weight, or ``stream:<x>``).
    size : int
        Number of channels.
    unit : int
        Channels pruned together (a ``GroupNorm``'s channels per group; 1 otherwise).
    rows : tuple of str
        Tensors whose dim 0 is indexed by the group's channels (weights, biases, norm params).
    cols : tuple of (str, int)
        ``(tensor, block)``: tensors whose dim 1 reads the channels, ``block`` columns per
        channel (the spatial positions of a channel after a ``Flatten``; 1 otherwise).
    scored : tuple of str
        The ``Linear``/``Conv`` weights among ``rows``: their rows score the channels.
    """

    name: str
    size: int
    unit: int
    rows: tuple[str, ...]
    cols: tuple[tuple[str, int], ...]
    scored: tuple[str, ...]

    @property
    def units(self) -> int:
        """Number of units (what is kept or pruned)."""
        return self.size // self.unit


@dataclass(frozen=True)
class ChannelGraph:
    """The channel groups of a model and the shapes of all its parameters.

    Attributes
    ----------
    groups : tuple of ChannelGroup
        In a fixed order (the order of flat channel vectors on the wire).
    shapes : dict of str to tuple of int
        Every parameter tensor (``named_parameters`` order) and its shape.
    """

    groups: tuple[ChannelGroup, ...]
    shapes: dict[str, tuple[int, ...]] = field(hash=False)

    @property
    def num_channels(self) -> int:
        """Total channels over all groups (the length of a flat channel vector)."""
        return sum(g.size for g in self.groups)

    @property
    def num_params(self) -> int:
        """Total parameters of the model."""
        return sum(math.prod(s) for s in self.shapes.values())


@dataclass
class _Group:
    """A group while the model is walked (mutable form of :class:`ChannelGroup`)."""

    name: str
    size: int
    unit: int = 1
    rows: list[str] = field(default_factory=list)
    cols: list[tuple[str, int]] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)


class _Builder:
    """Accumulates groups while a model is walked."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.groups: list[_Group] = []

    def new(self, name: str, size: int) -> int:
        """Open a new group of ``size`` channels; return its index."""
        self.groups.append(_Group(name, size))
        return len(self.groups) - 1

    def produce(self, g: int, module: nn.Module, prefix: str) -> None:
        """Record that ``module``'s outputs are group ``g``'s channels."""
        group = self.groups[g]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"model: BatchNorm {prefix!r} is not supported (use GroupNorm)")
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter):
                if p.shape[0] != group.size:
                    raise ValueError(
                        f"model: {prefix}.{attr} has {p.shape[0]} channels, group "
                        f"{group.name!r} has {group.size}"
                    )
                group.rows.append(f"{prefix}.{attr}")
        if isinstance(module, _LINEAR_CONV):
            group.scored.append(f"{prefix}.weight")
        if isinstance(module, nn.GroupNorm):
            group.unit = math.lcm(group.unit, group.size // module.num_groups)

    def consume(self, g: int | None, module: nn.Module, prefix: str, block: int = 1) -> None:
        """Record that ``module`` reads group ``g``'s channels on its weight's dim 1."""
        if g is None:
            return
        group = self.groups[g]
        w = module.weight
        assert isinstance(w, Tensor)
        if w.shape[1] != group.size * block:
            raise ValueError(
                f"model: {prefix}.weight reads {w.shape[1]} inputs, group {group.name!r} "
                f"gives {group.size} x {block}"
            )
        group.cols.append((f"{prefix}.weight", block))

    def graph(self) -> ChannelGraph:
        """Return the finished graph."""
        groups = tuple(
            ChannelGroup(g.name, g.size, g.unit, tuple(g.rows), tuple(g.cols), tuple(g.scored))
            for g in self.groups
        )
        return ChannelGraph(groups, self.shapes)


def channel_graph(model: nn.Module, input_shape: Sequence[int] | None = None) -> ChannelGraph:
    """Derive the channel dependency graph of a model (a pure function of its architecture).

    Supported: plain ``nn.Sequential`` chains of ``Linear``, ``Conv`` (``groups == 1``),
    ``GroupNorm``, ``Flatten``, pooling, element-wise activations and dropout (the ``"mlp*"`` and
    ``"cnn"`` models), and torchvision's ``ResNet`` with ``BasicBlock`` s and ``GroupNorm``
    (``"resnet18"``). The last layer's outputs (the classes) are never a group.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    input_shape : sequence of int, optional
        Shape of one example; needed only when a ``Flatten`` follows a convolution (to know the
        positions per channel). Taken from a forward pass of zeros when omitted.

    Returns
    -------
    ChannelGraph
        The groups, in execution order.

    Raises
    ------
    ValueError
        If the architecture is not supported.
    """
    if type(model).__name__ == "ResNet" and hasattr(model, "layer4"):
        return _resnet_graph(model)
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        return _sequential_graph(model, input_shape)
    raise ValueError(
        f"model: {type(model).__name__} is not supported for channel pruning (plain "
        "nn.Sequential chains and torchvision ResNet with BasicBlock are)"
    )


def _sequential_graph(model: nn.Sequential, input_shape: Sequence[int] | None) -> ChannelGraph:
    b = _Builder(model)
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    for n, m in model.named_modules():
        if n and next(m.children(), None) is not None and not isinstance(m, nn.Sequential):
            raise ValueError(f"model: container {n!r} ({type(m).__name__}) is not supported")
    layers = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _LINEAR_CONV)]
    if not layers:
        raise ValueError("model has no Linear or Conv layer")
    spatial: dict[str, int] = {}
    if any(isinstance(m, nn.Flatten) for _, m in leaves) and any(
        isinstance(m, _CONV) for _, m in leaves
    ):
        spatial = _positions_after(model, input_shape)
    cur: int | None = None
    is_spatial = False
    block = 1
    for i, (name, m) in enumerate(leaves):
        if i > layers[-1]:
            break
        if isinstance(m, _LINEAR_CONV):
            if isinstance(m, _CONV) and m.groups != 1:
                raise ValueError(f"model: grouped convolution {name!r} is not supported")
            b.consume(cur, m, name, block)
            block = 1
            if i == layers[-1]:
                break
            cur = b.new(f"{name}.weight", m.weight.shape[0])
            b.produce(cur, m, name)
            is_spatial = isinstance(m, _CONV)
        elif isinstance(m, _NORMS_T):
            if cur is not None:
                b.produce(cur, m, name)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"model: Flatten {name!r} must use start_dim=1, end_dim=-1")
            if is_spatial and cur is not None:
                block = spatial[name]
            is_spatial = False
        elif not isinstance(m, _PASS):
            raise ValueError(
                f"model: {type(m).__name__} ({name!r}) before the last layer is not supported"
            )
    return b.graph()


def _positions_after(model: nn.Sequential, input_shape: Sequence[int] | None) -> dict[str, int]:
    """Spatial positions per channel entering each ``Flatten`` (one forward pass of zeros)."""
    first = next(m for m in model.modules() if isinstance(m, _LINEAR_CONV))
    if input_shape is None:
        if not isinstance(first, _CONV):
            return {}
        raise ValueError("input_shape is needed to derive the graph of a Conv -> Flatten chain")
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Flatten):

            def hook(_: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                x = args[0]
                out[name] = math.prod(x.shape[2:]) if x.ndim > 2 else 1

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=first.weight.device))
    finally:
        for h in hooks:
            h.remove()
    return out


def _resnet_graph(model: nn.Module) -> ChannelGraph:
    b = _Builder(model)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    stream = b.new("stream:conv1", conv1.out_channels)
    b.produce(stream, conv1, "conv1")
    b.produce(stream, model.get_submodule("bn1"), "bn1")
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for idx, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{idx}"
            if type(block).__name__ != "BasicBlock":
                raise ValueError(f"model: {prefix} is a {type(block).__name__}; only BasicBlock")
            inner = b.new(f"{prefix}.conv1.weight", block.conv1.out_channels)
            b.consume(stream, block.conv1, f"{prefix}.conv1")
            b.produce(inner, block.conv1, f"{prefix}.conv1")
            b.produce(inner, block.bn1, f"{prefix}.bn1")
            b.consume(inner, block.conv2, f"{prefix}.conv2")
            if block.downsample is not None:
                ds_conv, ds_norm = block.downsample[0], block.downsample[1]
                b.consume(stream, ds_conv, f"{prefix}.downsample.0")
                stream = b.new(f"stream:{prefix}", ds_conv.out_channels)
                b.produce(stream, ds_conv, f"{prefix}.downsample.0")
                b.produce(stream, ds_norm, f"{prefix}.downsample.1")
            b.produce(stream, block.conv2, f"{prefix}.conv2")
            b.produce(stream, block.bn2, f"{prefix}.bn2")
    b.consume(stream, model.get_submodule("fc"), "fc")
    return b.graph()


# -- scores and selection --------------------------------------------------------------------


def channel_scores(
    tensors: Mapping[str, npt.NDArray[np.floating]], graph: ChannelGraph, norm: ChannelNorm = "l1"
) -> dict[str, npt.NDArray[np.float32]]:
    """Score every channel by the norm of its rows in the producing weights.

    Parameters
    ----------
    tensors : Mapping[str, numpy.ndarray]
        The weights (or element scores such as ``|w * dL/dw|``, then use ``"l1"``), by name.
    graph : ChannelGraph
        The model's graph.
    norm : {"l1", "l2"}
        L1: sum of ``|x|`` over the channel's rows in every producing weight; L2: the square
        root of the sum of squares.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``group name -> float32 score per channel`` (higher is more important).
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    out: dict[str, npt.NDArray[np.float32]] = {}
    for g in graph.groups:
        acc = np.zeros(g.size, dtype=np.float64)
        for name in g.scored:
            rows = np.asarray(tensors[name], dtype=np.float64).reshape(g.size, -1)
            acc += np.abs(rows).sum(axis=1) if norm == "l1" else np.square(rows).sum(axis=1)
        out[g.name] = (acc if norm == "l1" else np.sqrt(acc)).astype(np.float32)
    return out


def _kept_params(graph: ChannelGraph, kept: Mapping[str, int]) -> int:
    """Parameters left when group ``g`` keeps ``kept[g]`` of its channels."""
    row_of: dict[str, ChannelGroup] = {}
    col_of: dict[str, ChannelGroup] = {}
    for g in graph.groups:
        row_of.update(dict.fromkeys(g.rows, g))
        col_of.update({t: g for t, _ in g.cols})
    total = 0
    for name, shape in graph.shapes.items():
        n = math.prod(shape)
        for where in (row_of, col_of):
            if name in where:
                g = where[name]
                n = n // g.size * kept[g.name]
        total += n
    return total


def kept_params(graph: ChannelGraph, mask: Mapping[str, npt.NDArray[np.bool_]]) -> int:
    """Count the parameters a channel mask keeps (what the shrunk model has)."""
    return _kept_params(graph, {g.name: int(np.count_nonzero(mask[g.name])) for g in graph.groups})


def select_channels(
    graph: ChannelGraph,
    scores: Mapping[str, npt.NDArray[np.floating]],
    density: float,
    prior: Mapping[str, npt.NDArray[np.bool_]] | None = None,
) -> ChannelMask:
    """Channel mask keeping at most ``density`` of the model's parameters.

    Scores are made comparable across groups by dividing by the group's mean score (a group
    whose scores are all zero counts as uniform); a unit's score is the sum over its channels.
    Units are removed from the lowest score up (ties: earlier group, then lower index), never
    the last unit of a group, until the kept parameters are ``<= round(density * N)`` (or
    nothing more can go).

    Parameters
    ----------
    graph : ChannelGraph
        The model's graph.
    scores : Mapping[str, numpy.ndarray]
        ``group name -> finite score per channel``.
    density : float
        Target fraction of all parameters, in ``(0, 1]``.
    prior : Mapping[str, numpy.ndarray], optional
        The current channel mask; removed channels stay removed (monotone pruning).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``group name -> bool per channel``.
    """
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    keep: ChannelMask = {}
    candidates: list[tuple[float, int, int]] = []
    for gi, g in enumerate(graph.groups):
        s = np.asarray(scores[g.name], dtype=np.float64)
        if s.shape != (g.size,) or not np.all(np.isfinite(s)):
            raise ValueError(f"scores[{g.name!r}] must be {g.size} finite numbers")
        k = np.ones(g.size, dtype=np.bool_) if prior is None else prior[g.name].copy()
        keep[g.name] = k
        mean = float(s.mean())
        rel = s / mean if mean > 0 else np.ones_like(s)
        unit_scores = rel.reshape(g.units, g.unit).sum(axis=1)
        unit_kept = k.reshape(g.units, g.unit).all(axis=1)
        candidates.extend((float(unit_scores[u]), gi, int(u)) for u in np.flatnonzero(unit_kept))
    target = round(density * graph.num_params)
    kept = {g.name: int(np.count_nonzero(keep[g.name])) for g in graph.groups}
    for _, gi, u in sorted(candidates):
        if _kept_params(graph, kept) <= target:
            break
        g = graph.groups[gi]
        if kept[g.name] <= g.unit:
            continue
        keep[g.name][u * g.unit : (u + 1) * g.unit] = False
        kept[g.name] -= g.unit
    return keep


def reconcile_channels(
    graph: ChannelGraph,
    votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    weights: Sequence[float],
    *,
    rule: ReconcileRule,
    density: float,
    threshold: float = 0.5,
    prior: Mapping[str, npt.NDArray[np.bool_]] | None = None,
) -> ChannelMask:
    """Reconcile channel votes into one channel mask (the rules of :mod:`fedprune.masks`).

    ``"topk"``: votes are channel scores; their example-weighted sum (float64, canonical client
    order) is selected at parameter ``density`` by :func:`select_channels`. Mask rules: votes
    are channel masks reconciled entry-wise (majority/intersection/union); a group left with no
    channel keeps its best-voted unit (the lowest index among ties). The result is bit-identical
    for any order of the ``(vote, weight)`` pairs, and never keeps a channel outside ``prior``.
    """
    names = [g.name for g in graph.groups]
    if rule == "topk":
        summed = weighted_score_sum(votes, weights, names)
        return select_channels(graph, summed, density, prior)
    result = reconcile(
        votes,
        weights,
        ReconcileConfig(rule=rule, threshold=threshold),
        prior=None if prior is None else {n: np.asarray(prior[n]) for n in names},
    )
    for g in graph.groups:
        m: npt.NDArray[np.bool_] = np.repeat(
            result[g.name].reshape(g.units, g.unit).all(axis=1), g.unit
        )
        if not m.any():
            share = np.zeros(g.size)
            for vote, w in zip(votes, weights, strict=True):
                share += np.asarray(vote[g.name], dtype=np.float64) * float(w)
            if prior is not None:
                share[~prior[g.name]] = -1.0
            best = int(np.argmax(share.reshape(g.units, g.unit).sum(axis=1)))
            m[best * g.unit : (best + 1) * g.unit] = True
        result[g.name] = m
    return {n: result[n] for n in names}


# -- masks -----------------------------------------------------------------------------------


def expand(graph: ChannelGraph, mask: Mapping[str, npt.NDArray[np.bool_]]) -> ChannelMask:
    """Element masks over every parameter for a channel mask.

    A removed channel's rows in its producers (weights, biases, norm parameters) and its input
    slices in its consumers are ``False``; parameters that depend on no group are all ``True``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``parameter name -> bool array`` of its shape, for every parameter, in graph order.
    """
    check_channel_mask(graph, mask)
    out = {name: np.ones(shape, dtype=np.bool_) for name, shape in graph.shapes.items()}
    for g in graph.groups:
        keep = np.asarray(mask[g.name], dtype=np.bool_)
        for name in g.rows:
            shape = graph.shapes[name]
            out[name] &= keep.reshape((-1,) + (1,) * (len(shape) - 1))
        for name, block in g.cols:
            shape = graph.shapes[name]
            out[name] &= np.repeat(keep, block).reshape((1, -1) + (1,) * (len(shape) - 2))
    return out


def channel_mask_of(graph: ChannelGraph, masks: Mapping[str, npt.NDArray[np.bool_]]) -> ChannelMask:
    """Recover the channel mask that :func:`expand` turned into ``masks``.

    A channel is kept if any entry of its row in the group's first producing tensor is.
    """
    out: ChannelMask = {}
    for g in graph.groups:
        rows = np.asarray(masks[g.rows[0]], dtype=np.bool_).reshape(g.size, -1)
        out[g.name] = np.asarray(rows.any(axis=1), dtype=np.bool_)
    return out


def check_channel_mask(graph: ChannelGraph, mask: Mapping[str, npt.NDArray[np.bool_]]) -> None:
    """Raise ``ValueError`` unless ``mask`` is a valid channel mask of ``graph``.

    Valid: exactly the graph's groups, bool of the right length, whole units, and at least one
    unit kept in every group.
    """
    if set(mask) != {g.name for g in graph.groups}:
        raise ValueError(
            f"channel mask has groups {sorted(mask)}, "
            f"expected {sorted(g.name for g in graph.groups)}"
        )
    for g in graph.groups:
        m = np.asarray(mask[g.name])
        if m.dtype != np.bool_ or m.shape != (g.size,):
            raise ValueError(
                f"channel mask[{g.name!r}] must be {g.size} bools, got {m.dtype} {m.shape}"
            )
        units = m.reshape(g.units, g.unit)
        if not bool((units.all(axis=1) | ~units.any(axis=1)).all()):
            raise ValueError(
                f"channel mask[{g.name!r}] splits a unit of {g.unit} channels (GroupNorm group)"
            )
        if not m.any():
            raise ValueError(f"channel mask[{g.name!r}] removes every channel")


def flatten(
    graph: ChannelGraph, per_group: Mapping[str, npt.NDArray[np.generic]]
) -> npt.NDArray[np.generic]:
    """Concatenate per-group vectors in graph order (the wire layout)."""
    return np.concatenate([np.asarray(per_group[g.name]).reshape(-1) for g in graph.groups])


def unflatten(
    graph: ChannelGraph, flat: npt.NDArray[np.generic], what: str = "channel vector"
) -> dict[str, npt.NDArray[np.generic]]:
    """Split a flat vector in graph order back into groups; ValueError on a wrong length."""
    if flat.ndim != 1 or flat.shape[0] != graph.num_channels:
        raise ValueError(f"{what} has shape {flat.shape}, expected ({graph.num_channels},)")
    out: dict[str, npt.NDArray[np.generic]] = {}
    at = 0
    for g in graph.groups:
        out[g.name] = flat[at : at + g.size]
        at += g.size
    return out


def pack_channel_mask(
    graph: ChannelGraph, mask: Mapping[str, npt.NDArray[np.bool_]]
) -> npt.NDArray[np.uint8]:
    """One bit per channel, graph order, ``np.packbits`` (big-endian bits, zero padding)."""
    check_channel_mask(graph, mask)
    return np.packbits(flatten(graph, mask).astype(np.bool_))


def unpack_channel_mask(
    graph: ChannelGraph,
    bits: npt.NDArray[np.generic],
    *,
    density: float | None = None,
    tolerance: float = 0.05,
) -> ChannelMask:
    """Read a channel mask sent as :func:`pack_channel_mask`, rejecting malformed input.

    Parameters
    ----------
    graph : ChannelGraph
        The model's graph.
    bits : numpy.ndarray
        ``uint8``, ``ceil(num_channels / 8)`` bytes.
    density : float, optional
        The scheduled parameter density: the mask must keep within ``tolerance`` of it
        (a mask vote); ``None`` skips the check (the server's own mask).
    tolerance : float
        Allowed distance to ``density`` (whole units make exact densities unreachable).

    Raises
    ------
    ValueError
        Wrong dtype or length, padding bits set, a split unit, a group left empty, or a density
        off the schedule.
    """
    n = graph.num_channels
    arr = np.asarray(bits)
    if arr.dtype != np.uint8 or arr.shape != ((n + 7) // 8,):
        raise ValueError(
            f"channel mask bits must be {(n + 7) // 8} uint8 bytes, got {arr.dtype} {arr.shape}"
        )
    flat = np.unpackbits(arr)
    if flat[n:].any():
        raise ValueError("channel mask has padding bits set after the last channel")
    mask = {k: v.astype(np.bool_) for k, v in unflatten(graph, flat[:n]).items()}
    check_channel_mask(graph, mask)
    if density is not None:
        got = kept_params(graph, mask) / graph.num_params
        if abs(got - density) > tolerance:
            raise ValueError(
                f"channel mask keeps {got:.4f} of the parameters; the round asked for {density:.4f}"
            )
    return mask


# -- the smaller model -----------------------------------------------------------------------


def _index(keep: npt.NDArray[np.bool_], block: int, device: torch.device) -> Tensor:
    idx = np.flatnonzero(np.repeat(keep, block))
    return torch.as_tensor(idx, dtype=torch.long, device=device)


def shrink(
    model: nn.Module, graph: ChannelGraph, mask: Mapping[str, npt.NDArray[np.bool_]]
) -> nn.Module:
    """Physically smaller copy of ``model`` without the removed channels.

    Every ``Linear``/``Conv`` loses its removed output rows and input columns, every norm its
    removed channels (a ``GroupNorm`` its removed groups). The copy keeps the module structure
    and ``state_dict`` names, and computes what ``model`` computes after its parameters were
    zeroed under :func:`expand` (up to float summation order). ``model`` is not modified.
    """
    check_channel_mask(graph, mask)
    rows: dict[str, tuple[ChannelGroup, int]] = {}
    cols: dict[str, tuple[ChannelGroup, int]] = {}
    for g in graph.groups:
        rows.update({t: (g, 1) for t in g.rows})
        cols.update({t: (g, b) for t, b in g.cols})
    small = copy.deepcopy(model)
    with torch.no_grad():
        for prefix, m in small.named_modules():
            for attr in ("weight", "bias"):
                p = getattr(m, attr, None)
                name = f"{prefix}.{attr}"
                if not isinstance(p, nn.Parameter) or (name not in rows and name not in cols):
                    continue
                t = p.detach()
                if name in rows:
                    g, _ = rows[name]
                    t = t.index_select(0, _index(mask[g.name], 1, t.device))
                if name in cols:
                    g, block = cols[name]
                    t = t.index_select(1, _index(mask[g.name], block, t.device))
                setattr(m, attr, nn.Parameter(t.contiguous(), requires_grad=p.requires_grad))
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) and isinstance(w, Tensor):
                m.out_features, m.in_features = w.shape[0], w.shape[1]
            elif isinstance(m, _CONV) and isinstance(w, Tensor):
                m.out_channels, m.in_channels = w.shape[0], w.shape[1]
            elif isinstance(m, nn.GroupNorm) and f"{prefix}.weight" in rows:
                g, _ = rows[f"{prefix}.weight"]
                per_group = m.num_channels // m.num_groups
                m.num_channels = int(np.count_nonzero(mask[g.name]))
                m.num_groups = m.num_channels // per_group
    return small


def model_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of one example (``Linear`` and ``Conv`` only)."""
    total = 0
    hooks = []

    def hook(m: nn.Module, _: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        w = m.weight
        assert isinstance(w, Tensor)
        total += out[0].numel() * (w[0].numel())  # outputs x (inputs per output)

    for m in model.modules():
        if isinstance(m, _LINEAR_CONV):
            hooks.append(m.register_forward_hook(hook))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return total


# -- one run's channel pruning (the server's and the clients' side) --------------------------


@dataclass(frozen=True)
class ChannelPruning:
    """Channel pruning of one model: votes, reconciliation and masks as pure functions.

    The global mask is kept, as everywhere else, as element masks over every parameter
    (:func:`expand`); on the wire it is one bit per channel (:meth:`wire_mask`).

    Parameters
    ----------
    graph : ChannelGraph
        The model's graph (:func:`channel_graph`).
    norm : {"l1", "l2"}
        How weights score channels (magnitude pruning).
    tolerance : float
        How far a mask vote's parameter density may be from the scheduled one.
    """

    graph: ChannelGraph
    norm: ChannelNorm = "l1"
    tolerance: float = 0.05

    def scores(
        self, weights: Mapping[str, npt.NDArray[np.floating]]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Channel scores of a model's weights (``norm`` of each channel's rows)."""
        return channel_scores(weights, self.graph, self.norm)

    def initial_mask(
        self, weights: Mapping[str, npt.NDArray[np.floating]], density: float
    ) -> ChannelMask:
        """Element masks of the initial model at ``density`` (all ones at 1.0)."""
        return expand(self.graph, select_channels(self.graph, self.scores(weights), density))

    def own_vote(
        self,
        scores: Mapping[str, npt.NDArray[np.floating]],
        *,
        rule: ReconcileRule,
        density: float,
        prior: Mapping[str, npt.NDArray[np.bool_]] | None,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Return a client's vote from its channel scores: the scores (top-k) or a channel mask.

        ``prior`` is the current global element mask; scores of removed channels are 0.
        """
        channel_prior = None if prior is None else channel_mask_of(self.graph, prior)
        if rule == "topk":
            if channel_prior is None:
                return {k: np.asarray(v, dtype=np.float32) for k, v in scores.items()}
            return {
                k: np.where(channel_prior[k], v, np.float32(0.0)).astype(np.float32)
                for k, v in scores.items()
            }
        return dict(select_channels(self.graph, scores, density, channel_prior))

    def encode_vote(
        self, vote: Mapping[str, npt.NDArray[np.generic]], rule: ReconcileRule
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Return the wire form of a vote: float32 scores, or one bit per channel."""
        if rule == "topk":
            return {keys.CHANNEL_SCORES: flatten(self.graph, vote).astype(np.float32)}
        return {keys.CHANNEL_BITS: pack_channel_mask(self.graph, vote)}  # type: ignore[arg-type]

    def read_vote(
        self, arrays: Mapping[str, npt.NDArray[np.generic]], rule: ReconcileRule, density: float
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Decode and check a client's channel vote.

        Raises
        ------
        ValueError
            Wrong record layout, wrong length or dtype, non-finite or negative scores, padding
            bits set, a split unit or an empty group, or a mask off the scheduled density.
        """
        want = keys.CHANNEL_SCORES if rule == "topk" else keys.CHANNEL_BITS
        if set(arrays) != {want}:
            raise ValueError(f"channel vote holds {sorted(arrays)}, expected [{want!r}]")
        if rule != "topk":
            return dict(
                unpack_channel_mask(
                    self.graph, arrays[keys.CHANNEL_BITS], density=density, tolerance=self.tolerance
                )
            )
        flat = np.asarray(arrays[keys.CHANNEL_SCORES])
        if flat.dtype != np.float32:
            raise ValueError(f"channel scores must be float32, got {flat.dtype}")
        if not np.all(np.isfinite(flat)) or bool((flat < 0).any()):
            raise ValueError("channel scores must be finite and >= 0")
        return unflatten(self.graph, flat, "channel scores")

    def reconcile(
        self,
        votes: Sequence[Mapping[str, npt.NDArray[np.generic]]],
        weights: Sequence[float],
        *,
        rule: ReconcileRule,
        threshold: float,
        density: float,
        prior: Mapping[str, npt.NDArray[np.bool_]] | None,
    ) -> ChannelMask:
        """Reconcile channel votes into the new global element masks (monotone under prior)."""
        channel_prior = None if prior is None else channel_mask_of(self.graph, prior)
        mask = reconcile_channels(
            self.graph,
            votes,
            weights,
            rule=rule,
            density=density,
            threshold=threshold,
            prior=channel_prior,
        )
        return expand(self.graph, mask)

    def wire_mask(self, masks: Mapping[str, npt.NDArray[np.bool_]]) -> dict[str, np.ndarray]:
        """Return the global mask's wire form: one bit per channel."""
        return {
            keys.CHANNEL_BITS: pack_channel_mask(self.graph, channel_mask_of(self.graph, masks))
        }

    def read_mask(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> ChannelMask:
        """Element masks from the wire form of the global mask (:meth:`wire_mask`)."""
        if set(arrays) != {keys.CHANNEL_BITS}:
            raise ValueError(
                f"channel mask holds {sorted(arrays)}, expected [{keys.CHANNEL_BITS!r}]"
            )
        return expand(self.graph, unpack_channel_mask(self.graph, arrays[keys.CHANNEL_BITS]))
