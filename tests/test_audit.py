"""What leaves a site, as recorded by the ClientApp audit mod (client/audit.py).

- Unit: the mod is off without ``FEDPD_AUDIT_LOG``; with it, each reply becomes one strict-JSON line.
- Deployment (slow): a real SuperLink and 2 real SuperNodes with ``FEDPD_AUDIT_LOG`` set run 1 round;
  every message a site sent holds only the model's weight arrays (keys, shapes and dtypes of the
  state_dict), scalar metrics and counts, and the site's name: no other arrays, no lists (per-sample
  scores), no strings but the site name, no file paths, subject ids or image ids of the manifests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client.audit import AUDIT_ENV, audit_mod
from common import keys
from common.model import build_med3d
from server.strategy import EVALUATE_METRIC_KEYS
from simulation.flower import flwr_run, start_superlink, start_supernode, stop, write_connections, write_run_config

try:
    from deploy_helpers import SMALL, make_cohort
except ImportError:  # run as a package
    from tests.deploy_helpers import SMALL, make_cohort


def _strict_json(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def _lines(path: Path) -> list[dict]:
    return [_strict_json(x) for x in path.read_text().splitlines() if x.strip()]


# --- unit: the mod itself ------------------------------------------------------------------------


def _instruction() -> Message:
    meta = Metadata(run_id=7, message_id="msg-1", src_node_id=0, dst_node_id=101, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type="evaluate")
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


def _handler(msg: Message, context: Context) -> Message:
    """Stands in for the ClientApp's evaluate handler: a reply shaped as client/app.py builds it."""
    metrics = {keys.NUM_EXAMPLES: 4, **{keys.eval_key(m): 0.5 for m in keys.EVAL_METRICS}, keys.eval_key("auc"): float("nan")}
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
    assert e["records"][keys.ARRAYS] == {"type": "ArrayRecord", "arrays": {
        "w": {"shape": [2, 3], "dtype": "float32", "stype": "numpy.ndarray"}}}
    assert "123.25" not in log.read_text()
    assert e["records"][keys.METRICS]["metrics"]["scores"] == {"type": "list[float]", "length": 2, "value": [0.1, 0.9]}


# --- deployment: what two real sites sent --------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


def _forbidden_strings(root: Path) -> set[str]:
    """Every path, file name, subject id and image id in the manifests of this cohort."""
    out: set[str] = set()
    for csv in [root / "manifest.csv", *(root / "partition").rglob("*.csv")]:
        df = pd.read_csv(csv, dtype=str)
        for col in ("path", "subject_id", "image_id"):
            out |= set(df[col].dropna())
        out |= {Path(p).name for p in df["path"].dropna()}
        out |= {str((csv.parent / p).resolve()) for p in df["path"].dropna()}
        out.add(str(csv))
    return out


def _strings(entry: dict) -> list[str]:
    """All string values inside an entry's metric and config records."""
    found = []
    for record in entry.get("records", {}).values():
        for item in list(record.get("metrics", {}).values()) + list(record.get("config", {}).values()):
            values = item.get("value") if isinstance(item.get("value"), list) else [item.get("value")]
            found += [v for v in values if isinstance(v, str)]
    return found


@pytest.mark.slow
def test_sites_send_only_weights_scalars_and_their_name(cohort, tmp_path, monkeypatch):
    partition, out = cohort / "partition", tmp_path / "run"
    names = sorted(p.stem for p in (partition / "sites").glob("*.csv"))[:2]
    procs = []
    try:
        link = start_superlink(tmp_path / "link")
        procs.append(link)
        for name in names:
            # the SuperNode's environment (and so its ClientApp processes') carries the audit switch
            monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit" / f"{name}.jsonl"))
            node_config = f"data-path='{partition / 'sites' / f'{name}.csv'}' cache-dir='{tmp_path / 'cache' / name}'"
            procs.append(start_supernode(tmp_path / f"site-{name}", f"127.0.0.1:{link.port}", node_config=node_config,
                                         name=f"site-{name}"))
        monkeypatch.delenv(AUDIT_ENV)
        home = tmp_path / "cli"
        write_connections(home, {"deploy": {"address": f"127.0.0.1:{link.port}", "insecure": True}})
        cfg = write_run_config(tmp_path / "rc.toml", SMALL | {
            "num-server-rounds": 1, "min-nodes": 2, "server-manifest": str(partition / "server.csv"), "out-dir": str(out)})
        code = flwr_run(home, "deploy", run_config=cfg, log=tmp_path / "flwr-run.log", timeout=400)
        assert code == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    finally:
        for p in reversed(procs):
            stop(p)

    state = build_med3d(depth=10, num_classes=2).state_dict()
    weights = {k: {"shape": list(v.shape), "dtype": str(v.numpy().dtype)} for k, v in state.items()}
    forbidden = _forbidden_strings(cohort)
    assert len(forbidden) > 100
    for name in names:
        log = tmp_path / "audit" / f"{name}.jsonl"
        text = log.read_text()
        entries = _lines(log)
        assert sorted(e["message_type"] for e in entries) == ["evaluate", "train"], entries
        for e in entries:
            assert "error" not in e, e
            records = e["records"]
            if e["message_type"] == "train":
                assert set(records) == {keys.ARRAYS, keys.METRICS, keys.SITE}
                assert records[keys.ARRAYS]["type"] == "ArrayRecord"
                assert set(records[keys.ARRAYS]["arrays"]) == set(state)
                for k, desc in records[keys.ARRAYS]["arrays"].items():
                    assert desc["shape"] == weights[k]["shape"], k
                    assert desc["dtype"] == weights[k]["dtype"], k
                expected_metrics = set(keys.TRAIN_METRIC_KEYS)
            else:
                assert set(records) == {keys.METRICS, keys.SITE}  # no arrays at all
                expected_metrics = set(EVALUATE_METRIC_KEYS)
            metrics = records[keys.METRICS]
            assert metrics["type"] == "MetricRecord" and set(metrics["metrics"]) == expected_metrics
            for k, v in metrics["metrics"].items():
                assert v["type"] in ("int", "float"), (k, v)  # scalars: no lists, so no per-sample scores
            for k in (keys.NUM_EXAMPLES, keys.class_count_key(0), keys.class_count_key(1)):
                if k in metrics["metrics"]:
                    assert metrics["metrics"][k]["type"] == "int"
            assert records[keys.SITE] == {"type": "ConfigRecord",
                                          "config": {keys.SITE_NAME: {"type": "str", "value": name}}}
            assert _strings(e) == [name]  # the only string a site sends is its name
        for token in forbidden:
            assert f'"{token}"' not in text and (len(token) < 8 or token not in text), token


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
