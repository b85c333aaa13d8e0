"""The byte-counting relay and the wire bench, on real loopback sockets and a real deployment."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from simulations.bench_wire import (
    BEST_ROW,
    FEDAVG,
    fab_size,
    read_requests,
    run_config,
    wire_bench,
)
from simulations.deploy.relay import CountingRelay


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data + b"!")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _wait_for(relay: CountingRelay, up: int, down: int) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        traffic = relay.traffic()
        if traffic.up >= up and traffic.down >= down:
            return
        time.sleep(0.01)


def test_relay_counts_every_byte_both_ways_and_each_connection() -> None:
    server, _ = _echo_server()
    try:
        with CountingRelay("127.0.0.1", server.getsockname()[1]) as relay:
            t0 = time.time()
            for size in (1, 1000, 70_000):
                with socket.create_connection(("127.0.0.1", relay.port)) as sock:
                    sock.sendall(b"x" * size)
                    sock.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := sock.recv(1 << 16):
                        got += chunk
                assert got.replace(b"!", b"") == b"x" * size
            up = 1 + 1000 + 70_000
            _wait_for(relay, up, up + 3)
            traffic = relay.traffic()
            assert traffic.up == up
            # The echo server appends one "!" per recv: at least one per connection.
            assert traffic.down >= up + 3
            assert traffic.connections == 3
            assert relay.traffic(t0 - 10, t0).total == 0
            assert len(relay.upstream_ports()) == 3
    finally:
        server.close()


def test_relay_refuses_anything_but_loopback() -> None:
    with pytest.raises(ValueError, match="target_host"):
        CountingRelay("192.0.2.1", 9093)
    with pytest.raises(ValueError, match="host"):
        CountingRelay("127.0.0.1", 9093, host="0.0.0.0")


def test_access_lines_are_parsed(tmp_path: Path) -> None:
    log = tmp_path / "superlink.log"
    log.write_text(
        "noise\n"
        '2026-11-29T15:05:23.526Z DEBUG [uvicorn.access] 127.0.0.1:54014 - "POST '
        '/v1/fleet/push-object HTTP/1.1" 200\n'
        '\x1b[94m2026-11-29T15:05:24.000Z INFO [uvicorn.access] 127.0.0.1:7 - "POST '
        '/v1/fleet/get-fab HTTP/1.1" 404\x1b[0m\n'
    )
    found = read_requests(log)
    assert [(r.port, r.endpoint, r.status) for r in found] == [
        (54014, "push-object", 200),
        (7, "get-fab", 404),
    ]
    assert found[1].t - found[0].t == pytest.approx(0.474)


def test_bench_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="rounds"):
        wire_bench(rounds=2)
    with pytest.raises(ValueError, match="rows must start"):
        wire_bench(rows=["int8-topk0.05-delta"])
    with pytest.raises(ValueError, match="unknown row 'no-such-row'"):
        wire_bench(rows=[FEDAVG, "no-such-row"])


def test_codec_rows_run_with_their_codec_and_every_node_every_round() -> None:
    config = run_config("fashion-mnist", BEST_ROW, rounds=5, nodes=2)
    assert config["quant"] == "ternary" and config["update-topk"] == 0.05
    assert config["downlink-topk"] == 0.03 and config["topk-scope"] == "model"
    assert config["container"] == "blob" and config["seeded-start"] is True
    assert config["num-server-rounds"] == 5 and config["min-train-nodes"] == 2
    assert config["fraction-train"] == 1.0 and config["fraction-evaluate"] == 0.0


@pytest.mark.slow
def test_wire_bench_on_a_real_deployment(tmp_path: Path) -> None:
    report = wire_bench(scenario="demo", rows=[FEDAVG], rounds=3, idle_s=5.0, workdir=tmp_path)
    row = report["rows"][FEDAVG]
    assert row["rounds"] == 3
    # The socket carries the reported bytes and more, up and down, every steady round.
    assert row["steady_socket_per_node_round"] > row["steady_reported_per_node_round"] > 0
    assert row["run_socket_up_per_node"] > row["run_reported_up_per_node"]
    assert row["run_socket_down_per_node"] > row["run_reported_down_per_node"]
    # Each node downloads the bundle once per run, which is the bundle Flower builds.
    assert row["run_get_fab_per_node"] == 1
    assert row["run_socket_down_per_node"] > report["fab"]["bytes"] == fab_size()[0]
    # Every object of a message is its own request: a float32 MLP reply is several objects.
    assert row["objects_up_per_message"] >= 4
    assert row["steady_requests_by_endpoint"]["push-messages"] == 1
    assert report["tls_handshake"]["total"] > 1000
    assert report["keys"]["socket_overhead_per_node_round_bytes"] > 0
