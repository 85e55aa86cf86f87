"""Comparison arms (centralized, local), leave-one-site-out partitions and the unsafe scan split.

Real files, real training at 16^3 through the same loaders, loop and finalize step as the federated app.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.cohort.manifest import read_manifest, validate_manifest
from common.cohort.splits import partition_manifest, split_audit, split_manifest
from common.errors import ConfigError, DataError
from simulation.baselines import holdout_partition, run_baseline
try:
    from data_factory import make_manifest, scan_cohort
except ImportError:  # pragma: no cover
    from tests.data_factory import make_manifest, scan_cohort

STRATA = {(1, "site-A"): 6, (0, "site-A"): 3, (1, "site-B"): 6, (0, "site-B"): 3, (1, "site-C"): 5, (0, "site-C"): 3}
TINY = "input-shape='16,16,16' spacing='4.0,4.0,4.0' batch-size=4 num-server-rounds=1 local-epochs=1"


@pytest.fixture(scope="module")
def partition(tmp_path_factory) -> Path:
    return scan_cohort(tmp_path_factory.mktemp("cohort"), STRATA, seed=3, source="phantom")


def test_unsafe_scan_split_leaks_subjects_and_says_so(tmp_path, capsys):
    df = make_manifest(STRATA, visits=(2, 3), seed=1)
    safe = split_manifest(df.copy(), seed=0)
    assert split_audit(safe)["subjects_shared_across_splits"] == 0
    assert not split_audit(safe)["unsafe_split_by_scan"]

    leaky = split_manifest(df.copy(), seed=0, unsafe_by_scan=True)
    out = capsys.readouterr().out
    audit = split_audit(leaky)
    assert audit["unsafe_split_by_scan"] and audit["subjects_shared_across_splits"] > 0
    assert "UNSAFE" in out and "leakage" in out
    assert (leaky["unsafe_split"] == "by-scan").all()
    validate_manifest(leaky, "leaky", require_split=True)  # allowed only with the explicit marker
    with pytest.raises(DataError, match="subjects shared across splits must be 0"):
        validate_manifest(leaky.drop(columns=["unsafe_split"]), "leaky", require_split=True)
    again = split_manifest(leaky, seed=0)  # a normal re-split drops the marker and is subject-level again
    assert "unsafe_split" not in again.columns and split_audit(again)["subjects_shared_across_splits"] == 0


def test_holdout_partition_tests_on_the_held_out_site_only(partition, tmp_path):
    out = holdout_partition(partition, "site-B", tmp_path / "lolo")
    info = json.loads((out / "partition.json").read_text())
    assert info["holdout_site"] == "site-B"
    assert sorted(p.stem for p in (out / "sites").glob("*.csv")) == ["site-A", "site-C"]
    server = read_manifest(out / "server.csv", require_split=True)
    test, val = server[server["split"] == "test"], server[server["split"] == "val"]
    assert set(test["site"]) == {"site-B"} and "site-B" not in set(val["site"]) and len(val) > 0
    original = pd.concat([read_manifest(p, require_split=True) for p in (partition / "sites").glob("*.csv")]
                         + [read_manifest(partition / "server.csv", require_split=True)])
    site_b = original[original["site"] == "site-B"]
    assert set(test["image_id"]) == set(site_b["image_id"])  # every scan of its subjects, nothing else
    assert not set(test["subject_id"]) & set(pd.concat(
        [read_manifest(p, require_split=True) for p in (out / "sites").glob("*.csv")])["subject_id"])
    with pytest.raises(ConfigError, match="choose one of site-A, site-B, site-C"):
        holdout_partition(partition, "site-Z", tmp_path / "bad")


def test_holdout_needs_a_natural_partition(partition, tmp_path):
    iid = tmp_path / "iid"
    partition_manifest(partition.parent / "manifest.csv", scheme="iid", sites=2, out=iid, seed=0)
    with pytest.raises(ConfigError, match="natural partition"):
        holdout_partition(iid, "site-1", tmp_path / "lolo")


def test_centralized_and_local_arms_share_the_test_split(partition, tmp_path):
    reports = run_baseline("centralized", partition, tmp_path / "centralized", run_config=TINY)
    reports |= run_baseline("local", partition, tmp_path / "local", run_config=TINY)
    assert sorted(reports) == ["centralized", "local:site-A", "local:site-B", "local:site-C"]
    server = read_manifest(partition / "server.csv", require_split=True)
    test_ids = set(server.loc[server["split"] == "test", "image_id"])
    pooled_train = sum(int((read_manifest(p, require_split=True)["split"] == "train").sum())
                       for p in (partition / "sites").glob("*.csv"))
    for arm, report in reports.items():
        folder = tmp_path / "centralized" if arm == "centralized" else tmp_path / "local" / arm.split(":")[1]
        assert report.arm == arm
        assert report.test_counts["scans"] == len(test_ids)
        preds = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str})
        assert set(preds.loc[preds["split"] == "test", "image_id"]) == test_ids
        assert set(report.test) >= {"auc", "sensitivity", "specificity", "balanced_accuracy"}
        assert all("ci95" in v for v in report.test.values())
        rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1] and (folder / "model.pt").is_file()
        # how the server's scans were prepared (plain scans, no preprocess.json beside them): report and model agree
        folders = sorted({str(Path(p).parent) for p in server["path"]})
        assert report.preparation == {"method": "none", "folders": folders}
        assert torch.load(folder / "model.pt", weights_only=True)["preparation"] == report.preparation
        assert torch.load(folder / "checkpoints" / "round-1.pt", weights_only=True)["preparation"] == report.preparation
        assert rounds[0]["val"]["seconds"] > 0  # the validation's time, as in a federated round
        n_train = rounds[0]["num_examples"]
        if arm == "centralized":
            assert n_train == pooled_train
        else:
            site_rows = read_manifest(partition / "sites" / f"{arm.split(':')[1]}.csv", require_split=True)
            assert n_train == int((site_rows["split"] == "train").sum())
    with pytest.raises(ConfigError, match="already holds a run"):
        run_baseline("centralized", partition, tmp_path / "centralized", run_config=TINY)


def test_scratch_needs_a_pretrained_run_to_compare_with(partition, tmp_path):
    with pytest.raises(ConfigError, match="already is from scratch"):
        run_baseline("scratch", partition, tmp_path / "scratch", run_config=TINY)
    with pytest.raises(ConfigError, match="choose one of centralized, local, scratch"):
        run_baseline("pooled", partition, tmp_path / "x")

