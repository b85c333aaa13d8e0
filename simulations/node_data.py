"""Write each node's data file on the workstation: ``python -m simulations.node_data``.

Runs the simulation's partitioner (needs the ``simulation`` extra: flwr-datasets) and writes
``node-<i>.npz`` per node (see :mod:`fedprune.node_data`); copy file ``i`` to node ``i`` and
start its SuperNode with ``--node-config 'data-path="/path/node-<i>.npz"'``. The partitioning
options must be the run's (``dataset``, ``partitioning``, ``alpha``, ``classes-per-client``,
``seed``); a node refuses a file made with others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedprune.data import DATASETS, PARTITION_SCHEMES
from fedprune.node_data import write_node_files


def main(argv: Sequence[str] | None = None) -> int:
    """Write the files and print one line per file: path, train and test examples, bytes."""
    p = argparse.ArgumentParser(prog="python -m simulations.node_data", description=__doc__)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--num-partitions", type=int, required=True, help="number of nodes")
    p.add_argument("--out", type=Path, required=True, help="directory for node-<i>.npz")
    p.add_argument("--partitioning", default="dirichlet", choices=PARTITION_SCHEMES)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--classes-per-client", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition-id", type=int, action="append", help="only this node (repeatable)")
    p.add_argument("--data-dir", type=Path, help="dataset root (see fedprune.data)")
    args = p.parse_args(argv)
    try:
        paths = write_node_files(
            args.dataset,
            args.num_partitions,
            args.out,
            partitioning=args.partitioning,
            alpha=args.alpha,
            classes_per_client=args.classes_per_client,
            seed=args.seed,
            partition_ids=args.partition_id,
            root=args.data_dir,
        )
    except ValueError as err:
        p.error(str(err))
    from fedprune.node_data import load_node_file

    for path in paths:
        node = load_node_file(path)
        print(f"{path}\ttrain={len(node.train)}\ttest={len(node.test)}\t{path.stat().st_size} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
