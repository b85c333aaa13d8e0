"""Wire bench: the bytes a SuperNode's socket carries in a real deployment, and the reported ones.

``make wire-bench`` / ``python -m simulations.bench_wire``. A real deployment on loopback, as
``make deploy-demo``: a SuperLink with TLS and SuperNode authentication, registered SuperNodes,
``flwr run`` of this app. Each SuperNode connects through its own
:class:`~simulations.deploy.relay.CountingRelay`, so every byte of its TCP connections (TLS
handshakes, TLS records, HTTP headers, protobuf framing, polling, heartbeats, the app bundle) is
counted. The SuperLink runs with ``FLWR_LOG_LEVEL=DEBUG``, which makes it log every HTTP request
with the client's port; the relay knows its upstream ports, so requests are attributed to nodes.

What is measured, per run of each row (FedAvg float32 and the compressed rows; any row of the
scenario or of :data:`simulations.codec_sweep.CODEC_ROWS`):

- per run: socket bytes up/down per node, from just before ``flwr run`` to its end (FAB download,
  polling while the ServerApp starts, every round), and ``rounds.csv``'s reported bytes;
- per steady round (rounds 2..R; a node's round is the time between two of its replies): socket
  bytes per node, reported bytes per node, requests by endpoint (``push-object`` per reply =
  objects per uplink message, ``pull-object`` per instruction = objects per downlink message),
  new TCP+TLS connections;
- the message-driven overhead per node-round: socket bytes minus reported bytes minus what an
  idle node sends in the same time;
- idle: bytes per node over a quiet window (no run), scaled to an hour;
- the FAB: its size as Flower's builder makes it (what every SuperNode downloads per run).

Ratios: FedAvg float32 over the row, on the socket and as reported, per steady round and per run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import re
import socket
import ssl
import statistics
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from boundary import keepalive
from simulations.codec_sweep import rows_of
from simulations.deploy import PROJECT_ROOT, Deployment, RunResult
from simulations.deploy.relay import CountingRelay, Traffic
from simulations.scenarios import available, load_scenario

BEST_ROW: Final = "tern-up0.05-down0.03-model"
"""The best Fashion-MNIST row within a point of FedAvg (ternary; the top 5 % of the model's
update entries up, 3 % down; one Array per payload; seeded start), see
``docs/results/fashion-mnist-codec.md``; the headline keys are its figures."""
PREVIOUS_ROW: Final = "int8-topk0.05-delta"
"""The best row before the codec of issue 14 (int8, five Arrays, dense first round)."""
FEDAVG: Final = "fedavg-fp32"
"""The reference row (stock FedAvg, float32 both ways) of every built-in scenario."""
DEFAULT_ROWS: Final = (FEDAVG, PREVIOUS_ROW, BEST_ROW)
DEFAULT_MD: Final = PROJECT_ROOT / "docs" / "results" / "wire.md"
DEFAULT_JSON: Final = PROJECT_ROOT / "results" / "bench" / "wire.json"
HOUR_S: Final = 3600.0

_ACCESS = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \w+ \[uvicorn\.access\] "
    r"[\d.:\[\]a-f]+:(?P<port>\d+) - \"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+\" (?P<code>\d+)"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Request:
    """One HTTP request the SuperLink logged."""

    t: float
    port: int
    endpoint: str
    status: int


def read_requests(log: Path) -> list[Request]:
    """Parse the SuperLink's uvicorn access lines (``FLWR_LOG_LEVEL=DEBUG``) from its log."""
    found = []
    for line in log.read_text("utf-8", errors="replace").splitlines():
        match = _ACCESS.match(_ANSI.sub("", line).strip())
        if match is None:
            continue
        stamp = datetime.datetime.fromisoformat(match["ts"]).replace(tzinfo=datetime.UTC)
        found.append(
            Request(
                t=stamp.timestamp(),
                port=int(match["port"]),
                endpoint=match["path"].rsplit("/", 1)[-1],
                status=int(match["code"]),
            )
        )
    return found


def fab_size(app: Path = PROJECT_ROOT) -> tuple[int, int]:
    """Return (bytes, files) of the app bundle Flower builds from ``app`` (as ``flwr run`` does)."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return len(fab), len(archive.namelist())


@dataclass
class Window:
    """One node's traffic in a time window."""

    traffic: Traffic
    seconds: float
    requests: Counter[str] = field(default_factory=Counter)


def _window(relay: CountingRelay, requests: Sequence[Request], start: float, end: float) -> Window:
    ports = relay.upstream_ports()
    counts = Counter(r.endpoint for r in requests if r.port in ports and start <= r.t < end)
    return Window(relay.traffic(start, end), end - start, counts)


def run_config(
    scenario: str, row: str, rounds: int, nodes: int
) -> dict[str, bool | int | float | str]:
    """Run config of ``row`` of ``scenario`` for ``nodes`` SuperNodes, every node every round.

    Raises
    ------
    ValueError
        If ``row`` is neither a row of the scenario nor a codec row.
    """
    sc = load_scenario(scenario)
    rows = rows_of(sc)
    if row not in rows:
        raise ValueError(f"unknown row {row!r}; known: {sorted(rows)}")
    config: dict[str, bool | int | float | str] = {**sc.base, **rows[row].changes}
    config["num-server-rounds"] = rounds
    config["prune-end-round"] = min(int(config.get("prune-end-round", 1)), rounds)
    config.update({"min-train-nodes": nodes, "fraction-train": 1.0, "fraction-evaluate": 0.0})
    return config


def _polls(window: Window) -> int:
    """Count the polling requests of a node's round: empty ``pull-messages`` and heartbeats."""
    return max(window.requests["pull-messages"] - 1, 0) + window.requests["send-node-heartbeat"]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _row_report(
    result: RunResult,
    relays: Sequence[CountingRelay],
    requests: Sequence[Request],
    start: float,
    end: float,
    poll_bytes: float,
) -> dict[str, Any]:
    """Per-run and steady-round figures of one finished run."""
    nodes = len(relays)
    run = [_window(relay, requests, start, end) for relay in relays]
    reported = [int(r["bytes_up"]) + int(r["bytes_down"]) for r in result.rounds]
    reported_up = sum(int(r["bytes_up"]) for r in result.rounds)
    reported_down = sum(int(r["bytes_down"]) for r in result.rounds)
    # A node's round r ends with its reply (push-messages); steady rounds are 2..R.
    steady: list[list[Window]] = []
    for relay in relays:
        ports = relay.upstream_ports()
        pushes = sorted(
            r.t
            for r in requests
            if r.port in ports and r.endpoint == "push-messages" and start <= r.t < end
        )
        if len(pushes) != len(result.rounds):
            raise RuntimeError(
                f"{len(pushes)} replies of one node in the access log, "
                f"{len(result.rounds)} rounds in rounds.csv"
            )
        steady.append([_window(relay, requests, a, b) for a, b in itertools.pairwise(pushes)])
    rounds = len(result.rounds)
    per_round_socket = [
        sum(steady[n][i].traffic.total for n in range(nodes)) for i in range(rounds - 1)
    ]
    per_node_round = [w for node in steady for w in node]
    socket_nr = _median([w.traffic.total for w in per_node_round])
    reported_nr = _median([b / nodes for b in reported[1:]])
    # Polling: the empty pull-messages (one per round returns the instruction) and heartbeats,
    # each costing what one costs an idle node.
    polls = [_polls(w) for w in per_node_round]
    idle_nr = _median([n * poll_bytes for n in polls])
    requests_nr = _median([sum(w.requests.values()) for w in per_node_round])
    message_requests_nr = _median(
        [sum(w.requests.values()) - n for w, n in zip(per_node_round, polls, strict=True)]
    )
    overhead_nr = socket_nr - reported_nr - idle_nr
    return {
        "rounds": rounds,
        "final_accuracy": float(result.rounds[-1]["accuracy"]),
        "run_socket_up_per_node": _median([w.traffic.up for w in run]),
        "run_socket_down_per_node": _median([w.traffic.down for w in run]),
        "run_socket_total": sum(w.traffic.total for w in run),
        "run_reported_up_per_node": reported_up / nodes,
        "run_reported_down_per_node": reported_down / nodes,
        "run_reported_total": sum(reported),
        "run_connections_per_node": _median([w.traffic.connections for w in run]),
        "run_requests_per_node": _median([sum(w.requests.values()) for w in run]),
        "run_get_fab_per_node": _median([w.requests["get-fab"] for w in run]),
        "run_seconds": end - start,
        "steady_socket_up_per_node_round": _median([w.traffic.up for w in per_node_round]),
        "steady_socket_down_per_node_round": _median([w.traffic.down for w in per_node_round]),
        "steady_socket_per_node_round": socket_nr,
        "steady_socket_per_round": _median(per_round_socket),
        "steady_reported_per_node_round": reported_nr,
        "steady_reported_per_round": _median(reported[1:]),
        "steady_round_seconds": _median([w.seconds for w in per_node_round]),
        "steady_polls_per_node_round": _median(polls),
        "steady_idle_share_per_node_round": idle_nr,
        "steady_overhead_per_node_round": overhead_nr,
        "steady_connections_per_node_round": _median(
            [w.traffic.connections for w in per_node_round]
        ),
        "steady_requests_per_node_round": requests_nr,
        "steady_message_requests_per_node_round": message_requests_nr,
        "steady_overhead_per_request": overhead_nr / max(message_requests_nr, 1.0),
        "objects_up_per_message": _median([w.requests["push-object"] for w in per_node_round]),
        "objects_down_per_message": _median([w.requests["pull-object"] for w in per_node_round]),
        "steady_requests_by_endpoint": {
            name: _median([w.requests[name] for w in per_node_round])
            for name in sorted({k for w in per_node_round for k in w.requests})
        },
    }


def wire_bench(
    *,
    scenario: str = "fashion-mnist",
    rows: Sequence[str] = DEFAULT_ROWS,
    rounds: int = 5,
    nodes: int = 2,
    idle_s: float = 60.0,
    workdir: str | Path | None = None,
    timeout_s: float = 1800.0,
    node_env: Mapping[str, str] | None = None,
    keep_alive_s: float | None = keepalive.DEFAULT_KEEP_ALIVE_S,
) -> dict[str, Any]:
    """Run the wire bench; return every figure (see the module docstring).

    Parameters
    ----------
    scenario : str
        Scenario of :mod:`simulations.scenarios` whose base config and rows are used.
    rows : sequence of str
        Rows to run, FedAvg float32 (the ratios' reference) first.
    rounds : int
        Rounds per run (>= 3: rounds 2..R are the steady ones).
    nodes : int
        SuperNodes (each with its own partition and relay).
    idle_s : float
        Length of the quiet window that gives the idle rate (scaled to an hour).
    workdir : str or Path, optional
        Where the deployment lives (default: a temporary directory, removed).
    timeout_s : float
        Limit per ``flwr run``.
    node_env : Mapping[str, str], optional
        Extra environment of the SuperNodes (e.g. Flower's ``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_*``).
    keep_alive_s : float, optional
        Keep idle HTTP connections this long on both ends (:mod:`boundary.keepalive`, the
        deployment's default; ``None``: Flower's 5 s).

    Returns
    -------
    dict
        ``fab``, ``idle`` and one entry per row, plus the headline ``keys`` for ``make bench``.
    """
    if rounds < 3:
        raise ValueError(f"rounds={rounds} must be >= 3 (rounds 2..R are the steady ones)")
    if nodes < 1:
        raise ValueError(f"nodes={nodes} must be >= 1")
    if not rows or rows[0] != FEDAVG:
        raise ValueError(f"rows must start with {FEDAVG!r} (the reference), got {list(rows)}")
    if idle_s <= 0:
        raise ValueError(f"idle_s={idle_s} must be > 0")
    for row in rows:
        run_config(scenario, row, rounds, nodes)  # an unknown row fails before any deployment
    fab_bytes, fab_files = fab_size()
    with tempfile.TemporaryDirectory(prefix="fedprune-wire-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        report = _measure(
            scenario,
            rows,
            rounds,
            nodes,
            idle_s,
            work,
            timeout_s,
            dict(node_env or {}),
            keep_alive_s,
        )
    report["fab"] = {"bytes": fab_bytes, "files": fab_files}
    report["setup"] = {
        "scenario": scenario,
        "rounds": rounds,
        "nodes": nodes,
        "idle_s": idle_s,
        "transport": "Flower 1.42 REST (HTTP/1.1 over TLS), SuperNode auth",
        "node_env": dict(node_env or {}),
        "keep_alive_s": keep_alive_s,
    }
    report["keys"] = headline(report)
    return report


def _measure(
    scenario: str,
    rows: Sequence[str],
    rounds: int,
    nodes: int,
    idle_s: float,
    work: Path,
    timeout_s: float,
    node_env: dict[str, str],
    keep_alive_s: float | None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"rows": {}}
    relays: list[CountingRelay] = []
    with Deployment(work, threads=1, keep_alive_s=keep_alive_s) as deployment:
        address = deployment.start_superlink(env={"FLWR_LOG_LEVEL": "DEBUG"})
        host, port = address.rsplit(":", 1)
        keys = [deployment.new_node_key(f"node-{i}") for i in range(nodes)]
        deployment.register(keys)
        try:
            for i, key in enumerate(keys):
                relay = CountingRelay(host, int(port))
                relays.append(relay)
                deployment.start_supernode(
                    key.name,
                    key=key,
                    partition_id=i,
                    num_partitions=nodes,
                    superlink=relay.address,
                    env=node_env,
                )
            report["tls_handshake"] = tls_handshake(host, int(port), deployment)
            time.sleep(5.0)  # past the nodes' start-up requests
            start = time.time()
            time.sleep(idle_s)
            end = time.time()
            log = deployment.logs / "superlink.log"
            requests = read_requests(log)
            idle = [_window(relay, requests, start, end) for relay in relays]
            idle_rate = _median([w.traffic.total / w.seconds for w in idle])
            idle_rps = _median([sum(w.requests.values()) / w.seconds for w in idle])
            poll_bytes = _median([w.traffic.total / max(sum(w.requests.values()), 1) for w in idle])
            report["idle"] = {
                "seconds": end - start,
                "bytes_per_node_s": idle_rate,
                "bytes_per_node_hour": idle_rate * HOUR_S,
                "requests_per_node_s": idle_rps,
                "bytes_per_poll": poll_bytes,
                "connections_per_node_hour": _median(
                    [w.traffic.connections / w.seconds * HOUR_S for w in idle]
                ),
                "requests_by_endpoint": dict(sum((w.requests for w in idle), Counter())),
            }
            for row in rows:
                config = run_config(scenario, row, rounds, nodes)
                start = time.time()
                result = deployment.run(
                    config,
                    run_name=f"wire-{row}",
                    results_dir=work / "results",
                    timeout_s=timeout_s,
                )
                time.sleep(1.0)  # the last responses reach the relays and the log
                end = time.time()
                if not result.ok:
                    raise RuntimeError(f"run {row} {result.status}; log {result.log}")
                requests = read_requests(log)
                report["rows"][row] = _row_report(result, relays, requests, start, end, poll_bytes)
        finally:
            for relay in relays:
                relay.close()
    return report


def tls_handshake(host: str, port: int, deployment: Deployment) -> dict[str, int]:
    """Bytes of one new TLS connection to the SuperLink (handshake, session tickets, close)."""
    assert deployment.certs is not None
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    with CountingRelay(host, port) as relay:
        with (
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.settimeout(0.5)
            with contextlib.suppress(TimeoutError, ssl.SSLError):
                tls.recv(1)  # read the TLS 1.3 session tickets the server sends after the handshake
        time.sleep(0.5)
        traffic = relay.traffic()
    return {"up": traffic.up, "down": traffic.down, "total": traffic.total}


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """Return the ``make bench`` keys: ratios against FedAvg float32 and the fixed costs."""
    rows = report["rows"]
    ref = rows[FEDAVG]
    keys: dict[str, float] = {
        "fab_bytes": float(report["fab"]["bytes"]),
        "tls_handshake_bytes": float(report["tls_handshake"]["total"]),
        "poll_bytes": float(report["idle"]["bytes_per_poll"]),
        "idle_bytes_per_node_hour": float(report["idle"]["bytes_per_node_hour"]),
        "socket_overhead_per_node_round_bytes": float(ref["steady_overhead_per_node_round"]),
        "socket_overhead_per_request_bytes": float(ref["steady_overhead_per_request"]),
    }
    best = BEST_ROW if BEST_ROW in rows else next(iter(r for r in rows if r != FEDAVG), None)
    if best is not None:
        row = rows[best]
        keys |= {
            "socket_ratio_steady": ref["steady_socket_per_round"] / row["steady_socket_per_round"],
            "reported_ratio_steady": ref["steady_reported_per_round"]
            / row["steady_reported_per_round"],
            "socket_ratio_run": ref["run_socket_total"] / row["run_socket_total"],
            "reported_ratio_run": ref["run_reported_total"] / row["run_reported_total"],
            "objects_up_per_message": float(row["objects_up_per_message"]),
            "tls_connections_per_node_round": float(row["steady_connections_per_node_round"]),
            "objects_down_per_message": float(row["objects_down_per_message"]),
            "compressed_overhead_per_node_round_bytes": float(
                row["steady_overhead_per_node_round"]
            ),
        }
    return keys


def markdown(report: Mapping[str, Any], command: str) -> str:
    """Return the ``docs/results/wire.md`` page of one bench report."""
    setup, rows, idle, fab = report["setup"], report["rows"], report["idle"], report["fab"]
    ref = rows[FEDAVG]
    lines = [
        "# What the socket carries: wire bench",
        "",
        f"Written by `{command}` (`simulations/bench_wire.py`); one seed, one run per row.",
        f"Real deployment on loopback: {setup['transport']}, {setup['nodes']} SuperNodes, each "
        "through a byte-counting TCP relay; scenario "
        f"`{setup['scenario']}`, {setup['rounds']} rounds, every node every round. "
        "*Socket* = every byte of the node's TCP connections (TLS, HTTP, polling, heartbeats, "
        "the app bundle); *reported* = `rounds.csv` (the deflated Flower objects of each "
        "message). Steady round = median of rounds 2..R; a node's round runs from one of its "
        "replies to the next. Idle HTTP connections: "
        + (
            f"kept {setup['keep_alive_s']:g} s by the client and {setup['keep_alive_s']:g} + "
            "15 s by the server (`boundary/keepalive.py`)."
            if setup.get("keep_alive_s")
            else "Flower's defaults (closed after 5 s idle, both ends)."
        ),
        "",
        "| row | final acc | socket / round | reported / round | socket ratio | reported ratio "
        "| socket / run | reported / run | run socket ratio | run reported ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['final_accuracy']:.4f} | {row['steady_socket_per_round']:,.0f} "
            f"| {row['steady_reported_per_round']:,.0f} "
            f"| {ref['steady_socket_per_round'] / row['steady_socket_per_round']:.1f}x "
            f"| {ref['steady_reported_per_round'] / row['steady_reported_per_round']:.1f}x "
            f"| {row['run_socket_total']:,.0f} | {row['run_reported_total']:,.0f} "
            f"| {ref['run_socket_total'] / row['run_socket_total']:.1f}x "
            f"| {ref['run_reported_total'] / row['run_reported_total']:.1f}x |"
        )
    lines += [
        "",
        "Per node (bytes; steady values are per node and round):",
        "",
        "| row | run up | run down | run reported up | run reported down | steady up "
        "| steady down | steady reported | polls (share) | message-driven overhead "
        "| requests | objects up / msg | objects down / msg | new TLS conns | round s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['run_socket_up_per_node']:,.0f} "
            f"| {row['run_socket_down_per_node']:,.0f} "
            f"| {row['run_reported_up_per_node']:,.0f} "
            f"| {row['run_reported_down_per_node']:,.0f} "
            f"| {row['steady_socket_up_per_node_round']:,.0f} "
            f"| {row['steady_socket_down_per_node_round']:,.0f} "
            f"| {row['steady_reported_per_node_round']:,.0f} "
            f"| {row['steady_polls_per_node_round']:.0f} "
            f"({row['steady_idle_share_per_node_round']:,.0f}) "
            f"| {row['steady_overhead_per_node_round']:,.0f} "
            f"| {row['steady_requests_per_node_round']:.0f} "
            f"| {row['objects_up_per_message']:.0f} | {row['objects_down_per_message']:.0f} "
            f"| {row['steady_connections_per_node_round']:.0f} "
            f"| {row['steady_round_seconds']:.1f} |"
        )
    lines += [
        "",
        "Fixed costs:",
        "",
        f"- App bundle (FAB) every SuperNode downloads at the start of every run: "
        f"**{fab['bytes']:,} B** ({fab['files']} files; Flower stores them uncompressed); "
        f"`get-fab` requests per node and run: {ref['run_get_fab_per_node']:.0f}.",
        f"- Idle node (connected, no run): **{idle['bytes_per_node_hour']:,.0f} B per hour** "
        f"({idle['bytes_per_node_s']:,.0f} B/s measured over {idle['seconds']:.0f} s and scaled), "
        f"{idle['requests_per_node_s']:.2f} requests/s, "
        f"{idle['connections_per_node_hour']:,.0f} new TLS connections per hour; requests in the "
        f"window (all nodes): {dict(idle['requests_by_endpoint'])}.",
        f"- A new TLS connection (TCP + TLS 1.3 handshake with the P-384 certificate, session "
        f"tickets, close): **{report['tls_handshake']['total']:,} B** "
        f"({report['tls_handshake']['up']:,} up, {report['tls_handshake']['down']:,} down).",
        f"- One poll or heartbeat of an idle node: {idle['bytes_per_poll']:,.0f} B on an open "
        "connection.",
        f"- Message-driven overhead (socket - reported - polls), FedAvg float32: "
        f"**{ref['steady_overhead_per_node_round']:,.0f} B per node and round**, "
        f"{ref['steady_overhead_per_request']:,.0f} B per message-driven request.",
        "",
        "Requests per node and steady round, by endpoint:",
        "",
        "| row | " + " | ".join(sorted(ref["steady_requests_by_endpoint"])) + " |",
        "|---|" + "---|" * len(ref["steady_requests_by_endpoint"]),
    ]
    for name, row in rows.items():
        counts = row["steady_requests_by_endpoint"]
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{counts.get(k, 0):.0f}" for k in sorted(ref["steady_requests_by_endpoint"])
            )
            + " |"
        )
    lines += _before_after(rows)
    lines.append("")
    return "\n".join(lines)


def _before_after(rows: Mapping[str, Any]) -> list[str]:
    """Lines comparing :data:`PREVIOUS_ROW` and :data:`BEST_ROW` when both ran (else none)."""
    if PREVIOUS_ROW not in rows or BEST_ROW not in rows:
        return []
    ref, old, new = rows[FEDAVG], rows[PREVIOUS_ROW], rows[BEST_ROW]
    figures = [
        ("objects per message, up / down", "{objects_up_per_message:.0f} / "
         "{objects_down_per_message:.0f}"),
        ("message-driven requests per node-round", "{steady_message_requests_per_node_round:.0f}"),
        ("message-driven overhead per node-round (B)", "{steady_overhead_per_node_round:,.0f}"),
        ("new TLS connections per node-round", "{steady_connections_per_node_round:.0f}"),
        ("reported per node-round (B)", "{steady_reported_per_node_round:,.0f}"),
        ("socket per node-round (B)", "{steady_socket_per_node_round:,.0f}"),
    ]  # fmt: skip
    lines = [
        "",
        f"Before ({PREVIOUS_ROW}: five Arrays per payload) and after ({BEST_ROW}: one Array, "
        "ternary values, seeded start), steady round, per node:",
        "",
        f"| figure | {PREVIOUS_ROW} | {BEST_ROW} |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt.format(**old)} | {fmt.format(**new)} |" for name, fmt in figures]
    for name, key in (("steady", "steady_socket_per_round"), ("run", "run_socket_total")):
        lines.append(
            f"| socket ratio, {name} | {ref[key] / old[key]:.1f}x | {ref[key] / new[key]:.1f}x |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the bench, write ``wire.json``, ``docs/results/wire.md`` and the ``make bench`` keys."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_wire", description=__doc__)
    parser.add_argument("--scenario", default="fashion-mnist", choices=available())
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--workdir", type=Path, help="keep the deployment here (logs)")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--no-record", action="store_true", help="leave bench.json alone")
    parser.add_argument(
        "--node-env", action="append", default=[], help="KEY=VALUE for the SuperNodes (repeatable)"
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=keepalive.DEFAULT_KEEP_ALIVE_S,
        help="keep idle HTTP connections this many seconds on both ends (0: Flower's 5 s)",
    )
    args = parser.parse_args(argv)
    report = wire_bench(
        scenario=args.scenario,
        rows=args.rows,
        rounds=args.rounds,
        nodes=args.nodes,
        idle_s=args.idle,
        workdir=args.workdir,
        node_env=dict(pair.split("=", 1) for pair in args.node_env),
        keep_alive_s=args.keep_alive or None,
    )
    command = " ".join(
        ["python -m simulations.bench_wire", *(sys.argv[1:] if argv is None else argv)]
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", "utf-8")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(markdown(report, command), "utf-8")
    if not args.no_record:
        from simulations.bench import record

        record(report["keys"])
    for key, value in sorted(report["keys"].items()):
        print(f"{key:45s} {value:,.4g}")
    return report


if __name__ == "__main__":
    main()
