"""The README's `flwr run` command, as written: a real local SuperLink, stopped afterwards."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def superlinks() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "flower-superlink"], capture_output=True, text=True)
    # The script logs its SuperLink under $FLWR_HOME: other sessions' SuperLinks do not match.
    home = os.environ.get("FLWR_HOME", str(ROOT / ".flwr"))
    return [line for line in out.stdout.splitlines() if f"{home}/local-superlink/" in line]


def test_flwr_run_script_runs_the_app_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = (ROOT / "pyproject.toml").read_bytes()
    running = superlinks()
    done = subprocess.run(
        [
            str(ROOT / "simulations" / "flwr_run.sh"),
            "3",
            "--run-config",
            f"num-server-rounds=2 run-name='flwr-run-test' results-dir='{tmp_path}'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "flwr-run-test" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 3
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert (tmp_path / "flwr-run-test" / "model.npz").stat().st_size > 0
    assert (ROOT / "pyproject.toml").read_bytes() == before  # flwr did not rewrite it
    assert superlinks() == running  # the script stopped the SuperLink it started
