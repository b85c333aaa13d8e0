"""Tagged process supervision: start, log, stop by PID, signals, ports."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final

from simulations.deploy.common import TAG_ENV, DeploymentError, console


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
