"""transport-dtype (common/transport.py): float16 on the wire, float32 weights on the server.

The real simulation with float16 transport (and Flower's message_size_mod measuring both kinds of run) is
test_strategy_runs.py::test_float16_transport_halves_the_messages.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.app import transport_mod
from client.handlers import _reply
from client.site import Site
from common import keys
from common.config import RunConfig
from common.errors import ConfigError
from common.learning.model import exchanged_keys, make_model
from common.transport import decode_update, encode_update, from_wire, to_wire
from server.strategy import RecordingStrategy, nan_aware_mean, train_metrics_summary

RNG = np.random.default_rng(0)


def _weights() -> dict[str, np.ndarray]:
    return {"conv.weight": RNG.normal(0, 0.05, (16, 27)).astype(np.float32),
            "bn.running_var": RNG.uniform(0.5, 2.0, 16).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_a_float16_update_is_added_to_the_servers_float32_weights():
    server = _weights()
    wire = to_wire(server)
    assert wire["conv.weight"].dtype == np.float16 and wire["bn.num_batches_tracked"].dtype == np.int64
    received = from_wire(wire)
    assert received["conv.weight"].dtype == np.float32
    step = RNG.normal(0, 1e-3, server["conv.weight"].shape).astype(np.float32)
    trained = {"conv.weight": received["conv.weight"] + step, "bn.running_var": received["bn.running_var"] * 0.9,
               "bn.num_batches_tracked": np.array(9, dtype=np.int64)}
    update = encode_update(trained, received)
    assert update["conv.weight"].dtype == np.float16 and int(update["bn.num_batches_tracked"]) == 9
    rebuilt = decode_update(update, server)
    assert rebuilt["conv.weight"].dtype == np.float32 and int(rebuilt["bn.num_batches_tracked"]) == 9
    error = np.abs(rebuilt["conv.weight"] - (server["conv.weight"] + step)).max()
    # the update's own float16 rounding (~1e-3 * 2^-11), far below rounding the weights themselves
    assert error < 5e-6
    assert error < np.abs(from_wire(to_wire(trained))["conv.weight"] - trained["conv.weight"]).max() / 10
    np.testing.assert_allclose(rebuilt["bn.running_var"], server["bn.running_var"] + (trained["bn.running_var"]
                               - received["bn.running_var"]), rtol=1e-3)


def test_the_batchnorm_counter_travels_whole_after_flower_averaged_it_to_a_float():
    """Round 2 of a real run: the server's num_batches_tracked is a float (Flower's FedAvg averages it), the
    site's is an int64 it sends whole."""
    server = _weights() | {"bn.num_batches_tracked": np.array(7.0, dtype=np.float32)}
    received = from_wire(to_wire(server))
    trained = dict(received, **{"bn.num_batches_tracked": np.array(12, dtype=np.int64)})
    update = encode_update(trained, received)
    assert update["bn.num_batches_tracked"].dtype == np.int64
    rebuilt = decode_update(update, server)
    assert not isinstance(rebuilt, str) and int(rebuilt["bn.num_batches_tracked"]) == 12


def test_an_update_beyond_float16_range_is_refused_at_the_site_by_name():
    received = from_wire(to_wire(_weights()))
    trained = dict(received, **{"conv.weight": received["conv.weight"] + 1e5})
    with pytest.raises(ValueError, match=r"update of conv.weight reaches 1e\+05, beyond float16's range.*float32"):
        encode_update(trained, received)


def test_a_float32_reply_under_float16_transport_is_named():
    server = _weights()
    reason = decode_update(server, server)
    assert isinstance(reason, str) and "'conv.weight' came as float32, not a float16 update" in reason


def test_transport_dtype_is_validated_with_its_choices_and_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match="transport-dtype.*must be one of float32, float16"):
        RunConfig.from_mapping({"transport-dtype": "int8"})
    with pytest.raises(ConfigError, match="secure-aggregation = true with transport-dtype = 'float16'"):
        RunConfig.from_mapping({"transport-dtype": "float16", "secure-aggregation": True, "min-nodes": 3})
    assert RunConfig.from_mapping({"transport-dtype": "float16"}).transport_dtype == "float16"


def _message(node: int, content: RecordDict, message_type: str = "train") -> Message:
    meta = Metadata(run_id=1, message_id=f"msg-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content, metadata=meta)


def _bytes(messages: list[Message]) -> int:
    return sum(record.count_bytes() for m in messages for record in m.content.values())


def test_med3d_weights_travel_in_half_the_bytes_and_aggregate_on_float32_server_weights():
    """Server (RecordingStrategy around Flower's FedAvg) and sites (the ClientApp's transport_mod) together, on
    the real resnet_10 weights: the instructions carry <= 0.51x the float32 bytes, the sites' replies too, and
    the aggregate is the server's float32 weights plus the sites' weighted mean update."""
    cfg = RunConfig.from_mapping({"transport-dtype": "float16", "input-shape": "16,16,16"})
    model = make_model(cfg)
    state = model.state_dict()
    server = OrderedDict((k, state[k].numpy().copy()) for k in exchanged_keys(model))
    # one RecordDict for all the instructions, as Flower's FedAvg.configure_train makes them
    content = RecordDict({keys.ARRAYS: ArrayRecord(OrderedDict((k, Array(v)) for k, v in server.items())),
                          keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})
    fp32_bytes = 2 * _bytes([_message(1, content)])
    plain = [_message(n, content) for n in (1, 2)]
    strategy = RecordingStrategy(FedAvg(train_metrics_aggr_fn=train_metrics_summary,
                                        evaluate_metrics_aggr_fn=nan_aware_mean), transport_dtype="float16")
    strategy.reference[1] = {k: v.shape for k, v in server.items()}
    sent = strategy._to_wire(plain, remember=True)
    assert _bytes(sent) <= 0.51 * fp32_bytes
    wire = {k: v.numpy() for k, v in sent[0].content[keys.ARRAYS].items()}
    assert all(wire[k].dtype == np.float16 for k, v in server.items() if v.dtype.kind == "f")
    assert sent[0].content[keys.ARRAYS] is sent[1].content[keys.ARRAYS]  # converted once for all sites
    assert all(v.dtype == np.float32 for v in strategy._sent.values() if v.dtype.kind == "f")  # kept in float32

    steps = {1: 1e-3, 2: -2e-3}
    sizes = {1: 10, 2: 30}
    replies = []
    for node, ins in zip((1, 2), sent):
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=cfg.to_dict())

        def site(msg: Message, _ctx: Context, node=node) -> Message:
            got = {k: v.numpy() for k, v in msg.content[keys.ARRAYS].items()}
            assert all(v.dtype != np.float16 for v in got.values())  # the handler sees float32 weights
            trained = {k: (v + np.float32(steps[node]) if v.dtype.kind == "f" else v) for k, v in got.items()}
            n = sizes[node]
            metrics = {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.5, keys.TRAIN_SECONDS: 1.0,
                       keys.SAMPLES_PER_SECOND: 1.0, keys.STARTUP_SECONDS: 0.0, keys.SETUP_SECONDS: 0.1,
                       keys.class_count_key(0): n // 2, keys.class_count_key(1): n - n // 2}
            where = Site(name=f"s{node}", index=node, manifest=Path("/x.csv"), cache_dir=Path("/c"))
            return _reply(msg, where, metrics, ArrayRecord(OrderedDict((k, Array(v)) for k, v in trained.items())))

        replies.append(transport_mod(ins, context, site))
    reply_bytes = sum(r.content[keys.ARRAYS].count_bytes() for r in replies)
    assert reply_bytes <= 0.51 * fp32_bytes
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.rejected == {}
    mean_step = (10 * 1e-3 + 30 * -2e-3) / 40
    for k, v in arrays.items():
        got = v.numpy()
        if server[k].dtype.kind == "f":
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, server[k] + mean_step, atol=2e-6, err_msg=k)
