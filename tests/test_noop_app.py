"""benchmarks/noop_app: the no-op Flower app whose rounds are the deployment floor of benchmarks/round_overhead.py.

Its messages must cost what a model's do: Flower 1.42 sends each distinct 5-MB chunk of an array once (by content
hash), so a reply that returned the arrays it got, or arrays of zeros, would move next to nothing.
"""

import importlib.util
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

APP = Path(__file__).resolve().parents[1] / "benchmarks" / "noop_app" / "noop_app.py"


def _noop_app():
    spec = importlib.util.spec_from_file_location("noop_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_train_reply_carries_new_arrays_of_the_same_keys_shapes_and_dtypes():
    app = _noop_app()
    sent = OrderedDict([("conv.weight", np.random.default_rng(0).random((4, 3, 3), dtype=np.float32)),
                        ("bn.num_batches_tracked", np.array(7, dtype=np.int64))])  # 0-d, as BatchNorm's counter
    content = RecordDict({"arrays": ArrayRecord(OrderedDict((k, Array(v)) for k, v in sent.items())),
                          "config": ConfigRecord({})})
    meta = Metadata(run_id=1, message_id="msg-1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type="train")
    msg = Message(content, metadata=meta)
    reply = app.train(msg, _context())
    got = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert list(got) == list(sent)
    for key, value in sent.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value + 1)  # every number changed: no chunk is the one received
    assert reply.content["metrics"]["num-examples"] == 1
    assert reply.content["metrics"]["startup-seconds"] > 0  # this test process's age


def test_the_servers_arrays_are_random_in_the_shapes_and_dtypes_asked():
    """The ServerApp's initial arrays: zeros would travel as one distinct chunk per array."""
    spec = [["conv.weight", [64, 1, 7, 7, 7], "float32"], ["bn.num_batches_tracked", [], "int64"]]
    arrays = {k: a.numpy() for k, a in _noop_app().initial_arrays(spec).items()}
    weight = arrays["conv.weight"]
    assert weight.shape == (64, 1, 7, 7, 7) and weight.dtype == np.float32
    assert len(np.unique(weight)) > 0.99 * weight.size  # distinct numbers, not a constant
    assert arrays["bn.num_batches_tracked"].shape == () and arrays["bn.num_batches_tracked"].dtype == np.int64
