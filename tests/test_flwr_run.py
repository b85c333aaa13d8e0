"""`flwr run` as the README shows it: plain `flwr run .`, and simulations/flwr_run.sh."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from fedprune.checkpoint import PROJECT_DIR_ENV, run_dir
from simulations.local_superlink import PORT_ENV, PTH_NAME, install, project_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER_VARS = (*project_env(ROOT), *PORT_ENV)


def clean_env(**extra: str) -> dict[str, str]:
    """A shell's environment before the project's venv sets anything."""
    env = {k: v for k, v in os.environ.items() if k not in FLOWER_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def superlinks(home: Path) -> dict[int, str]:
    out = subprocess.run(["pgrep", "-af", "flower-superlink"], capture_output=True, text=True)
    # Every SuperLink here logs under $FLWR_HOME/local-superlink/: other sessions' do not match.
    return {
        int(line.split()[0]): line
        for line in out.stdout.splitlines()
        if f"{home}/local-superlink/" in line
    }


def free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_pth_sets_the_project_env_without_overriding_the_shell(tmp_path: Path) -> None:
    install(tmp_path, root=Path("/srv/app"))
    assert (tmp_path / PTH_NAME).exists()
    probe = (
        "import json, os, site, sys; site.addsitedir(sys.argv[1]); "
        "print(json.dumps({k: os.environ.get(k) for k in sys.argv[2:]}))"
    )
    names = sorted(project_env(Path("/srv/app")))
    env = clean_env(FLWR_HOME="/mine")
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(tmp_path), *names],  # -S: not this venv's .pth
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {
        "FLWR_HOME": "/mine",  # set in the shell: kept
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        PROJECT_DIR_ENV: "/srv/app",
    }


def test_relative_results_dir_resolves_against_the_project(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(PROJECT_DIR_ENV, str(tmp_path))
    assert run_dir("results", "a") == tmp_path / "results" / "a"
    assert run_dir("/abs/r", "a") == Path("/abs/r/a")
    monkeypatch.setenv(PROJECT_DIR_ENV, "")
    assert run_dir("results", "a") == Path("results/a")


@pytest.mark.slow
def test_plain_flwr_run_uses_the_project_env_and_keeps_the_run(tmp_path: Path) -> None:
    """`flwr run .` with nothing exported: the venv's .pth is the whole set-up.

    The `flwr` process gets the .pth through `site.addsitedir` (what the venv's site-packages
    does at start-up); Flower's managed SuperLink inherits that environment. Only the ports and
    FLWR_HOME are the test's own (other sessions share this machine); the results directory is
    relative, and `flwr` starts in another directory than the project.
    """
    site_dir, home, project, elsewhere = (tmp_path / d for d in ("site", "home", "proj", "cwd"))
    for d in (site_dir, elsewhere):
        d.mkdir()
    install(site_dir, root=project)
    port = free_port()
    env = clean_env(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=port,
        FLWR_LOCAL_CONTROL_API_PORT=port,
        OMP_NUM_THREADS="1",
    )
    # -S, then the test's .pth before this venv's site-packages: a .pth the venv itself holds
    # (`make venv` installs one) would otherwise set the same variables first.
    flwr = [
        sys.executable,
        "-S",
        "-c",
        "import site, sys; site.addsitedir(sys.argv.pop(1)); site.addsitedir(sys.argv.pop(1)); "
        "from flwr.cli.app import app; sys.argv[0] = 'flwr'; sys.exit(app())",
        str(site_dir),
        sysconfig.get_paths()["purelib"],
    ]
    before = (ROOT / "pyproject.toml").read_bytes()
    try:
        done = subprocess.run(
            [*flwr, "run", str(ROOT), "--stream", "--run-config",
             "num-server-rounds=1 run-name='plain'"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((project / "results" / "plain" / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["num_clients"] == 2  # Flower's default
        assert not (elsewhere / "results").exists()
        (pid, line), *others = superlinks(home).items()
        assert not others and "--database" in line
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in environ
        assert not (home / "runtime-envs").exists()  # nothing was installed per run
        # The run is kept: after the SuperLink stops, `flwr list` starts it again from its
        # database and still lists the run; `flwr log` shows its log.
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if pid not in superlinks(home):
                break
            time.sleep(0.1)
        listed = subprocess.run(
            [*flwr, "list", "--format", "json"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        runs = json.loads(listed.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"]
        log = subprocess.run(
            [*flwr, "log", runs[0]["run-id"], "--show"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "round 1: test accuracy" in log.stdout
    finally:
        for pid in superlinks(home):
            os.killpg(pid, signal.SIGTERM)  # started detached: its own process group
    assert (ROOT / "pyproject.toml").read_bytes() == before  # flwr did not rewrite it


@pytest.mark.slow
def test_flwr_run_script_runs_the_app_and_leaves_the_run_listed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_env(FLWR_HOME=str(home), OMP_NUM_THREADS="1")
    # Not Flower's managed SuperLink: a port nobody serves, so the script starts its own.
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = env["FLWR_LOCAL_CONTROL_API_PORT"] = free_port()
    done = subprocess.run(
        [
            str(ROOT / "simulations" / "flwr_run.sh"),
            "3",
            "--run-config",
            f"num-server-rounds=2 run-name='flwr-run-test' results-dir='{tmp_path}'",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "flwr-run-test" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 3
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert (tmp_path / "flwr-run-test" / "model.npz").stat().st_size > 0
    assert superlinks(home) == {}  # the script stopped the SuperLink it started
    assert (home / "local-superlink" / "state.db").stat().st_size > 0  # the run is kept
