"""A whole deployment on this machine, and the loopback demo."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from boundary import keepalive
from simulations.deploy.common import (
    DEMO_WORKDIR,
    PROJECT_ROOT,
    TAG_ENV,
    WORKDIR_MARKER,
    DeploymentError,
    console,
)
from simulations.deploy.flower_cli import (
    flwr_env,
    flwr_run,
    node_env,
    register_keys,
    superlink_command,
    supernode_command,
    wait_for_supernode,
    write_connection,
)
from simulations.deploy.processes import ExitOnSignal, Processes, free_port, tail, wait_for_port
from simulations.deploy.results import RunResult
from simulations.deploy.tls import CertPaths, NodeKey, make_certificates, make_node_key


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
    keep_alive_s : float, optional
        Run the SuperLink and SuperNodes through :mod:`boundary.keepalive`: idle HTTP
        connections are kept this long (``None``: Flower's 5 s).
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
        keep_alive_s: float | None = keepalive.DEFAULT_KEEP_ALIVE_S,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.keep_alive_s = keep_alive_s
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
        self,
        *,
        port: int | None = None,
        auth: bool = True,
        timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Create certificates, start the SuperLink, write the connection; return its address.

        ``env`` adds environment variables of the SuperLink (e.g. ``FLWR_LOG_LEVEL``).
        """
        if self.superlink is not None:
            raise DeploymentError("the SuperLink is already running")
        self.certs = make_certificates(self.workdir / "certs", [self.host])
        port = port or free_port(self.host)
        process = self.processes.start(
            "superlink",
            keepalive.command(
                superlink_command(self.certs, host=self.host, port=port, auth=auth),
                self.keep_alive_s,
            ),
            log=self.logs / "superlink.log",
            env=self.env(env),
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
        superlink: str | None = None,
        env: Mapping[str, str] | None = None,
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
        superlink : str, optional
            Address to connect to instead of the SuperLink's own (e.g. a
            :class:`~simulations.deploy.relay.CountingRelay` in front of it).
        env : Mapping[str, str], optional
            Extra environment of the SuperNode (and its ClientApps).

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
            superlink=superlink or self.address,
            root_certificates=self.certs.ca_cert if tls else None,
            private_key=None if key is None else key.private,
            partition_id=partition_id,
            num_partitions=num_partitions,
            data_dir=data_dir,
            port=free_port("127.0.0.1"),
            max_retries=max_retries,
        )
        extra = node_env(threads=self.threads, data_dir=data_dir) | dict(env or {})
        argv = keepalive.command(argv, self.keep_alive_s)
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
