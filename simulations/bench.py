"""Benchmarks: ``make bench`` / ``python -m simulations.bench [NAME ...]``.

Each benchmark is a function registered with :func:`register` that returns a flat
``dict[str, float]``; the results of the selected benchmarks (default: all) are merged into
``results/bench/bench.json`` with :func:`record` (keys of other benchmarks are kept) and printed
as a table. Other issues add their benchmarks by decorating a function with
``@register("name")`` in this module.

Timings are medians over several repeats. Throughputs are reported relative to numpy's memcpy
(``np.copyto``) of the same float32 buffer measured in the same run, so the numbers compare
across machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedprune import codec

BenchFn = Callable[[], dict[str, float]]

DEFAULT_PATH: Final = Path("results") / "bench" / "bench.json"
REPEATS: Final = 11
SEED: Final = 0

_REGISTRY: dict[str, BenchFn] = {}


def register(name: str) -> Callable[[BenchFn], BenchFn]:
    """Register a benchmark under ``name`` (a decorator).

    Parameters
    ----------
    name : str
        Command-line name of the benchmark.

    Returns
    -------
    Callable
        Decorator that registers the function and returns it unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """

    def deco(fn: BenchFn) -> BenchFn:
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def benchmarks() -> dict[str, BenchFn]:
    """Return the registered benchmarks, in registration order."""
    return dict(_REGISTRY)


def record(
    results: Mapping[str, float], path: str | os.PathLike[str] = DEFAULT_PATH
) -> dict[str, Any]:
    """Merge ``results`` into the JSON object at ``path`` (created if missing).

    Keys already in the file and absent from ``results`` are kept; keys in both are
    overwritten. The file is replaced atomically and written with sorted keys.

    Parameters
    ----------
    results : Mapping[str, float]
        Flat benchmark results.
    path : str or os.PathLike
        JSON file (default ``results/bench/bench.json``).

    Returns
    -------
    dict
        The merged content that was written.

    Raises
    ------
    ValueError
        If the existing file does not hold a JSON object.
    """
    target = Path(path)
    merged: dict[str, Any] = {}
    if target.exists():
        merged = json.loads(target.read_text(encoding="utf-8") or "{}")
        if not isinstance(merged, dict):
            raise ValueError(f"{target} does not hold a JSON object")
    merged.update({key: float(value) for key, value in results.items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, target)
    return merged


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], repeats: int = REPEATS
) -> dict[str, float]:
    """Median wall time in seconds of each function, timed round-robin.

    Every function runs once as a warm-up, then ``repeats`` rounds call each function once in
    turn, so that all of them see the same machine load (the timings are compared as ratios).

    Parameters
    ----------
    fns : Mapping[str, Callable]
        Functions to time, by name.
    repeats : int
        Number of timed rounds.

    Returns
    -------
    dict[str, float]
        Median seconds per call, by name.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


# ==============================================================================================
# codec
# ==============================================================================================
def resnet18_tensors(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ResNet-18 (10 classes) ``state_dict`` shapes filled with standard normal float32.

    Parameters
    ----------
    rng : np.random.Generator
        Source of the values.

    Returns
    -------
    flat : np.ndarray
        One contiguous float32 buffer holding all entries (about 11.2M).
    tensors : dict[str, np.ndarray]
        Views into ``flat``, in ``state_dict`` order.
    """
    import torch
    from torchvision.models import resnet18

    torch.set_num_threads(1)
    shapes = {name: tuple(t.shape) for name, t in resnet18(num_classes=10).state_dict().items()}
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = rng.standard_normal(sum(sizes), dtype=np.float32)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for (name, shape), size in zip(shapes.items(), sizes, strict=True):
        tensors[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return flat, tensors


def random_masks(
    tensors: Mapping[str, np.ndarray], density: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Bernoulli(``density``) masks over the prunable (``ndim >= 2``) tensors.

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray]
        Named tensors.
    density : float
        Probability that an entry is kept.
    rng : np.random.Generator
        Source of the masks.

    Returns
    -------
    dict[str, np.ndarray]
        Boolean masks of the prunable tensors.
    """
    return {
        name: rng.random(t.shape, dtype=np.float32) < density
        for name, t in tensors.items()
        if t.ndim >= 2
    }


@register("codec")
def bench_codec() -> dict[str, float]:
    """Codec throughput relative to memcpy, and ResNet-18 wire sizes.

    Returns
    -------
    dict[str, float]
        ``codec_encode_vs_memcpy`` / ``codec_decode_vs_memcpy`` (int8 per channel, mask at
        density 0.3, no entropy stage; bytes of float32 tensors per second divided by the
        memcpy rate of the same bytes), the same for the update codec of the best
        Fashion-MNIST row (``codec_update_*``: ternary, top 3 %, Rice/zlib stage, one-array
        blob; dominated by the top-k selection), the raw timings, and ``wire_bytes_resnet18_*``.
    """
    rng = np.random.default_rng(SEED)
    flat, tensors = resnet18_tensors(rng)
    masks = random_masks(tensors, 0.3, rng)
    config = codec.CodecConfig(quant="int8-channel")
    dst = np.empty_like(flat)
    payload = codec.encode(tensors, config, masks=masks)
    t = interleaved_medians(
        {
            "memcpy": lambda: np.copyto(dst, flat),
            "encode": lambda: codec.encode(tensors, config, masks=masks),
            "decode": lambda: codec.decode(payload),
            "wire_size": lambda: codec.wire_size(payload),
        }
    )
    out: dict[str, float] = {
        "codec_encode_vs_memcpy": t["memcpy"] / t["encode"],
        "codec_decode_vs_memcpy": t["memcpy"] / t["decode"],
        "codec_memcpy_ms": 1e3 * t["memcpy"],
        "codec_encode_ms": 1e3 * t["encode"],
        "codec_decode_ms": 1e3 * t["decode"],
        "codec_wire_size_ms": 1e3 * t["wire_size"],
        "codec_resnet18_float32_bytes": float(flat.nbytes),
    }
    update = codec.CodecConfig(quant="ternary", topk=0.03, entropy=True, container="blob")
    update_payload = codec.encode(tensors, update)
    t = interleaved_medians(
        {
            "memcpy": lambda: np.copyto(dst, flat),
            "encode": lambda: codec.encode(tensors, update),
            "decode": lambda: codec.decode(update_payload),
        }
    )
    out["codec_update_encode_vs_memcpy"] = t["memcpy"] / t["encode"]
    out["codec_update_decode_vs_memcpy"] = t["memcpy"] / t["decode"]
    out["wire_bytes_resnet18_ternary_top0.03"] = float(codec.wire_size(update_payload))
    out["wire_bytes_resnet18_fp32"] = float(codec.wire_size(tensors))
    for density in (1.0, 0.3, 0.1):
        dmasks = None if density == 1.0 else random_masks(tensors, density, rng)
        for entropy in (False, True):
            cfg = codec.CodecConfig(quant="int8-channel", entropy=entropy)
            size = codec.wire_size(codec.encode(tensors, cfg, masks=dmasks))
            out[f"wire_bytes_resnet18_d{density}_int8{'_zlib' if entropy else ''}"] = float(size)
        if dmasks is not None:
            cached = codec.encode(tensors, config, masks=dmasks, send_masks=False)
            out[f"wire_bytes_resnet18_d{density}_int8_nomask"] = float(codec.wire_size(cached))
            sparse = codec.encode(tensors, codec.CodecConfig(quant="none"), masks=dmasks)
            out[f"wire_bytes_resnet18_d{density}_fp32"] = float(codec.wire_size(sparse))
    return out


@register("dp")
def bench_dp() -> dict[str, float]:
    """DP-SGD step time over the plain step (see :mod:`simulations.bench_dp`)."""
    from simulations.bench_dp import bench_dp as run

    return run()


@register("rounds")
def bench_rounds() -> dict[str, float]:
    """Median round time of d0.3 + int8 over FedAvg float32 (see :mod:`simulations.bench_sim`)."""
    from simulations.bench_sim import bench_round_time

    return bench_round_time()


@register("sim1000")
def bench_sim1000() -> dict[str, float]:
    """Peak RSS of a 1000-SuperNode simulation (see :mod:`simulations.bench_sim`)."""
    from simulations.bench_sim import bench_sim_1000

    return bench_sim_1000()


@register("server")
def bench_server() -> dict[str, float]:
    """Server CPU per reply over stock FedAvg (see :mod:`simulations.bench_server`)."""
    from simulations.bench_server import bench_server_reply_cost

    return bench_server_reply_cost()


@register("client")
def bench_client() -> dict[str, float]:
    """Peak RSS of one client process training one round, one thread."""
    from simulations.client_memory import client_peak_rss_mb

    return {"client_peak_rss_mb": client_peak_rss_mb()}


# ==============================================================================================
# CLI
# ==============================================================================================
def _print_table(results: Mapping[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedprune benchmarks")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the selected benchmarks, merge their results into the JSON file, print a table.

    Parameters
    ----------
    argv : Sequence[str], optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    dict[str, float]
        The results of this run.
    """
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(_REGISTRY)}"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="JSON file to merge into")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in _REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(_REGISTRY)}")
    results: dict[str, float] = {}
    for name in args.names or list(_REGISTRY):
        results.update(_REGISTRY[name]())
    record(results, args.out)
    _print_table(results)
    return results


if __name__ == "__main__":
    main()
