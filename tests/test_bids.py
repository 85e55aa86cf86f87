"""BIDS input (common/cohort/bids.py): participants.tsv + sub-*/[ses-*/]anat/*_T1w.nii[.gz] -> manifest.csv.

Every test builds a small BIDS tree under tmp_path with nibabel (16-24 voxels a side).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.cohort.bids import ingest_bids
from common.cohort.manifest import read_manifest
from common.errors import DataError

PARTICIPANTS = [
    # participant_id, group, site, sex, age
    ("sub-PPMI3001", "PD", "10", "M", "61.5"),
    ("sub-PPMI3002", "Control", "20", "F", "n/a"),
    ("sub-PPMI3003", "Prodromal", "10", "F", "70"),     # excluded: neither PD nor control
    ("sub-PPMI3004", "hc", "20", "M", "55"),            # control, any case
]
SCANS = [  # relative path, shape
    ("sub-PPMI3001/ses-BL/anat/sub-PPMI3001_ses-BL_T1w.nii.gz", (16, 18, 20)),
    ("sub-PPMI3001/ses-V04/anat/sub-PPMI3001_ses-V04_run-01_T1w.nii.gz", (20, 16, 16)),
    ("sub-PPMI3002/anat/sub-PPMI3002_T1w.nii", (24, 24, 24)),
    ("sub-PPMI3003/anat/sub-PPMI3003_T1w.nii.gz", (16, 16, 16)),
    ("sub-PPMI3004/ses-BL/anat/sub-PPMI3004_ses-BL_T1w.nii.gz", (16, 16, 16)),
]


def _volume(path: Path, shape, seed: int, data=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).uniform(0, 1000, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0])), path)


def _participants(root: Path, rows, columns=("participant_id", "group", "site", "sex", "age")) -> None:
    lines = ["\t".join(columns)] + ["\t".join(r[:len(columns)]) for r in rows]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture()
def bids(tmp_path) -> Path:
    root = tmp_path / "bids"
    root.mkdir()
    _participants(root, PARTICIPANTS)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.8.0"}')
    for n, (rel, shape) in enumerate(SCANS):
        _volume(root / rel, shape, n)
    anat = root / "sub-PPMI3004/ses-BL/anat"
    _volume(anat / "sub-PPMI3004_ses-BL_T2w.nii.gz", (16, 16, 16), 99)          # not a T1w: ignored
    (anat / "sub-PPMI3004_ses-BL_T1w.json").write_text("{}")                    # sidecar: ignored
    _volume(root / "derivatives/x/sub-PPMI3001/anat/sub-PPMI3001_T1w.nii.gz", (16, 16, 16), 98)  # not raw data
    return root


def test_manifest_from_a_bids_dataset(bids, tmp_path, capsys):
    out = tmp_path / "out" / "manifest.csv"
    rows = ingest_bids(bids, out)
    text = capsys.readouterr()
    df = read_manifest(out)
    assert list(df["image_id"]) == list(rows["image_id"]) == [
        "sub-PPMI3001_ses-BL", "sub-PPMI3001_ses-V04_run-01", "sub-PPMI3002", "sub-PPMI3004_ses-BL"]
    assert list(df["subject_id"]) == ["sub-PPMI3001", "sub-PPMI3001", "sub-PPMI3002", "sub-PPMI3004"]
    assert list(df["label"]) == [1, 1, 0, 0]
    assert list(df["site"]) == ["10", "10", "20", "20"]
    assert [v if isinstance(v, str) else "" for v in df["visit"]] == ["BL", "V04", "", "BL"]
    assert list(df["sex"]) == ["M", "M", "F", "M"]
    assert df["age"].tolist()[:2] == [61.5, 61.5] and np.isnan(df["age"].iloc[2])
    assert set(df["source"]) == {"bids"}
    assert [Path(p) for p in df["path"]] == [bids / SCANS[i][0] for i in (0, 1, 2, 4)]
    assert "excluded 1 participant(s) with group 'Prodromal'" in text.out
    assert (out.parent / ".scan-check.json").is_file()
    # a second run over the same dataset: same manifest (with --force), the old one kept as a backup
    before = out.read_bytes()
    ingest_bids(bids, out, force=True)
    assert out.read_bytes() == before and len(list(out.parent.glob("manifest.csv.bak-*"))) == 1


def test_other_columns_and_values(bids, tmp_path):
    _participants(bids, [(pid, {"PD": "Parkinson", "Control": "CN", "hc": "CN"}.get(g, g), s, "M", "60")
                         for pid, g, s, _, _ in PARTICIPANTS], columns=("participant_id", "diagnosis_bl", "centre"))
    rows = ingest_bids(bids, tmp_path / "m.csv", diagnosis_column="diagnosis_bl", pd_values=("parkinson",),
                       control_values=("CN",), site_column="centre")
    assert list(rows["label"]) == [1, 1, 0, 0] and list(rows["site"]) == ["10", "10", "20", "20"]
    assert "sex" not in rows.columns


def test_bad_scans_are_left_out_with_their_reason(bids, tmp_path, capsys):
    _volume(bids / SCANS[4][0], None, 0, data=np.zeros((16, 16, 16), np.float32))  # empty image
    misnamed = bids / "sub-PPMI3002/anat/sub-PPMI3009_T1w.nii.gz"                    # file of another subject
    _volume(misnamed, (16, 16, 16), 7)
    out = tmp_path / "manifest.csv"
    with pytest.raises(DataError, match=r"2 scan\(s\) could not be ingested") as err:
        ingest_bids(bids, out)
    assert "sub-PPMI3004_ses-BL" in str(err.value) and "sub-PPMI3009" in str(err.value)
    table = capsys.readouterr().err
    assert re.search(r"sub-PPMI3004_ses-BL\s+.*sub-PPMI3004_ses-BL_T1w\.nii\.gz", table)
    assert "must start with sub-PPMI3002_" in table
    df = read_manifest(out)                                          # the good rows were written first
    assert list(df["image_id"]) == ["sub-PPMI3001_ses-BL", "sub-PPMI3001_ses-V04_run-01", "sub-PPMI3002"]


@pytest.mark.parametrize("drop, flag", [("group", "--diagnosis-column"), ("site", "--site-column")])
def test_missing_column_names_the_file_and_the_flag(bids, tmp_path, drop, flag):
    columns = [c for c in ("participant_id", "group", "site") if c != drop]
    index = {"participant_id": 0, "group": 1, "site": 2}
    _participants(bids, [tuple(r[index[c]] for c in columns) for r in PARTICIPANTS], columns=columns)
    with pytest.raises(DataError, match=re.escape(str(bids / "participants.tsv"))) as err:
        ingest_bids(bids, tmp_path / "manifest.csv")
    assert flag in str(err.value) and repr(drop) in str(err.value)
    assert not (tmp_path / "manifest.csv").exists()


def test_missing_participants_tsv_and_unlisted_subjects(bids, tmp_path, capsys):
    (bids / "participants.tsv").unlink()
    with pytest.raises(DataError, match=re.escape(str(bids / "participants.tsv"))):
        ingest_bids(bids, tmp_path / "manifest.csv")
    _participants(bids, PARTICIPANTS[1:])                            # sub-PPMI3001 has folders but no row
    rows = ingest_bids(bids, tmp_path / "manifest.csv")
    assert "sub-PPMI3001" not in set(rows["subject_id"])
    assert "excluded 1 subject folder(s) not listed in participants.tsv" in capsys.readouterr().err


def test_never_overwrites(bids, tmp_path):
    out = tmp_path / "manifest.csv"
    out.write_text("keep me")
    with pytest.raises(DataError, match="--force"):
        ingest_bids(bids, out)
    assert out.read_text() == "keep me"
    tsv = bids / "participants.tsv"
    before = tsv.read_bytes()
    with pytest.raises(DataError, match="participants.tsv"):
        ingest_bids(bids, tsv, force=True)
    assert tsv.read_bytes() == before
    with pytest.raises(DataError, match="must not share"):
        ingest_bids(bids, tmp_path / "new.csv", pd_values=("PD",), control_values=("pd",))


def test_no_participant_with_a_known_diagnosis(bids, tmp_path):
    with pytest.raises(DataError, match="values there are: Control, PD, Prodromal, hc"):
        ingest_bids(bids, tmp_path / "manifest.csv", pd_values=("Parkinson",), control_values=("CN",))


def test_one_scan_twice_and_a_missing_site(bids, tmp_path, capsys):
    _volume(bids / "sub-PPMI3002/anat/sub-PPMI3002_T1w.nii.gz", (16, 16, 16), 5)   # beside the .nii
    _participants(bids, [PARTICIPANTS[0][:2] + ("n/a",)] + PARTICIPANTS[1:])
    with pytest.raises(DataError, match="1 scan"):
        ingest_bids(bids, tmp_path / "manifest.csv")
    err = capsys.readouterr().err
    assert "2 files for one scan" in err
    assert "1 subject(s) have site 'unknown' (no 'site' value in participants.tsv): sub-PPMI3001" in err
    df = read_manifest(tmp_path / "manifest.csv")
    assert "sub-PPMI3002" not in set(df["subject_id"]) and set(df.loc[df["label"] == 1, "site"]) == {"unknown"}


def test_cli_reads_bids_and_refuses_mixed_inputs(bids, tmp_path, capsys):
    from common.cli import main

    out = tmp_path / "m" / "manifest.csv"
    out.parent.mkdir()
    code = main(["ingest", "--bids", str(bids), "--out", str(out), "--diagnosis-column", "group", "--pd-values", "PD",
                 "--control-values", "Control,HC", "--site-column", "site"])
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    df = read_manifest(out)
    assert code == 0 and len(df) == 4 and set(df["source"]) == {"bids"}
    assert main(["ingest", "--bids", str(bids), "--csv", "x.csv", "--out", str(tmp_path / "o.csv")]) == 2
    assert "leave out DOWNLOAD, --csv" in capsys.readouterr().err
    assert main(["ingest", "--out", str(tmp_path / "o.csv")]) == 2
    assert "or --bids DIR" in capsys.readouterr().err
