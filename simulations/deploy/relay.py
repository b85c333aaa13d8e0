"""A byte-counting TCP relay on loopback: what a SuperNode's socket really carries.

A SuperNode connects to the relay instead of the SuperLink; the relay opens one connection to
the SuperLink per accepted connection and copies bytes both ways, untouched (TLS passes through
end to end, so the counts include TLS records, handshakes and HTTP headers). It records every
chunk it forwards with a timestamp, and every connection it accepts with the local port of its
upstream side (which is the client address the SuperLink logs for that connection).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Final, Literal

UP: Final = "up"
"""Node -> SuperLink."""
DOWN: Final = "down"
"""SuperLink -> node."""
_CHUNK: Final = 1 << 16


@dataclass(frozen=True)
class Chunk:
    """Bytes forwarded in one ``send``."""

    t: float
    """``time.time()`` when forwarded."""
    connection: int
    direction: Literal["up", "down"]
    size: int


@dataclass(frozen=True)
class Connection:
    """One accepted TCP connection (each one starts with a TLS handshake)."""

    id: int
    t: float
    upstream_port: int
    """Local port of the relay's connection to the SuperLink."""


@dataclass(frozen=True)
class Traffic:
    """Bytes and connections of one relay in a time window."""

    up: int
    down: int
    connections: int

    @property
    def total(self) -> int:
        """Bytes both ways."""
        return self.up + self.down


def _shut(*sockets: socket.socket) -> None:
    """Shut down (waking threads blocked in ``recv``) and close ``sockets``."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class CountingRelay:
    """Forward TCP from a loopback port to ``target``, counting every byte (threads).

    Parameters
    ----------
    target_host, target_port : str, int
        Where to forward (a loopback address).
    host : str
        Loopback address to listen on (port chosen free).

    Raises
    ------
    ValueError
        If either address is not a loopback address: the relay is a measuring device for one
        machine, never a proxy between machines.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        for name, value in (("target_host", target_host), ("host", host)):
            if not _loopback(value):
                raise ValueError(f"{name}={value!r} must be a loopback address")
        self.target = (target_host.strip("[]"), target_port)
        self._listener = socket.create_server((host.strip("[]"), 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.chunks: list[Chunk] = []
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``host:port`` for ``flower-supernode --superlink``."""
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = Connection(len(self.connections), time.time(), upstream.getsockname()[1])
                self.connections.append(conn)
                self._sockets += [client, upstream]
            done = threading.Barrier(2, action=functools.partial(_shut, client, upstream))
            for src, dst, direction in ((client, upstream, UP), (upstream, client, DOWN)):
                threading.Thread(
                    target=self._pump, args=(src, dst, conn.id, direction, done), daemon=True
                ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        conn: int,
        direction: Literal["up", "down"],
        done: threading.Barrier,
    ) -> None:
        """Copy ``src`` to ``dst``; pass a half-close on; close both when both ways ended."""
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
                with self._lock:
                    self.chunks.append(Chunk(time.time(), conn, direction, len(data)))
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _shut(src, dst)  # a reset: end the other direction too
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    def traffic(self, start: float = 0.0, end: float = float("inf")) -> Traffic:
        """Bytes forwarded and connections accepted with ``start <= t < end``."""
        with self._lock:
            chunks = [c for c in self.chunks if start <= c.t < end]
            conns = sum(start <= c.t < end for c in self.connections)
        return Traffic(
            up=sum(c.size for c in chunks if c.direction == UP),
            down=sum(c.size for c in chunks if c.direction == DOWN),
            connections=conns,
        )

    def upstream_ports(self) -> set[int]:
        """Local ports of every upstream connection so far."""
        with self._lock:
            return {c.upstream_port for c in self.connections}

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        _shut(*sockets)

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
