"""``fedpd ingest``: IDA CSV + image tree (NIfTI and DICOM) -> manifest; caching; every error path."""

import os
from pathlib import Path
import re

import nibabel as nib
import pandas as pd
import pytest

from common.cohort.ingest import ingest
from common.cohort.manifest import read_manifest
from common.cohort.scans import check_scans
from common.errors import DataError

try:
    from data_factory import write_ida_download, write_sites_csv
except ImportError:  # tests/ imported as a package
    from tests.data_factory import write_ida_download, write_sites_csv

COHORT = [
    {"id": "I101", "subject": "1001", "group": "PD", "kind": "nifti", "visit": "BL"},
    {"id": "I102", "subject": "1001", "group": "PD", "kind": "dicom", "institution": "Hospital A", "visit": "V04"},
    {"id": "I201", "subject": "1002", "group": "Control", "kind": "dicom", "institution": "Hospital B"},
    {"id": "I202", "subject": "1002", "group": "Control", "kind": "dicom", "institution": "Hospital B"},
    {"id": "I301", "subject": "1003", "group": "PD", "kind": "nifti"},
    {"id": "I401", "subject": "1004", "group": "Prodromal", "kind": "nifti"},
    {"id": "I402", "subject": "1004", "group": "Prodromal", "kind": "nifti"},
    {"id": "I501", "subject": "1005", "group": "SWEDD", "kind": "dicom"},
    {"id": "I601", "subject": "1006", "group": "healthy control", "kind": "nifti", "age": 70.5},
]


def _cached(cache):
    """The converted NIfTI files in a cache folder (not the hidden scan-check cache)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def _run(tmp_path, scans=COHORT, sites=None, **kw):
    download, csv = write_ida_download(tmp_path, scans)
    sites_csv = write_sites_csv(tmp_path / "centres.csv", sites) if sites else None
    out = kw.pop("out", tmp_path / "work" / "manifest.csv")
    return download, csv, sites_csv, out


def test_ingest_labels_sites_conversion_and_cache(tmp_path, capsys):
    download, csv, sites_csv, out = _run(tmp_path, sites={"1003": "10", "9999": "12"})
    df = ingest(download, csv=csv, sites_csv=sites_csv, out=out)
    printed = capsys.readouterr()
    assert "excluded 2 scan(s) of group 'Prodromal'" in printed.out
    assert "excluded 1 scan(s) of group 'SWEDD'" in printed.out
    assert "converted 3, reused 0" in printed.out
    assert "1 subject(s) have site 'unknown'" in printed.err

    m = read_manifest(out)
    assert sorted(m["image_id"]) == ["I101", "I102", "I201", "I202", "I301", "I601"]
    assert len(df) == len(m)
    lab = dict(zip(m["subject_id"], m["label"]))
    assert lab == {"1001": 1, "1002": 0, "1003": 1, "1006": 0}
    site = dict(zip(m["subject_id"], m["site"]))
    assert site == {"1001": "Hospital A", "1002": "Hospital B", "1003": "10", "1006": "unknown"}
    assert check_scans(m) == []  # every manifest path is a usable scan
    row = m.set_index("image_id")
    assert row.loc["I102", "visit"] == "V04" and row.loc["I601", "age"] == 70.5
    assert row.loc["I101", "description"] == "MPRAGE" and row.loc["I101", "sex"] == "M"
    assert row.loc["I101", "path"].endswith(".nii.gz") and "download" in row.loc["I101", "path"]
    cache = out.parent / "nifti"
    assert _cached(cache) == ["I102.nii.gz", "I201.nii.gz", "I202.nii.gz"]
    assert (cache / ".scan-check.json").is_file()
    assert row.loc["I201", "path"] == str(cache / "I201.nii.gz")
    assert nib.load(cache / "I201.nii.gz").shape == (16, 16, 8)
    assert "nifti/I201.nii.gz" in out.read_text()  # relative to the manifest's folder

    # The re-run (--force: the manifest exists) converts nothing: same files, untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.nii.gz")}
    again = ingest(download, csv=csv, sites_csv=sites_csv, out=out, force=True)
    assert "converted 0, reused 3" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.nii.gz")} == mtimes
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df.reset_index(drop=True))


def test_explicit_nifti_cache(tmp_path, capsys):
    download, csv, _, out = _run(tmp_path, scans=COHORT[:3])
    ingest(download, csv=csv, out=out, nifti_cache=tmp_path / "cache")
    assert _cached(tmp_path / "cache") == ["I102.nii.gz", "I201.nii.gz"]
    assert not (out.parent / "nifti").exists()


def test_missing_required_column(tmp_path):
    download, csv, _, out = _run(tmp_path, scans=COHORT[:1])
    pd.read_csv(csv).drop(columns=["Group"]).to_csv(csv, index=False)
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    msg = str(err.value)
    assert str(csv) in msg and "missing column(s) Group" in msg and "Acq Date" in msg and "IDA" in msg


def test_unknown_group_lists_values_and_lines(tmp_path):
    scans = COHORT[:2] + [{"id": "I9", "subject": "9", "group": "Alien", "kind": "nifti"}]
    download, csv, _, out = _run(tmp_path, scans=scans)
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    msg = str(err.value)
    assert str(csv) in msg and "'Alien' (lines 4)" in msg and "PD -> 1, Control -> 0" in msg
    assert not (out.parent / "nifti" / "I102.nii.gz").exists()  # table errors stop before any conversion


def test_duplicate_image_id(tmp_path):
    scans = COHORT[:2] + [dict(COHORT[0], subject="1001")]
    download, csv, _, out = _run(tmp_path, scans=scans)
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    assert str(csv) in str(err.value) and "duplicate Image Data ID I101 (lines 2, 4)" in str(err.value)


def test_subject_with_two_diagnoses(tmp_path):
    scans = [COHORT[0], dict(COHORT[1], group="Control")]
    download, csv, _, out = _run(tmp_path, scans=scans)
    with pytest.raises(DataError, match=r"1001 \(Control/PD\)"):
        ingest(download, csv=csv, out=out)


def test_missing_folder_and_bad_dicom_keep_the_good_scans(tmp_path, capsys):
    scans = COHORT[:4] + [{"id": "I777", "subject": "1007", "group": "PD", "kind": "missing"},
                          {"id": "I888", "subject": "1008", "group": "PD", "kind": "garbage"},
                          {"id": "I999", "subject": "1009", "group": "PD", "kind": "empty"}]
    download, csv, _, out = _run(tmp_path, scans=scans)
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    msg = str(err.value)
    assert "3 scan(s) could not be ingested: I777, I888, I999" in msg and str(out) in msg
    table = capsys.readouterr().err
    assert re.search(r"I777 +no folder named I777 under .*download; download this image from IDA again", table)
    assert re.search(r"I888 +cannot convert the DICOM series in \S+/I888 \(none of its 8 .dcm files is a readable "
                     r"DICOM file\)", table)
    assert re.search(r"I999 +\S+/I999 holds no .nii/.nii.gz/.dcm file", table)
    m = read_manifest(out)  # the good rows were written
    assert sorted(m["image_id"]) == ["I101", "I102", "I201", "I202"]
    cache = out.parent / "nifti"
    assert _cached(cache) == ["I102.nii.gz", "I201.nii.gz", "I202.nii.gz"]

    # Drop the failed rows: the re-run (--force: the partial manifest exists) converts nothing and succeeds.
    ida = pd.read_csv(csv, dtype=str)
    ida[~ida["Image Data ID"].isin(["I777", "I888", "I999"])].to_csv(csv, index=False)
    ingest(download, csv=csv, out=out, force=True)
    assert "converted 0, reused 3" in capsys.readouterr().out


def test_interrupted_conversion_leaves_no_half_file(tmp_path, monkeypatch):
    import dicom2nifti

    download, csv, _, out = _run(tmp_path, scans=COHORT[:3])

    def interrupted(folder, output_file, reorient_nifti=True):
        with open(output_file, "wb") as fh:
            fh.write(b"half a volume")
        raise KeyboardInterrupt

    monkeypatch.setattr(dicom2nifti, "dicom_series_to_nifti", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(download, csv=csv, out=out)
    assert list((out.parent / "nifti").iterdir()) == []
    assert not out.exists()
    monkeypatch.undo()
    ingest(download, csv=csv, out=out)
    assert _cached(out.parent / "nifti") == ["I102.nii.gz", "I201.nii.gz"]


def test_unwritable_output_is_reported_before_converting(tmp_path):
    download, csv, _, _ = _run(tmp_path, scans=COHORT[:3])
    (tmp_path / "file.txt").write_text("not a folder")
    out = tmp_path / "file.txt" / "manifest.csv"  # fails for root too
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    msg = str(err.value)
    assert str(tmp_path / "file.txt") in msg and "not writable" in msg and "Nothing was converted" in msg


def test_read_only_output_folder(tmp_path):
    download, csv, _, _ = _run(tmp_path, scans=COHORT[:3])
    if os.geteuid() == 0:  # root ignores chmod; /sys refuses new files even to root
        assert Path("/sys").is_dir(), "running as root without /sys: no unwritable folder to test with"
        with pytest.raises(DataError, match="not writable"):
            ingest(download, csv=csv, out=Path("/sys") / "manifest.csv")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable"):
            ingest(download, csv=csv, out=ro / "manifest.csv")
    finally:
        ro.chmod(0o700)


def test_permission_denied_output_folder(tmp_path, monkeypatch):
    """The same path as a read-only folder for a non-root user, simulated so it runs as root too."""
    import tempfile

    download, csv, _, out = _run(tmp_path, scans=COHORT[:3])

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(DataError) as err:
        ingest(download, csv=csv, out=out)
    assert f"output folder {out.parent} is not writable (Permission denied)" in str(err.value)
    assert not (out.parent / "nifti").exists()


def test_sites_csv_errors(tmp_path):
    download, csv, _, out = _run(tmp_path, scans=COHORT[:1])
    bad = tmp_path / "centres.csv"
    bad.write_text("SUBJ,CNO\n1001,10\n")
    with pytest.raises(DataError, match="missing column.*PATNO"):
        ingest(download, csv=csv, sites_csv=bad, out=out)
    bad.write_text("PATNO,CNO\n1001,10\n1001,11\n")
    with pytest.raises(DataError, match=r"more than one CNO: 1001 \(10/11\)"):
        ingest(download, csv=csv, sites_csv=bad, out=out)
