"""A Flower app that does nothing but Flower's part of a round: the floor of benchmarks/round_overhead.py.

The ServerApp sends an ArrayRecord of fedpd's exchanged shapes to every node in a train and an evaluate
message per round, with Flower's FedAvg; the ClientApp answers the train message with arrays of the same
shapes and the evaluate message with a count.

The arrays carry random numbers, and a train reply's differ from the ones received (each number + 1), so every
message carries new content, as a model's weights do. Flower 1.42 splits each array into 5-MB chunks and
sends a chunk only once per content hash (``flwr/app/message/array.py``): arrays of zeros, or a reply that
returns the arrays it got, would travel as a few distinct chunks, and the floor would leave out the cost of
moving a real model. Each round's start (``configure_train``) and end (after the
evaluate replies) go to the run-config's ``out`` JSON file, as fedpd's ``rounds.jsonl`` times its rounds,
with the slowest ClientApp process's age when its handler ran (``startup-seconds``, as fedpd's sites report it):
Flower's own start-up of a message, which fedpd's per-message start-up is compared against. The ServerApp
checks for replies every ``poll-interval`` seconds with fedpd's :class:`server.grid.PollingGrid`, as fedpd's
ServerApp does (3 s: Flower's deployment Grid's own wait).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.grid import PollingGrid  # fedpd's own wrapper (the venv that runs this app has fedpd installed)

server = ServerApp()
client = ClientApp()


def _age() -> float:
    """Seconds since this process started (Linux /proc), the measure fedpd's ``startup-seconds`` uses."""
    with open("/proc/self/stat") as fh:
        start_ticks = float(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def initial_arrays(spec: list, seed: int = 0) -> ArrayRecord:
    """The arrays of ``spec`` (``[name, shape, dtype]`` each), filled with random numbers in [0, 1)."""
    rng = np.random.default_rng(seed)
    return ArrayRecord(OrderedDict((name, Array(np.asarray(rng.random(shape, dtype=np.float32), dtype=dtype)))
                                   for name, shape, dtype in spec))


def _changed(array: np.ndarray) -> np.ndarray:
    """``array`` with every number + 1, in place (``Array.numpy()`` already made it a fresh copy): new content, as
    training makes, and an ndarray also for 0-d arrays (``array + 1`` would give a numpy scalar there)."""
    array += 1
    return array


class _Timed(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: dict[int, float] = {}
        self.startup: dict[tuple[int, str], float] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def _slowest(self, server_round, replies, kind):
        ages = [m.content["metrics"]["startup-seconds"] for m in replies if m.has_content()]
        self.startup[(server_round, kind)] = max(ages, default=0.0)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._slowest(server_round, replies, "train")
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self._slowest(server_round, replies, "evaluate")
        return super().aggregate_evaluate(server_round, replies)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    grid = PollingGrid(grid, float(rc["poll-interval"]))  # fedpd's ServerApp does the same (server/grid.py)
    arrays = initial_arrays(json.loads(Path(str(rc["shapes"])).read_text()))
    n = int(rc["min-nodes"])
    strategy = _Timed(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                      min_available_nodes=n)
    rounds: list[dict] = []

    def done(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            rounds.append({"round": server_round, "start": strategy.started[server_round], "end": time.time(),
                           "startup-train": strategy.startup.get((server_round, "train"), 0.0),
                           "startup-evaluate": strategy.startup.get((server_round, "evaluate"), 0.0)})
        return None

    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(rc["num-server-rounds"]), evaluate_fn=done)
    Path(str(rc["out"])).write_text(json.dumps(rounds))


@client.train()
def train(msg: Message, context: Context) -> Message:
    age = _age()
    trained = OrderedDict((k, Array(_changed(a.numpy()))) for k, a in msg.content["arrays"].items())
    content = RecordDict({"arrays": ArrayRecord(trained),
                          "metrics": MetricRecord({"num-examples": 1, "startup-seconds": age})})
    return Message(content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "startup-seconds": _age()})}), reply_to=msg)
