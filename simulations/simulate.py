"""Run one configuration in Flower's Ray-backed simulation engine, in this process.

``flwr run .`` is the user-facing way to run the app (see the README). The harness and the tests
use this in-process entry instead, because it hands back the measured :class:`RunSummary` and
lets a progress bar follow the rounds; the ServerApp and ClientApp are the same objects that
``flwr run`` loads, built around a fixed :class:`RunConfig` instead of ``context.run_config``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from clients.client_app import make_client_app
from fedprune.config import RunConfig
from fedprune.results import RunSummary
from strategies.accounting import RoundTraffic
from strategies.server_app import make_server_app

RAY_ADDRESS_ENV = "RAY_ADDRESS"
"""Ray's own variable: when set (``host:port`` of a cluster's head), the simulation joins that
cluster and uses its CPUs instead of starting Ray on this machine alone."""


def backend_config(num_cpus: int | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Ray backend settings: one CPU per virtual client, all of this machine's cores.

    With ``$RAY_ADDRESS`` set, Ray joins that cluster (``ray start --head`` / ``ray start
    --address``) and the cluster's resources count; ``num_cpus`` must then be ``None``. With
    ``quiet`` the ClientApp actors' logs are not forwarded to this process (errors still reach
    the server as error replies and are logged there).

    Raises
    ------
    ValueError
        If ``num_cpus`` is given while ``$RAY_ADDRESS`` names a cluster.
    """
    init_args: dict[str, Any] = {"include_dashboard": False}
    address = os.environ.get(RAY_ADDRESS_ENV, "")
    if address:
        if num_cpus is not None:
            raise ValueError(
                f"num_cpus={num_cpus}: with {RAY_ADDRESS_ENV}={address} the cluster sets the CPUs"
            )
        init_args["address"] = address
    else:
        init_args["num_cpus"] = num_cpus or os.cpu_count() or 1
    if quiet:
        init_args["log_to_driver"] = False
    return {"init_args": init_args, "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def simulate(
    cfg: RunConfig,
    *,
    num_supernodes: int,
    on_round_end: Callable[[RoundTraffic], None] | None = None,
    num_cpus: int | None = None,
    quiet: bool = False,
    client_app: ClientApp | None = None,
) -> RunSummary:
    """Run ``cfg`` on ``num_supernodes`` virtual SuperNodes and return what was measured.

    Results are also written to ``<cfg.results_dir>/<cfg.run_name>/``. ``client_app``
    replaces the fedprune ClientApp (e.g. :func:`simulations.faults.make_faulty_client_app`).
    """
    if num_supernodes < cfg.min_train_nodes:
        raise ValueError(
            f"num_supernodes={num_supernodes} is below min-train-nodes={cfg.min_train_nodes}"
        )
    # Keep Ray from warning, on every run, about a GPU setting of a future release.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    summaries: list[RunSummary] = []
    server_app = make_server_app(cfg, on_round_end=on_round_end, on_done=summaries.append)
    run_simulation(
        server_app=server_app,
        client_app=client_app or make_client_app(cfg),
        num_supernodes=num_supernodes,
        backend_config=backend_config(num_cpus, quiet=quiet),
    )
    if not summaries:
        raise RuntimeError(f"run {cfg.run_name!r} ended without a result; see the log above")
    return summaries[0]
