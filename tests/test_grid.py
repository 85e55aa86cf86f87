"""server/grid.py: PollingGrid around Flower's real in-memory Grid and LinkState.

The setup is the one Flower's simulation builds (flwr/simulation/run_simulation.py ``_main_loop``): an
in-memory LinkState with a pre-registered Run and its primary Task, an ``InMemoryGrid`` set to that run, and
SuperNodes registered and marked online as the simulation runtime does (flwr/server/superlink/fleet/vce/
vce_api.py ``_register_nodes``). A background thread plays the nodes the way vce_api's loops do: it pulls
each node's instruction from the LinkState and stores a reply built with ``Message(content, reply_to=...)``.

Checked: replies to every sent message come back with their content; a node that never replies makes
``send_and_receive`` return at its timeout (not on a 3-s deployment tick); every other Grid call is the
wrapped grid's; the poll interval must be > 0.
"""

from __future__ import annotations

import copy
import secrets
import threading
import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server.grid import PollingGrid

RUN_ID, TASK_ID = 4242, 7


class Federation:
    """Flower's in-memory LinkState and Grid for one run, with SuperNodes registered and online."""

    def __init__(self, num_nodes: int):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        self.state = factory.state()
        run = Run.create_empty(run_id=RUN_ID)
        run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
        self.state.run_ids[run.run_id] = RunRecord(run=run)
        self.state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=run.run_id)
        self.grid = InMemoryGrid(state_factory=factory)
        self.grid.set_run(run)
        self.node_ids = [self._register_node() for _ in range(num_nodes)]

    def _register_node(self) -> int:
        node_id = self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                         heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        self.state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        return node_id

    def reply_later(self, node_ids: list[int], delay: float) -> threading.Thread:
        """After ``delay`` s, each of ``node_ids`` pulls its instruction (waiting until the Grid has pushed it)
        and stores a reply whose metric is twice the instruction's ``x`` (vce_api's add_messages_to_queue /
        worker / put_message_into_state). ``self.replied`` lists the nodes that did, in order."""
        self.replied: list[int] = []

        def pull(node_id: int) -> Message:
            deadline = time.monotonic() + 30.0  # the push comes from the test's thread, whenever it is scheduled
            while time.monotonic() < deadline:
                found = self.state.get_message_ins(node_id=node_id, limit=1)
                if found:
                    return found[0]
                time.sleep(0.01)
            raise AssertionError(f"node {node_id} never received an instruction")

        def play() -> None:
            time.sleep(delay)
            for node_id in node_ids:
                ins = pull(node_id)
                x = ins.content.config_records["config"]["x"]
                reply = Message(RecordDict({"metrics": MetricRecord({"y": 2.0 * x, "node": node_id})}),
                                reply_to=ins)
                reply.metadata.__dict__["_message_id"] = str(uuid4())  # as vce_api's worker does
                assert self.state.store_message_res(reply) is not None
                self.replied.append(node_id)

        thread = threading.Thread(target=play, daemon=True)
        thread.start()
        return thread


def instruction(node_id: int, x: float) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": x})}), dst_node_id=node_id, message_type="train")


@pytest.fixture
def federation(monkeypatch) -> Federation:
    # The ServerApp's identity, as run_simulation sets it for new Messages (restored after the test)
    monkeypatch.setattr(TaskIdentity, "_task_id", TASK_ID)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    return Federation(num_nodes=2)


def test_replies_from_every_node_come_back(federation):
    grid = PollingGrid(federation.grid, interval=0.05)
    sent = {node_id: instruction(node_id, x=1.5 + i) for i, node_id in enumerate(federation.node_ids)}
    player = federation.reply_later(federation.node_ids, delay=0.2)
    replies = list(grid.send_and_receive(sent.values(), timeout=5.0))
    player.join(timeout=5.0)

    assert len(replies) == 2
    by_id = {msg.metadata.message_id: (node_id, msg) for node_id, msg in sent.items()}
    assert {r.metadata.reply_to_message_id for r in replies} == set(by_id)
    for reply in replies:
        node_id, ins = by_id[reply.metadata.reply_to_message_id]
        assert not reply.has_error()
        assert reply.metadata.src_node_id == node_id
        metrics = reply.content.metric_records["metrics"]
        assert metrics["node"] == node_id
        assert metrics["y"] == pytest.approx(2.0 * ins.content.config_records["config"]["x"])


def test_timeout_returns_the_replies_that_came(federation):
    grid = PollingGrid(federation.grid, interval=0.05)
    answering, silent = federation.node_ids
    player = federation.reply_later([answering], delay=0.0)
    start = time.monotonic()
    replies = list(grid.send_and_receive([instruction(answering, 1.0), instruction(silent, 2.0)], timeout=1.0))
    elapsed = time.monotonic() - start
    player.join(timeout=5.0)

    # The answering node replies as soon as its instruction is pushed; a loaded machine (CI runs tests in two
    # processes on 2 cores) may delay that thread, so it is given the whole second, and it must have replied
    assert federation.replied == [answering], "the answering node's thread did not reply within the timeout"
    assert [r.metadata.src_node_id for r in replies] == [answering]
    assert 1.0 <= elapsed < 2.5  # waited for the silent node until the timeout, not for a 3-s tick


def test_timeout_with_no_reply_at_all_is_empty(federation):
    grid = PollingGrid(federation.grid, interval=0.05)
    start = time.monotonic()
    replies = list(grid.send_and_receive([instruction(federation.node_ids[0], 1.0)], timeout=0.3))
    assert replies == []
    assert 0.3 <= time.monotonic() - start < 2.0


def test_other_grid_calls_are_flowers(federation):
    inner = federation.grid
    grid = PollingGrid(inner, interval=0.05)
    assert set(grid.get_node_ids()) == set(inner.get_node_ids()) == set(federation.node_ids)
    assert grid.run == inner.run
    assert grid.run.run_id == RUN_ID
    assert grid.state is inner.state  # an attribute only InMemoryGrid has
    # Grid.get_nodes has a base-class fallback with empty statuses: the inner grid's answer must come through
    assert sorted((n.node_id, n.status) for n in grid.get_nodes()) == sorted(
        (n.node_id, n.status) for n in inner.get_nodes())
    assert all(n.status for n in grid.get_nodes())
    assert copy.copy(grid).get_node_ids() == grid.get_node_ids()  # a copy delegates too, no recursion


@pytest.mark.parametrize("interval", [0, 0.0, -0.5])
def test_interval_must_be_positive(federation, interval):
    with pytest.raises(ValueError, match="interval"):
        PollingGrid(federation.grid, interval)
