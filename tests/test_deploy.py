"""Real deployment over loopback: TLS SuperLink with SuperNode auth, SuperNodes, ``flwr run``.

No mocks: the SuperLink, the SuperNodes and the ``flwr`` CLI are the real Flower processes,
talking HTTPS on 127.0.0.1 with ports chosen free at run time. Every test checks that no process
of its deployment (found by the deployment's environment tag) is left behind.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from simulations import deploy
from simulations.deploy import Deployment, DeploymentError, tagged_pids

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 2


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _assert_nothing_left(tag: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [(pid, _cmdline(pid)) for pid in left]


# -- certificates, keys, config files (fast) --------------------------------------------------


def test_certificates_name_the_host_and_loopback(tmp_path: Path) -> None:
    paths = deploy.make_certificates(tmp_path / "certs", ["superlink.example", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3",
        "127.0.0.1",
        "::1",
    }
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (paths.server_key, paths.ca_key):
        assert secret.stat().st_mode & 0o077 == 0


def test_node_keys_load_as_flower_loads_them(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = deploy.make_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(key.public)
    assert key.private.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="plain file name"):
        deploy.make_node_key(tmp_path, "../escape")


def test_write_connection_keeps_other_entries(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    deploy.write_connection(tmp_path, "lab", "127.0.0.1:9093", root_certificates=tmp_path / "ca")
    document = tomllib.loads(config.read_text())
    assert document["superlink"]["default"] == "local"
    assert document["superlink"]["local"] == {"address": ":local:"}
    assert document["superlink"]["lab"] == {
        "address": "127.0.0.1:9093",
        "root-certificates": str((tmp_path / "ca").resolve()),
    }
    deploy.write_connection(tmp_path, "lab", "h:1", root_certificates=None, make_default=True)
    document = tomllib.loads(config.read_text())
    assert document["superlink"]["lab"] == {"address": "h:1", "insecure": True}
    assert document["superlink"]["default"] == "lab"


def test_config_strings_and_commands() -> None:
    assert (
        deploy.format_config({"a": 1, "b": 0.5, "c": True, "d": "x y"})
        == 'a=1 b=0.5 c=true d="x y"'
    )
    with pytest.raises(ValueError):
        deploy.format_config({"bad key": 1})
    argv = deploy.supernode_command(
        superlink="127.0.0.1:1",
        root_certificates=None,
        private_key=None,
        partition_id=1,
        num_partitions=2,
        data_dir="/data/fm",
        port=5,
    )
    assert "--insecure" in argv
    assert argv[argv.index("--node-config") + 1] == (
        'partition-id=1 num-partitions=2 data-dir="/data/fm"'
    )
    with pytest.raises(ValueError):
        deploy.supernode_command(
            superlink="h:1",
            root_certificates=None,
            private_key=None,
            partition_id=2,
            num_partitions=2,
        )
    assert deploy.node_env(threads=2)["OMP_NUM_THREADS"] == "2"


# -- a real deployment ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """SuperLink (TLS + SuperNode auth) and 2 registered, connected SuperNodes."""
    work = tmp_path_factory.mktemp("deploy")
    deployment = Deployment(work, grace_s=5.0)
    with deployment:
        deployment.start_superlink()
        keys = [deployment.new_node_key(f"node-{i}") for i in range(2)]
        node_ids = deployment.register(keys)
        assert len(set(node_ids)) == 2
        connected = [
            deployment.start_supernode(key.name, key=key, partition_id=i, num_partitions=2)
            for i, key in enumerate(keys)
        ]
        assert sorted(connected) == sorted(node_ids)
        yield deployment
    _assert_nothing_left(deployment.tag)


@pytest.mark.slow
def test_superlink_speaks_tls_only(loopback: Deployment) -> None:
    assert loopback.address is not None and loopback.certs is not None
    host, port = loopback.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(loopback.certs.ca_cert))
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # plain HTTP
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not sock.recv(64).startswith(b"HTTP/1.1")


@pytest.mark.slow
def test_tls_auth_run_writes_results(loopback: Deployment, tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    # Flower's processes inherit the tag: the SuperNodes' SuperExecs carry it too.
    assert sum("flower-superexec" in _cmdline(pid) for pid in tagged_pids(loopback.tag)) >= 3
    result = loopback.run(
        deploy.demo_run_config(ROUNDS, 2), run_name="tls-auth", results_dir=tmp_path
    )
    assert result.status == deploy.COMPLETED, deploy.tail(result.log)
    assert result.ok
    assert [row["round"] for row in result.rounds] == [str(r) for r in range(1, ROUNDS + 1)]
    assert result.summary["num_clients"] == 2
    assert result.summary["rounds"] == ROUNDS
    assert all(int(row["bytes_up"]) > 0 for row in result.rounds)
    assert (tmp_path / "tls-auth" / "summary.json").exists()
    assert hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() == (
        hashlib.sha256(pyproject).hexdigest()
    ), "flwr run rewrote pyproject.toml"
    tables = deploy.results_tables(result)
    assert tables[0].row_count == ROUNDS


@pytest.mark.slow
def test_failed_run_is_reported(loopback: Deployment, tmp_path: Path) -> None:
    config = deploy.demo_run_config(1, 2) | {"reconcile-rule": "no-such-rule"}
    result = loopback.run(config, run_name="bad", results_dir=tmp_path)
    assert result.status.startswith("finished:") and result.status != deploy.COMPLETED
    assert not result.ok
    assert not (tmp_path / "bad" / "summary.json").exists()


@pytest.mark.slow
def test_supernode_without_tls_cannot_connect(loopback: Deployment) -> None:
    before = set(tagged_pids(loopback.tag))
    with pytest.raises(DeploymentError, match="Failed to initialize the connection"):
        loopback.start_supernode(
            "plain", key=None, partition_id=0, num_partitions=2, tls=False, max_retries=1
        )
    assert set(tagged_pids(loopback.tag)) <= before  # its SuperExec was stopped too


@pytest.mark.slow
def test_unregistered_key_is_rejected(loopback: Deployment) -> None:
    stranger = loopback.new_node_key("stranger")
    before = set(tagged_pids(loopback.tag))
    with pytest.raises(DeploymentError, match="Failed to activate SuperNode"):
        loopback.start_supernode(
            "stranger", key=stranger, partition_id=0, num_partitions=2, max_retries=1
        )
    assert set(tagged_pids(loopback.tag)) <= before


@pytest.mark.slow
def test_supernode_without_key_is_rejected(loopback: Deployment) -> None:
    with pytest.raises(DeploymentError, match="must be registered via the CLI"):
        loopback.start_supernode("keyless", key=None, partition_id=0, num_partitions=2)


# -- cleanup on failure and on signals --------------------------------------------------------


@pytest.mark.slow
def test_processes_stopped_when_the_block_fails(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, grace_s=5.0)
    with pytest.raises(RuntimeError, match="boom"), deployment:
        deployment.start_superlink()
        pids = tagged_pids(deployment.tag)
        assert len(pids) >= 2  # the SuperLink and its SuperExec (a new session)
        raise RuntimeError("boom")
    _assert_nothing_left(deployment.tag, timeout_s=0.5)
    assert not any(Path(f"/proc/{pid}").exists() and deploy.processes._alive(pid) for pid in pids)


@pytest.mark.slow
def test_cli_superlink_stops_everything_on_sigterm(tmp_path: Path) -> None:
    certs = deploy.make_certificates(tmp_path / "certs", ["127.0.0.1"])
    port = deploy.free_port()
    tag = f"test-{tmp_path.name}-{port}"
    env = {
        **deploy.flwr_env(tmp_path / "home"),
        "PATH": f"{deploy.venv_bin()}:/usr/bin:/bin",
        deploy.TAG_ENV: tag,
    }
    argv = [sys.executable, "-m", "simulations.deploy", "superlink"]
    argv += ["--certs", str(certs.ca_cert.parent), "--host", "127.0.0.1", "--port", str(port)]
    cli = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deploy.wait_for_port("127.0.0.1", port, cli, timeout_s=60)
        deadline = time.monotonic() + 30
        while len(tagged_pids(tag)) < 3 and time.monotonic() < deadline:  # CLI, link, exec
            time.sleep(0.2)
        assert len(tagged_pids(tag)) >= 3
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 128 + signal.SIGTERM
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    _assert_nothing_left(tag)


@pytest.mark.slow
def test_cli_run_fails_without_a_superlink(tmp_path: Path) -> None:
    env = {**deploy.flwr_env(tmp_path / "home"), "PATH": f"{deploy.venv_bin()}:/usr/bin:/bin"}
    deploy.write_connection(
        tmp_path / "home", "gone", f"127.0.0.1:{deploy.free_port()}", root_certificates=None
    )
    argv = [sys.executable, "-m", "simulations.deploy", "run", "--connection", "gone"]
    argv += ["--run-name", "x", "--results-dir", str(tmp_path), "--timeout", "120", "--quiet"]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "flwr run" in result.stderr


@pytest.mark.slow
def test_client_memory_probe_measures_one_round() -> None:
    from simulations.client_memory import measure_client_memory

    measured = measure_client_memory("digits", "mlp", threads=1)
    assert measured.num_examples > 0
    # The round itself (data, model, training) costs memory beyond the imports, and the whole
    # client stays far below what a 2 GB Pi could not hold even with the CUDA build of torch.
    assert 0 < measured.imports_mb < measured.peak_mb < 2048
    assert measured.train_s > 0


def test_a_bad_option_value_is_an_error_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["supernode", "--superlink", "127.0.0.1:9092", "--insecure"]
    assert deploy.main([*argv, "--partition-id", "5", "--num-partitions", "2"]) == 1
    assert "error: partition_id=5 not in [0, 2)" in capsys.readouterr().err
