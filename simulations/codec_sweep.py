"""Issue 14's sweep: codec rows on a scenario over several seeds, with mean ± sd.

    python -m simulations.codec_sweep --rows fedavg-fp32,tern-topk0.02 --seeds 0,1,2
    python -m simulations.codec_sweep --report            # the table of what has run

Each (row, seed) runs in Flower's Ray simulation like :mod:`simulations.compare` (same scenario
base config, the seed replaced) and writes ``<out>/<row>/s<seed>/`` (``rounds.csv``,
``summary.json``); a run whose ``summary.json`` exists is not run again. ``--report`` writes
``<out>/summary.md``: per row, the mean ± sd over its seeds of final accuracy, total bytes, the
ratio against ``fedavg-fp32`` (per seed, against the FedAvg run of the same seed) and bytes to the
target accuracy, and the mean uplink bits per parameter by payload part (positions and their
entropy H(p), values, scales, framing) over the last round of each run.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedprune.codec import BREAKDOWN_KEYS
from simulations.compare import quiet_flower_logs
from simulations.scenarios import Row, Scenario, available, load_scenario
from simulations.simulate import simulate

FEDAVG = "fedavg-fp32"
"""The reference row of the Fashion-MNIST scenario."""
_TOPK_DELTA = {"quant": "int8-channel", "target-density": 1.0, "delta-downlink": True}
_NEW = {"container": "blob", "seeded-start": True}


def _row(name: str, quant: str, topk: float, down_topk: float = 0.0, **more: Any) -> Row:
    changes = {**_TOPK_DELTA, **_NEW, "quant": quant, "update-topk": topk}
    if down_topk:
        changes["downlink-topk"] = down_topk
    return Row(name, {**changes, **more})


CODEC_ROWS: tuple[Row, ...] = (
    _row("int8-topk0.05-blob", "int8-channel", 0.05),
    _row("int4-topk0.05", "int4-channel", 0.05, downlink_quant="int8-channel"),
    _row("tern-topk0.05", "ternary", 0.05),
    _row("tern-topk0.04", "ternary", 0.04),
    _row("tern-topk0.03", "ternary", 0.03),
    _row("tern-topk0.02", "ternary", 0.02),
    _row("tern-topk0.03-downint8", "ternary", 0.03, downlink_quant="int8-channel"),
    _row("tern-up0.02-down0.04", "ternary", 0.02, 0.04),
    _row("tern-up0.05-down0.03", "ternary", 0.05, 0.03),
    _row("tern-up0.03-down0.05", "ternary", 0.03, 0.05),
    _row("tern-topk0.05-log8", "ternary", 0.05, lowbit_scales="log8"),
    _row("tern-topk0.04-log8", "ternary", 0.04, lowbit_scales="log8"),
    _row("tern-up0.05-down0.03-log8", "ternary", 0.05, 0.03, lowbit_scales="log8"),
    _row("tern-up0.03-down0.05-log8", "ternary", 0.03, 0.05, lowbit_scales="log8"),
    _row("tern-up0.05-down0.02-log8", "ternary", 0.05, 0.02, lowbit_scales="log8"),
    _row("tern-up0.05-down0.025-log8", "ternary", 0.05, 0.025, lowbit_scales="log8"),
    _row("tern-up0.04-down0.03-log8", "ternary", 0.04, 0.03, lowbit_scales="log8"),
    _row("tern-up0.05-down0.03-model", "ternary", 0.05, 0.03, topk_scope="model"),
    _row("tern-b2-up0.08-down0.05", "ternary", 0.08, 0.05, topk_block=2),
    _row("tern-b4-up0.10-down0.06", "ternary", 0.10, 0.06, topk_block=4),
    _row("tern-b4-up0.12-down0.08", "ternary", 0.12, 0.08, topk_block=4),
    _row("tern-b4-up0.08-down0.06", "ternary", 0.08, 0.06, topk_block=4),
    _row("tern-b8-up0.16-down0.10", "ternary", 0.16, 0.10, topk_block=8),
    _row("tern-b8-up0.20-down0.12", "ternary", 0.20, 0.12, topk_block=8),
    _row("tern-b8-up0.16-down0.12", "ternary", 0.16, 0.12, topk_block=8),
    _row("tern-b16-up0.25-down0.15", "ternary", 0.25, 0.15, topk_block=16),
    _row("tern-up0.04-down0.03-model", "ternary", 0.04, 0.03, topk_scope="model"),
    _row("tern-up0.05-down0.025-model", "ternary", 0.05, 0.025, topk_scope="model"),
    _row("tern-up0.04-down0.025-model", "ternary", 0.04, 0.025, topk_scope="model"),
    _row("tern-up0.035-down0.03-model", "ternary", 0.035, 0.03, topk_scope="model"),
    _row(
        "tern-up0.05-down0.03-model-log8",
        "ternary",
        0.05,
        0.03,
        topk_scope="model",
        lowbit_scales="log8",
    ),
    _row(
        "int4-up0.03-terndown0.03-log8",
        "int4-channel",
        0.03,
        0.03,
        downlink_quant="ternary",
        lowbit_scales="log8",
    ),
    _row(
        "tern-up0.04-down0.03-log8-m0.5",
        "ternary",
        0.04,
        0.03,
        lowbit_scales="log8",
        inner_strategy="fedavgm",
        server_momentum=0.5,
    ),
    # The float32 row of that server optimizer (FedAvgM, momentum 0.5): dense float32 values
    # both ways through the codec, like stock FedAvg's.
    Row(
        "fedavgm0.5-fp32",
        {
            "quant": "none",
            "target-density": 1.0,
            "entropy": False,
            "error-feedback": False,
            "inner-strategy": "fedavgm",
            "server-momentum": 0.5,
        },
    ),
)
"""Candidate rows (issue 14): every new row sends one Array per payload and starts seeded."""


ATTEMPTS = 3
"""Start-ups of one run before the sweep moves on (Ray gives a node 30 s to start)."""


def _fix(row: Row) -> Row:
    return Row(row.name, {k.replace("_", "-"): v for k, v in row.changes.items()})


def rows_of(scenario: Scenario) -> dict[str, Row]:
    """Return the scenario's rows and the codec rows by name."""
    rows = {r.name: r for r in scenario.rows}
    rows.update({r.name: _fix(r) for r in CODEC_ROWS})
    return rows


def run(
    scenario: Scenario,
    out: Path,
    names: Sequence[str],
    seeds: Sequence[int],
    rounds: int | None = None,
) -> None:
    """Run every (row, seed) not run yet, seeds outermost (a seed's rows finish together)."""
    rows = rows_of(scenario)
    unknown = sorted(set(names) - set(rows))
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; known: {sorted(rows)}")
    quiet_flower_logs()
    for seed in seeds:
        for name in names:
            directory = out / name
            if (directory / f"s{seed}" / "summary.json").exists():
                continue
            cfg = scenario.config(rows[name], str(directory), rounds, seed=seed)
            cfg = cfg.replace(run_name=f"s{seed}")  # <out>/<row>/s<seed>
            summary = None
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    summary = simulate(cfg, num_supernodes=scenario.num_clients, quiet=True)
                    break
                except RuntimeError as err:  # e.g. Ray's 30 s node start-up limit on a busy host
                    print(f"{name} seed {seed}: attempt {attempt} failed: {err}", flush=True)
            if summary is None:
                continue
            if not _complete(directory / f"s{seed}"):
                # A round with fewer replies than the others (a node crashed, e.g. killed by
                # Ray's memory monitor) is not the scenario: set the run aside, run it again.
                failed = directory / f"s{seed}-incomplete"
                (directory / f"s{seed}").rename(failed)
                print(f"{name} seed {seed}: incomplete rounds, moved to {failed}", flush=True)
                continue
            print(
                f"{name} seed {seed}: accuracy {summary.final_accuracy:.4f}, "
                f"bytes {summary.bytes_total:,}, {summary.wall_s:.0f} s",
                flush=True,
            )


def _complete(run_dir: Path) -> bool:
    """Whether every round got at least 60 % of the uplink bytes of the fullest round.

    Every node replies in every round of these scenarios; a reply of the first round is ~20 %
    smaller (its positions have structure zlib finds), a missing reply 10 % per node.
    """
    with (run_dir / "rounds.csv").open(newline="") as f:
        up = [int(r["bytes_up"]) for r in csv.DictReader(f)]
    return bool(up) and all(u >= 0.6 * max(up) for u in up)


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:{fmt}} (1 seed)"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def report(scenario: Scenario, out: Path, baseline: Path | None = None) -> str:
    """Write ``<out>/summary.md`` from the runs on disk and return it.

    ``baseline``: a ``summary.csv`` of :mod:`simulations.compare` whose ``fedavg-fp32`` row (a
    run of the scenario's own seed) stands in for a FedAvg run of that seed not run here.
    """
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for summary_file in sorted(out.glob("*/s*/summary.json")):
        name, seed = summary_file.parent.parent.name, int(summary_file.parent.name[1:])
        body = json.loads(summary_file.read_text())
        with (summary_file.parent / "rounds.csv").open(newline="") as f:
            rounds = list(csv.DictReader(f))
        sent, to_target = 0, None
        for r in rounds:
            sent += int(r["bytes_up"]) + int(r["bytes_down"])
            if to_target is None and float(r["accuracy"]) >= scenario.target_accuracy:
                to_target = sent
        body["to_target"] = to_target
        body["bits"] = {
            part: float(rounds[-1][f"uplink_bits_{part}"])
            for part in BREAKDOWN_KEYS
            if rounds and rounds[-1].get(f"uplink_bits_{part}")
        }
        runs.setdefault(name, {})[seed] = body
    base = dict(runs.get(FEDAVG, {}))
    seed = int(scenario.base.get("seed", 0))
    if baseline is not None and seed not in base:
        with baseline.open(newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["strategy"] == FEDAVG)
        base[seed] = {
            "final_accuracy": float(row["final_accuracy"]),
            "bytes_total": int(row["bytes_total"]),
            "to_target": int(row["bytes_to_target"]) if row["bytes_to_target"] else None,
            "bits": {},
        }
        runs[FEDAVG] = base  # seed 0 from the baseline file, the others run here
    lines = [
        "| row | seeds | final accuracy | Δ vs FedAvg (points) | bytes total | ratio vs FedAvg "
        "| bytes to target | ratio to target | uplink bits/param: positions (H) / values / "
        "scales / framing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in sorted(
        runs.items(), key=lambda kv: -statistics.mean(b["bytes_total"] for b in kv[1].values())
    ):
        seeds = sorted(by_seed)
        acc = [by_seed[s]["final_accuracy"] for s in seeds]
        delta = [
            100 * (by_seed[s]["final_accuracy"] - base[s]["final_accuracy"])
            for s in seeds
            if s in base
        ]
        total = [float(by_seed[s]["bytes_total"]) for s in seeds]
        ratio = [base[s]["bytes_total"] / by_seed[s]["bytes_total"] for s in seeds if s in base]
        target = [float(by_seed[s]["to_target"]) for s in seeds if by_seed[s]["to_target"]]
        ratio_t = [
            base[s]["to_target"] / by_seed[s]["to_target"]
            for s in seeds
            if s in base and base[s]["to_target"] and by_seed[s]["to_target"]
        ]
        bits = [by_seed[s]["bits"] for s in seeds if by_seed[s]["bits"]]
        cell = ""
        if bits:
            mean = {p: statistics.mean(b[p] for b in bits) for p in BREAKDOWN_KEYS}
            cell = (
                f"{mean['positions']:.3f} ({mean['entropy']:.3f}) / {mean['values']:.3f} / "
                f"{mean['scales']:.3f} / {mean['framing']:.3f}"
            )
        lines.append(
            f"| {name} | {','.join(map(str, seeds))} | {_mean_sd(acc, '.4f')} | "
            f"{_mean_sd(delta, '+.2f')} | {_mean_sd(total, ',.0f')} | {_mean_sd(ratio, '.1f')} | "
            f"{_mean_sd(target, ',.0f')} | {_mean_sd(ratio_t, '.1f')} | {cell} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def objects_per_reply() -> str:
    """Count the Flower objects and bytes of a reply carrying a top-3 % ternary MLP update.

    Five arrays against one blob, and an empty payload (the message's own objects); the
    update is random normal, the MLP's shapes are the scenario's.
    """
    import numpy as np
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    from boundary.records import payload_record
    from fedprune import codec
    from strategies.accounting import message_wire_bytes

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(0)
    shapes = {"0.w": (200, 784), "0.b": (200,), "2.w": (200, 200), "2.b": (200,)}
    shapes |= {"4.w": (10, 200), "4.b": (10,)}
    update = {k: (1e-3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    lines = []
    for container in ("arrays", "blob", "empty"):
        payload: dict[str, np.ndarray] = {}
        if container != "empty":
            config = codec.CodecConfig(
                quant="ternary",
                topk=0.03,
                entropy=True,
                container=container,  # type: ignore[arg-type]
            )
            payload = codec.encode(update, config)
        metrics = MetricRecord({"num-examples": 6000, "server-round": 3, "train-loss": 0.5})
        content = RecordDict({"arrays": payload_record(payload), "metrics": metrics})
        message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
        objects = len(get_all_nested_objects(message))
        size = message_wire_bytes([message])
        streams = sum(a.nbytes for a in payload.values())
        lines.append(
            f"{container}: {objects} objects, {size} B, of which {size - streams} B framing"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m simulations.codec_sweep", description=__doc__)
    parser.add_argument("--scenario", default="fashion-mnist", choices=available())
    parser.add_argument("--rows", default="", help="comma-separated row names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, default=Path("results/codec-sweep"))
    parser.add_argument("--rounds", type=int, help="override the number of rounds (smoke runs)")
    parser.add_argument("--report", action="store_true", help="only write the table")
    parser.add_argument("--objects", action="store_true", help="Flower objects of one reply")
    parser.add_argument(
        "--baseline", type=Path, help="compare.py summary.csv whose fedavg-fp32 row is seed 0's"
    )
    args = parser.parse_args(argv)
    if args.objects:
        print(objects_per_reply())
        return
    scenario = load_scenario(args.scenario)
    out = args.out.resolve()
    if not args.report:
        names = [n for n in args.rows.split(",") if n]
        run(scenario, out, names, [int(s) for s in args.seeds.split(",")], args.rounds)
    print(report(scenario, out, args.baseline))


if __name__ == "__main__":
    main()
