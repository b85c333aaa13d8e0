"""A ServerApp's surroundings without a network: its task identity and a fixed grid of nodes.

For tests and benchmarks that drive a strategy directly.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def server_task_identity() -> Iterator[None]:
    """Set the run, node and task ids a ServerApp process has (creating a Message needs them)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class StaticGrid(Grid):
    """A grid with a fixed set of connected nodes; it only answers node queries."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """Return the connected nodes."""
        return list(self.node_ids)

    def set_run(self, run: Run) -> None:  # noqa: D102
        raise NotImplementedError

    @property
    def run(self) -> Run:  # noqa: D102
        raise NotImplementedError

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError
