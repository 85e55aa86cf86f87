"""The phantom cohort (simulation/phantom.py): IDA format, determinism, DICOM, site profiles and its signal.

Cohorts are small (16-24 voxels a side) and seeded, so the file runs in well under a minute on 2 cores.
The validity check trains a plain logistic regression on raw, downsampled voxels (no knowledge of where the
effect is) with subject-grouped cross-validation: AUC ~0.5 at effect 0, clearly higher at the default.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path

import dicom2nifti
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.errors import DataError
from simulation import phantom
from simulation.phantom import IDA_COLUMNS, generate_phantom

SIGNAL = {"subjects": 100, "sites": 3, "shape": 24, "seed": 1}     # the validity-check cohort
SMALL = {"subjects": 12, "sites": 3, "shape": 16, "seed": 5}


def _quiet(**kwargs) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return generate_phantom(**kwargs)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _folder(out: Path, row) -> Path:
    return next((out / "PPMI" / row["Subject"]).glob(f"*/*/{row['Image Data ID']}"))


def _volume(out: Path, row, tmp: Path) -> nib.Nifti1Image:
    """The scan as a RAS NIfTI image; DICOM series go through dicom2nifti as ingestion does."""
    folder = _folder(out, row)
    nifti = list(folder.glob("*.nii.gz"))
    if nifti:
        img = nib.load(nifti[0])
    else:
        target = tmp / f"{row['Image Data ID']}.nii.gz"
        dicom2nifti.convert_dicom.dicom_series_to_nifti(str(folder), str(target), reorient_nifti=True)
        img = nib.load(target)
    return nib.as_closest_canonical(img)


def _normalise(vol: np.ndarray) -> np.ndarray:
    mask = vol > 0.2 * np.percentile(vol, 99)
    return (vol - vol[mask].mean()) / vol[mask].std()


def _load(out: Path, tmp: Path):
    ida = pd.read_csv(out / "idaSearch.csv", dtype=str)
    vols = [np.asarray(_volume(out, r, tmp).dataobj, dtype=np.float32) for _, r in ida.iterrows()]
    return ida, np.stack(vols)


@pytest.fixture(scope="module")
def signal(tmp_path_factory):
    """Same cohort at effect 0 and at the default effect 1: (out, summary, ida, volumes) per effect."""
    cohorts = {}
    for effect in (0.0, 1.0):
        root = tmp_path_factory.mktemp(f"effect{effect:g}")
        summary = _quiet(out=root / "phantom", effect=effect, **SIGNAL)
        ida, vols = _load(root / "phantom", root)
        cohorts[effect] = (root / "phantom", summary, ida, vols)
    return cohorts


def _grouped_cv_auc(vols: np.ndarray, ida: pd.DataFrame) -> float:
    keep = ida["Group"].isin(["PD", "Control"]).to_numpy()
    n, s = keep.sum(), vols.shape[1] // 8
    x = np.stack([_normalise(v) for v in vols[keep]])
    x = x[:, :8 * s, :8 * s, :8 * s].reshape(n, 8, s, 8, s, 8, s).mean(axis=(2, 4, 6)).reshape(n, -1)  # 8^3
    y = (ida["Group"][keep] == "PD").astype(int).to_numpy()
    groups = ida["Subject"][keep].to_numpy()
    score = np.zeros(n)
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x[train], y[train])
        score[test] = model.predict_proba(x[test])[:, 1]
    return roc_auc_score(y, score)


# ---------------------------------------------------------------------------------------------- format
def test_ida_csv_centres_and_tree(signal):
    out, summary, ida, vols = signal[1.0]
    assert list(ida.columns) == list(IDA_COLUMNS)
    assert ida["Image Data ID"].str.fullmatch(r"I\d{6}").all() and ida["Image Data ID"].is_unique
    assert ida["Subject"].str.fullmatch(r"\d{4,5}").all()
    assert set(ida["Group"]) == {"PD", "Control", "Prodromal", "SWEDD"}
    assert set(ida["Sex"]) <= {"M", "F"} and set(ida["Modality"]) == {"MRI"} and set(ida["Type"]) == {"Original"}
    assert set(ida["Format"]) == {"NiFTI", "DCM"}
    assert pd.to_numeric(ida["Age"]).between(40, 90).all()
    assert ida["Acq Date"].str.fullmatch(r"\d\d/\d\d/\d{4}").all() and ida["Downloaded"].nunique() == 1
    centres = pd.read_csv(out / "centres.csv", dtype=str)
    assert list(centres.columns) == ["PATNO", "CNO"] and set(centres["PATNO"]) == set(ida["Subject"])
    site_desc = {v["cno"]: v["description"] for v in summary["sites"].values()}
    desc = ida["Subject"].map(dict(zip(centres["PATNO"], centres["CNO"]))).map(site_desc)
    assert (desc == ida["Description"]).all()
    for _, row in ida.iterrows():
        folder = _folder(out, row)
        month, day, year = row["Acq Date"].split("/")
        assert folder.parent.parent.name == row["Description"].replace(" ", "_")
        assert re.fullmatch(rf"{year}-{month}-{day}_\d\d_\d\d_\d\d\.0", folder.parent.name)
        files = sorted(folder.iterdir())
        if row["Format"] == "NiFTI":
            assert [f.name for f in files] == [f"PPMI_{row['Subject']}_MR_{folder.parent.parent.name}_"
                                               f"{row['Image Data ID']}.nii.gz"]
        else:
            assert len(files) == SIGNAL["shape"] and all(f.suffix == ".dcm" for f in files)
    assert vols.shape[1:] == (SIGNAL["shape"],) * 3
    assert not list(out.rglob("*.partial"))


def test_summary_matches_files(signal, capsys):
    out, summary, ida, _ = signal[1.0]
    assert summary["scans"] == len(ida) and summary["dicom"] == (ida["Format"] == "DCM").sum()
    assert summary["subjects"] == ida["Subject"].nunique() == SIGNAL["subjects"]
    assert sum(v["scans"] for v in summary["sites"].values()) == len(ida)
    assert summary["voxel_mm"] == pytest.approx(phantom.FOV_MM / SIGNAL["shape"])
    marker = (out / phantom.MARKER).read_text()
    assert '"complete": true' in marker and str(out) not in marker


def test_cohort_composition(signal):
    _, summary, ida, _ = signal[1.0]
    subjects = ida.drop_duplicates("Subject")
    groups = subjects["Group"].value_counts()
    assert groups["PD"] / (groups["PD"] + groups["Control"]) == pytest.approx(0.8, abs=0.06)
    assert 0.03 <= (groups["Prodromal"] + groups["SWEDD"]) / len(subjects) <= 0.15
    shares = [v["groups"]["PD"] / (v["groups"]["PD"] + v["groups"]["Control"]) for v in summary["sites"].values()]
    assert max(shares) - min(shares) > 0.05                                    # non-IID labels
    assert len({v["subjects"] for v in summary["sites"].values()}) > 1          # unequal site sizes
    for _, visits in ida.groupby("Subject")["Visit"]:
        assert 1 <= len(visits) <= 3
        assert sorted(visits) == sorted(phantom.VISITS[:len(visits)])
    assert 1.5 <= len(ida) / len(subjects) <= 2.5


def test_visits_share_the_subjects_anatomy(signal):
    _, _, ida, vols = signal[0.0]
    x = np.stack([_normalise(v).ravel() for v in vols])
    corr = np.corrcoef(x)
    subject = ida["Subject"].to_numpy()
    same = subject[:, None] == subject[None, :]
    np.fill_diagonal(corr, -np.inf)
    multi = [i for i in range(len(x)) if same[i].sum() > 1]
    nearest_is_same = np.mean([same[i, np.argmax(corr[i])] for i in multi])
    within = corr[same & ~np.eye(len(x), dtype=bool)].mean()
    between = corr[~same].mean()
    assert within > between + 0.02, (within, between)
    assert nearest_is_same > 0.7, nearest_is_same          # ~0.85; chance is about 1 in 100


# ---------------------------------------------------------------------------------------------- DICOM
def test_dicom_share_and_headers(signal):
    out, summary, ida, _ = signal[1.0]
    dcm = ida[ida["Format"] == "DCM"]
    assert len(dcm) >= 0.10 * len(ida)
    cno = dict(pd.read_csv(out / "centres.csv", dtype=str).values)
    site_of_cno = {v["cno"]: name for name, v in summary["sites"].items()}
    sops, series = set(), set()
    for _, row in dcm.iterrows():
        files = sorted(_folder(out, row).glob("*.dcm"))
        first = pydicom.dcmread(files[0])
        assert first.SOPClassUID == pydicom.uid.MRImageStorage
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert first.InstitutionName == site_of_cno[cno[row["Subject"]]]
        assert first.PatientID == row["Subject"] and first.SeriesDescription == row["Description"]
        assert (first.BitsAllocated, first.PixelRepresentation, first.Modality) == (16, 0, "MR")
        assert float(first.RescaleSlope) > 0 and first.pixel_array.dtype == np.uint16
        series.add(first.SeriesInstanceUID)
        for f in files:
            sops.add(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    assert len(series) == len(dcm) and len(sops) == len(dcm) * SIGNAL["shape"]


def test_dicom_series_converts_back_to_the_nifti(tmp_path):
    """Same cohort written twice: a scan that is NIfTI in one is a DICOM series in the other."""
    _quiet(out=tmp_path / "a", **SMALL)
    _quiet(out=tmp_path / "b", dicom_fraction=1.0, **SMALL)
    a = pd.read_csv(tmp_path / "a" / "idaSearch.csv", dtype=str)
    b = pd.read_csv(tmp_path / "b" / "idaSearch.csv", dtype=str)
    assert (b["Format"] == "DCM").all()
    pd.testing.assert_frame_equal(a.drop(columns="Format"), b.drop(columns="Format"))
    row = a[a["Format"] == "NiFTI"].iloc[0]
    ref = _volume(tmp_path / "a", row, tmp_path)
    conv = _volume(tmp_path / "b", row, tmp_path)
    assert conv.shape == ref.shape == (SMALL["shape"],) * 3
    np.testing.assert_allclose(conv.affine, ref.affine, atol=1e-3)
    r = np.corrcoef(np.asarray(conv.dataobj).ravel(), np.asarray(ref.dataobj).ravel())[0, 1]
    assert r > 0.99, r


# ---------------------------------------------------------------------------------------------- sites
def test_site_profiles_differ(signal):
    out, summary, ida, vols = signal[0.0]
    cno = dict(pd.read_csv(out / "centres.csv", dtype=str).values)
    site = ida["Subject"].map(cno).to_numpy()
    c = max(2, vols.shape[1] // 6)
    ends = (slice(0, c), slice(-c, None))
    corners = [vols[:, i, j, k] for i in ends for j in ends for k in ends]       # background: noise only
    noise = np.stack([q.reshape(len(vols), -1).std(1) for q in corners]).mean(0)
    brain = np.array([v[v > 0.3 * np.percentile(v, 99)].mean() for v in vols])
    for feature in (brain, noise):
        by_site = [feature[site == s] for s in sorted(set(site))]
        assert stats.f_oneway(*by_site).pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- signal
def test_effect_zero_images_ignore_the_label():
    tpl = phantom._load_templates(16)
    sites, subjects, scans, _ = phantom._plan(12, 3, 7, 0.15)
    subject = next(s for s in subjects if s["group"] == "PD")
    scan = next(s for s in scans if s["subject"] == subject["index"])
    anatomy = phantom._anatomy(7, subject, tpl.basis, float(tpl.affine[0, 0]))

    def render(group, effect):
        site = sites[subject["site"]]
        volumes = phantom._site_volumes(tpl, site)
        return phantom._render(tpl, volumes, site, {**subject, "group": group}, anatomy, scan, effect, 7)

    assert np.array_equal(render("PD", 0.0), render("Control", 0.0))
    assert not np.array_equal(render("PD", 1.0), render("Control", 1.0))
    assert np.array_equal(render("Control", 1.0), render("Control", 0.0))


@pytest.mark.parametrize("shape", [48, 64])
def test_pd_warp_at_its_caps_does_not_fold(shape):
    """The strongest PD warp (ventricle enlargement and deep-GM shrinkage both at their caps) keeps a positive
    Jacobian determinant inside the head, and still moves tissue by more than one voxel."""
    tpl = phantom._load_templates(shape)
    u = tpl.ventricle * np.float32(phantom.VENTRICLE_CAP) + tpl.shrink * np.float32(phantom.SHRINK_CAP)
    jac = np.stack([np.stack(np.gradient(u[i]), 0) for i in range(3)], 0) + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    head = tpl.t1 > 0.05
    assert det[head].min() > 0, f"the warp folds: min Jacobian determinant {det[head].min():.4f}"
    moved_mm = np.abs(tpl.ventricle * phantom.VENTRICLE_CAP).max() * tpl.affine[0, 0]
    assert moved_mm > 2 * tpl.affine[0, 0], moved_mm


def test_classifier_auc_chance_at_effect_zero_and_high_at_default(signal):
    auc0 = _grouped_cv_auc(signal[0.0][3], signal[0.0][2])
    auc1 = _grouped_cv_auc(signal[1.0][3], signal[1.0][2])
    print(f"phantom validity: grouped-CV AUC {auc0:.3f} at effect 0, {auc1:.3f} at effect 1")
    assert 0.35 <= auc0 <= 0.65, auc0
    assert auc1 > 0.75, auc1


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = _quiet(out=tmp_path / "a", **SMALL)
    hashes = _hashes(tmp_path / "a")
    assert len(hashes) > first["scans"]
    _quiet(out=tmp_path / "a", **SMALL)                         # regenerating a previous phantom in place
    assert _hashes(tmp_path / "a") == hashes
    _quiet(out=tmp_path / "b", **SMALL)                         # another folder: same bytes
    assert _hashes(tmp_path / "b") == hashes
    _quiet(out=tmp_path / "c", **{**SMALL, "seed": SMALL["seed"] + 1})
    other = _hashes(tmp_path / "c")
    assert other["idaSearch.csv"] != hashes["idaSearch.csv"]
    assert not set(other.values()) & set(hashes.values()) - {hashes["centres.csv"]}


# ---------------------------------------------------------------------------------------------- bad input
def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        _quiet(out=tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_refuses_a_phantom_folder_with_foreign_files(tmp_path):
    _quiet(out=tmp_path, **SMALL)
    (tmp_path / "manifest.csv").write_text("x")
    with pytest.raises(DataError, match="manifest.csv"):
        _quiet(out=tmp_path, **SMALL)
    assert (tmp_path / "idaSearch.csv").is_file()


@pytest.mark.parametrize("kwargs, flag", [
    ({"subjects": 11, "sites": 3}, "--subjects"),
    ({"shape": 12}, "--shape"),
    ({"dicom_fraction": 0.05}, "--dicom-fraction"),
    ({"effect": -1.0}, "--effect"),
    ({"seed": -1}, "--seed"),
])
def test_bad_arguments(tmp_path, kwargs, flag):
    with pytest.raises(DataError, match=flag):
        _quiet(out=tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from common.cli import main

    assert main(["phantom", str(tmp_path / "x"), "--subjects", "4", "--sites", "3"]) == 2
    assert "fedpd phantom: error:" in capsys.readouterr().err
