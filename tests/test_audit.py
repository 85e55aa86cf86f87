"""What leaves a site, as recorded by the ClientApp audit mod (client/audit.py).

Unit tests: the mod is off without ``FEDPD_AUDIT_LOG``; with it, each reply becomes one strict-JSON line.

The deployment check (what real sites sent: only the model's weight arrays, scalar metrics and counts,
and the site's name) runs on the secure federation of test_deploy.py
(``test_sites_send_only_weights_scalars_and_their_name``), whose two good SuperNodes are started by the
kit's start-supernode.sh with ``FEDPD_AUDIT_LOG`` set.
"""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client.audit import AUDIT_ENV, audit_mod
from common import keys

try:
    from deploy_helpers import audit_lines as _lines
except ImportError:  # run as a package
    from tests.deploy_helpers import audit_lines as _lines


# --- unit: the mod itself ------------------------------------------------------------------------


def _instruction() -> Message:
    meta = Metadata(run_id=7, message_id="msg-1", src_node_id=0, dst_node_id=101, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type="evaluate")
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


def _handler(msg: Message, context: Context) -> Message:
    """Stands in for the ClientApp's evaluate handler: a reply shaped as client/app.py builds it."""
    metrics = {keys.NUM_EXAMPLES: 4, **{keys.eval_key(m): 0.5 for m in keys.EVAL_METRICS}, keys.eval_key("auc"): float("nan"),
               keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5, keys.EVAL_SECONDS: 0.2}
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics), keys.SITE: ConfigRecord({keys.SITE_NAME: "A"})}),
                   reply_to=msg)


def _context() -> Context:
    return Context(run_id=7, node_id=101, node_config={}, state=RecordDict(), run_config={})


def test_audit_mod_is_off_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(AUDIT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    reply = audit_mod(_instruction(), _context(), _handler)
    assert reply.content[keys.SITE][keys.SITE_NAME] == "A"
    assert list(tmp_path.iterdir()) == []


def test_audit_mod_writes_one_strict_json_line_per_reply(tmp_path, monkeypatch):
    log = tmp_path / "audit" / "site.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(log))
    first = audit_mod(_instruction(), _context(), _handler)
    audit_mod(_instruction(), _context(), _handler)
    assert first.metadata.reply_to_message_id == "msg-1"  # the reply passes through unchanged
    entries = _lines(log)
    assert len(entries) == 2
    e = entries[0]
    assert e["message_type"] == "evaluate" and e["received_type"] == "evaluate" and e["node_id"] == 101
    assert e["reply_to_message_id"] == "msg-1" and e["run_id"] == 7
    assert set(e["records"]) == {keys.METRICS, keys.SITE}
    metrics = e["records"][keys.METRICS]["metrics"]
    assert metrics[keys.NUM_EXAMPLES] == {"type": "int", "value": 4}
    assert metrics[keys.eval_key("auc")] == {"type": "float", "value": None, "non_finite": "nan"}
    assert e["records"][keys.SITE] == {"type": "ConfigRecord", "config": {keys.SITE_NAME: {"type": "str", "value": "A"}}}


def test_audit_describes_arrays_without_their_values(tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(log))

    def train(msg, context):
        return Message(RecordDict({keys.ARRAYS: ArrayRecord({"w": torch.full((2, 3), 123.25)}),
                                   keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, "scores": [0.1, 0.9]})}), reply_to=msg)

    audit_mod(_instruction(), _context(), train)
    (e,) = _lines(log)
    assert e["records"][keys.ARRAYS] == {"type": "ArrayRecord", "bytes": e["records"][keys.ARRAYS]["bytes"], "arrays": {
        "w": {"shape": [2, 3], "dtype": "float32", "stype": "numpy.ndarray"}}}
    # the serialised size: the 6 float32 values (24 bytes) and their array header; the whole content is more
    assert 24 < e["records"][keys.ARRAYS]["bytes"] < e["content_bytes"] < 1000
    assert "123.25" not in log.read_text()
    assert e["records"][keys.METRICS]["metrics"]["scores"] == {"type": "list[float]", "length": 2, "value": [0.1, 0.9]}


def test_audit_survives_config_values_flower_cannot_count(tmp_path, monkeypatch):
    """SecAgg+ messages carry empty bytes/lists in their config records. Flower's own ConfigRecord.count_bytes
    raises on them, and the audit used it: with the audit log on, every SecAgg+ message failed at the sites
    (found running benchmarks/strategies.py, whose runs turn the audit on). The audit now counts such a record
    itself and the reply passes through."""
    log = tmp_path / "a.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(log))
    odd = ConfigRecord({"empty-bytes": b"", "empty-str": "", "empty-list": [], "shares": [b"ab", b"c"], "n": 3})
    with pytest.raises((ValueError, IndexError)):
        odd.count_bytes()  # Flower 1.42; if this starts passing, the fallback is no longer needed

    def secagg_like(msg, context):
        return Message(RecordDict({"secagg": odd}), reply_to=msg)

    reply = audit_mod(_instruction(), _context(), secagg_like)
    assert reply.content["secagg"]["shares"] == [b"ab", b"c"]
    (e,) = _lines(log)
    # keys (11 + 9 + 10 + 6 + 1 bytes) + values (0 + 0 + 0 + 3 + 8)
    assert e["content_bytes"] == 37 + 11
    assert e["records"]["secagg"]["config"]["empty-list"] == {"type": "list[]", "length": 0, "value": []}


def test_audit_logs_the_error_reason_flower_sends_when_a_handler_raises(tmp_path, monkeypatch):
    """Flower turns an exception into an error reply whose reason carries the exception text, e.g. a path."""
    from common.errors import ConfigError

    log = tmp_path / "a.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(log))

    def broken(msg, context):
        raise ConfigError("node-config data-path /site/secret.csv does not exist")

    with pytest.raises(ConfigError):
        audit_mod(_instruction(), _context(), broken)
    (e,) = _lines(log)
    assert e["error"]["raised"] is True and e["reply_to_message_id"] == "msg-1"
    assert e["error"]["reason"] == "<class 'common.errors.ConfigError'>:<'node-config data-path /site/secret.csv does not exist'>"
    assert "records" not in e
