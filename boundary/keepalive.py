"""Run ``flower-superlink`` or ``flower-supernode`` with idle HTTP connections kept open longer.

    python -m boundary.keepalive 60 flower-supernode --superlink host:9093 ...

Flower 1.42's SuperLink serves its HTTPS API with uvicorn and its SuperNode talks to it with an
``httpx.Client``; both close an idle keep-alive connection after 5 s (the two libraries'
defaults, which Flower does not set). A node is idle for longer than that while its ClientApp
trains, so most rounds open new TLS connections (about 2 kB each; ``docs/results/wire.md``
counts them). This launcher sets the libraries' defaults in the process and then runs Flower's
own entry point, unchanged: the server keeps idle connections for ``seconds + 15`` s, the client
for ``seconds`` s (the client gives up first, so it never sends on a connection the server is
closing). Flower's code and command-line arguments are untouched; every argument after the
command name goes to it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

ENTRY_POINTS: Final = {
    "flower-superlink": ("flwr.superlink.cli", "flower_superlink"),
    "flower-supernode": ("flwr.supernode.cli", "flower_supernode"),
}
"""Flower's console scripts this launcher runs (module, function), as in its entry points."""
DEFAULT_KEEP_ALIVE_S: Final = 60.0
"""The deployment's client keep-alive (seconds): longer than a round's training on a Pi."""
SERVER_MARGIN_S: Final = 15
"""How much longer the server keeps an idle connection than the client does."""


def keep_alive(seconds: float) -> None:
    """Make uvicorn servers and httpx clients created from now on keep idle connections longer.

    Parameters
    ----------
    seconds : float
        Idle time after which a client drops a kept-alive connection (``> 0``); servers keep
        them :data:`SERVER_MARGIN_S` seconds longer.

    Raises
    ------
    ValueError
        If ``seconds`` is not positive.
    """
    if not seconds > 0:
        raise ValueError(f"keep-alive seconds must be > 0, got {seconds!r}")
    import httpx
    import uvicorn

    run: Callable[..., Any] = uvicorn.run
    timeout = int(seconds) + SERVER_MARGIN_S
    uvicorn.run = functools.update_wrapper(functools.partial(run, timeout_keep_alive=timeout), run)
    base = httpx.Client

    class Client(base):  # type: ignore[valid-type,misc]
        """``httpx.Client`` whose default limits keep idle connections ``seconds`` long."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("limits", httpx.Limits(keepalive_expiry=float(seconds)))
            super().__init__(*args, **kwargs)

    httpx.Client = Client  # type: ignore[misc]


def command(argv: Sequence[str], seconds: float | None) -> list[str]:
    """Return ``argv`` (a Flower command line) run through this launcher (unchanged if ``None``).

    Parameters
    ----------
    argv : sequence of str
        ``flower-superlink`` or ``flower-supernode`` (by path or name) and its arguments.
    seconds : float or None
        The client's keep-alive (see :func:`keep_alive`); ``None`` or ``0`` keeps Flower's
        defaults.

    Returns
    -------
    list of str
        The command line, run by this interpreter.
    """
    if not seconds:
        return list(argv)
    name = Path(argv[0]).name
    if name not in ENTRY_POINTS:
        raise ValueError(f"not a command this launcher runs: {argv[0]!r}")
    if not seconds > 0:
        raise ValueError(f"keep-alive seconds must be > 0, got {seconds!r}")
    return [sys.executable, "-m", __name__, str(seconds), name, *argv[1:]]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``<seconds> <flower command> [its arguments...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] not in ENTRY_POINTS:
        sys.exit(
            f"usage: python -m boundary.keepalive SECONDS {{{','.join(ENTRY_POINTS)}}} [ARGS...]"
        )
    try:
        seconds = float(args[0])
    except ValueError:
        sys.exit(f"keep-alive seconds must be a number, got {args[0]!r}")
    keep_alive(seconds)
    module, function = ENTRY_POINTS[args[1]]
    sys.argv = [args[1], *args[2:]]
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main()
