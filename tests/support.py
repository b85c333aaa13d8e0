"""Shared test support for code that runs inside a ServerApp (no network needed)."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def server_task_identity() -> Iterator[None]:
    """What a ServerApp process has, and what creating a Message needs: run, node, task ids."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class StaticGrid(Grid):
    """A grid with a fixed set of connected nodes; it only answers node queries."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_nodes(self):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError
