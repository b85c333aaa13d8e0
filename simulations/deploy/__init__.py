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

The package, one concern per module (each imports only the ones above it):

=================  ===========================================================================
``common``         constants, the console, :class:`DeploymentError`
``tls``            the CA, the server certificate, SuperNode key pairs
``processes``      tagged processes: start, log, stop by PID, signals, ports
``results``        a run's ``rounds.csv`` / ``summary.json`` and their tables
``flower_cli``     Flower's command lines and the ``flwr`` CLI (connections, register, run)
``deployment``     :class:`Deployment` (a SuperLink and SuperNodes here) and the loopback demo
``wheels``         the aarch64 wheels a Raspberry Pi needs
``cli``            argparse subcommands (``python -m simulations.deploy``)
=================  ===========================================================================
"""

from simulations.deploy.cli import main
from simulations.deploy.common import (
    COMPLETED,
    DATA_DIR_ENV,
    DEMO_WORKDIR,
    NODE_DATA_DIR_KEY,
    PROJECT_ROOT,
    TAG_ENV,
    DeploymentError,
)
from simulations.deploy.deployment import Deployment, demo, demo_run_config, prepare_workdir
from simulations.deploy.flower_cli import (
    flwr_cli,
    flwr_env,
    flwr_home,
    flwr_run,
    format_config,
    node_env,
    register_keys,
    run_status,
    superlink_command,
    supernode_command,
    wait_for_supernode,
    write_connection,
)
from simulations.deploy.processes import (
    ExitOnSignal,
    Processes,
    executable,
    free_port,
    tagged_pids,
    tail,
    venv_bin,
    wait_for_port,
)
from simulations.deploy.results import RunResult, print_results, read_results, results_tables
from simulations.deploy.tls import CertPaths, NodeKey, make_certificates, make_node_key
from simulations.deploy.wheels import check_aarch64_wheels, installed_pins

__all__ = [
    "COMPLETED",
    "DATA_DIR_ENV",
    "DEMO_WORKDIR",
    "NODE_DATA_DIR_KEY",
    "PROJECT_ROOT",
    "TAG_ENV",
    "CertPaths",
    "Deployment",
    "DeploymentError",
    "ExitOnSignal",
    "NodeKey",
    "Processes",
    "RunResult",
    "check_aarch64_wheels",
    "demo",
    "demo_run_config",
    "executable",
    "flwr_cli",
    "flwr_env",
    "flwr_home",
    "flwr_run",
    "format_config",
    "free_port",
    "installed_pins",
    "main",
    "make_certificates",
    "make_node_key",
    "node_env",
    "prepare_workdir",
    "print_results",
    "read_results",
    "register_keys",
    "results_tables",
    "run_status",
    "superlink_command",
    "supernode_command",
    "tagged_pids",
    "tail",
    "venv_bin",
    "wait_for_port",
    "wait_for_supernode",
    "write_connection",
]
