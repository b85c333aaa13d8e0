"""Shrink a model by channel pruning and measure what changes (``docs/results/channel.md``).

    python -m simulations.channel_shrink                      # ResNet-18 (GroupNorm), 3x32x32
    python -m simulations.channel_shrink --model cnn --shape 1 28 28

Builds the model with seed 0, scores channels by the L1 norm of the initial weights, keeps
``--density`` of the parameters, and prints: parameters, MACs and CPU latency per example of the
full and the shrunk network, the largest output difference between the masked and the shrunk
network on random inputs, the export file sizes (shrunk vs element-sparse under the same mask),
and the global mask's size on the wire (element mask bits vs one bit per channel).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from fedprune import channels as ch
from fedprune import codec, keys
from fedprune.export import footprint, load_shrunk, save_compact, save_shrunk
from fedprune.models import MODELS, build_model, get_weights
from fedprune.pruning import apply_mask


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m simulations.channel_shrink")
    parser.add_argument("--model", default="resnet18", choices=MODELS)
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    model = build_model(
        args.model, input_shape=shape, num_classes=10, generator=torch.Generator().manual_seed(0)
    ).eval()
    graph = ch.channel_graph(model, shape)
    plan = ch.ChannelPruning(graph)
    masks = plan.initial_mask(get_weights(model), args.density)
    apply_mask(model, {k: torch.from_numpy(v) for k, v in masks.items()})
    small = ch.shrink(model, graph, ch.channel_mask_of(graph, masks)).eval()
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), small(x)
    full, shrunk = footprint(model, shape, args.repeats), footprint(small, shape, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        shrunk_bytes = save_shrunk(Path(tmp) / "s.npz", small, plan, masks)
        sparse_bytes = save_compact(Path(tmp) / "e.npz", get_weights(model), masks)
        loaded = load_shrunk(Path(tmp) / "s.npz", model, plan).eval()
        with torch.no_grad():
            agree = float((loaded(x).argmax(1) == got.argmax(1)).float().mean())
    weights = get_weights(model)
    config = codec.CodecConfig(quant="int8-channel", entropy=True)
    with_bits = codec.encode(weights, config, masks=masks, send_masks=True)
    without = codec.encode(weights, config, masks=masks, send_masks=False)
    mask_bytes = sum(a.nbytes for a in with_bits.values()) - sum(a.nbytes for a in without.values())
    print(f"{args.model} {shape}: {len(graph.groups)} groups, {graph.num_channels} channels")
    print(
        f"params          {full.params:>12,} -> {shrunk.params:>12,} "
        f"({shrunk.params / full.params:.4f})"
    )
    print(
        f"MACs / example  {full.macs_per_example:>12,} -> {shrunk.macs_per_example:>12,} "
        f"({shrunk.macs_per_example / full.macs_per_example:.4f})"
    )
    print(
        f"latency ms      {full.latency_ms_per_example:>12.2f} -> "
        f"{shrunk.latency_ms_per_example:>12.2f}"
    )
    print(
        f"max |masked - shrunk| {float((want - got).abs().max()):.3g} "
        f"(max |output| {float(want.abs().max()):.3g}); "
        f"int8 export argmax agreement {agree:.2f}"
    )
    print(f"export bytes: shrunk {shrunk_bytes:,}, element-sparse same mask {sparse_bytes:,}")
    bits = plan.wire_mask(masks)[keys.CHANNEL_BITS].nbytes
    print(f"global mask on the wire: element bits {mask_bytes:,} B, channel bits {bits:,} B")


if __name__ == "__main__":
    main()
