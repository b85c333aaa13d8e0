"""The base of fedprune's strategy wrappers: delegate everything to an inner strategy.

Like Flower's own DP wrappers, each fedprune wrapper composes over an inner strategy instead of
subclassing one; it overrides only the steps it changes.

Checkpoints: :func:`strategy_state` returns the state of a whole wrapper chain as a flat dict
(see :mod:`fedprune.checkpoint`), each wrapper under its own prefix, the innermost Flower
strategy's server-optimizer state under ``inner/``; :func:`load_strategy_state` puts it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprune.checkpoint import nested, prefixed

FLOWER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")
"""Attributes in which Flower 1.42's strategies keep state across rounds: the server model and
momentum of FedAvgM, the moments of FedAdam/FedYogi/FedAdagrad (FedOpt)."""


class StrategyWrapper(Strategy):
    """A strategy that hands every step to ``strategy`` unchanged.

    Parameters
    ----------
    strategy : Strategy
        The wrapped (inner) strategy.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training with the inner strategy."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate training replies with the inner strategy."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate evaluation replies with the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.strategy.summary()

    def own_state(self) -> dict[str, Any]:
        """Return this wrapper's own state across rounds (none by default)."""
        return {}

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`own_state` returned."""


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Return the state of a strategy chain, each wrapper under its class name."""
    if isinstance(strategy, StrategyWrapper):
        own = prefixed(type(strategy).__name__, strategy.own_state())
        return {**own, **strategy_state(strategy.strategy)}
    return prefixed("inner", _flower_state(strategy))


def load_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Restore a state from :func:`strategy_state` into the same chain."""
    if isinstance(strategy, StrategyWrapper):
        strategy.load_own_state(nested(state, type(strategy).__name__))
        load_strategy_state(strategy.strategy, state)
    else:
        _load_flower_state(strategy, nested(state, "inner"))


def _flower_state(strategy: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for attr in FLOWER_STATE:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            kind, items = "record", [(k, a.numpy()) for k, a in value.items()]
        elif isinstance(value, dict):
            kind, items = "dict", list(value.items())
        else:
            kind, items = "list", [(str(i), a) for i, a in enumerate(value)]
        state[attr] = {"kind": kind, "names": [k for k, _ in items]}
        state.update({f"{attr}/{k}": np.asarray(a) for k, a in items})
    return state


def _load_flower_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    for attr in FLOWER_STATE:
        if not hasattr(strategy, attr):
            continue
        info = state.get(attr)
        if info is None:  # not set yet when the state was taken
            setattr(strategy, attr, None)
            continue
        items = [(k, state[f"{attr}/{k}"]) for k in info["names"]]
        value: Any
        if info["kind"] == "record":
            value = ArrayRecord({k: Array(a) for k, a in items})
        elif info["kind"] == "dict":
            value = dict(items)
        else:
            value = [a for _, a in items]
        setattr(strategy, attr, value)
