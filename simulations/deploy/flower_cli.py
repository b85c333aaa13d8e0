"""Flower's command lines: connections, ``flower-superlink``/``flower-supernode``, ``flwr``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from simulations.deploy.common import (
    DATA_DIR_ENV,
    NODE_DATA_DIR_KEY,
    PROJECT_ROOT,
    THREAD_ENVS,
    DeploymentError,
)
from simulations.deploy.processes import Processes, executable, tail
from simulations.deploy.results import RunResult, read_results
from simulations.deploy.tls import CertPaths


def flwr_home() -> Path:
    """Return ``$FLWR_HOME`` (Flower's default ``~/.flwr`` when unset)."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def write_connection(
    home: str | os.PathLike[str],
    name: str,
    address: str,
    *,
    root_certificates: str | os.PathLike[str] | None,
    make_default: bool = False,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``<home>/config.toml``; keep everything else.

    This is the file ``flwr run . <name>`` reads; ``pyproject.toml`` is never touched.

    Parameters
    ----------
    home : str or os.PathLike
        The Flower home directory (``$FLWR_HOME``).
    name : str
        Connection name.
    address : str
        SuperLink ``host:port``.
    root_certificates : str or os.PathLike or None
        CA certificate that verifies the SuperLink (absolute path written); ``None`` for a plain
        HTTP connection (``insecure = true``).
    make_default : bool
        Also set ``[superlink] default = <name>``.

    Returns
    -------
    Path
        The configuration file.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"connection name {name!r} must be alphanumeric, '-' or '_'")
    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = tomllib.loads(path.read_text("utf-8")) if path.exists() else {}
    superlink = document.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    path.write_text(tomli_w.dumps(document), "utf-8")
    return path


def format_config(values: Mapping[str, bool | int | float | str]) -> str:
    """Format a ``--run-config`` / ``--node-config`` string (space-separated TOML pairs)."""
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"config key {key!r} must be alphanumeric, '-' or '_'")
        if isinstance(value, str) and ('"' in value or "\\" in value or "\n" in value):
            raise ValueError(f"config value for {key!r} must not contain quotes or backslashes")
        parts.append(f"{key}={tomli_w.dumps({'v': value})[4:].strip()}")
    return " ".join(parts)


def flwr_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """Environment of every Flower process.

    Its home; no per-run dependency installs (they would ignore our pins and take minutes);
    and no traffic beyond the deployment itself: Flower's telemetry events and update check
    are off.
    """
    return {
        "FLWR_HOME": str(Path(home).expanduser().resolve()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def node_env(
    *, threads: int | None = None, data_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Environment of a SuperNode, inherited by its ClientApp processes.

    Parameters
    ----------
    threads : int, optional
        CPU threads for torch and the BLAS libraries (``OMP_NUM_THREADS`` and friends).
    data_dir : str or os.PathLike, optional
        Data directory (``FEDPRUNE_DATA_DIR``).

    Returns
    -------
    dict
        The variables to set.
    """
    env: dict[str, str] = {}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        env.update({name: str(threads) for name in THREAD_ENVS})
    if data_dir is not None:
        env[DATA_DIR_ENV] = str(Path(data_dir).expanduser().resolve())
    return env


def superlink_command(
    certs: CertPaths,
    *,
    host: str,
    port: int,
    auth: bool = True,
    database: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Return the ``flower-superlink`` command line: TLS, SuperNode auth, no runtime installs.

    Parameters
    ----------
    certs : CertPaths
        From :func:`make_certificates` (paths are made absolute: the SuperLink's SuperExec
        resolves them from its own working directory).
    host, port : str, int
        Address of the SuperLink's HTTPS API (Fleet, Control and Runtime).
    auth : bool
        ``--enable-supernode-auth``: only registered SuperNode keys may connect.
    database : str or os.PathLike, optional
        SQLite file for the SuperLink's state (registered nodes survive a restart); in memory
        by default.

    Returns
    -------
    list of str
        The command.
    """
    argv = [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs.ca_cert.resolve()),
        "--ssl-certfile",
        str(certs.server_cert.resolve()),
        "--ssl-keyfile",
        str(certs.server_key.resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if auth:
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(Path(database).resolve())]
    return argv


def supernode_command(
    *,
    superlink: str,
    root_certificates: str | os.PathLike[str] | None,
    private_key: str | os.PathLike[str] | None,
    partition_id: int,
    num_partitions: int,
    data_dir: str | os.PathLike[str] | None = None,
    port: int = 9094,
    max_retries: int | None = None,
    max_wait_s: float | None = None,
) -> list[str]:
    """Return the ``flower-supernode`` command line.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``host:port``.
    root_certificates : str or os.PathLike or None
        CA certificate verifying the SuperLink; ``None`` gives ``--insecure`` (plain HTTP, which
        a TLS SuperLink refuses).
    private_key : str or os.PathLike or None
        The node's OpenSSH private key (``--auth-supernode-private-key``); its public key must
        be registered with the SuperLink.
    partition_id, num_partitions : int
        Node config read by the ClientApp.
    data_dir : str or os.PathLike, optional
        Data location, passed as node config ``data-dir`` (the ClientApp also receives it as
        ``FEDPRUNE_DATA_DIR``, see :func:`node_env`).
    port : int
        Port of the SuperNode's local Runtime API (for its ClientApp processes; loopback).
    max_retries, max_wait_s : int or float, optional
        Give up connecting after this many retries / seconds (default: retry forever).

    Returns
    -------
    list of str
        The command.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} not in [0, {num_partitions})")
    node_config: dict[str, bool | int | float | str] = {
        "partition-id": partition_id,
        "num-partitions": num_partitions,
    }
    if data_dir is not None:
        node_config[NODE_DATA_DIR_KEY] = str(Path(data_dir).expanduser().resolve())
    argv = [executable("flower-supernode"), "--superlink", superlink]
    if root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(root_certificates).resolve())]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    argv += [
        "--node-config",
        format_config(node_config),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_s is not None:
        argv += ["--max-wait-time", str(max_wait_s)]
    return argv


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


def wait_for_supernode(process: subprocess.Popen[bytes], log: Path, *, timeout_s: float) -> int:
    """Wait until the SuperNode logged its node id (it is connected and activated).

    Returns
    -------
    int
        The node id.

    Raises
    ------
    DeploymentError
        If the SuperNode exits first (e.g. TLS or authentication refused) or times out.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text("utf-8", errors="replace") if log.exists() else ""
        if match := _NODE_ID.search(text):
            return int(match.group(1))
        if process.poll() is not None:
            time.sleep(0.3)  # let the pump flush the last lines
            raise DeploymentError(
                f"SuperNode exited with code {process.returncode} before connecting:\n"
                + tail(log, 40)
            )
        time.sleep(0.2)
    raise DeploymentError(f"SuperNode not connected after {timeout_s:.0f} s:\n" + tail(log, 40))


def _json_from(text: str) -> Any:
    """Decode the first JSON object in ``text`` (CLI output may carry other lines)."""
    start = text.find("{")
    if start < 0:
        raise DeploymentError(f"no JSON in the output:\n{text[-2000:]}")
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    return value


def flwr_cli(
    args: Sequence[str], *, env: Mapping[str, str], timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr <args>`` (tagged environment given by the caller) and capture its output.

    A timeout, an interrupt or a signal kills the command (``subprocess.run`` does so).
    """
    try:
        return subprocess.run(
            [executable("flwr"), *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr {' '.join(args)}` timed out after {timeout_s:.0f} s") from err


def register_keys(
    public_keys: Sequence[str | os.PathLike[str]],
    connection: str,
    *,
    env: Mapping[str, str],
    timeout_s: float = 120.0,
) -> list[int]:
    """Register SuperNode public keys with the SuperLink (``flwr supernode register``).

    The commands run concurrently (each ``flwr`` start costs seconds of CPU).

    Returns
    -------
    list of int
        The node ids, in the order of ``public_keys``.
    """
    results: list[subprocess.CompletedProcess[str] | BaseException | None] = [None] * len(
        public_keys
    )

    def work(i: int, key: str | os.PathLike[str]) -> None:
        try:
            results[i] = flwr_cli(
                ["supernode", "register", str(Path(key).resolve()), connection, "--format", "json"],
                env=env,
                timeout_s=timeout_s,
            )
        except BaseException as err:  # reported below, in the caller's thread
            results[i] = err

    threads = [
        threading.Thread(target=work, args=(i, key), daemon=True)
        for i, key in enumerate(public_keys)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    node_ids = []
    for key, result in zip(public_keys, results, strict=True):
        if isinstance(result, BaseException):
            raise DeploymentError(f"registering {key} failed: {result}") from result
        if result is None or result.returncode != 0:
            output = "" if result is None else result.stdout + result.stderr
            raise DeploymentError(f"registering {key} failed:\n{output[-2000:]}")
        node_ids.append(int(_json_from(result.stdout)["node-id"]))
    return node_ids


def run_status(
    connection: str, run_id: int, *, env: Mapping[str, str], timeout_s: float = 120.0
) -> str:
    """Return a run's status (e.g. ``finished:completed``) from ``flwr list --format json``."""
    result = flwr_cli(
        ["list", connection, "--run-id", str(run_id), "--format", "json"],
        env=env,
        timeout_s=timeout_s,
    )
    if result.returncode != 0:
        raise DeploymentError(f"`flwr list` failed:\n{(result.stdout + result.stderr)[-2000:]}")
    runs = _json_from(result.stdout).get("runs", [])
    if not runs:
        raise DeploymentError(f"run {run_id} is unknown to the SuperLink")
    return str(runs[0]["status"])


def flwr_run(
    processes: Processes,
    connection: str,
    *,
    env: Mapping[str, str],
    log: Path,
    run_config: Mapping[str, bool | int | float | str],
    app: str | os.PathLike[str] = PROJECT_ROOT,
    check_results: bool = True,
    timeout_s: float = 900.0,
    echo: bool = False,
) -> RunResult:
    """``flwr run <app> <connection> --stream``; check the run's status and its results.

    Parameters
    ----------
    processes : Processes
        Where the ``flwr run`` process is tracked.
    connection : str
        SuperLink connection name in ``$FLWR_HOME/config.toml``.
    env : Mapping[str, str]
        Extra environment (``FLWR_HOME``).
    log : Path
        File for the streamed logs.
    run_config : Mapping
        ``--run-config`` overrides; ``results-dir`` (absolute) and ``run-name`` are required:
        the ServerApp writes ``<results-dir>/<run-name>/`` on the SuperLink's machine.
    app : str or os.PathLike
        The Flower app directory.
    check_results : bool
        Read the results back (the SuperLink runs on this machine).
    timeout_s : float
        Limit for the whole run.
    echo : bool
        Copy the streamed logs to stderr.

    Returns
    -------
    RunResult
        The run; :attr:`RunResult.ok` tells success.

    Raises
    ------
    DeploymentError
        If the run could not be started or did not finish in time.
    """
    for key in ("results-dir", "run-name"):
        if key not in run_config:
            raise ValueError(f"run_config needs {key!r}")
    results_dir = Path(str(run_config["results-dir"]))
    if check_results and not results_dir.is_absolute():
        raise ValueError(f"results-dir={results_dir} must be absolute")
    run_dir = results_dir / str(run_config["run-name"])
    for name in ("rounds.csv", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    argv = [
        executable("flwr"),
        "run",
        str(Path(app).resolve()),
        connection,
        "--run-config",
        format_config(run_config),
        "--stream",
    ]
    process = processes.start("flwr-run", argv, log=log, env=env, echo=echo)
    try:
        code = processes.wait(process, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        processes.stop(process)
        raise DeploymentError(f"`flwr run` did not end within {timeout_s:.0f} s") from err
    text = log.read_text("utf-8", errors="replace")
    match = _RUN_ID.search(text)
    if code != 0 or match is None:
        raise DeploymentError(f"`flwr run` failed (exit code {code}):\n{tail(log, 20)}")
    run_id = int(match.group(1))
    full_env = processes.env(env)
    status = run_status(connection, run_id, env=full_env)
    deadline = time.monotonic() + 60.0
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(2.0)
        status = run_status(connection, run_id, env=full_env)
    rounds, summary = read_results(run_dir) if check_results else ([], {"unchecked": True})
    return RunResult(
        run_id=run_id, status=status, path=run_dir, rounds=rounds, summary=summary, log=log
    )
