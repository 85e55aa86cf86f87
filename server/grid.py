"""The ServerApp's Grid, checking for site replies every ``poll-interval`` seconds.

Flower 1.42's deployment Grid (``flwr.superlink.grid.http_grid``) pushes a round's messages and then asks the
SuperLink for the replies every 3 s (a fixed ``time.sleep(3)``); the simulation's in-memory Grid asks every
0.1 s. So in a deployment every phase of a round (train, evaluate, each SecAgg+ stage) ends on a 3-s tick
after its last reply: up to 3 s lost per phase, 0-6 s per round, at random (BENCHMARKS.md, issue 16 item 1).
:class:`PollingGrid` keeps Flower's Grid for everything (messages, node ids, push, pull) and only replaces that
wait: same push, same pull, same timeout, a shorter sleep. An empty pull is one small gRPC call to the
SuperLink, which runs beside the ServerApp.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

__all__ = ["PollingGrid"]


class PollingGrid(Grid):
    """``grid`` with :meth:`send_and_receive` polling every ``interval`` seconds; every other call is Flower's."""

    def __init__(self, grid: Grid, interval: float):
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval!r}")
        self._grid, self.interval = grid, float(interval)

    def __getattr__(self, name: str):  # attributes a Grid implementation adds (e.g. node, state)
        if name.startswith("_"):  # not set yet (a copy being built): no lookup through ourselves
            raise AttributeError(name)
        return getattr(self._grid, name)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # Grid defines a fallback of its own, so __getattr__ would not reach the inner one
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` seconds have passed (Flower's
        semantics; ``None`` waits for ever)."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while True:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                return replies
            left = None if timeout is None else end - time.monotonic()
            if left is not None and left <= 0:
                return replies
            time.sleep(self.interval if left is None else min(self.interval, left))
