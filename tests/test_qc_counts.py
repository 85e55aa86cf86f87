"""Preprocessing QC counts travel from a site's qc.csv to the run report: counts only, never reasons or ids.

A site whose scans came from ``fedpd preprocess`` finds the ``qc.csv`` beside them and puts its own
kept/excluded counts into its reply's site record; the strategy records them per round; the report's
cohort section shows them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from client.handlers import _reply
from client.site import Site
from common import keys
from common.cohort.manifest import write_manifest
from common.preprocessing import QC_CSV as QC_FILE
from common.report.render import render_report
from common.runs.records import RoundRecord
from server.app import _preprocessing_qc
from server.strategy import RecordingFedAvg


def _site_csv(folder: Path, site: str, scans: list[str]) -> Path:
    rows = [{"image_id": s, "subject_id": f"subj-{s}", "visit": "BL", "label": i % 2, "site": site, "path": str(folder / f"{s}.nii.gz"),
             "split": "train"} for i, s in enumerate(scans)]
    out = folder.parent / f"site-{site}.csv"
    write_manifest(pd.DataFrame(rows), out)
    return out


def _qc(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([
        {"image_id": "a1", "subject_id": "s1", "site": "A", "status": "ok", "reason": ""},
        {"image_id": "a2", "subject_id": "s2", "site": "A", "status": "excluded", "reason": "correlation 0.31 < 0.8"},
        {"image_id": "a3", "subject_id": "s3", "site": "A", "status": "excluded", "reason": "cannot be registered"},
        {"image_id": "b1", "subject_id": "s4", "site": "B", "status": "ok", "reason": ""},
    ]).to_csv(folder / QC_FILE, index=False)


def test_a_site_counts_its_own_rows_of_the_qc_table(tmp_path):
    pre = tmp_path / "preprocessed"
    _qc(pre)
    a = Site(name="A", index=0, manifest=_site_csv(pre, "A", ["a1"]), cache_dir=tmp_path / "c")
    assert a.preprocessing_qc() == {"kept": 1, "excluded": 2}
    b = Site(name="B", index=1, manifest=_site_csv(pre, "B", ["b1"]), cache_dir=tmp_path / "c")
    assert b.preprocessing_qc() == {"kept": 1, "excluded": 0}
    virtual = Site(name="3", index=2, manifest=_site_csv(pre, "A", ["a1"]), cache_dir=tmp_path / "c")
    assert virtual.preprocessing_qc() is None  # an iid/dirichlet site is no acquisition site
    raw = tmp_path / "raw"
    raw.mkdir()
    assert Site(name="A", index=0, manifest=_site_csv(raw, "A", ["a1"]), cache_dir=tmp_path / "c").preprocessing_qc() is None


def test_qc_counts_are_kept_per_process_until_the_qc_table_changes(tmp_path):
    pre = tmp_path / "preprocessed"
    _qc(pre)
    a = Site(name="A", index=0, manifest=_site_csv(pre, "A", ["a1"]), cache_dir=tmp_path / "c")
    assert a.preprocessing_qc() == {"kept": 1, "excluded": 2}
    table, stat = pre / QC_FILE, (pre / QC_FILE).stat()
    text = table.read_text()
    table.write_text(text.replace("a2,s2,A,excluded", "a2,s2,A,ok"))
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the kept counts are used
    assert a.preprocessing_qc() == {"kept": 1, "excluded": 2}
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # preprocessed again: read anew
    assert a.preprocessing_qc() == {"kept": 2, "excluded": 1}
    table.unlink()
    assert a.preprocessing_qc() is None


def _instruction(node: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"msg-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


def test_counts_ride_in_the_site_record_and_reach_the_report(tmp_path):
    pre = tmp_path / "preprocessed"
    _qc(pre)
    metrics = {keys.NUM_EXAMPLES: 3, keys.TRAIN_LOSS: 0.5, keys.TRAIN_SECONDS: 1.0, keys.SAMPLES_PER_SECOND: 3.0,
            keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5,
               keys.class_count_key(0): 1, keys.class_count_key(1): 2}
    arrays = ArrayRecord({"w": Array(pd.Series([1.0, 2.0]).to_numpy())})
    replies = [_reply(_instruction(n), Site(name=s, index=n, manifest=_site_csv(pre, s, [f"{s.lower()}1"]),
                                            cache_dir=tmp_path / "c"), metrics, arrays) for n, s in ((1, "A"), (2, "B"))]
    record = replies[0].content.config_records[keys.SITE]
    assert dict(record) == {keys.SITE_NAME: "A", keys.QC_KEPT: 1, keys.QC_EXCLUDED: 2}  # counts, no ids or reasons

    strategy = RecordingFedAvg()
    strategy.aggregate_train(1, replies)  # the site record does not fail the update screening
    assert sorted(strategy.train_sites[1]) == ["A", "B"]
    assert strategy.site_qc[1] == {"A": {"kept": 1, "excluded": 2}, "B": {"kept": 1, "excluded": 0}}

    data = _preprocessing_qc([RoundRecord(round=1, val={}, site_qc=strategy.site_qc[1]), RoundRecord(round=2, val={})])
    assert data == {"preprocessing_qc": {"A": {"kept": 1, "excluded": 2}, "B": {"kept": 1, "excluded": 0}}}
    assert _preprocessing_qc([RoundRecord(round=1, val={})]) == {}

    run = tmp_path / "run"
    run.mkdir()
    report = {"data": {"source": "phantom", "site_train_counts": {"A": {"control": 1, "pd": 2, "num_examples": 3}}}
              | data, "test": {}, "rounds": 1}
    (run / "report.json").write_text(json.dumps(report))
    html = render_report(run, saliency_scans=0).read_text()
    assert "scans kept by preprocessing QC" in html and "<td>A</td><td>1</td><td>2</td>" in html.replace("\n", "")
    assert "correlation 0.31" not in html  # reasons stay at the site
