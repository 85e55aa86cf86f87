"""Bad input to ``fedpd ingest`` / ``split`` / ``partition`` through the real CLI (DESIGN.md, "Bad input").

Every refusal exits 2 with a message that names the file or flag and the fix, shows no traceback, and
leaves the user's files byte-identical. Runs on one tiny phantom cohort (16^3 voxels, 8 subjects).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import common.cohort.scans
from common.cli import main
from common.cohort.manifest import read_manifest, write_manifest
from simulation.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
COHORT = dict(subjects=8, sites=2, shape=16, seed=3)


def _digest(*paths: Path) -> dict[str, str]:
    """sha256 of each file (every file under a folder)."""
    files = []
    for p in paths:
        files += sorted(f for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() else [Path(p)]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A phantom download and its manifest (NIfTI cache shared by the tests that only read it)."""
    root = tmp_path_factory.mktemp("cohort")
    download = root / "download"
    generate_phantom(download, dicom_fraction=0.3, **COHORT)
    csv, sites = download / "idaSearch.csv", download / "centres.csv"
    manifest = root / "work" / "manifest.csv"
    assert main(["ingest", str(download), "--csv", str(csv), "--sites-csv", str(sites), "--out", str(manifest)]) == 0
    return {"root": root, "download": download, "csv": csv, "sites": sites, "manifest": manifest,
            "cache": manifest.parent / "nifti"}


def _ingest_args(c, out, *more):
    return ["ingest", c["download"], "--csv", c["csv"], "--sites-csv", c["sites"], "--out", out, *more]


# ----------------------------------------------------------------------------------- ingest: outputs
@pytest.mark.parametrize("flag", ["--csv", "--sites-csv"])
def test_ingest_out_equal_to_an_input_is_refused(cohort, tmp_path, capsys, monkeypatch, flag):
    target = cohort["csv"] if flag == "--csv" else cohort["sites"]
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    before = _digest(cohort["download"])
    monkeypatch.chdir(target.parent)
    for out in (target, link, Path(target.name)):  # the path itself, a symlink to it, a relative path
        code, _, err = _cli(capsys, *_ingest_args(cohort, out))
        assert code == 2, out
        assert f"--out is the same file as {flag}" in err and str(target) in err
        assert "choose another --out" in err and "Nothing was converted" in err
    assert _digest(cohort["download"]) == before
    assert link.is_symlink() and link.resolve() == target


@pytest.mark.parametrize("which", ["csv", "sites"])
def test_ingest_nifti_cache_equal_to_an_input_is_refused(cohort, tmp_path, capsys, which):
    before = _digest(cohort["download"])
    code, _, err = _cli(capsys, *_ingest_args(cohort, tmp_path / "m.csv", "--nifti-cache", cohort[which]))
    assert code == 2
    flag = "--csv" if which == "csv" else "--sites-csv"
    assert f"--nifti-cache is the same path as {flag}" in err and str(cohort[which]) in err
    assert "choose another folder" in err
    assert _digest(cohort["download"]) == before
    assert not (tmp_path / "m.csv").exists()


def test_ingest_refuses_an_existing_manifest_and_force_keeps_a_backup(cohort, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    shutil.copy(cohort["manifest"], out)
    assert _cli(capsys, "split", out)[0] == 0  # in place: the manifest now holds the user's split column
    assert "split" in read_manifest(out, require_split=True).columns
    before = _digest(out, cohort["download"])

    code, _, err = _cli(capsys, *_ingest_args(cohort, out, "--nifti-cache", cohort["cache"]))
    assert code == 2
    assert str(out) in err and "a manifest already exists here" in err and "split column" in err
    assert "--force" in err and "choose another --out" in err
    assert _digest(out, cohort["download"]) == before

    code, printed, _ = _cli(capsys, *_ingest_args(cohort, out, "--nifti-cache", cohort["cache"], "--force"))
    assert code == 0
    backups = list(tmp_path.glob("manifest.csv.bak-*"))
    assert len(backups) == 1 and re.fullmatch(r"manifest\.csv\.bak-\d{8}-\d{6}", backups[0].name)
    assert hashlib.sha256(backups[0].read_bytes()).hexdigest() == before[str(out)]  # byte-identical
    assert str(backups[0]) in printed and "run fedpd split again" in printed
    assert "split" not in read_manifest(out).columns
    assert read_manifest(out)["image_id"].tolist() == read_manifest(cohort["manifest"])["image_id"].tolist()
    assert _digest(cohort["download"]) == {k: v for k, v in before.items() if k != str(out)}


# ---------------------------------------------------------------------------------- ingest: scan QC
def _bad_scans(good: bytes) -> dict[str, tuple[bytes | None, np.ndarray | None, str]]:
    """kind -> (raw bytes or None, volume or None, expected reason)."""
    vol = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32) + 0.1
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    return {
        "corrupt": (np.random.default_rng(1).bytes(4096), None, "cannot be read as NIfTI"),
        "truncated": (good[: len(good) // 2], None, "cannot be read as NIfTI"),
        "4d": (None, np.stack([vol, vol], -1), "is 4D with 2 volumes"),
        "2d": (None, vol[:, :, 0], "has 2 dimensions"),
        "nan": (None, nan, "has 1 NaN/Inf voxels"),
        "zero": (None, np.zeros_like(vol), "has no voxel > 0"),
    }


def test_ingest_scan_check_excludes_bad_scans_and_caches_results(cohort, tmp_path, capsys, monkeypatch):
    download = tmp_path / "download"
    shutil.copytree(cohort["download"], download)
    cache = tmp_path / "nifti"
    shutil.copytree(cohort["cache"], cache)  # the DICOM conversions are reused, the copies keep their mtimes
    csv = download / "idaSearch.csv"
    ida = pd.read_csv(csv, dtype=str)
    good = next(cohort["cache"].glob("*.nii.gz")).read_bytes()
    rows, expected = [], {}
    for n, (kind, (raw, vol, reason)) in enumerate(_bad_scans(good).items()):
        iid, subject = f"I99{n}", str(9900 + n)
        folder = download / "PPMI" / subject / "MPRAGE" / "2020-01-01_10_00_00.0" / iid
        folder.mkdir(parents=True)
        scan = folder / f"PPMI_{subject}_MR_MPRAGE_{iid}.nii.gz"
        if raw is not None:
            scan.write_bytes(raw)
        else:
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(scan))
        expected[iid] = (scan, reason)
        rows.append(dict(ida.iloc[0], **{"Image Data ID": iid, "Subject": subject, "Group": "PD" if n % 2 else "Control",
                                         "Format": "NiFTI"}))
    pd.concat([ida, pd.DataFrame(rows)]).to_csv(csv, index=False)
    inputs = _digest(download)

    calls = []
    real = common.cohort.scans.scan_problem
    monkeypatch.setattr(common.cohort.scans, "scan_problem", lambda p: calls.append(p) or real(p))
    out = tmp_path / "work" / "manifest.csv"
    argv = ["ingest", download, "--csv", csv, "--sites-csv", download / "centres.csv", "--out", out,
            "--nifti-cache", cache]
    code, printed, err = _cli(capsys, *argv)
    assert code == 2
    assert "converted 0, reused" in printed
    assert f"{len(expected)} scan(s) could not be ingested: {', '.join(sorted(expected))}" in err
    for iid, (scan, reason) in expected.items():  # one table row per bad scan, with its own reason
        assert re.search(rf"^  {iid} +{re.escape(str(scan))}: {re.escape(reason)}", err, re.M), (iid, err)
    assert sorted(read_manifest(out)["image_id"]) == sorted(read_manifest(cohort["manifest"])["image_id"])
    assert (cache / ".scan-check.json").is_file()
    assert len(calls) >= len(expected)
    assert _digest(download) == inputs

    # The re-run checks nothing again: every result (pass and fail) comes from .scan-check.json.
    calls.clear()
    code, _, err2 = _cli(capsys, *argv, "--force")
    assert code == 2 and calls == []
    for iid, (scan, reason) in expected.items():
        assert re.search(rf"^  {iid} +{re.escape(str(scan))}: {re.escape(reason)}", err2, re.M)
    assert _digest(download) == inputs


def test_unknown_site_warning_names_the_subjects(cohort, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    code, _, err = _cli(capsys, "ingest", cohort["download"], "--csv", cohort["csv"], "--out", out,
                        "--nifti-cache", cohort["cache"])
    assert code == 0
    m = read_manifest(out)
    unknown = sorted(m.loc[m["site"] == "unknown", "subject_id"].unique())
    assert unknown and len(unknown) < m["subject_id"].nunique()  # NIfTI-only subjects have no InstitutionName
    line = next(ln for ln in err.splitlines() if "have site 'unknown'" in ln)
    assert line.startswith(f"ingest: warning: {len(unknown)} subject(s)")
    named = re.search(r"InstitutionName\): (.*); pass --sites-csv", line).group(1)
    assert sorted(named.split(", ")) == unknown and "PATNO,CNO" in line


# ------------------------------------------------------------------------------------ split, partition
def test_split_refuses_a_one_class_manifest(cohort, tmp_path, capsys):
    m = read_manifest(cohort["manifest"])
    path = write_manifest(m[m["label"] == 1], tmp_path / "pd-only.csv")
    before = _digest(path)
    code, _, err = _cli(capsys, "split", path)
    assert code == 2
    assert str(path) in err and "only one class" in err and "0 control subject(s)" in err
    assert "add control subjects" in err
    assert _digest(path) == before


@pytest.fixture
def split_manifest_path(cohort, tmp_path, capsys):
    path = tmp_path / "in" / "split.csv"
    assert _cli(capsys, "split", cohort["manifest"], "--out", path)[0] == 0
    return path


def test_partition_warns_about_a_one_class_site(split_manifest_path, tmp_path, capsys):
    m = read_manifest(split_manifest_path, require_split=True)
    # the site with most PD train subjects loses its controls: its train rows hold PD only
    site = m[(m["split"] == "train") & (m["label"] == 1)].groupby("site")["subject_id"].nunique().idxmax()
    one = write_manifest(m[(m["site"] != site) | (m["label"] == 1)], tmp_path / "one-class.csv")
    code, _, err = _cli(capsys, "partition", one, "--out", tmp_path / "partition")
    assert code == 0
    assert re.search(rf"partition: warning: site {site}: its train rows hold only one class \(\d+ PD / 0 control",
                     err), err
    assert "trains on PD only" in err
    assert (tmp_path / "partition" / "sites" / f"{site}.csv").is_file()


def test_partition_out_holding_the_manifest_is_refused(split_manifest_path, capsys, monkeypatch):
    folder = split_manifest_path.parent
    before = _digest(folder)
    monkeypatch.chdir(folder)
    for out in (folder, Path("."), split_manifest_path):
        code, _, err = _cli(capsys, "partition", split_manifest_path, "--out", out)
        assert code == 2, out
        assert str(split_manifest_path) in err and "lies inside the --out folder" in err
        assert f"--out {folder / 'partition'}" in err
    assert _digest(folder) == before  # nothing written: no server.csv, sites/ or partition.json


# ------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_during_ingest_leaves_no_temporary_file(tmp_path):
    """SIGTERM while ingest converts: exit 130, no manifest, no temporary file, the finished NIfTIs kept whole.

    The last DICOM series holds a FIFO no one writes to, so its conversion blocks in open() as on a hung
    network share: the signal always lands inside conversion, after the earlier series were cached, however
    loaded the machine is (a timed signal raced the end of a fast ingest under load)."""
    import os

    download = tmp_path / "download"
    generate_phantom(download, dicom_fraction=1.0, **COHORT)  # every scan a DICOM series
    ida = pd.read_csv(download / "idaSearch.csv")
    last = ida["Image Data ID"][ida["Group"].isin(["PD", "Control"])].iloc[-1]  # the last series ingest converts
    series = next(d for d in download.rglob(str(last)) if d.is_dir())
    os.mkfifo(series / "zz-hung-share.dcm")
    work = tmp_path / "work"
    cache = work / "nifti"
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "ingest", str(download), "--csv", str(download / "idaSearch.csv"),
         "--out", str(work / "manifest.csv")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if any(not p.name.startswith(".") for p in cache.glob("*.nii.gz")):
                break  # conversion is under way, and cannot get past the FIFO
            time.sleep(0.05)
        assert proc.poll() is None, "ingest ended: it should block on the FIFO series"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not (work / "manifest.csv").exists()
    left = [str(p) for p in work.rglob("*") if ".tmp" in p.name or ".partial" in p.name]
    assert left == []
    kept = sorted(p.name for p in cache.glob("*.nii.gz"))
    assert kept and all(common.cohort.scans.scan_problem(cache / k) is None for k in kept)  # the kept files are whole
    assert f"{last}.nii.gz" not in kept  # it was stopped in the blocked series
    assert re.search(rf"ingest: interrupted: {len(kept)} converted NIfTI file\(s\) stay cached in {re.escape(str(cache))}",
                     err), err
    assert "no manifest was written" in err and "no temporary file was left" in err
    assert "fedpd ingest: interrupted" in err
