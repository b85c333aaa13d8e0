"""Benchmark: cost of a DP-SGD step relative to a plain SGD step.

Same model (the ``"cnn"`` of :mod:`fedprune.models` on 28x28x1 inputs), same batch (64), same
masks (50% density), same process: DP and non-DP steps are interleaved so that both see the
same CPU conditions, and the medians are compared. The DP step is the full
:meth:`fedprune.privacy.PrivateTrainer.step` path (per-sample gradients, masking before
clipping, clipping, noise, accounting, mask re-application); the plain step is
``loss.backward(); optimizer.step()`` followed by the mask re-application a non-private training
loop does as well.

Run ``python -m simulations.bench_dp``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Final, get_args

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedprune.models import build_model
from fedprune.privacy import DPConfig, GradSampleMode, make_private

TARGET_RATIO: Final = 2.5
"""Issue #4: a DP step should cost at most this many plain steps."""
BATCH_SIZE: Final = 64
INPUT_SHAPE: Final = (1, 28, 28)
NUM_CLASSES: Final = 10
DENSITY: Final = 0.5


def _model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("cnn", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


def _masks(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.rand(p.shape, generator=generator) < DENSITY
        for name, p in model.named_parameters()
        if p.ndim >= 2
    }


def _timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _ratio(mode: GradSampleMode, *, steps: int, warmup: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH_SIZE, *INPUT_SHAPE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE)  # only sets q for DP

    plain = _model(seed)
    masks = _masks(plain, gen)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    plain_params = dict(plain.named_parameters())
    pruned = {name: ~keep for name, keep in masks.items()}

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        with torch.no_grad():
            for name, off in pruned.items():
                plain_params[name].masked_fill_(off, 0.0)

    cfg = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    trainer = make_private(
        _model(seed),
        lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        loader,
        cfg,
        generator=gen,
        masks=masks,
    )

    def dp_step() -> None:
        trainer.zero_grad()
        nn.functional.cross_entropy(trainer.model(x), y).backward()
        trainer.step()

    for _ in range(warmup):
        plain_step()
        dp_step()
    plain_times, dp_times = [], []
    for _ in range(steps):
        plain_times.append(_timed(plain_step))
        dp_times.append(_timed(dp_step))
    trainer.close()
    plain_s = statistics.median(plain_times)
    dp_s = statistics.median(dp_times)
    return {"ratio": dp_s / plain_s, "dp_ms": 1e3 * dp_s, "plain_ms": 1e3 * plain_s}


def bench_dp(*, steps: int = 40, warmup: int = 5, seed: int = 0) -> dict[str, float]:
    """Median DP-SGD step time over median plain step time, per grad-sample mode.

    Parameters
    ----------
    steps : int
        Timed steps of each kind (interleaved).
    warmup : int
        Untimed steps of each kind first.
    seed : int
        Seed of the model, data, masks and noise.

    Returns
    -------
    dict[str, float]
        ``dp_step_time_ratio`` (with ``DPConfig``'s default grad-sample mode, what the app
        runs), ``dp_step_ms`` and ``plain_step_ms`` for it, and
        ``dp_step_time_ratio_<mode>`` for every supported mode.
    """
    torch.set_num_threads(1)  # shared CI cores: single-threaded timings are the stable ones
    default_mode = DPConfig().grad_sample_mode
    out: dict[str, float] = {}
    for mode in get_args(GradSampleMode):
        with warnings.catch_warnings():
            # Opacus's hooks on a first layer whose input needs no grad: harmless, per step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = _ratio(mode, steps=steps, warmup=warmup, seed=seed)
        out[f"dp_step_time_ratio_{mode}"] = result["ratio"]
        if mode == default_mode:
            out["dp_step_time_ratio"] = result["ratio"]
            out["dp_step_ms"] = result["dp_ms"]
            out["plain_step_ms"] = result["plain_ms"]
    return out


def main() -> None:
    """Print the benchmark as JSON and whether the target ratio is met."""
    result = bench_dp()
    print(json.dumps(result, indent=2, sort_keys=True))
    verdict = "meets" if result["dp_step_time_ratio"] <= TARGET_RATIO else "misses"
    print(f"dp_step_time_ratio {result['dp_step_time_ratio']:.2f} {verdict} target {TARGET_RATIO}")


if __name__ == "__main__":
    main()
