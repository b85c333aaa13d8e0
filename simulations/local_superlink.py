"""The project's Flower environment, and the local SuperLink behind ``simulations/flwr_run.sh``.

Plain ``flwr run .`` sends the run to Flower's *managed* local SuperLink: the first ``flwr``
command starts one (``--simulation --database $FLWR_HOME/local-superlink/state.db``) on
127.0.0.1:39091 and leaves it running, with the environment and working directory of that first
command. Three things therefore have to be in the environment of every ``flwr`` command, not in
a user's memory:

- ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: otherwise that SuperLink installs the
  app's dependencies (torch with its CUDA libraries) into a fresh environment for every run;
- ``FLWR_HOME=<project>/.flwr``: Flower's state (its config, the SuperLink's database, the
  installed app packages) stays inside the project;
- ``FEDPRUNE_PROJECT_DIR=<project>``: a relative ``results-dir`` resolves against the project,
  not against wherever the SuperLink happened to be started (:func:`fedprune.checkpoint.run_dir`);

and telemetry and the update check are off. ``make venv`` writes them into the virtualenv as a
``.pth`` file (:func:`install`), whose one line Python runs at every interpreter start-up, so
``flwr`` (and every process it starts) has them whether or not the venv is activated. Each is a
default: a variable already set in the shell wins.

``python -m simulations.local_superlink run N [flwr run options]`` (what ``flwr_run.sh``
calls) starts its own SuperLink on a free loopback port with the same database file, runs
``flwr run . local --stream`` with ``N`` virtual SuperNodes and stops the SuperLink by PID
afterwards, so ``flwr list`` and ``flwr log <run-id>`` (served by the managed SuperLink from that
database) show the run later. If the managed SuperLink is already running, the run goes to it
instead (two SuperLinks never write one database at the same time).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from fedprune.checkpoint import PROJECT_DIR_ENV

PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
PTH_NAME: Final = "fedprune-flower-env.pth"
"""The file :func:`install` writes into the virtualenv's site-packages."""
MANAGED_PORT: Final = "39091"
"""Flower's managed local SuperLink (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` overrides it)."""
PORT_ENV: Final = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
STARTUP_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 5.0


def project_env(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Return the environment every ``flwr`` command of the project runs with.

    Parameters
    ----------
    root : Path
        The project directory (the one holding ``pyproject.toml``).

    Returns
    -------
    dict[str, str]
        Variable name to value.
    """
    return {
        "FLWR_HOME": str(root / ".flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        PROJECT_DIR_ENV: str(root),
    }


def pth_line(env: Mapping[str, str]) -> str:
    """Return the ``.pth`` line that sets each of ``env`` unless it is already set."""
    pairs = ", ".join(f"({k!r}, {v!r})" for k, v in sorted(env.items()))
    return f"import os; [os.environ.setdefault(k, v) for k, v in ({pairs},)]\n"


def install(site_dir: Path | None = None, root: Path = PROJECT_ROOT) -> Path:
    """Write the project's environment into a virtualenv as a ``.pth`` file.

    Parameters
    ----------
    site_dir : Path, optional
        A site-packages directory; default: the running interpreter's (``purelib``).
    root : Path
        The project directory.

    Returns
    -------
    Path
        The file written.
    """
    directory = Path(site_dir or sysconfig.get_paths()["purelib"])
    path = directory / PTH_NAME
    path.write_text(pth_line(project_env(root)), encoding="utf-8")
    return path


def _healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink and the simulation processes it started (its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run(num_supernodes: int, flwr_args: Sequence[str], root: Path = PROJECT_ROOT) -> int:
    """Run the app in ``root`` on a local simulation SuperLink; return ``flwr run``'s status.

    Parameters
    ----------
    num_supernodes : int
        Virtual SuperNodes (``--federation-config num-supernodes=N``).
    flwr_args : Sequence[str]
        Further ``flwr run`` options (e.g. ``--run-config "..."``).
    root : Path
        The project directory.

    Returns
    -------
    int
        The exit status of ``flwr run``.

    Raises
    ------
    ValueError
        If ``num_supernodes`` is below 1.
    RuntimeError
        If the SuperLink does not start.
    """
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes={num_supernodes} must be >= 1")
    env = {**project_env(root), **os.environ}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    flwr = [
        str(bin_dir / "flwr"),
        "run",
        ".",
        "local",
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
        *flwr_args,
    ]
    if _healthy(env.get(PORT_ENV[0], MANAGED_PORT)):  # the managed SuperLink: use it
        return subprocess.run(flwr, cwd=root, env=env, check=False).returncode

    state = Path(env["FLWR_HOME"]) / "local-superlink"
    state.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env.update(dict.fromkeys(PORT_ENV, port))
    log_file = state / f"superlink-{port}.log"
    superlink = subprocess.Popen(
        [
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--database",
            str(state / "state.db"),
            "--log-file",
            str(log_file),
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the SuperLink and what it starts: one process group
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            if superlink.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {superlink.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink was not healthy after 30 s; see {log_file}")
            time.sleep(0.2)
        return subprocess.run(flwr, cwd=root, env=env, check=False).returncode
    finally:
        _stop(superlink)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``install`` (the venv's ``.pth``) or ``run N [flwr run options]``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.local_superlink")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("install", help="write the project's Flower environment into the venv")
    p.add_argument("--site-dir", type=Path, default=None)
    p = commands.add_parser("run", help="flwr run . on a local SuperLink started and stopped here")
    p.add_argument("num_supernodes", type=int)
    p.add_argument("flwr_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.site_dir))
        return 0
    try:
        return run(args.num_supernodes, args.flwr_args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
