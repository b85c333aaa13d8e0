"""The keep-alive launcher of the deployment: library defaults changed, Flower's code not."""

import subprocess
import sys

import pytest

from boundary import keepalive

PROBE = """
from boundary.keepalive import keep_alive
keep_alive(30)
import uvicorn
from flwr.supercore.protobuf.client import ProtobufClient
client = ProtobufClient("https://127.0.0.1:1")._client
print(client._transport._pool._keepalive_expiry, uvicorn.run.keywords["timeout_keep_alive"])
"""


def test_flowers_client_and_server_get_the_longer_keep_alive() -> None:
    """Flower's own HTTP client is built with the new limit; uvicorn.run gets the server's."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["30.0", "45"]


def test_command_by_hand() -> None:
    argv = ["/venv/bin/flower-supernode", "--superlink", "h:1"]
    assert keepalive.command(argv, None) == argv
    assert keepalive.command(argv, 60) == [
        sys.executable,
        "-m",
        "boundary.keepalive",
        "60",
        "flower-supernode",
        "--superlink",
        "h:1",
    ]
    with pytest.raises(ValueError, match="not a command this launcher runs"):
        keepalive.command(["flwr", "run"], 60)
    assert keepalive.command(argv, 0) == argv  # 0: Flower's defaults
    with pytest.raises(ValueError, match="must be > 0"):
        keepalive.command(argv, -1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [([], "usage"), (["60", "flwr"], "usage"), (["soon", "flower-superlink"], "a number")],
)
def test_main_refuses_bad_arguments(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        keepalive.main(argv)
