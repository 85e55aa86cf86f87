"""The hand-over of one deployed message between the thin ClientApp and the site worker (client/worker.py).

A training message carries the whole model (resnet_10: 57.5 MB of float32) to the worker and its reply carries
it back; an evaluation message carries it one way. Each crossing is encoded by one side and decoded by the
other. Timed here, in one process and one run, for the same message:

- ``protobuf``: protocol 1 (before 2026-12-05 late): Flower's protobuf encoding of the whole message
  (``message_to_proto(...).SerializeToString()``) and back (``FromString`` + ``message_from_proto``);
- ``frames``: protocol 2: ``worker._pack`` (records but arrays as protobuf, each array's bytes as they are)
  and ``worker._unpack``, plus the copy of every frame into fresh bytes that the socket read makes.

No socket: both encodings cross the same Unix socket as a few length-prefixed frames, so what differs is the
encoding. Prints min/median/max seconds of ``--repeats`` round trips (encode + decode) and their ratio.

    .venv/bin/python benchmarks/handover.py --depth 10 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402  # pylint: disable=E0611

from client import worker  # noqa: E402
from common import keys  # noqa: E402
from common.learning.model import build_med3d  # noqa: E402


def _message(depth: int) -> Message:
    state = build_med3d(depth=depth, num_classes=2).state_dict()
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")
    content = RecordDict({keys.ARRAYS: ArrayRecord(OrderedDict(state)), keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 1})})
    return Message(content, metadata=meta)


def _protobuf(msg: Message) -> int:
    data = message_to_proto(msg).SerializeToString()
    back = message_from_proto(ProtoMessage.FromString(data))
    assert list(back.content[keys.ARRAYS]) == list(msg.content[keys.ARRAYS])
    return len(data)


def _frames(msg: Message) -> int:
    index, frames = worker._pack(msg.content)
    received = [bytes(bytearray(f)) for f in frames]  # the socket read: into a buffer, then bytes
    back = worker._unpack(index, received)
    assert list(back[keys.ARRAYS]) == list(msg.content[keys.ARRAYS])
    return sum(len(f) for f in frames)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    msg = _message(a.depth)
    times: dict[str, list[float]] = {"protobuf": [], "frames": []}
    sizes = {}
    for r in range(a.repeats):
        for name, fn in sorted({"protobuf": _protobuf, "frames": _frames}.items(), reverse=bool(r % 2)):  # alternate
            start = time.perf_counter()
            sizes[name] = fn(msg)
            times[name].append(time.perf_counter() - start)
    print(f"resnet_{a.depth} training message, one crossing (encode + decode), {a.repeats} repeats:")
    for name, ts in times.items():
        print(f"  {name:9s} {sizes[name] / 1e6:6.1f} MB  min {min(ts):.3f} s  median {statistics.median(ts):.3f} s  "
              f"max {max(ts):.3f} s")
    ratio = statistics.median(times["frames"]) / statistics.median(times["protobuf"])
    print(f"  frames / protobuf (medians): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
