"""Comparison scenarios, read from TOML files: one dataset and federation, several rows.

A scenario file (the built-in ones are ``scenarios/*.toml`` at the repository root) holds::

    description = "digits, 10 clients, ..."
    num-clients = 10            # federation size (virtual SuperNodes)
    target-accuracy = 0.85      # for the bytes_to_target column
    baseline = "fedavg-fp32"    # optional; default: the first row

    [base]                      # run-config keys every row shares
    dataset = "digits"
    num-server-rounds = 20

    [rows.fedavg-fp32]          # one table per row: the keys it changes
    strategy = "fedavg"
    target-density = 1.0

Every key of ``[base]`` and of a row is a run-config key of ``pyproject.toml``'s
``[tool.flwr.app.config]``, validated by :meth:`fedprune.config.RunConfig.from_mapping`; the
harness sets ``run-name`` and ``results-dir`` itself. A bad file raises :class:`ScenarioError`
naming the file, the row and the key. A row's full run config, as the harness runs it, is
:meth:`Scenario.config`; :func:`export_config` writes it as a file for
``flwr run . --run-config <file>``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedprune.config import ConfigError, RunConfig

SCENARIO_DIR = Path(__file__).resolve().parents[1] / "scenarios"
"""Where the built-in scenario files are (``--scenario NAME`` reads ``NAME.toml`` there)."""
DEFAULT_SCENARIO = "demo"
"""The scenario of ``make demo``."""
HARNESS_KEYS = frozenset({"run-name", "results-dir"})
"""Run-config keys the harness sets for each run; a scenario file may not set them."""
_TOP_LEVEL = {
    "description": str,
    "num-clients": int,
    "target-accuracy": float,
    "baseline": str,
    "base": dict,
    "rows": dict,
}
_KIND_NAMES = {str: "string", int: "integer", float: "number", dict: "table"}
_REQUIRED = ("description", "num-clients", "target-accuracy", "rows")


class ScenarioError(ValueError):
    """A scenario file is unreadable, lacks a key, or has a bad key or value (named)."""


@dataclass(frozen=True)
class Row:
    """One strategy of a comparison: a name and the config keys it changes."""

    name: str
    changes: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """A dataset, a federation and the strategies compared on it."""

    name: str
    description: str
    num_clients: int
    target_accuracy: float
    base: dict[str, Any]
    rows: tuple[Row, ...]
    baseline: str

    def row(self, name: str) -> Row:
        """Return the row called ``name``.

        Raises
        ------
        ValueError
            If the scenario has no such row (the message lists the rows it has).
        """
        for row in self.rows:
            if row.name == name:
                return row
        raise ValueError(
            f"scenario {self.name!r} has no row {name!r}; rows: {[r.name for r in self.rows]}"
        )

    @property
    def base_seed(self) -> int:
        """The seed of ``[base]`` (the run-config default, 0, when it sets none)."""
        return int(self.base.get("seed", RunConfig.seed))

    def seeds(self, count: int) -> list[int]:
        """Return the ``count`` seeds a ``--seeds count`` comparison runs: base seed + 0, 1, ..."""
        if count < 1:
            raise ValueError(f"the number of seeds must be >= 1, got {count}")
        return [self.base_seed + i for i in range(count)]

    def config(
        self,
        row: Row,
        results_dir: str,
        rounds: int | None = None,
        seed: int | None = None,
    ) -> RunConfig:
        """Return the validated config the harness runs for ``row``.

        Parameters
        ----------
        row : Row
            One of the scenario's rows.
        results_dir : str
            The ``results-dir`` of the run (the harness uses ``<out>/<scenario name>``).
        rounds : int, optional
            Override ``num-server-rounds`` (a pruning schedule ending later is cut to it).
        seed : int, optional
            Run this seed instead of the base seed. The run is called ``<row>-seed<seed>``.
        """
        seed = self.base_seed if seed is None else seed
        values = {
            **self.base,
            **row.changes,
            "seed": seed,
            "run-name": f"{row.name}-seed{seed}",
            "results-dir": results_dir,
        }
        if rounds is not None:
            values["num-server-rounds"] = rounds
            values["prune-end-round"] = min(int(values.get("prune-end-round", 1)), rounds)
        return RunConfig.from_mapping(values)


def available() -> list[str]:
    """Return the names of the built-in scenarios (the files in :data:`SCENARIO_DIR`)."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(source: str | Path) -> Scenario:
    """Load a scenario from a file path or the name of a built-in one.

    Parameters
    ----------
    source : str or Path
        A path to a ``.toml`` file, or a name from :func:`available`.

    Raises
    ------
    ScenarioError
        If there is no such file or scenario, or the file is not a valid scenario.
    """
    path = Path(source)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{source}.toml"
        if not path.is_file():
            raise ScenarioError(
                f"no scenario {str(source)!r}: give a .toml file or one of {available()}"
            )
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ScenarioError(f"cannot read scenario file {path}: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML: {err}") from err
    try:
        return parse_scenario(data, name=path.stem)
    except ScenarioError as err:
        raise ScenarioError(f"{path}: {err}") from err


def parse_scenario(data: Mapping[str, Any], *, name: str) -> Scenario:
    """Validate a scenario's parsed TOML and return it.

    Every row's config (``[base]`` with the row's keys over it) is validated as the harness
    will run it, so a bad key fails here, before any run starts.

    Raises
    ------
    ScenarioError
        Naming the top-level key, or the row and the run-config key, that is wrong.
    """
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        raise ScenarioError(f"unknown key(s) {unknown}; a scenario has {sorted(_TOP_LEVEL)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ScenarioError(f"missing key(s) {missing}")
    for key, kind in _TOP_LEVEL.items():
        if key in data and not _is_a(data[key], kind):
            raise ScenarioError(f"key '{key}': expected a {_KIND_NAMES[kind]}, got {data[key]!r}")
    num_clients = int(data["num-clients"])
    target = float(data["target-accuracy"])
    if num_clients < 1:
        raise ScenarioError(f"key 'num-clients': must be >= 1, got {num_clients}")
    if not 0.0 <= target <= 1.0:
        raise ScenarioError(f"key 'target-accuracy': must be in [0, 1], got {target}")
    base = dict(data.get("base", {}))
    _check_harness_keys(base, "[base]")
    rows: list[Row] = []
    for row_name, changes in data["rows"].items():
        where = f"row {row_name!r}"
        if not isinstance(changes, dict):
            raise ScenarioError(f"{where}: expected a table of config keys, got {changes!r}")
        _check_harness_keys(changes, where)
        rows.append(Row(row_name, dict(changes)))
    if not rows:
        raise ScenarioError("key 'rows': a scenario needs at least one row")
    baseline = str(data.get("baseline", rows[0].name))
    if baseline not in {r.name for r in rows}:
        raise ScenarioError(
            f"key 'baseline': {baseline!r} is not a row; rows: {[r.name for r in rows]}"
        )
    scenario = Scenario(
        name, str(data["description"]), num_clients, target, base, tuple(rows), baseline
    )
    for row in rows:
        try:
            cfg = scenario.config(row, results_dir="results")
        except ConfigError as err:
            raise ScenarioError(f"row {row.name!r}: {err}") from err
        if cfg.min_train_nodes > num_clients:
            raise ScenarioError(
                f"row {row.name!r}: config key 'min-train-nodes' is {cfg.min_train_nodes}, "
                f"more than num-clients={num_clients}"
            )
    return scenario


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _check_harness_keys(values: Mapping[str, Any], where: str) -> None:
    clash = sorted(HARNESS_KEYS & set(values))
    if clash:
        raise ScenarioError(
            f"{where}: config key(s) {clash} are set by the harness (the row name and --out)"
        )


def export_config(cfg: RunConfig, num_clients: int) -> str:
    """Return ``cfg`` in full as a TOML run-config file for ``flwr run . --run-config``.

    The header names the federation size the harness ran it on (a ``flwr run`` option, not a
    run-config key).
    """
    header = (
        f"# Run config of {cfg.run_name!r}, as the comparison harness runs it. Run it alone with\n"
        f"#   simulations/flwr_run.sh {num_clients} --run-config <this file>\n"
        f"# or: flwr run . <federation> --run-config <this file> "
        f'--federation-config "num-supernodes={num_clients}"\n'
    )
    return header + tomli_w.dumps(cfg.to_mapping())
