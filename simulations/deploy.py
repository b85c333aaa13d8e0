"""Real Flower deployments: a TLS SuperLink with SuperNode authentication, SuperNodes, ``flwr run``.

``python -m simulations.deploy <command>`` (``--help`` on each command for its options):

=============  =================================================================================
``certs``      create a CA and a server certificate for host names / IPs (plus loopback)
``keys``       create SuperNode key pairs (EC P-384, OpenSSH format) for authentication
``connection`` write a named SuperLink connection into ``$FLWR_HOME/config.toml``
``superlink``  run a SuperLink with TLS and SuperNode authentication (foreground)
``register``   register SuperNode public keys with a running SuperLink (``flwr supernode
               register``)
``supernode``  run a SuperNode with node config: partition id, number of partitions, data dir
``run``        ``flwr run <app> <connection> --stream``; fails unless the run finished
               ``completed`` and wrote its results; prints the results table
``demo``       all of the above on loopback: 2 SuperNodes, 3 rounds (``make deploy-demo``)
``check-wheels``  download the aarch64 wheels a Raspberry Pi needs and report their versions
=============  =================================================================================

How Flower 1.42 does TLS and authentication (read from its source):

- The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one ``--host``/``--port``
  (uvicorn), with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``. In ``subprocess`` isolation it
  starts ``flower-superexec`` (new session, ``--parent-pid``), which connects back to
  ``127.0.0.1:<port>`` over TLS to launch ``flwr-serverapp``: the server certificate must name the
  loopback addresses as well as the public host name, which :func:`make_certificates` does.
- ``--enable-supernode-auth`` makes the SuperLink accept only SuperNodes whose public key was
  registered through the Control API (``flwr supernode register <key.pub> <connection>``). A
  SuperNode started with ``--auth-supernode-private-key`` signs a timestamp on every request;
  the SuperLink rejects timestamps more than 5 s ahead of or 300 s behind its clock.
- A SuperNode verifies the SuperLink's certificate with ``--root-certificates <ca.crt>``; with
  ``--insecure`` it speaks plain HTTP and cannot connect to a TLS SuperLink.

Every process started here is tagged with a unique environment variable (inherited by the
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` processes Flower starts in turn)
and is stopped by PID on exit, failure and SIGTERM/SIGINT/SIGHUP included: first the processes
started directly (SIGTERM, then SIGKILL after a grace period), then any tagged process left.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.table import Table

PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent
"""The Flower app (``pyproject.toml`` with ``[tool.flwr.app]``)."""
TAG_ENV: Final = "FEDPRUNE_DEPLOY_TAG"
"""Environment variable marking every process of one deployment (and its descendants)."""
DATA_DIR_ENV: Final = "FEDPRUNE_DATA_DIR"
"""Data directory of :func:`fedprune.data.load_dataset` (inherited by the ClientApp)."""
NODE_DATA_DIR_KEY: Final = "data-dir"
"""Node-config key carrying the SuperNode's data location."""
THREAD_ENVS: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
DEMO_WORKDIR: Final = PROJECT_ROOT / ".flwr" / "deploy-demo"
WORKDIR_MARKER: Final = ".fedprune-deploy"
COMPLETED: Final = "finished:completed"
AARCH64_PLATFORMS: Final = (
    "manylinux2014_aarch64",
    *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)),
)
"""pip ``--platform`` tags a 64-bit Raspberry Pi OS (glibc 2.36) accepts; pip does not expand
``manylinux_2_X`` to older tags by itself, so every level is listed."""
PI_PACKAGES: Final = ("torch", "torchvision", "opacus", "flwr")

console = Console(stderr=True, highlight=False)


class DeploymentError(RuntimeError):
    """A deployment step failed (the message quotes the relevant log)."""


# -- certificates and keys -------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`make_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format)."""

    name: str
    private: Path
    public: Path


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Return SAN entries for ``hosts`` plus the loopback names, deduplicated, in order."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*hosts, *LOOPBACK_NAMES):
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    path.chmod(0o600)


def make_certificates(
    out_dir: str | os.PathLike[str], hosts: Sequence[str], *, days: int = 365
) -> CertPaths:
    """Create a CA and a server certificate signed by it (EC P-384, SHA-256).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (created; keys
        are written with mode 0600). Never commit these files.
    hosts : sequence of str
        Host names or IP addresses SuperNodes and ``flwr`` use to reach the SuperLink. The
        loopback names (``localhost``, ``127.0.0.1``, ``::1``) are always added: the SuperLink's
        own ``flower-superexec`` connects to it over loopback with TLS.
    days : int
        Validity of both certificates.

    Returns
    -------
    CertPaths
        The four files.
    """
    if days < 1:
        raise ValueError(f"days={days} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = (hosts[0] if hosts else "localhost").strip("[]")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    paths.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    paths.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(paths.ca_key, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    _write_private(
        paths.server_key, server_key.private_bytes(pem, pkcs8, serialization.NoEncryption())
    )
    return paths


def make_node_key(out_dir: str | os.PathLike[str], name: str) -> NodeKey:
    """Create a SuperNode key pair: ``<name>`` (private, 0600) and ``<name>.pub``.

    The format is what ``ssh-keygen -t ecdsa -b 384`` writes and what Flower loads: an OpenSSH
    EC P-384 private key for ``flower-supernode --auth-supernode-private-key`` and an OpenSSH
    public key for ``flwr supernode register``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory for the two files (created).
    name : str
        File name of the private key (a plain name).

    Returns
    -------
    NodeKey
        The key pair's paths.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    public = out / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" fedprune-{name}\n".encode()
    )
    return NodeKey(name=name, private=private, public=public)


# -- Flower CLI configuration ----------------------------------------------------------------


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


# -- processes -------------------------------------------------------------------------------


def venv_bin() -> Path:
    """Return the directory of this interpreter's console scripts (``flwr``, ``flower-*``)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """Return the path of Flower's console script ``name`` next to this interpreter."""
    candidate = venv_bin() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    stat = _read_proc(pid, "stat")
    if not stat:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[0]
    return state not in (b"Z", b"X")


def _descendants(pid: int) -> list[int]:
    """Return the live descendants of ``pid`` (by parent PID, from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_proc(int(entry.name), "stat")
            if stat:
                ppid = int(stat.rsplit(b")", 1)[-1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return [child for child in found if _alive(child)]


def tagged_pids(tag: str) -> list[int]:
    """Return the live processes whose environment has ``FEDPRUNE_DEPLOY_TAG=<tag>``.

    Parameters
    ----------
    tag : str
        The deployment's tag.

    Returns
    -------
    list of int
        PIDs, excluding this process.
    """
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if needle in _read_proc(pid, "environ").split(b"\0") and _alive(pid):
            found.append(pid)
    return sorted(found)


def _signal_pid(pid: int, sig: int, tag: str | None) -> None:
    """Send ``sig`` to ``pid`` (re-checking the tag first, against PID reuse)."""
    if tag is not None and f"{TAG_ENV}={tag}".encode() not in _read_proc(pid, "environ").split(
        b"\0"
    ):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class _Managed:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    pump: threading.Thread | None = None


class Processes:
    """Processes of one deployment, stopped by PID on :meth:`stop_all` (also at exit).

    Every process gets ``FEDPRUNE_DEPLOY_TAG=<tag>`` in its environment and its own session
    (a terminal's Ctrl-C reaches this process only, which then stops the others in order).

    Parameters
    ----------
    tag : str, optional
        The deployment's tag (default: a fresh random one).
    grace_s : float
        Seconds between SIGTERM and SIGKILL.
    """

    def __init__(self, tag: str | None = None, *, grace_s: float = 10.0) -> None:
        self.tag = tag or f"fedprune-{uuid.uuid4().hex}"
        self.grace_s = grace_s
        self._managed: list[_Managed] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return this environment plus the tag, the venv's scripts on PATH and ``extra``."""
        env = dict(os.environ)
        env[TAG_ENV] = self.tag
        env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        echo: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr appended to ``log`` (and echoed if asked).

        Parameters
        ----------
        name : str
            A label for messages.
        argv : sequence of str
            The command.
        log : Path
            Log file (created).
        env : Mapping[str, str], optional
            Extra environment variables.
        cwd : Path, optional
            Working directory.
        echo : bool
            Also copy the output to this process's stderr.

        Returns
        -------
        subprocess.Popen
            The started process.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env(env),
                cwd=cwd,
                start_new_session=True,
            )
            managed = _Managed(name=name, process=process, log=log)
            managed.pump = threading.Thread(
                target=_pump, args=(process.stdout, log, echo), daemon=True
            )
            managed.pump.start()
            self._managed.append(managed)
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> Path:
        """Return the log file of a process started here."""
        for managed in self._managed:
            if managed.process is process:
                return managed.log
        raise KeyError(process.pid)

    def wait(self, process: subprocess.Popen[bytes], timeout: float | None = None) -> int:
        """Wait for ``process`` and for its output to reach the log; return its exit code."""
        code = process.wait(timeout)
        for managed in self._managed:
            if managed.process is process and managed.pump is not None:
                managed.pump.join(5.0)
        return code

    def pids(self) -> list[int]:
        """Return the PIDs of the live processes started here."""
        return [m.process.pid for m in self._managed if m.process.poll() is None]

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one process started here and what it started (SIGTERM, SIGKILL after grace).

        Its descendants are found before it stops (by parent PID), and after it stopped among
        this deployment's tagged processes: Flower's ``flower-superexec`` runs in a new session
        and only notices ``--parent-pid`` exiting later.
        """
        family = set(_descendants(process.pid))
        if process.poll() is None:
            _signal_pid(process.pid, signal.SIGTERM, None)
            try:
                process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                _signal_pid(process.pid, signal.SIGKILL, None)
                process.wait(self.grace_s)
        marker = f"--parent-pid\0{process.pid}\0".encode()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [
                pid
                for pid in tagged_pids(self.tag)
                if pid in family or marker in _read_proc(pid, "cmdline")
            ]
            for pid in left:
                _signal_pid(pid, sig, self.tag)
            deadline = time.monotonic() + self.grace_s
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = [pid for pid in left if _alive(pid)]
            if not left:
                return

    def stop_all(self) -> list[int]:
        """Stop every process (newest first), then every tagged process left.

        Returns
        -------
        list of int
            PIDs that were still tagged and alive after SIGKILL (normally empty).
        """
        with self._lock:
            managed = list(reversed(self._managed))
        for entry in managed:
            try:
                self.stop(entry.process)
            except (OSError, subprocess.TimeoutExpired) as err:
                console.print(f"[red]could not stop {entry.name} (pid {entry.process.pid}): {err}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + self.grace_s
            left = tagged_pids(self.tag)
            for pid in left:
                _signal_pid(pid, sig, self.tag)
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = tagged_pids(self.tag)
            if not left:
                break
        for entry in managed:
            if entry.pump is not None:
                entry.pump.join(2.0)
        return tagged_pids(self.tag)

    def close(self) -> list[int]:
        """Stop everything and forget the atexit hook; return PIDs that survived."""
        left = self.stop_all()
        atexit.unregister(self.stop_all)
        return left


def _pump(stream: IO[bytes] | None, log: Path, echo: bool) -> None:
    """Copy ``stream`` to ``log`` line by line (and to stderr when ``echo``)."""
    if stream is None:
        return
    with log.open("ab") as out:
        for line in iter(stream.readline, b""):
            out.write(line)
            out.flush()
            if echo:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
    stream.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a log file, colour codes removed (empty if missing)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError:
        return ""
    return _ANSI.sub("", "\n".join(text.splitlines()[-lines:]))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], *, timeout_s: float
) -> None:
    """Wait until ``host:port`` accepts TCP connections while ``process`` runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"process {process.pid} exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


class ExitOnSignal:
    """Turn SIGTERM and SIGHUP into :class:`SystemExit` so ``finally`` blocks run.

    The first signal also makes further SIGINT/SIGTERM/SIGHUP ignored until the block ends, so
    a second one cannot interrupt the cleanup (which is bounded by its grace periods). Only the
    main thread can install handlers; elsewhere this does nothing.
    """

    _SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ExitOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        for sig in (*self._SIGNALS, signal.SIGINT):
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# -- commands --------------------------------------------------------------------------------


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


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """A finished ``flwr run`` and what its ServerApp wrote."""

    run_id: int
    status: str
    path: Path
    """``<results-dir>/<run-name>``."""
    rounds: list[dict[str, str]]
    summary: dict[str, Any]
    log: Path
    """The streamed run log."""

    @property
    def ok(self) -> bool:
        """Whether the run completed and wrote its results."""
        return self.status == COMPLETED and bool(self.rounds) and bool(self.summary)


def read_results(path: str | os.PathLike[str]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Read ``rounds.csv`` and ``summary.json`` of a run directory (empty if missing)."""
    run_dir = Path(path)
    rounds: list[dict[str, str]] = []
    summary: dict[str, Any] = {}
    if (run_dir / "rounds.csv").exists():
        with (run_dir / "rounds.csv").open(newline="", encoding="utf-8") as file:
            rounds = list(csv.DictReader(file))
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    return rounds, summary


def results_tables(result: RunResult) -> list[Table]:
    """Return rich tables of a run: its rounds and its summary."""
    rounds = Table(title=f"run {result.run_id}: {result.path}", title_justify="left")
    columns = list(result.rounds[0]) if result.rounds else []
    for column in columns:
        rounds.add_column(column, justify="right")
    for row in result.rounds:
        rounds.add_row(*(row[c] for c in columns))
    summary = Table(title="summary", title_justify="left", show_header=False)
    summary.add_column("key")
    summary.add_column("value", justify="right")
    summary.add_row("status", result.status)
    for key, value in result.summary.items():
        if not isinstance(value, dict | list):
            summary.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    return [rounds, summary]


def print_results(result: RunResult, out: Console | None = None) -> None:
    """Print :func:`results_tables` (to stdout by default)."""
    out = out or Console(highlight=False)
    for table in results_tables(result):
        out.print(table)


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


# -- a whole deployment ----------------------------------------------------------------------


class Deployment:
    """A SuperLink (TLS + SuperNode auth) and SuperNodes on this machine, stopped on exit.

    Use as a context manager; everything lives under ``workdir``: ``certs/``, ``keys/``,
    ``logs/`` and ``flwr-home/`` (this deployment's ``FLWR_HOME``, holding the connection).

    Parameters
    ----------
    workdir : str or os.PathLike
        Working directory (created).
    host : str
        Address the SuperLink binds and everyone connects to.
    connection : str
        Name of the SuperLink connection written to ``flwr-home/config.toml``.
    threads : int, optional
        CPU threads of each SuperNode's ClientApps (and of the ServerApp).
    tag : str, optional
        Process tag (default: fresh), see :class:`Processes`.
    grace_s : float
        Seconds between SIGTERM and SIGKILL when stopping.
    echo : bool
        Copy the ``flwr run`` log stream to stderr.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        connection: str = "fedprune-deploy",
        threads: int | None = 1,
        tag: str | None = None,
        grace_s: float = 10.0,
        echo: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.connection = connection
        self.threads = threads
        self.echo = echo
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.keys_dir = self.workdir / "keys"
        self.processes = Processes(tag, grace_s=grace_s)
        self.certs: CertPaths | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.address: str | None = None
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self._signals = ExitOnSignal()
        self._runs = 0

    @property
    def tag(self) -> str:
        """The tag of every process of this deployment."""
        return self.processes.tag

    def __enter__(self) -> Deployment:
        self._signals.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        finally:
            self._signals.__exit__(exc_type, exc, traceback)

    def close(self) -> list[int]:
        """Stop every process; return the PIDs that survived SIGKILL (normally none)."""
        left = self.processes.close()
        self.superlink = None
        self.supernodes.clear()
        return left

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Extra environment of this deployment's processes."""
        env = flwr_env(self.home)
        env.update(node_env(threads=self.threads))
        env.update(extra or {})
        return env

    def start_superlink(
        self, *, port: int | None = None, auth: bool = True, timeout_s: float = 60.0
    ) -> str:
        """Create certificates, start the SuperLink, write the connection; return its address."""
        if self.superlink is not None:
            raise DeploymentError("the SuperLink is already running")
        self.certs = make_certificates(self.workdir / "certs", [self.host])
        port = port or free_port(self.host)
        process = self.processes.start(
            "superlink",
            superlink_command(self.certs, host=self.host, port=port, auth=auth),
            log=self.logs / "superlink.log",
            env=self.env(),
            cwd=self.workdir,
        )
        try:
            wait_for_port(self.host, port, process, timeout_s=timeout_s)
        except DeploymentError as err:
            raise DeploymentError(f"{err}\n{tail(self.logs / 'superlink.log')}") from err
        self.superlink = process
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{port}"
        write_connection(
            self.home, self.connection, self.address, root_certificates=self.certs.ca_cert
        )
        return self.address

    def new_node_key(self, name: str) -> NodeKey:
        """Create a SuperNode key pair under ``keys/`` (not registered yet)."""
        return make_node_key(self.keys_dir, name)

    def register(self, keys: Sequence[NodeKey]) -> list[int]:
        """Register the public keys with the SuperLink; return the node ids."""
        return register_keys(
            [key.public for key in keys], self.connection, env=self.processes.env(self.env())
        )

    def start_supernode(
        self,
        name: str,
        *,
        key: NodeKey | None,
        partition_id: int,
        num_partitions: int,
        tls: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        max_retries: int | None = None,
        timeout_s: float = 120.0,
    ) -> int:
        """Start a SuperNode and wait until it is connected; return its node id.

        Parameters
        ----------
        name : str
            Label (log file ``logs/<name>.log``).
        key : NodeKey or None
            Authentication key (``None``: none, which a SuperLink with auth refuses).
        partition_id, num_partitions : int
            Node config.
        tls : bool
            Verify the SuperLink with the CA (``False``: ``--insecure``, plain HTTP).
        data_dir : str or os.PathLike, optional
            Data location (node config ``data-dir`` and ``FEDPRUNE_DATA_DIR``).
        max_retries : int, optional
            Connection retries before giving up (default: forever).
        timeout_s : float
            How long to wait for the connection.

        Raises
        ------
        DeploymentError
            If the SuperNode exits before connecting (the log tail says why) or times out;
            the process is stopped.
        """
        if self.address is None or self.certs is None:
            raise DeploymentError("start the SuperLink first")
        log = self.logs / f"{name}.log"
        argv = supernode_command(
            superlink=self.address,
            root_certificates=self.certs.ca_cert if tls else None,
            private_key=None if key is None else key.private,
            partition_id=partition_id,
            num_partitions=num_partitions,
            data_dir=data_dir,
            port=free_port("127.0.0.1"),
            max_retries=max_retries,
        )
        extra = node_env(threads=self.threads, data_dir=data_dir)
        process = self.processes.start(name, argv, log=log, env=self.env(extra), cwd=self.workdir)
        try:
            node_id = wait_for_supernode(process, log, timeout_s=timeout_s)
        except BaseException:
            self.processes.stop(process)
            raise
        self.supernodes[name] = process
        return node_id

    def run(
        self,
        run_config: Mapping[str, bool | int | float | str],
        *,
        run_name: str,
        results_dir: str | os.PathLike[str],
        timeout_s: float = 900.0,
    ) -> RunResult:
        """``flwr run`` the app against this deployment (see :func:`flwr_run`)."""
        self._runs += 1
        config = dict(run_config)
        config["run-name"] = run_name
        config["results-dir"] = str(Path(results_dir).resolve())
        return flwr_run(
            self.processes,
            self.connection,
            env=self.env(),
            log=self.logs / f"run-{self._runs}-{run_name}.log",
            run_config=config,
            timeout_s=timeout_s,
            echo=self.echo,
        )


def demo_run_config(rounds: int, num_supernodes: int) -> dict[str, bool | int | float | str]:
    """Run config of the loopback demo: digits, MLP, every node trains every round."""
    return {
        "dataset": "digits",
        "model": "mlp",
        "num-server-rounds": rounds,
        "min-train-nodes": num_supernodes,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "prune-start-round": 1,
        "prune-end-round": max(1, rounds - 1),
        "seed": 0,
    }


def prepare_workdir(path: str | os.PathLike[str]) -> Path:
    """Return an empty working directory, clearing it only if a previous demo made it."""
    workdir = Path(path).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / WORKDIR_MARKER).exists():
            raise DeploymentError(
                f"{workdir} is not empty and was not made by this script; choose another"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("made by simulations.deploy; cleared by its demo\n")
    return workdir


def demo(
    *,
    workdir: str | os.PathLike[str] = DEMO_WORKDIR,
    rounds: int = 3,
    num_supernodes: int = 2,
    run_name: str = "deploy-demo",
    results_dir: str | os.PathLike[str] = PROJECT_ROOT / "results",
    timeout_s: float = 900.0,
    echo: bool = False,
) -> RunResult:
    """Deploy on loopback: TLS SuperLink with auth, registered SuperNodes, one ``flwr run``.

    Returns
    -------
    RunResult
        The run (check :attr:`RunResult.ok`).
    """
    work = prepare_workdir(workdir)
    with Deployment(work, echo=echo, tag=os.environ.get(TAG_ENV) or None) as deployment:
        console.print(f"[bold]SuperLink[/] (TLS, SuperNode auth) in {work}")
        address = deployment.start_superlink()
        console.print(f"  listening on https://{address}; connection {deployment.connection!r}")
        keys = [deployment.new_node_key(f"node-{i}") for i in range(num_supernodes)]
        node_ids = deployment.register(keys)
        console.print(f"  registered {len(node_ids)} SuperNode keys: {node_ids}")
        for i, key in enumerate(keys):
            node_id = deployment.start_supernode(
                key.name, key=key, partition_id=i, num_partitions=num_supernodes
            )
            console.print(f"  SuperNode {key.name} connected as node {node_id}")
        console.print(f"[bold]flwr run[/] {rounds} rounds (log: {deployment.logs})")
        result = deployment.run(
            demo_run_config(rounds, num_supernodes),
            run_name=run_name,
            results_dir=results_dir,
            timeout_s=timeout_s,
        )
        left = deployment.close()
    if left:
        raise DeploymentError(f"processes left behind: {left}")
    return result


# -- aarch64 wheels --------------------------------------------------------------------------


def check_aarch64_wheels(
    packages: Sequence[str],
    *,
    dest: str | os.PathLike[str] | None = None,
    python_version: str = "3.11",
    timeout_s: float = 1800.0,
) -> dict[str, str]:
    """Download the aarch64 wheels of ``packages`` (``name==version``) with pip; report them.

    ``pip download --only-binary=:all: --no-deps`` with every manylinux tag up to glibc 2.36
    (64-bit Raspberry Pi OS Bookworm). Nothing is installed.

    Parameters
    ----------
    packages : sequence of str
        Requirements, e.g. ``["torch==2.14.1"]``.
    dest : str or os.PathLike, optional
        Where to keep the wheels (default: a temporary directory, removed).
    python_version : str
        Target Python.
    timeout_s : float
        Limit for pip.

    Returns
    -------
    dict
        Requirement -> downloaded wheel file name.

    Raises
    ------
    DeploymentError
        If pip finds no aarch64 wheel for one of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(dest) if dest is not None else Path(tmp)
        platforms = [arg for tag in AARCH64_PLATFORMS for arg in ("--platform", tag)]
        abi = "cp" + python_version.replace(".", "")
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            *platforms,
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--abi",
            abi,
            "-d",
            str(out),
            *packages,
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            raise DeploymentError(f"pip download failed:\n{result.stderr[-3000:]}")
        found: dict[str, str] = {}
        for requirement in packages:
            name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
            prefix = name.lower().replace("-", "_") + "-"
            wheels = [w.name for w in out.glob("*.whl") if w.name.lower().startswith(prefix)]
            found[requirement] = wheels[0] if wheels else "?"
            for wheel in wheels:
                _report_cuda_requirements(out / wheel)
        return found


def _report_cuda_requirements(wheel: Path) -> None:
    """Warn when a wheel's metadata pulls NVIDIA CUDA packages on Linux (any architecture)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            return
        text = archive.read(metadata).decode("utf-8", errors="replace")
    cuda = [
        line.split(":", 1)[1].split(";")[0].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
        and re.search(r"nvidia|cuda|triton", line)
        and "extra ==" not in line
    ]
    if cuda:
        console.print(
            f"[yellow]{wheel.name} requires CUDA packages on Linux: {', '.join(cuda)}; "
            "on a Raspberry Pi install the CPU build of torch first (see the README)."
        )


def installed_pins(names: Sequence[str] = PI_PACKAGES) -> list[str]:
    """Return ``name==version`` of installed distributions (the versions to look for)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]


# -- command line ----------------------------------------------------------------------------


def _add_common_superlink(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=9093, help="HTTPS port")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deploy",
        description="Flower deployment with TLS and SuperNode authentication.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("certs", help="create a CA and a server certificate")
    p.add_argument("--out", required=True, type=Path, help="output directory (keep it private)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP of the SuperLink (repeatable); loopback names are always added",
    )
    p.add_argument("--days", type=int, default=365)

    p = commands.add_parser("keys", help="create SuperNode key pairs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("names", nargs="+", help="file names of the private keys")

    p = commands.add_parser("connection", help="write a SuperLink connection for `flwr`")
    p.add_argument("--name", required=True)
    p.add_argument("--address", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", type=Path, required=True, help="the CA certificate")
    p.add_argument("--default", action="store_true", help="make it the default connection")

    p = commands.add_parser("superlink", help="run a SuperLink with TLS and SuperNode auth")
    p.add_argument("--certs", required=True, type=Path, help="directory made by `certs`")
    _add_common_superlink(p)
    p.add_argument("--database", type=Path, help="SQLite state file (default: in memory)")
    p.add_argument("--no-auth", action="store_true", help="accept any SuperNode (TLS only)")
    p.add_argument("--threads", type=int, help="CPU threads of the ServerApp")

    p = commands.add_parser("register", help="register SuperNode public keys")
    p.add_argument("--connection", required=True)
    p.add_argument("public_keys", nargs="+", type=Path)

    p = commands.add_parser("supernode", help="run a SuperNode")
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", type=Path, help="CA certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (refused by TLS)")
    p.add_argument("--auth-key", type=Path, help="the node's private key")
    p.add_argument("--partition-id", type=int, required=True)
    p.add_argument("--num-partitions", type=int, required=True)
    p.add_argument("--data-dir", type=Path, help="data location")
    p.add_argument("--threads", type=int, help="CPU threads for training")
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port (loopback)")
    p.add_argument("--max-retries", type=int)

    p = commands.add_parser("run", help="flwr run against a connection; print the results")
    p.add_argument("--connection", required=True)
    p.add_argument("--app", type=Path, default=PROJECT_ROOT)
    p.add_argument("--run-name", required=True)
    p.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "results")
    p.add_argument("--run-config", "-c", action="append", default=[], help="KEY=VALUE (TOML value)")
    p.add_argument(
        "--remote", action="store_true", help="the SuperLink is elsewhere: skip reading results"
    )
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--quiet", action="store_true", help="do not echo the run's log stream")

    p = commands.add_parser("demo", help="everything on loopback (make deploy-demo)")
    p.add_argument("--workdir", type=Path, default=DEMO_WORKDIR)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--run-name", default="deploy-demo")
    p.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "results")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--stream", action="store_true", help="echo the run's log stream")

    p = commands.add_parser("check-wheels", help="download and report the Pi's aarch64 wheels")
    p.add_argument("packages", nargs="*", help="requirements (default: installed pins)")
    p.add_argument("--dest", type=Path, help="keep the wheels here")
    p.add_argument("--python-version", default="3.11")
    return parser


def _parse_pairs(pairs: Sequence[str]) -> dict[str, bool | int | float | str]:
    """Parse ``KEY=VALUE`` pairs with TOML values (bare words are strings)."""
    values: dict[str, bool | int | float | str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--run-config {pair!r}: expected KEY=VALUE")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


def _foreground(processes: Processes, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Run one long-lived Flower process in the foreground until it ends or a signal comes."""
    log = Path(tempfile.gettempdir()) / f"fedprune-{name}-{os.getpid()}.log"
    process = processes.start(name, argv, log=log, env=env, echo=True)
    console.print(f"{name} pid {process.pid}; Ctrl-C or SIGTERM stops it (log copy: {log})")
    return processes.wait(process)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m simulations.deploy``; returns the exit code."""
    args = _parser().parse_args(argv)
    processes = Processes(os.environ.get(TAG_ENV) or None)
    try:
        with ExitOnSignal():
            return _dispatch(args, processes)
    except (DeploymentError, ValueError) as err:  # ValueError: a bad option value
        console.print(f"[red]error:[/] {err}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every process started was stopped")
        return 128 + signal.SIGINT
    finally:
        left = processes.close()
        if left:
            console.print(f"[red]processes left behind: {left}")


def _dispatch(args: argparse.Namespace, processes: Processes) -> int:
    home = flwr_home()
    if args.command == "certs":
        paths = make_certificates(args.out, args.host, days=args.days)
        for path in (paths.ca_cert, paths.server_cert, paths.server_key, paths.ca_key):
            print(path)
        return 0
    if args.command == "keys":
        for name in args.names:
            key = make_node_key(args.out, name)
            print(key.private, key.public, sep="\n")
        return 0
    if args.command == "connection":
        print(
            write_connection(
                home,
                args.name,
                args.address,
                root_certificates=args.root_certificates,
                make_default=args.default,
            )
        )
        return 0
    if args.command == "superlink":
        certs = CertPaths(
            ca_cert=args.certs / "ca.crt",
            ca_key=args.certs / "ca.key",
            server_cert=args.certs / "server.pem",
            server_key=args.certs / "server.key",
        )
        argv = superlink_command(
            certs, host=args.host, port=args.port, auth=not args.no_auth, database=args.database
        )
        return _foreground(
            processes, "superlink", argv, {**flwr_env(home), **node_env(threads=args.threads)}
        )
    if args.command == "register":
        ids = register_keys(args.public_keys, args.connection, env=processes.env(flwr_env(home)))
        for key, node_id in zip(args.public_keys, ids, strict=True):
            print(f"{key}\t{node_id}")
        return 0
    if args.command == "supernode":
        if args.insecure == (args.root_certificates is not None):
            raise SystemExit("give exactly one of --root-certificates and --insecure")
        argv = supernode_command(
            superlink=args.superlink,
            root_certificates=args.root_certificates,
            private_key=args.auth_key,
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
            data_dir=args.data_dir,
            port=args.port,
            max_retries=args.max_retries,
        )
        env = {**flwr_env(home), **node_env(threads=args.threads, data_dir=args.data_dir)}
        return _foreground(processes, "supernode", argv, env)
    if args.command == "run":
        config = _parse_pairs(args.run_config)
        config["run-name"] = args.run_name
        config["results-dir"] = str(args.results_dir.resolve())
        log = Path(tempfile.gettempdir()) / f"fedprune-run-{os.getpid()}.log"
        result = flwr_run(
            processes,
            args.connection,
            env=flwr_env(home),
            log=log,
            run_config=config,
            app=args.app,
            check_results=not args.remote,
            timeout_s=args.timeout,
            echo=not args.quiet,
        )
        return _report(result, check_results=not args.remote)
    if args.command == "demo":
        result = demo(
            workdir=args.workdir,
            rounds=args.rounds,
            num_supernodes=args.supernodes,
            run_name=args.run_name,
            results_dir=args.results_dir,
            timeout_s=args.timeout,
            echo=args.stream,
        )
        code = _report(result, check_results=True)
        expected = args.rounds
        if code == 0 and len(result.rounds) != expected:
            console.print(f"[red]expected {expected} rounds, got {len(result.rounds)}")
            return 1
        return code
    if args.command == "check-wheels":
        packages = args.packages or installed_pins()
        found = check_aarch64_wheels(packages, dest=args.dest, python_version=args.python_version)
        for requirement, wheel in found.items():
            print(f"{requirement}\t{wheel}")
        return 0 if "?" not in found.values() else 1
    raise AssertionError(args.command)


def _report(result: RunResult, *, check_results: bool) -> int:
    """Print a run's results; return 0 if it completed (and wrote them, when checked)."""
    if check_results:
        print_results(result)
    ok = result.ok if check_results else result.status == COMPLETED
    if not ok:
        console.print(
            f"[red]run {result.run_id} {result.status}; results in {result.path}: "
            f"{'present' if result.summary else 'missing'}\n{tail(result.log, 25)}"
        )
        return 1
    console.print(f"[green]run {result.run_id} {result.status}[/]; results in {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
