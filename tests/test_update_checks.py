"""The server's screening of site replies (server/strategy.py), on real Flower Message/ArrayRecord objects
built by the ClientApp's own ``_reply``: each kind of bad update is rejected with a reason naming the
problem, recorded with site and round, and the remaining updates are aggregated by samples.
Also the per-round participation table of the report (server/app.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from client.handlers import _reply
from client.site import Site
from common import keys
from common.runs.records import RoundRecord
from server.strategy import (EVALUATE_METRIC_KEYS, MAX_NUM_EXAMPLES, RecordingFedAvg, check_evaluate_reply,
                             check_train_reply)

REFERENCE = {"w": (4,), "b": (2, 3), "nbt": ()}  # key -> shape of the "global model"


def _instruction(node: int, message_type: str = "train") -> Message:
    meta = Metadata(run_id=1, message_id=f"msg-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


def _arrays(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full(4, value, dtype=np.float32), "b": np.full((2, 3), value, dtype=np.float32),
            "nbt": np.asarray(3, dtype=np.int64)}


def _metrics(n: int = 10, loss: float = 0.5) -> dict:
    return {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss, keys.TRAIN_SECONDS: 1.0, keys.SAMPLES_PER_SECOND: float(n),
            keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5,
            keys.class_count_key(0): n // 5, keys.class_count_key(1): n - n // 5}


def _reply_msg(node: int, site: str, arrays: dict | ArrayRecord, metrics: dict) -> Message:
    s = Site(name=site, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return _reply(_instruction(node), s, metrics, record)


def _good() -> Message:
    return _reply_msg(101, "A", _arrays(), _metrics())


def _with_arrays(**changes) -> Message:
    arrays = _arrays()
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    return _reply_msg(101, "A", arrays, _metrics())


def _with_metrics(**changes) -> Message:
    metrics = _metrics()
    for k, v in changes.items():
        k = k.replace("_", "-")
        if v is None:
            del metrics[k]
        else:
            metrics[k] = v
    return _reply_msg(101, "A", _arrays(), metrics)


def _lying_array() -> Array:
    """Declares the reference shape (4,) but holds 5 numbers."""
    good = Array(np.zeros(5, dtype=np.float32))
    return Array(dtype=good.dtype, shape=(4,), stype=good.stype, data=good.data)


def test_good_reply_passes():
    assert check_train_reply(_good().content, REFERENCE) is None


def test_bounds_are_documented_defaults():
    assert MAX_NUM_EXAMPLES == 100_000
    assert RecordingFedAvg().max_num_examples == MAX_NUM_EXAMPLES


BAD_TRAIN = {
    "nan weight": (lambda: _with_arrays(w=np.array([0.0, np.nan, 1.0, 2.0], dtype=np.float32)),
                   "array 'w' holds 1 non-finite value(s) (NaN/Inf) out of 4"),
    "inf weight": (lambda: _with_arrays(b=np.full((2, 3), np.inf, dtype=np.float64)), "array 'b' holds 6 non-finite"),
    "missing key": (lambda: _with_arrays(b=None), "array keys differ from the global model: missing ['b']"),
    "unexpected key": (lambda: _with_arrays(extra=np.zeros(2, dtype=np.float32)), "unexpected ['extra']"),
    "wrong shape": (lambda: _with_arrays(b=np.zeros((3, 2), dtype=np.float32)),
                    "array 'b' has shape (3, 2) (declared (3, 2)), the global model's is (2, 3)"),
    "declared shape lies": (lambda: _reply_msg(101, "A", ArrayRecord({"w": _lying_array(), "b": Array(_arrays()["b"]),
                                                                      "nbt": Array(_arrays()["nbt"])}), _metrics()),
                            "array 'w' has shape (5,) (declared (4,))"),
    "strings as weights": (lambda: _with_arrays(w=np.array(["a", "b", "c", "d"])), "non-numeric dtype <U1"),
    "undecodable": (lambda: _reply_msg(101, "A", ArrayRecord({"w": Array(dtype="float32", shape=(4,), stype="torch.Tensor",
                                                                         data=b"\x00" * 16),
                                                              "b": Array(_arrays()["b"]), "nbt": Array(_arrays()["nbt"])}),
                                       _metrics()), "array 'w' cannot be decoded"),
    "zero examples": (lambda: _with_metrics(num_examples=0, class_count_0=0, class_count_1=0), "num-examples = 0 is below 1"),
    "negative examples": (lambda: _with_metrics(num_examples=-10), "num-examples = -10 is below 1"),
    "fractional examples": (lambda: _with_metrics(num_examples=10.5), "num-examples = 10.5 is not an integer"),
    "integral float examples": (lambda: _with_metrics(num_examples=10.0), "num-examples = 10.0 is not an integer"),
    "huge examples": (lambda: _with_metrics(num_examples=10**9, class_count_1=10**9),
                      f"num-examples = 1000000000 exceeds the bound {MAX_NUM_EXAMPLES}"),
    "more examples than class counts": (lambda: _with_metrics(num_examples=500),
                                        "num-examples = 500 but the site's class counts sum to 10"),
    "negative class count": (lambda: _with_metrics(class_count_0=-2, class_count_1=12), "class-count-0 = -2 is below 0"),
    "nan loss": (lambda: _with_metrics(train_loss=float("nan")), "metric 'train-loss' = nan is not finite"),
    "list metric": (lambda: _with_metrics(train_loss=[0.1, 0.2]), "metric 'train-loss' = [0.1, 0.2] is not a single number"),
    "missing metric": (lambda: _with_metrics(train_loss=None), "metric keys: missing ['train-loss']"),
    "extra metric": (lambda: _with_metrics(per_sample=[0.1, 0.9]), "metric keys: unexpected ['per-sample']"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_reply_is_rejected_with_reason(case):
    make, expected = BAD_TRAIN[case]
    reason = check_train_reply(make().content, REFERENCE)
    assert reason is not None and expected in reason, reason


def test_extra_and_missing_records_are_rejected():
    msg = _good()
    msg.content["scores"] = ArrayRecord({"y": Array(np.zeros(3, dtype=np.float32))})
    assert "records {" in check_train_reply(msg.content, REFERENCE)
    msg = _good()
    msg.content["subject"] = ConfigRecord({"id": "sub-001"})
    assert "records {" in check_train_reply(msg.content, REFERENCE)
    msg = _good()
    del msg.content[keys.ARRAYS]
    assert "expected ArrayRecord 'arrays'" in check_train_reply(msg.content, REFERENCE)
    msg = _good()
    del msg.content[keys.SITE]  # the site record is optional
    assert check_train_reply(msg.content, REFERENCE) is None


def test_without_reference_only_the_content_checks_run():
    assert check_train_reply(_with_arrays(extra=np.zeros(2, dtype=np.float32)).content, None) is None
    assert "non-finite" in check_train_reply(_with_arrays(w=np.full(4, np.nan, dtype=np.float32)).content, None)


def test_max_num_examples_is_configurable():
    content = _with_metrics(num_examples=500, class_count_0=100, class_count_1=400).content
    assert check_train_reply(content, REFERENCE) is None
    assert "exceeds the bound 499" in check_train_reply(content, REFERENCE, max_num_examples=499)


def _eval_reply(node: int, site: str, n, auc: float = 0.5) -> Message:
    s = Site(name=site, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
    metrics = {keys.NUM_EXAMPLES: n, **{keys.eval_key(m): 0.5 for m in keys.EVAL_METRICS}, keys.eval_key("auc"): auc,
               keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5, keys.EVAL_SECONDS: 0.2}
    return _reply(_instruction(node, "evaluate"), s, metrics)


def test_evaluate_reply_checks():
    assert set(EVALUATE_METRIC_KEYS) == set(_eval_reply(1, "A", 3).content[keys.METRICS])
    assert check_evaluate_reply(_eval_reply(1, "A", 3).content) is None
    assert check_evaluate_reply(_eval_reply(1, "A", 0, auc=float("nan")).content) is None  # undefined metrics are fine
    assert "below 0" in check_evaluate_reply(_eval_reply(1, "A", -1).content)
    assert "not an integer" in check_evaluate_reply(_eval_reply(1, "A", 2.5).content)
    msg = _eval_reply(1, "A", 3)
    msg.content[keys.ARRAYS] = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    assert "records {" in check_evaluate_reply(msg.content)


def test_strategy_rejects_bad_update_logs_it_and_aggregates_the_rest(caplog):
    strategy = RecordingFedAvg(round_offset=2)
    strategy.reference[3] = REFERENCE  # what configure_train records for global round 3 (Flower round 1)
    strategy.sampled[3] = [101, 102, 103, 104]
    replies = [
        _reply_msg(101, "A", _arrays(1.0), _metrics(10)),
        _reply_msg(102, "B", _arrays(2.0), _metrics(30)),
        _reply_msg(103, "C", _arrays(np.nan), _metrics(60)),  # diverged site
        _reply_msg(104, "D", _arrays(50.0), _metrics(10) | {keys.NUM_EXAMPLES: 10_000}),  # inflated weight
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    w = arrays["w"].numpy()
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, (10 * 1.0 + 30 * 2.0) / 40, rtol=1e-6)  # A and B only, by samples
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(0.5)
    assert set(strategy.train_sites[3]) == {"A", "B"}
    rejected = {r["site"]: r for r in strategy.rejected[3]}
    assert set(rejected) == {"C", "D"}
    assert rejected["C"]["round"] == 3 and rejected["C"]["phase"] == "train" and rejected["C"]["node"] == 103
    assert "non-finite" in rejected["C"]["reason"]
    assert "class counts sum to 10" in rejected["D"]["reason"]
    assert strategy.missing_sites(3) == ["C", "D"]
    text = caplog.text
    assert "round 3: rejected the train reply of site C (node 103)" in text
    assert "round 3: rejected the train reply of site D (node 104)" in text


def test_strategy_with_every_update_rejected_keeps_the_model():
    strategy = RecordingFedAvg()
    strategy.reference[1] = REFERENCE
    arrays, metrics = strategy.aggregate_train(1, [_reply_msg(101, "A", _arrays(np.inf), _metrics())])
    assert arrays is None and metrics is None  # Flower's start() then keeps the previous global model
    assert [r["site"] for r in strategy.rejected[1]] == ["A"]


def test_strategy_rejects_bad_evaluate_reply_instead_of_crashing():
    strategy = RecordingFedAvg()
    out = strategy.aggregate_evaluate(1, [_eval_reply(101, "A", 10, 0.6), _eval_reply(102, "B", 30, 0.8),
                                          _eval_reply(103, "C", 2.5, 0.1)])
    assert out[keys.eval_key("auc")] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert [(r["site"], r["phase"]) for r in strategy.rejected[1]] == [("C", "evaluate")]
    assert set(strategy.eval_sites[1]) == {"A", "B"}


def test_participation_table_of_the_report():
    from server.app import _participation

    records = [
        {"round": 1, "sites": {"A": {}, "B": {}, "C": {}}, "missing_sites": [], "failures": [], "rejected": []},
        {"round": 2, "sites": {"A": {}, "B": {}}, "missing_sites": ["C"],
         "failures": [{"site": "C", "phase": "evaluate", "reason": "Node Unavailable"}], "rejected": []},
        {"round": 3, "sites": {"A": {}}, "missing_sites": ["B"], "failures": [],
         "rejected": [{"site": "B", "node": 7, "round": 3, "phase": "train", "reason": "array 'w' holds 1 non-finite"}]},
    ]
    table = _participation([RoundRecord.from_dict(r, "test") for r in records])
    assert table["1"] == {"trained": ["A", "B", "C"], "missing": [], "not_sampled": [], "rejected": [], "failed": []}
    assert table["2"]["missing"] == ["C"] and table["2"]["failed"][0]["site"] == "C"
    assert table["3"] == {"trained": ["A"], "missing": ["B"], "not_sampled": ["C"],
                          "rejected": [{"site": "B", "phase": "train", "reason": "array 'w' holds 1 non-finite"}],
                          "failed": []}
    json.dumps(table, allow_nan=False)  # plain JSON for report.json


@pytest.mark.parametrize("mode, expected", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "has shape"),
                                            ("keys", "missing ['b']"), ("num-examples", "class counts sum to 100")])
def test_every_mode_of_the_bad_test_client_is_rejected(mode, expected):
    """tests/bad_client_app.py (the deployment test's bad site) spoils a real reply; the server catches each mode."""
    try:
        from bad_client_app import spoil
    except ImportError:  # run as a package
        from tests.bad_client_app import spoil

    reply = _reply_msg(101, "A", {"b": np.ones((2, 3), dtype=np.float32), "nbt": np.asarray(3, dtype=np.int64),
                                  "w": np.ones(4, dtype=np.float32)}, _metrics(100))
    assert check_train_reply(reply.content, REFERENCE) is None
    reason = check_train_reply(spoil(reply, mode).content, REFERENCE)
    assert reason is not None and expected in reason, reason


def test_superlink_made_error_reply_is_attributed_to_the_dead_node():
    """After missed heartbeats the SuperLink answers for the node: the error comes from the SuperLink's own
    node id and names the instruction in reply_to_message_id (Flower's own error builder is used here)."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy = RecordingFedAvg()
    strategy.reference[1] = REFERENCE
    strategy.aggregate_train(1, [_reply_msg(101, "A", _arrays(), _metrics()), _reply_msg(102, "B", _arrays(), _metrics())])
    sent = [_instruction(101, "evaluate"), _instruction(102, "evaluate")]  # message ids msg-101, msg-102
    strategy._outbox = sent  # what configure_evaluate keeps of the instructions Flower pushed
    error = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
    assert error.metadata.src_node_id != 102 and error.metadata.reply_to_message_id == "msg-102"
    strategy.aggregate_evaluate(1, [_eval_reply(101, "A", 5), error])
    (failure,) = strategy.failed[1]
    assert failure["node"] == 102 and failure["site"] == "B" and failure["phase"] == "evaluate"
    assert "Node Unavailable" in failure["reason"]


def test_negative_batchnorm_variance_is_rejected():
    """A reply whose BatchNorm running variance has a negative value is rejected (it would make every output NaN)."""
    reference = {"bn.running_var": (3,), "w": (4,)}
    good = {"bn.running_var": np.array([0.5, 0.0, 2.0], np.float32), "w": np.zeros(4, np.float32)}
    bad = dict(good, **{"bn.running_var": np.array([0.5, -0.1, 2.0], np.float32)})
    assert check_train_reply(_reply_msg(101, "A", good, _metrics()).content, reference) is None
    reason = check_train_reply(_reply_msg(101, "A", bad, _metrics()).content, reference)
    assert reason == "array 'bn.running_var' (a BatchNorm variance) holds 1 negative value(s)"


def test_server_validation_of_a_poisoned_model_records_nan_instead_of_stopping(tmp_path):
    """A model with non-finite outputs gets NaN validation figures and an infinite loss (a warning), not an
    exception; such a round never wins the selection."""
    from common.config import RunConfig
    from common.device import runtime
    from common.learning.model import build_med3d
    from common.learning.train import validation_metrics
    from common.runs.rundir import select_round

    try:
        from data_factory import make_manifest, write_nifti
    except ImportError:
        from tests.data_factory import make_manifest, write_nifti
    rows = make_manifest({(0, "A"): 2, (1, "A"): 2}, visits=(1, 1), seed=0, folder=tmp_path / "images")
    for i, p in enumerate(rows["path"]):
        write_nifti(Path(p), shape=(16, 16, 16), seed=i)
    cfg = RunConfig.from_mapping({"input-shape": "16,16,16", "spacing": "1.0,1.0,1.0", "batch-size": 2, "amp": False})
    model = build_med3d(depth=10, num_classes=2)
    with torch.no_grad():
        model.state_dict()["backbone.bn1.running_var"].fill_(-1.0)  # what a sign-flipped variance does
    m = validation_metrics(model, rows, cfg, runtime(False), tmp_path / "cache")
    assert m["loss"] == float("inf") and m["n"] == 4 and all(math.isnan(m[k]) for k in ("auc", "accuracy", "sensitivity"))
    records = [RoundRecord(round=1, val={"loss": 0.7, "auc": 0.6}), RoundRecord(round=2, val=m)]
    assert select_round(records) == 1


def test_a_run_whose_every_round_is_poisoned_fails_clearly(tmp_path):
    """Updates were aggregated, but no round's model gave finite validation outputs: failure.json and a
    RunFailedError that says so, instead of a selection error."""
    from types import SimpleNamespace

    from common.errors import RunFailedError
    from common.runs.rundir import RunDir
    from server.app import FAILURE_FILE, _require_training

    setup = SimpleNamespace(run=RunDir(tmp_path / "run").prepare())
    records = [RoundRecord(round=r, val={"loss": None}, sites={"A": {keys.NUM_EXAMPLES: 3}}) for r in (1, 2)]
    with pytest.raises(RunFailedError, match="validation outputs are not finite"):
        _require_training(setup, records)
    assert json.loads((tmp_path / "run" / FAILURE_FILE).read_text())["error"] == "no usable round"
    _require_training(setup, records + [RoundRecord(round=3, val={"loss": 0.6}, sites={"A": {}})])  # one usable round
