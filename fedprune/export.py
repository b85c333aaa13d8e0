"""Compact model export: the pruned global model as a sparse int8 file, and back.

The file is an uncompressed ``.npz`` holding a :mod:`fedprune.codec` payload of the weights:
int8 codes of the kept entries with per-channel scales, bit-packed masks, and the codec's zlib
stage wherever it pays. It loads with ``np.load(allow_pickle=False)`` (no pickle anywhere) and
decodes to float32 weights that drop straight into the model (``fedprune.models.set_weights``).

With channel pruning the file holds the physically smaller network instead
(:func:`save_shrunk`): the dense int8 payload of its weights plus the channel mask (one bit per
channel), from which :func:`load_shrunk` rebuilds the smaller architecture. :func:`footprint`
measures what a device pays to run an exported model: parameters, multiply-accumulates and CPU
latency per example.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from torch import nn

from fedprune import codec, keys
from fedprune.channels import ChannelPruning, model_macs, shrink, unpack_channel_mask
from fedprune.models import get_weights, model_num_params, set_weights

EXPORT_CODEC = codec.CodecConfig(quant="int8-channel", entropy=True)
"""How exported weights are encoded, whatever the run's wire settings were."""


def save_compact(
    path: Path, weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None
) -> int:
    """Write ``weights`` (pruned under ``masks``) as a compact file; return its size in bytes.

    Parameters
    ----------
    path : Path
        Destination (``.npz``); parent directories are created.
    weights : Mapping[str, np.ndarray]
        float32 weights in ``state_dict`` order.
    masks : Mapping[str, np.ndarray] or None
        The global pruning mask (``None`` for a dense model).
    """
    payload = codec.encode(weights, EXPORT_CODEC, masks=masks, send_masks=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, allow_pickle=False, **payload)
    return path.stat().st_size


def load_compact(path: Path) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save_compact` back into float32 weights.

    Raises
    ------
    ValueError
        If the file is not a valid compact model.
    """
    with np.load(path, allow_pickle=False) as data:
        payload = {name: data[name] for name in data.files}
    return codec.decode(payload)


def save_shrunk(
    path: Path, small: nn.Module, plan: ChannelPruning, masks: Mapping[str, np.ndarray]
) -> int:
    """Write the physically smaller model of a channel-pruned run; return the file's bytes.

    Parameters
    ----------
    path : Path
        Destination (``.npz``).
    small : torch.nn.Module
        The smaller model (:func:`fedprune.channels.shrink` of the global model).
    plan : ChannelPruning
        The run's channel pruning (its graph names the channels).
    masks : Mapping[str, np.ndarray]
        The global element mask the model was shrunk under.
    """
    payload = codec.encode(get_weights(small), EXPORT_CODEC)
    bits = plan.wire_mask(masks)[keys.CHANNEL_BITS]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, allow_pickle=False, **payload, **{keys.CHANNEL_MASK: bits})
    return path.stat().st_size


def load_shrunk(path: Path, model: nn.Module, plan: ChannelPruning) -> nn.Module:
    """Rebuild the smaller model written by :func:`save_shrunk` from the full architecture.

    ``model`` (the full architecture, any weights) is not modified.

    Raises
    ------
    ValueError
        If the file is not a shrunk export of this architecture.
    """
    with np.load(path, allow_pickle=False) as data:
        payload = {name: data[name] for name in data.files}
    if keys.CHANNEL_MASK not in payload:
        raise ValueError(f"{path} holds no '{keys.CHANNEL_MASK}': not a shrunk export")
    mask = unpack_channel_mask(plan.graph, payload.pop(keys.CHANNEL_MASK))
    small = shrink(model, plan.graph, mask)
    set_weights(small, codec.decode(payload))
    return small


@dataclass(frozen=True)
class Footprint:
    """What running an exported model costs on a device."""

    params: int
    """Parameters of the network as it runs (every entry of every tensor)."""
    macs_per_example: int
    """Multiply-accumulates of ``Linear``/``Conv`` layers for one example."""
    latency_ms_per_example: float
    """Median CPU wall time of one forward pass of a batch of one, one thread."""


def footprint(model: nn.Module, input_shape: tuple[int, ...], repeats: int = 30) -> Footprint:
    """Measure an exported model's parameters, MACs and CPU latency per example.

    Latency is the median over ``repeats`` timed forward passes of one example (after
    three warm-up passes) with one torch thread, in eval mode; the thread setting is restored.
    """
    macs = model_macs(model, input_shape)
    threads = torch.get_num_threads()
    training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape)
    times: list[float] = []
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for i in range(repeats + 3):
                t0 = perf_counter()
                model(x)
                if i >= 3:
                    times.append(perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        model.train(training)
    return Footprint(model_num_params(model), macs, 1e3 * float(np.median(times)))
