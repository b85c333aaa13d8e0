"""The install guard: a node whose installed fedprune is not the ServerApp's fails, clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from boundary.install import (
    APP_PACKAGES,
    DIGEST_CHARS,
    MISMATCH,
    InstallGuard,
    InstallMismatch,
    check_install,
    code_digest,
    install_id,
    installed_version,
    package_dirs,
)
from clients.client_app import make_client_app
from fedprune import keys
from simulations import deploy
from simulations.deploy import Deployment
from simulations.grid import server_task_identity

OTHER = "0.0.9 code 0123456789abcdef"


@pytest.fixture(autouse=True)
def _task_identity():  # Flower's Message() needs a run id outside a run
    with server_task_identity():
        yield


def _copy_install(target: Path) -> dict[str, Path]:
    """Copy the installed app packages (code only) under ``target``; return their dirs."""
    dirs = {}
    for name, source in package_dirs().items():
        shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        dirs[name] = target / name
    return dirs


def test_digest_depends_on_the_code_not_on_where_it_is_installed(tmp_path: Path) -> None:
    installed = code_digest(package_dirs())
    copy = _copy_install(tmp_path / "site")
    assert set(copy) == set(APP_PACKAGES)
    assert len(installed) == DIGEST_CHARS and int(installed, 16) >= 0
    assert code_digest(copy) == installed
    (copy["fedprune"] / "__pycache__").mkdir(exist_ok=True)
    (copy["fedprune"] / "__pycache__" / "x.py").write_text("stale = 1\n")
    assert code_digest(copy) == installed  # byte-code caches do not count
    init = copy["fedprune"] / "__init__.py"
    init.write_text(init.read_text() + "\n# edited\n")
    edited = code_digest(copy)
    assert edited != installed
    (copy["clients"] / "extra.py").write_text("")
    assert code_digest(copy) not in (installed, edited)  # an added (even empty) file counts
    assert install_id() == f"{installed_version()} code {installed}"


def test_check_passes_without_the_key_or_with_the_same_install() -> None:
    check_install(ConfigRecord())
    check_install(ConfigRecord({keys.INSTALL: install_id()}))
    check_install(ConfigRecord({keys.INSTALL: OTHER}), own=OTHER)


def test_a_different_install_is_an_error_naming_both() -> None:
    with pytest.raises(InstallMismatch) as err:
        check_install(ConfigRecord({keys.INSTALL: OTHER}))
    text = str(err.value)
    assert text.startswith(MISMATCH)
    assert f"({install_id()}) differs from the ServerApp's ({OTHER})" in text
    with pytest.raises(ValueError, match=keys.INSTALL):
        check_install(ConfigRecord({keys.INSTALL: 3}))


def test_the_client_app_refuses_a_message_from_another_install() -> None:
    app = make_client_app()
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    config = ConfigRecord({keys.INSTALL: OTHER, keys.SERVER_ROUND: 1})
    message = Message(RecordDict({keys.CONFIG: config}), dst_node_id=7, message_type="train")
    with pytest.raises(InstallMismatch, match=MISMATCH):
        app(message, context)


def _message(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def test_server_stamps_rounds_until_every_connected_node_replied() -> None:
    guard = InstallGuard(own="1.0 code abc")
    base = ConfigRecord({keys.RESUMED_FROM: 0})
    stamped = guard.stamp(base, [1, 2])
    assert stamped[keys.INSTALL] == "1.0 code abc" and keys.INSTALL not in base
    ok = Message(RecordDict(), reply_to=_message(1))
    failed = Message(Error(code=0, reason="node crashed"), reply_to=_message(2))
    guard.confirm([ok, failed])  # an ordinary failure confirms nothing and is no mismatch
    assert guard.confirmed == {1}
    assert keys.INSTALL in guard.stamp(base, [1, 2])
    guard.confirm([Message(RecordDict(), reply_to=_message(2))])
    assert guard.stamp(base, [1, 2]) is base  # every node confirmed: nothing extra on the wire
    assert keys.INSTALL in guard.stamp(base, [1, 2, 3])  # a node joined


def test_server_fails_the_run_on_a_node_reporting_a_mismatch() -> None:
    guard = InstallGuard(own="1.0 code abc")
    reason = f"<class 'boundary.install.InstallMismatch'>:<'{MISMATCH}: this node's ...'>"
    reply = Message(Error(code=2, reason=reason), reply_to=_message(5))
    with pytest.raises(InstallMismatch, match=f"node 5: .*{MISMATCH}"):
        guard.confirm([reply])


@pytest.mark.slow
def test_a_node_with_another_install_fails_the_deployed_run(tmp_path: Path) -> None:
    """A real deployment (TLS, SuperNode auth): node-1 runs an edited copy of the packages."""
    stale = _copy_install(tmp_path / "stale")
    init = stale["fedprune"] / "__init__.py"
    init.write_text(init.read_text() + "\n# an older install\n")
    with Deployment(tmp_path / "deploy", grace_s=5.0) as deployment:
        deployment.start_superlink()
        keys_ = [deployment.new_node_key(f"node-{i}") for i in range(2)]
        deployment.register(keys_)
        for i, key in enumerate(keys_):
            env = {"PYTHONPATH": str(tmp_path / "stale")} if i == 1 else {}
            deployment.start_supernode(key.name, key=key, partition_id=i, num_partitions=2, env=env)
        result = deployment.run(
            deploy.demo_run_config(1, 2), run_name="stale", results_dir=tmp_path / "results"
        )
        node_log = (deployment.logs / "node-1.log").read_text(errors="replace")
    assert not result.ok and result.status != deploy.COMPLETED
    assert MISMATCH in node_log and "differs from the ServerApp's" in node_log
    run_log = result.log.read_text(errors="replace")
    assert "InstallMismatch" in run_log and MISMATCH in run_log
