"""``python -m simulations.deploy <command>``: argparse subcommands."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from boundary import keepalive
from simulations.deploy.common import (
    COMPLETED,
    DEMO_WORKDIR,
    PROJECT_ROOT,
    TAG_ENV,
    DeploymentError,
    console,
)
from simulations.deploy.deployment import demo
from simulations.deploy.flower_cli import (
    flwr_env,
    flwr_home,
    flwr_run,
    node_env,
    register_keys,
    superlink_command,
    supernode_command,
    write_connection,
)
from simulations.deploy.processes import ExitOnSignal, Processes, tail
from simulations.deploy.results import RunResult, print_results
from simulations.deploy.tls import CertPaths, make_certificates, make_node_key
from simulations.deploy.wheels import check_aarch64_wheels, installed_pins


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
    p.set_defaults(func=_certs)

    p = commands.add_parser("keys", help="create SuperNode key pairs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("names", nargs="+", help="file names of the private keys")
    p.set_defaults(func=_keys)

    p = commands.add_parser("connection", help="write a SuperLink connection for `flwr`")
    p.add_argument("--name", required=True)
    p.add_argument("--address", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", type=Path, required=True, help="the CA certificate")
    p.add_argument("--default", action="store_true", help="make it the default connection")
    p.set_defaults(func=_connection)

    p = commands.add_parser("superlink", help="run a SuperLink with TLS and SuperNode auth")
    p.add_argument("--certs", required=True, type=Path, help="directory made by `certs`")
    _add_common_superlink(p)
    p.add_argument("--database", type=Path, help="SQLite state file (default: in memory)")
    p.add_argument("--no-auth", action="store_true", help="accept any SuperNode (TLS only)")
    p.add_argument("--threads", type=int, help="CPU threads of the ServerApp")
    _add_keep_alive(p)
    p.set_defaults(func=_superlink)

    p = commands.add_parser("register", help="register SuperNode public keys")
    p.add_argument("--connection", required=True)
    p.add_argument("public_keys", nargs="+", type=Path)
    p.set_defaults(func=_register)

    p = commands.add_parser("supernode", help="run a SuperNode")
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", type=Path, help="CA certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (refused by TLS)")
    p.add_argument("--auth-key", type=Path, help="the node's private key")
    p.add_argument("--partition-id", type=int, required=True)
    p.add_argument("--num-partitions", type=int, required=True)
    p.add_argument("--data-dir", type=Path, help="data location")
    p.add_argument("--threads", type=int, help="CPU threads for training")
    _add_keep_alive(p)
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port (loopback)")
    p.add_argument("--max-retries", type=int)
    p.set_defaults(func=_supernode)

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
    p.set_defaults(func=_run)

    p = commands.add_parser("demo", help="everything on loopback (make deploy-demo)")
    p.add_argument("--workdir", type=Path, default=DEMO_WORKDIR)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--run-name", default="deploy-demo")
    p.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "results")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--stream", action="store_true", help="echo the run's log stream")
    p.set_defaults(func=_demo)

    p = commands.add_parser("check-wheels", help="download and report the Pi's aarch64 wheels")
    p.add_argument("packages", nargs="*", help="requirements (default: installed pins)")
    p.add_argument("--dest", type=Path, help="keep the wheels here")
    p.add_argument("--python-version", default="3.11")
    p.set_defaults(func=_check_wheels)
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
            code: int = args.func(args, processes)
            return code
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


# -- one function per command: (parsed arguments, the processes to track) -> exit code ------


def _certs(args: argparse.Namespace, processes: Processes) -> int:
    paths = make_certificates(args.out, args.host, days=args.days)
    for path in (paths.ca_cert, paths.server_cert, paths.server_key, paths.ca_key):
        print(path)
    return 0


def _keys(args: argparse.Namespace, processes: Processes) -> int:
    for name in args.names:
        key = make_node_key(args.out, name)
        print(key.private, key.public, sep="\n")
    return 0


def _connection(args: argparse.Namespace, processes: Processes) -> int:
    print(
        write_connection(
            flwr_home(),
            args.name,
            args.address,
            root_certificates=args.root_certificates,
            make_default=args.default,
        )
    )
    return 0


def _add_keep_alive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=keepalive.DEFAULT_KEEP_ALIVE_S,
        help="keep idle HTTP connections this many seconds (boundary.keepalive; 0: Flower's 5 s)",
    )


def _superlink(args: argparse.Namespace, processes: Processes) -> int:
    certs = CertPaths(
        ca_cert=args.certs / "ca.crt",
        ca_key=args.certs / "ca.key",
        server_cert=args.certs / "server.pem",
        server_key=args.certs / "server.key",
    )
    argv = keepalive.command(
        superlink_command(
            certs, host=args.host, port=args.port, auth=not args.no_auth, database=args.database
        ),
        args.keep_alive,
    )
    env = {**flwr_env(flwr_home()), **node_env(threads=args.threads)}
    return _foreground(processes, "superlink", argv, env)


def _register(args: argparse.Namespace, processes: Processes) -> int:
    ids = register_keys(args.public_keys, args.connection, env=processes.env(flwr_env(flwr_home())))
    for key, node_id in zip(args.public_keys, ids, strict=True):
        print(f"{key}\t{node_id}")
    return 0


def _supernode(args: argparse.Namespace, processes: Processes) -> int:
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
    argv = keepalive.command(argv, args.keep_alive)
    env = {**flwr_env(flwr_home()), **node_env(threads=args.threads, data_dir=args.data_dir)}
    return _foreground(processes, "supernode", argv, env)


def _run(args: argparse.Namespace, processes: Processes) -> int:
    config = _parse_pairs(args.run_config)
    config["run-name"] = args.run_name
    config["results-dir"] = str(args.results_dir.resolve())
    log = Path(tempfile.gettempdir()) / f"fedprune-run-{os.getpid()}.log"
    result = flwr_run(
        processes,
        args.connection,
        env=flwr_env(flwr_home()),
        log=log,
        run_config=config,
        app=args.app,
        check_results=not args.remote,
        timeout_s=args.timeout,
        echo=not args.quiet,
    )
    return _report(result, check_results=not args.remote)


def _demo(args: argparse.Namespace, processes: Processes) -> int:
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
    if code == 0 and len(result.rounds) != args.rounds:
        console.print(f"[red]expected {args.rounds} rounds, got {len(result.rounds)}")
        return 1
    return code


def _check_wheels(args: argparse.Namespace, processes: Processes) -> int:
    packages = args.packages or installed_pins()
    found = check_aarch64_wheels(packages, dest=args.dest, python_version=args.python_version)
    for requirement, wheel in found.items():
        print(f"{requirement}\t{wheel}")
    return 0 if "?" not in found.values() else 1


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
