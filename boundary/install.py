"""The install guard: the ServerApp and every node must run the same installed fedprune.

The app bundle (FAB) Flower ships to each SuperNode holds only the entry points
(``fedprune_app``); the code itself is the ``fedprune`` distribution installed on each machine
(``pip install .`` on a node, the editable install of ``make venv``). So that a node with an
older or edited install cannot take part unnoticed, the ServerApp puts its install's identity
(:func:`install_id`: version and a digest of the code) into the config of a round's messages
while some connected node has not yet replied successfully (:class:`InstallGuard`); each node
compares it with its own (:func:`install_guard_mod`) and, if they differ, fails the message with
:class:`InstallMismatch`, whose text names both installs. The ServerApp turns such a reply into
an error of the run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Final

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedprune import keys

DISTRIBUTION: Final = "fedprune"
"""The distribution (``pyproject.toml``'s ``[project].name``) the apps come from."""
APP_PACKAGES: Final = ("fedprune", "boundary", "strategies", "clients")
"""The packages the ServerApp and the ClientApp import; their code makes the digest."""
DIGEST_CHARS: Final = 16
"""Hex characters of the sha256 digest kept (64 bits: a mismatch, not an attack, is the threat)."""
MISMATCH: Final = "fedprune install mismatch"
"""How a node's error starts; Flower passes the text on in the error reply (not the class)."""


class InstallMismatch(RuntimeError):
    """A node's installed fedprune is not the ServerApp's."""


def package_dirs(names: Iterable[str] = APP_PACKAGES) -> dict[str, Path]:
    """Return the directory each of ``names`` is imported from (without importing it).

    Raises
    ------
    ModuleNotFoundError
        If a package is not installed.
    """
    found = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"package {name!r} is not installed", name=name)
        found[name] = Path(next(iter(spec.submodule_search_locations)))
    return found


def code_digest(dirs: Mapping[str, Path]) -> str:
    """Return the sha256 (hex, :data:`DIGEST_CHARS` long) of the ``.py`` files under ``dirs``.

    Every file's package-relative path and bytes enter the hash, in sorted order, so the digest
    is the same wherever the packages are installed and changes with any edit, added or removed
    file; byte-code caches are not read.
    """
    sha = hashlib.sha256()
    for name in sorted(dirs):
        root = dirs[name]
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            relative = f"{name}/{path.relative_to(root).as_posix()}"
            sha.update(f"{relative}\0{path.stat().st_size}\0".encode())
            sha.update(path.read_bytes())
    return sha.hexdigest()[:DIGEST_CHARS]


def installed_version() -> str:
    """Return the installed distribution's version (``"unknown"`` when it has no metadata)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@cache
def install_id() -> str:
    """Return this process's install identity: ``"<version> code <digest>"`` (computed once)."""
    return f"{installed_version()} code {code_digest(package_dirs())}"


def check_install(config: ConfigRecord, own: str | None = None) -> None:
    """Fail when ``config`` carries another install identity than this node's.

    Parameters
    ----------
    config : ConfigRecord
        A message's config; without :data:`fedprune.keys.INSTALL` nothing is checked.
    own : str, optional
        This node's identity (default: :func:`install_id`).

    Raises
    ------
    InstallMismatch
        If the identities differ.
    ValueError
        If the key holds something other than a string.
    """
    if keys.INSTALL not in config:
        return
    theirs = config[keys.INSTALL]
    if not isinstance(theirs, str):
        raise ValueError(f"'{keys.INSTALL}' must be a string, got {theirs!r}")
    mine = install_id() if own is None else own
    if theirs != mine:
        raise InstallMismatch(
            f"{MISMATCH}: this node's installed {DISTRIBUTION} ({mine}) differs from the "
            f"ServerApp's ({theirs}): install the same {DISTRIBUTION} on every node and the server "
            f"(pip install of one commit), then restart the SuperNode"
        )


def install_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: run :func:`check_install` on every message's config, then the app."""
    if msg.has_content() and keys.CONFIG in msg.content.config_records:
        check_install(msg.content.config_records[keys.CONFIG])
    return call_next(msg, context)


class InstallGuard:
    """Server side: which nodes still need the install identity, and their verdicts.

    Parameters
    ----------
    own : str, optional
        The ServerApp's identity (default: :func:`install_id`).
    """

    def __init__(self, own: str | None = None) -> None:
        self.own = install_id() if own is None else own
        self.confirmed: set[int] = set()

    def stamp(self, config: ConfigRecord, node_ids: Iterable[int]) -> ConfigRecord:
        """Return ``config`` with the identity added while any of ``node_ids`` is unconfirmed.

        Every message of a round shares one config, so the identity goes to all of them in a
        round in which some connected node has not replied successfully yet (the first round,
        and any round a new node may join): each node's first message carries it.
        """
        if set(node_ids) <= self.confirmed:
            return config
        stamped = ConfigRecord(dict(config))
        stamped[keys.INSTALL] = self.own
        return stamped

    def confirm(self, replies: Iterable[Message]) -> None:
        """Record the nodes that replied successfully; fail on a node's install mismatch.

        Raises
        ------
        InstallMismatch
            If a reply's error says the node's install differs (the run cannot be trusted).
        """
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error():
                self.confirmed.add(node)
            elif MISMATCH in (reply.error.reason or ""):
                raise InstallMismatch(f"node {node}: {reply.error.reason}")
