"""Checkpoints on disk without pickle: a flat state dict in one ``.npz``, written atomically.

A *state* is a flat mapping of ``/``-separated names to either a numpy array or a
JSON-serializable value (int, float, str, bool, None, lists and dicts of those). Arrays are
stored as ``.npz`` members; everything else goes into one JSON member. Loading uses
``np.load(allow_pickle=False)``, so object arrays are refused on the way in and on the way out.

A file is written to a temporary name in the same directory and renamed over the target
(``os.replace``): a process killed mid-write leaves the previous checkpoint intact.

Layout under ``<results-dir>/<run-name>/checkpoint/``::

    server.npz                          global model, mask, strategy state, history, RNG
    clients/partition-<i>/round-<r>.npz a node's state (error feedback, accountant, caches)
                                        after it trained round r; the newest two are kept
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_DIR = "checkpoint"
SERVER_FILE = "server.npz"
_META = "__meta__.json"
_ROUND_FILE = re.compile(r"round-(\d+)\.npz")
KEEP_CLIENT_STATES = 2
"""A node keeps the states of its two latest rounds: the server's checkpoint (round R) is at
most one round behind the node's newest state, so the state as of round R is always one of them.
"""


PROJECT_DIR_ENV = "FEDPRUNE_PROJECT_DIR"
"""A relative ``results-dir`` resolves against this directory when the variable is set (the
project's virtualenv sets it to the repository), else against the working directory: Flower's
managed SuperLink runs the app from wherever it was first started."""


def run_dir(results_dir: str | Path, run_name: str) -> Path:
    """Return ``<results-dir>/<run-name>``, a relative ``results-dir`` taken from the project.

    Parameters
    ----------
    results_dir : str or Path
        The run config's ``results-dir``; absolute, or relative to ``$FEDPRUNE_PROJECT_DIR``
        (the working directory when that is unset or empty).
    run_name : str
        The run config's ``run-name``.

    Returns
    -------
    Path
        Where the run's results and checkpoints live.
    """
    base = Path(results_dir)
    project = os.environ.get(PROJECT_DIR_ENV, "")
    if not base.is_absolute() and project:
        base = Path(project) / base
    return base / run_name


def checkpoint_dir(results_dir: str | Path, run_name: str) -> Path:
    """Return the checkpoint directory of a run."""
    return run_dir(results_dir, run_name) / CHECKPOINT_DIR


def client_state_dir(results_dir: str | Path, run_name: str, partition_id: int) -> Path:
    """Return the directory in which node ``partition_id`` keeps its per-round state."""
    return checkpoint_dir(results_dir, run_name) / "clients" / f"partition-{partition_id}"


def save_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (arrays as npz members, the rest as JSON).

    Parameters
    ----------
    path : str or Path
        Target file (``.npz``); its directory is created if needed.
    state : Mapping[str, Any]
        Flat state; values are numpy arrays or JSON-serializable.

    Raises
    ------
    ValueError
        If an array has dtype ``object`` or a name collides with the metadata member.
    TypeError
        If a non-array value is not JSON-serializable.
    """
    path = Path(path)
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    if _META in arrays:
        raise ValueError(f"state name {_META!r} is reserved")
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise ValueError(f"state {name!r} is an object array; only plain dtypes are stored")
    encoded = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    members: dict[str, Any] = {**arrays, _META: encoded}
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **members)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (no pickle).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a state file (not an npz archive, no or malformed metadata), or an
        array in it would need pickle.
    """
    try:
        data = np.load(Path(path), allow_pickle=False)
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a fedprune checkpoint: {err}") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a fedprune checkpoint (not an npz archive)")
    with data:
        if _META not in data.files:
            raise ValueError(f"{path} is not a fedprune checkpoint (no {_META})")
        try:
            state = json.loads(data[_META].tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a fedprune checkpoint: bad {_META}") from err
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a fedprune checkpoint: {_META} is not an object")
        state.update({name: data[name] for name in data.files if name != _META})
    return state


def nested(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Return the entries of ``state`` under ``prefix/``, with the prefix removed."""
    start = f"{prefix}/"
    return {k[len(start) :]: v for k, v in state.items() if k.startswith(start)}


def prefixed(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state`` with every name put under ``prefix/`` (inverse of :func:`nested`)."""
    return {f"{prefix}/{k}": v for k, v in state.items()}


def save_round_state(directory: str | Path, server_round: int, state: Mapping[str, Any]) -> None:
    """Write a node's state after ``server_round`` and keep only its newest states."""
    directory = Path(directory)
    save_state(directory / f"round-{server_round}.npz", state)
    for stale in sorted(_round_files(directory))[:-KEEP_CLIENT_STATES]:
        (directory / f"round-{stale}.npz").unlink(missing_ok=True)


def load_round_state(directory: str | Path, at_most: int) -> tuple[int, dict[str, Any]] | None:
    """Return the newest ``(round, state)`` in ``directory`` with round <= ``at_most``."""
    rounds = [r for r in _round_files(Path(directory)) if r <= at_most]
    if not rounds:
        return None
    newest = max(rounds)
    return newest, load_state(Path(directory) / f"round-{newest}.npz")


def clear_round_states(directory: str | Path, after: int = 0) -> None:
    """Remove a node's saved states of rounds after ``after`` (all: a fresh run of that name).

    On a resume after round R, the states of rounds > R belong to the attempt that died; left in
    place they could later be taken for the state of a round the resumed run trained.
    """
    for r in _round_files(Path(directory)):
        if r > after:
            (Path(directory) / f"round-{r}.npz").unlink(missing_ok=True)


def _round_files(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return [int(m.group(1)) for p in directory.iterdir() if (m := _ROUND_FILE.fullmatch(p.name))]
