"""torch's optimizers on a client without importing ``torch._dynamo``, torch's compiler.

torch (2.9.1, 2.10 and 2.14.1 alike) imports ``torch._dynamo``, and sympy with it, the first
time an optimizer is used, for two things that do nothing in a process that never compiles, as a
client:

- ``Optimizer.add_param_group`` (called by every optimizer's constructor), ``zero_grad``,
  ``state_dict`` and ``load_state_dict`` are wrapped by ``torch._disable_dynamo``, which imports
  it on the first call to build a "do not compile" mark and caches that on the plain function
  (attribute ``__dynamo_disable``);
- every ``step`` is wrapped by ``_use_grad_for_differentiable``, which imports it to call
  ``torch._dynamo.graph_break()`` around the step run under ``torch.no_grad``.

The import is not free: 77 MiB of a Fashion-MNIST CNN round's peak RSS on aarch64 (torch 2.10,
the Pi's CPU build, ``make pi-check``) and 148 MiB on x86-64 (torch 2.14.1), and seconds of CPU
per round (each round is a fresh ``flwr-clientapp`` process). :func:`eager_optimizers` caches the
plain functions as their own marks and :func:`eager_step` runs the plain step under
``torch.no_grad``: the same calls, the same arithmetic, no import. Both step aside (and torch
behaves as without them) once ``torch._dynamo`` is imported, i.e. when something in the process
compiles, and when torch wraps these functions in another way than the one described here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import optimizer as torch_optimizer

__all__ = ["eager_optimizers", "eager_step"]

_STEP_WRAPPERS = ["wrapper", "_use_grad"]
"""Code names of the wrappers around a torch optimizer's ``step``, outermost first."""


def _unused() -> None:
    """Do nothing: :func:`eager_optimizers` wraps it to see how torch wraps a function."""


def eager_optimizers() -> None:
    """Let ``torch.optim.Optimizer``'s methods run without importing ``torch._dynamo``.

    Call before building an optimizer. Does nothing once ``torch._dynamo`` is imported.
    """
    if "torch._dynamo" in sys.modules:
        return
    marked = torch._disable_dynamo(_unused).__code__
    for member in vars(torch.optim.Optimizer).values():
        plain = getattr(member, "__wrapped__", None)
        wrapped = getattr(member, "__code__", None) is marked and callable(plain)
        if wrapped and not hasattr(plain, "__dynamo_disable"):
            setattr(plain, "__dynamo_disable", plain)


def eager_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` without importing ``torch._dynamo``.

    Runs the class's own ``step`` under ``torch.no_grad`` (what torch's wrapper does for a
    non-differentiable optimizer). Falls back to ``optimizer.step()`` when ``torch._dynamo`` is
    already imported, when the optimizer is differentiable or has step hooks (torch's wrapper
    runs them), or when ``step`` is wrapped otherwise.
    """
    plain = _plain_step(type(optimizer))
    hooks = optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
    global_hooks = (
        torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
    )
    if (
        plain is None
        or "torch._dynamo" in sys.modules
        or optimizer.defaults.get("differentiable", False)
        or hooks
        or global_hooks
    ):
        optimizer.step()
        return
    with torch.no_grad():
        plain(optimizer)


def _plain_step(cls: type[torch.optim.Optimizer]) -> Callable[..., Any] | None:
    """Return ``cls.step`` without torch's wrappers, or ``None`` if they are not as expected."""
    chain: list[Any] = [cls.step]
    while hasattr(chain[-1], "__wrapped__") and len(chain) <= len(_STEP_WRAPPERS):
        chain.append(chain[-1].__wrapped__)
    names = [getattr(getattr(f, "__code__", None), "co_name", None) for f in chain[:-1]]
    if names != _STEP_WRAPPERS or hasattr(chain[-1], "__wrapped__"):
        return None
    plain: Callable[..., Any] = chain[-1]
    return plain
