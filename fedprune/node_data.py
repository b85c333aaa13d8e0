"""One deployed node's data, prepared off the device: a compact ``.npz`` file per node.

A simulation partitions each dataset in memory (:func:`fedprune.data.client_data`); a deployed
node (a Raspberry Pi) should not: loading the whole dataset and running the partitioner takes
hundreds of MB and brings Hugging Face ``datasets`` and pyarrow. Instead, on the workstation,
:func:`write_node_files` (``python -m simulations.node_data``) runs the simulation's partitioner
and writes, for each node ``i``, the ``uint8`` pixels and labels of

- ``train``: partition ``i`` of the train split, the rows :func:`~fedprune.data.client_data`
  gives partition ``i`` (same partitioner, arguments and order);
- ``test``: shard ``i`` of the held-out split, the rows the ClientApp evaluates on (an IID
  split of the test set with the run's seed);

with the per-channel ``scale``/``shift`` that turn pixels into the simulation's floats, and the
partitioning it was made with. A node given the file (node config ``data-path``) loads only that
(:func:`load_node_file`, ~26 MB for half of Fashion-MNIST) as :class:`~fedprune.data.ByteDataset`
and standardises examples as batches are drawn; :meth:`NodeDataInfo.check_run` refuses a file
made for another dataset, partitioning or seed than the run's.

The file holds only numeric arrays and one JSON string: it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedprune.data import ByteDataset, load_bytes, partition

__all__ = [
    "FORMAT",
    "NodeData",
    "NodeDataInfo",
    "load_node_file",
    "node_file_name",
    "read_info",
    "write_node_files",
]

FORMAT: Final = 1
"""Version of the file layout, stored in the file and checked on loading."""
_ARRAYS: Final = ("train_x", "train_y", "test_x", "test_y", "scale", "shift")


@dataclass(frozen=True)
class NodeDataInfo:
    """What a node data file was made from (stored in it as JSON)."""

    dataset: str
    partition_id: int
    num_partitions: int
    partitioning: str
    alpha: float
    classes_per_client: int
    seed: int
    num_classes: int

    def check_run(
        self,
        *,
        dataset: str,
        partitioning: str,
        alpha: float,
        classes_per_client: int,
        seed: int,
        source: str = "node data file",
    ) -> None:
        """Raise ``ValueError`` unless the file was made for this run's data settings.

        ``alpha`` is compared only for ``"dirichlet"``, ``classes_per_client`` only for
        ``"classes"`` (the other schemes ignore them).
        """
        expected: dict[str, Any] = {
            "dataset": dataset,
            "partitioning": partitioning,
            "seed": seed,
        }
        if partitioning == "dirichlet":
            expected["alpha"] = float(alpha)
        if partitioning == "classes":
            expected["classes-per-client"] = classes_per_client
        found = {
            "dataset": self.dataset,
            "partitioning": self.partitioning,
            "seed": self.seed,
            "alpha": self.alpha,
            "classes-per-client": self.classes_per_client,
        }
        wrong = [f"{k}={found[k]!r} (run: {v!r})" for k, v in expected.items() if found[k] != v]
        if wrong:
            raise ValueError(
                f"{source} was prepared with {', '.join(wrong)}; write it again with "
                "`python -m simulations.node_data` and the run's settings"
            )


@dataclass(frozen=True, eq=False)
class NodeData:
    """A node's data file, loaded: its info, training partition and evaluation shard."""

    info: NodeDataInfo
    train: ByteDataset
    test: ByteDataset


def node_file_name(partition_id: int) -> str:
    """Return the file name :func:`write_node_files` gives node ``partition_id``."""
    return f"node-{partition_id}.npz"


def write_node_files(
    dataset: str,
    num_partitions: int,
    out_dir: str | os.PathLike[str],
    *,
    partitioning: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    partition_ids: list[int] | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> list[Path]:
    """Write one data file per node (``node-<i>.npz`` in ``out_dir``).

    Parameters
    ----------
    dataset : str
        See :func:`fedprune.data.load_dataset`.
    num_partitions : int
        Number of nodes the train split is partitioned into.
    out_dir : str or os.PathLike
        Created if missing; existing files of the same names are replaced.
    partitioning, alpha, classes_per_client, seed
        As the run config's ``partitioning``, ``alpha``, ``classes-per-client`` and ``seed``
        (see :func:`fedprune.data.partition`).
    partition_ids : list of int, optional
        Write only these nodes' files (default: all ``num_partitions``).
    root, download
        See :func:`fedprune.data.load_dataset`.

    Returns
    -------
    list of Path
        The files written, in ``partition_ids`` order.
    """
    ids = list(range(num_partitions)) if partition_ids is None else list(partition_ids)
    bad = [i for i in ids if not 0 <= i < num_partitions]
    if bad:
        raise ValueError(f"partition ids {bad} not in [0, num_partitions={num_partitions})")
    train, test = load_bytes(dataset, root=root, download=download)
    parts = partition(
        train.y,
        num_partitions,
        scheme=partitioning,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )
    shards = partition(test.y, num_partitions, scheme="iid", seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pid in ids:
        info = NodeDataInfo(
            dataset=dataset,
            partition_id=pid,
            num_partitions=num_partitions,
            partitioning=partitioning,
            alpha=float(alpha),
            classes_per_client=int(classes_per_client),
            seed=int(seed),
            num_classes=train.num_classes,
        )
        # The same rows as client_data (sorted partition) and local_eval_data (shard order).
        node_train, node_test = train.subset(np.sort(parts[pid])), test.subset(shards[pid])
        path = out / node_file_name(pid)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez_compressed(
                f,
                info=np.array(json.dumps({"format": FORMAT, **asdict(info)})),
                train_x=node_train.x,
                train_y=_uint8_labels(node_train.y),
                test_x=node_test.x,
                test_y=_uint8_labels(node_test.y),
                scale=train.scale,
                shift=train.shift,
            )
        tmp.replace(path)
        written.append(path)
    return written


def read_info(path: str | os.PathLike[str]) -> NodeDataInfo:
    """Read only the info of a node data file (cheap: the arrays are not decompressed).

    Raises
    ------
    ValueError
        If the file is missing, not a node data file, or of another format version.
    """
    with _open(path) as npz:
        return _info(npz, str(path))


def load_node_file(path: str | os.PathLike[str]) -> NodeData:
    """Load a node data file, once per process (cached by path, size and modification time).

    Parameters
    ----------
    path : str or os.PathLike
        A file :func:`write_node_files` wrote.

    Returns
    -------
    NodeData
        Its info and ``uint8`` datasets (read-only arrays).

    Raises
    ------
    ValueError
        If the file is missing, malformed, or of another format version (named in the message).
    """
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError as err:
        raise ValueError(f"node data file {str(path)!r} cannot be read: {err}") from err
    return _load_cached(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: Path, size: int, mtime_ns: int) -> NodeData:
    source = str(path)
    with _open(path) as npz:
        info = _info(npz, source)
        missing = [name for name in _ARRAYS if name not in npz.files]
        if missing:
            raise ValueError(f"node data file {source!r} lacks arrays {missing}")
        arrays = {name: npz[name] for name in _ARRAYS}
    for name in ("train_y", "test_y"):
        if arrays[name].dtype != np.uint8:
            raise ValueError(f"node data file {source!r}: {name} must be uint8 labels")
    try:
        train, test = (
            ByteDataset(
                arrays[f"{split}_x"],
                arrays[f"{split}_y"].astype(np.int64),
                info.num_classes,
                info.dataset,
                arrays["scale"],
                arrays["shift"],
            )
            for split in ("train", "test")
        )
    except ValueError as err:
        raise ValueError(f"node data file {source!r}: {err}") from err
    for ds in (train, test):
        for a in (ds.x, ds.y):
            a.flags.writeable = False
    return NodeData(info, train, test)


def _open(path: str | os.PathLike[str]) -> Any:
    try:
        return np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"node data file {str(path)!r} cannot be read: {err}") from err


def _info(npz: Any, source: str) -> NodeDataInfo:
    if "info" not in npz.files:
        raise ValueError(f"{source!r} is not a node data file (no info)")
    try:
        raw: dict[str, Any] = json.loads(str(npz["info"]))
        version = raw.pop("format")
    except (ValueError, KeyError) as err:
        raise ValueError(f"{source!r}: unreadable node data info: {err}") from err
    if version != FORMAT:
        raise ValueError(
            f"{source!r} has node data format {version}, this version reads {FORMAT}; "
            "write it again with `python -m simulations.node_data`"
        )
    try:
        return NodeDataInfo(**raw)
    except TypeError as err:
        raise ValueError(f"{source!r}: unreadable node data info: {err}") from err


def _uint8_labels(y: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Return labels as ``uint8`` (the file's label type), refusing classes beyond 255."""
    if y.size and int(y.max()) > 255:
        raise ValueError("node data files store labels as uint8: at most 256 classes")
    return y.astype(np.uint8)
