"""Subject-level splits (stratified, seeded, audited) and natural / iid / dirichlet partitions."""

import json

import numpy as np
import pandas as pd
import pytest

from common.cohort.manifest import read_manifest, write_manifest
from common.cohort.splits import format_audit, partition_manifest, split_audit, split_manifest
from common.errors import DataError

try:
    from data_factory import make_manifest
except ImportError:  # tests/ imported as a package
    from tests.data_factory import make_manifest

STRATA = {(1, "10"): 40, (0, "10"): 12, (1, "20"): 30, (0, "20"): 8, (1, "30"): 16, (0, "30"): 6}


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(make_manifest(STRATA, seed=1), tmp_path / "manifest.csv")


@pytest.mark.parametrize("seed", range(5))
def test_split_is_subject_level_stratified_and_seeded(manifest, tmp_path, seed, capsys):
    df = split_manifest(manifest, val=0.15, test=0.2, seed=seed, out=tmp_path / "split.csv")
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("subjects shared across splits: 0")
    assert df.groupby("subject_id")["split"].nunique().max() == 1
    back = read_manifest(tmp_path / "split.csv", require_split=True)
    assert back["split"].tolist() == df["split"].tolist()
    assert "split" not in read_manifest(manifest).columns  # `out` leaves the input alone

    sub = df.drop_duplicates("subject_id")
    n = len(sub)
    for name, frac in (("test", 0.2), ("val", 0.15)):
        assert abs((sub["split"] == name).sum() - frac * n) <= 2
    for (label, site), size in STRATA.items():
        part = sub[(sub["label"] == label) & (sub["site"] == site)]
        counts = part["split"].value_counts()
        assert abs(counts.get("test", 0) - 0.2 * size) <= 1.5, (label, site, counts)
        assert abs(counts.get("val", 0) - 0.15 * size) <= 1.5, (label, site, counts)
        assert counts.get("train", 0) >= 0.5 * size

    again = split_manifest(manifest, val=0.15, test=0.2, seed=seed, out=tmp_path / "again.csv")
    assert again["split"].tolist() == df["split"].tolist()


def test_seeds_differ_and_in_place_update(manifest):
    a = split_manifest(manifest, seed=0)
    b = split_manifest(manifest, seed=1)
    assert a["split"].tolist() != b["split"].tolist()
    assert read_manifest(manifest, require_split=True)["split"].tolist() == b["split"].tolist()


def test_tiny_sites_still_split_whole_subjects(tmp_path, capsys):
    df = make_manifest({(1, "A"): 9, (0, "A"): 3, (1, "B"): 1, (0, "C"): 1, (1, "D"): 2})
    out = split_manifest(df, val=0.2, test=0.2, seed=0)
    assert out.groupby("subject_id")["split"].nunique().max() == 1
    assert set(out["split"]) == {"train", "val", "test"}
    assert "subjects shared across splits: 0" in capsys.readouterr().out
    tiny = make_manifest({(1, "A"): 2, (0, "A"): 2})
    with pytest.raises(DataError, match="too few subjects"):
        split_manifest(tiny, val=0.45, test=0.45)


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (1.0, 0.0), (0.5, 0.5), (0.2, 1.2)])
def test_bad_fractions(val, test, manifest):
    with pytest.raises(DataError, match=r"--(val|test)"):
        split_manifest(manifest, val=val, test=test)


def test_audit_dict_is_json_and_formatted(manifest):
    df = split_manifest(manifest, seed=2)
    audit = split_audit(df)
    json.dumps(audit)
    assert audit["subjects_shared_across_splits"] == 0
    assert audit["total"] == {"subjects": df["subject_id"].nunique(), "scans": len(df)}
    assert sum(audit["splits"][s]["scans"] for s in ("train", "val", "test")) == len(df)
    assert sum(r["subjects"] for r in audit["strata"]) == df["subject_id"].nunique()
    text = format_audit(audit)
    assert text.splitlines()[-1] == "subjects shared across splits: 0" and "train" in text


@pytest.fixture
def split_path(manifest):
    split_manifest(manifest, val=0.15, test=0.15, seed=0)
    return manifest


def _site_rows(out):
    return pd.concat([read_manifest(p) for p in sorted((out / "sites").glob("*.csv"))], ignore_index=True)


@pytest.mark.parametrize("scheme,sites", [("natural", None), ("iid", 4), ("dirichlet", 3)])
def test_partition_invariants(split_path, tmp_path, scheme, sites):
    out = tmp_path / "part"
    info = partition_manifest(split_path, scheme=scheme, out=out, sites=sites, alpha=0.5, seed=0)
    m = read_manifest(split_path, require_split=True)
    rows = _site_rows(out)
    pool = m[m["split"].isin(["train", "val"])]
    assert sorted(rows["image_id"]) == sorted(pool["image_id"])  # union of site files == train+val rows
    assert not (rows["split"] == "test").any()
    assert rows.groupby("subject_id")["site"].nunique().max() == 1  # whole subjects, one site each
    server = read_manifest(out / "server.csv")
    assert sorted(server["image_id"]) == sorted(m.loc[m["split"].isin(["val", "test"]), "image_id"])
    saved = json.loads((out / "partition.json").read_text())
    assert saved == info and saved["scheme"] == scheme and saved["seed"] == 0
    for name, c in info["sites"].items():
        site_rows = read_manifest(out / c["file"])
        assert (site_rows["site"] == name).all()
        assert (site_rows["split"] == "train").any()
        assert c["train_scans"]["1"] == int(((site_rows["split"] == "train") & (site_rows["label"] == 1)).sum())
    if scheme == "natural":
        assert set(info["sites"]) == {"10", "20", "30"}
        assert "origin_site" not in rows.columns
    else:
        assert set(info["sites"]) == {f"site-{i}" for i in range(1, sites + 1)}
        orig = dict(zip(m["image_id"], m["site"]))
        assert (rows["origin_site"] == rows["image_id"].map(orig)).all()


def test_partition_is_deterministic_and_replaces_its_own_files(split_path, tmp_path):
    out = tmp_path / "part"
    a = partition_manifest(split_path, scheme="iid", out=out, sites=4, seed=3)
    assert partition_manifest(split_path, scheme="iid", out=out, sites=4, seed=3) == a
    partition_manifest(split_path, scheme="iid", out=out, sites=2, seed=3)
    assert sorted(p.name for p in (out / "sites").glob("*.csv")) == ["site-1.csv", "site-2.csv"]
    (out / "sites" / "mine.csv").write_text("x\n")
    with pytest.raises(DataError, match="mine.csv"):
        partition_manifest(split_path, scheme="iid", out=out, sites=2, seed=3)


def _pd_share_spread(info):
    shares = [c["train_subjects"]["1"] / max(1, c["train_subjects"]["0"] + c["train_subjects"]["1"])
              for c in info["sites"].values()]
    return float(np.std(shares))


def test_dirichlet_small_alpha_skews_class_shares(tmp_path):
    df = make_manifest({(1, "A"): 100, (0, "A"): 100}, visits=(1, 1))
    df["split"] = "train"
    path = write_manifest(df, tmp_path / "m.csv")
    skewed = [_pd_share_spread(partition_manifest(path, scheme="dirichlet", sites=5, alpha=0.05, seed=s,
                                                  out=tmp_path / f"a{s}")) for s in range(3)]
    even = [_pd_share_spread(partition_manifest(path, scheme="dirichlet", sites=5, alpha=1000.0, seed=s,
                                                out=tmp_path / f"b{s}")) for s in range(3)]
    assert min(skewed) > 0.25 and max(even) < 0.1
    info = partition_manifest(path, scheme="dirichlet", sites=5, alpha=0.05, seed=0, out=tmp_path / "c")
    assert all(c["train_subjects"]["0"] + c["train_subjects"]["1"] >= 1 for c in info["sites"].values())


def test_partition_argument_errors(split_path, tmp_path):
    with pytest.raises(DataError, match="needs --sites"):
        partition_manifest(split_path, scheme="iid", out=tmp_path / "p")
    with pytest.raises(DataError, match="needs --sites"):
        partition_manifest(split_path, scheme="dirichlet", out=tmp_path / "p")
    with pytest.raises(DataError, match="--sites is for iid/dirichlet only"):
        partition_manifest(split_path, scheme="natural", sites=3, out=tmp_path / "p")
    with pytest.raises(DataError, match="alpha"):
        partition_manifest(split_path, scheme="dirichlet", sites=3, alpha=0, out=tmp_path / "p")
    with pytest.raises(DataError, match="only .* train subjects"):
        partition_manifest(split_path, scheme="iid", sites=10_000, out=tmp_path / "p")
    with pytest.raises(DataError, match="no split column"):
        partition_manifest(write_manifest(make_manifest({(1, "A"): 3}), tmp_path / "raw.csv"), out=tmp_path / "p")


def test_resplit_replaces_a_broken_split_column(manifest, capsys):
    df = read_manifest(manifest)
    df["split"] = ["train", "test"] * (len(df) // 2) + ["val"] * (len(df) % 2)  # subjects straddle splits
    write_manifest(df, manifest)
    with pytest.raises(DataError, match="different splits"):
        read_manifest(manifest)
    split_manifest(manifest, seed=0)
    assert "replacing the existing split column" in capsys.readouterr().out
    read_manifest(manifest, require_split=True)


def test_natural_site_without_train_subjects_gets_no_file(tmp_path, capsys):
    df = make_manifest({(1, "A"): 4, (0, "A"): 2, (1, "Z"): 1})
    df["split"] = np.where(df["site"] == "Z", "val", "train")
    info = partition_manifest(df, scheme="natural", out=tmp_path / "p")
    assert set(info["sites"]) == {"A"} and info["skipped_sites"] == ["Z"]
    assert "site(s) with no train subject get no site file" in capsys.readouterr().out
    assert set(read_manifest(tmp_path / "p" / "server.csv")["site"]) == {"Z"}
