"""Update-norm clipping: bound how far any one client can move the global model.

Each valid reply's model ``w`` is replaced by ``g + (w - g) * min(1, C / ||w - g||)`` (the L2
norm over all tensors) before the inner strategy aggregates, so a client that scales its update
up (a scaling attacker, or a diverging client) weighs at most like one with an update of norm
``C``. This is robustness, not differential privacy: no noise is added.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprune import keys
from strategies.records import from_record, to_record
from strategies.wrapper import StrategyWrapper


class UpdateClipping(StrategyWrapper):
    """Clip every client's update to L2 norm ``max_norm`` before aggregation.

    Parameters
    ----------
    strategy : Strategy
        The aggregating strategy.
    max_norm : float
        The largest L2 norm of an update ``w - g`` over all tensors, ``> 0``.
    """

    def __init__(self, strategy: Strategy, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        super().__init__(strategy)
        self.max_norm = max_norm
        self._global: dict[str, np.ndarray] = {}
        self.clipped: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the updates are measured against."""
        self._global = from_record(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each reply's update in place, then aggregate with the inner strategy."""
        got = list(replies)
        clipped = 0
        for reply in got:
            if reply.has_error():
                continue
            model = from_record(reply.content.array_records[keys.ARRAYS])
            update = {name: model[name] - g for name, g in self._global.items()}
            norm = float(np.sqrt(sum(float(np.vdot(u, u)) for u in update.values())))
            if norm > self.max_norm:
                factor = np.float32(self.max_norm / norm)
                reply.content[keys.ARRAYS] = to_record(
                    {name: g + update[name] * factor for name, g in self._global.items()}
                )
                clipped += 1
        self.clipped[server_round] = clipped
        if clipped:
            log(
                INFO,
                "round %d: clipped %d updates to norm %g",
                server_round,
                clipped,
                self.max_norm,
            )
        return self.strategy.aggregate_train(server_round, got)

    def summary(self) -> None:
        """Log the bound, then the inner strategy."""
        log(INFO, "\t├──> Update-norm clipping at %g", self.max_norm)
        self.strategy.summary()
