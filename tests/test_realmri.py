"""``fedpd preprocess`` on real human T1 scans: every file in ``../shared/realmri`` gets its expected verdict.

The scans (provenance and licences in ``../shared/realmri/README.md``) are read where they are, never copied.
They are real anatomy, real scanners and real mistakes, which the template-made phantom cannot show: a
head-and-neck scan, a skull-stripped brain, a 4 mm scan with an odd value range, a 2D clinical spin echo.
The settings are the defaults except one worker (pytest runs two workers already).

"Fits" is measured, not eyeballed: the scan's own brain mask is carried to the template with the transform
``fedpd preprocess`` wrote (``transforms/<id>.tfm``) and compared with the template's brain mask (Dice). For
the skull-stripped scan its own mask is its non-zero voxels; for the head-and-neck scan it is the mask ROBEX
ships for it (``tests/fixtures/robex``). Misregistered, that scan was squeezed into the brain outline: Dice 0.69.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from common.preprocessing.pipeline import DEFAULT_QC_THRESHOLD, load_template, nifti_to_sitk, preprocess_manifest

REALMRI = Path(__file__).resolve().parents[2] / "shared" / "realmri"
ROBEX_MASK = Path(__file__).resolve().parent / "fixtures" / "robex" / "atlas_mask.nii.gz"
EXPECTED = {  # file stem -> "ok" or a phrase the exclusion reason must contain
    "wholehead_chris-t1-A_niivue_0.88mm": "ok",
    "wholehead_niivue-otsu_T1_1mm": "ok",
    "wholehead_robex-refvol_T1_1.5mm": "ok",
    "brain_niimath-bitmap_T1_0.8mm": "ok",
    "clinical_tcga-fg-6692_T1-SE-axial_0.9x0.9x5.5mm": "2D thick-slice acquisition",
    "lowres_intnorm-test_T1_4mm": "ok",
}


def _iid(stem: str) -> str:
    return stem.replace("_", "-").replace(".", "p")


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    files = sorted(REALMRI.glob("*.nii*"))
    assert files, (f"{REALMRI}: no real scans found; the tests read the shared real-scan set beside the repository "
                   "(shared/realmri): restore it")
    stems = {f.name.split(".nii")[0]: f for f in files}
    assert set(stems) == set(EXPECTED), f"{REALMRI}: files changed; update EXPECTED: {sorted(stems)}"
    root = tmp_path_factory.mktemp("realmri")
    rows = [{"image_id": _iid(stem), "subject_id": f"S{k}", "visit": "BL", "label": k % 2, "site": "real",
             "path": str(path)} for k, (stem, path) in enumerate(sorted(stems.items()))]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    out = root / "mni"
    qc = preprocess_manifest(root / "manifest.csv", out, workers=1, progress=False)
    return out, qc.set_index("image_id")


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_every_real_scan_gets_its_verdict(preprocessed, stem):
    _, qc = preprocessed
    row = qc.loc[_iid(stem)]
    if EXPECTED[stem] == "ok":
        assert row["status"] == "ok", (stem, row["reason"], row["correlation"])
        assert row["correlation"] >= DEFAULT_QC_THRESHOLD
    else:
        assert row["status"] == "excluded"
        assert EXPECTED[stem] in row["reason"], row["reason"]
        assert pd.isna(row["correlation"]), "excluded before registration, by its own reason"


def _dice_in_template(mask: nib.Nifti1Image, tfm: Path) -> float:
    template = load_template(2)
    moved = sitk.Resample(nifti_to_sitk(mask, np.uint8), template.brain, sitk.ReadTransform(str(tfm)),
                          sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayFromImage(moved) > 0, sitk.GetArrayFromImage(template.brain) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_head_and_neck_scan_fits_the_brain_outline(preprocessed):
    out, qc = preprocessed
    iid = _iid("wholehead_robex-refvol_T1_1.5mm")
    assert qc.loc[iid, "status"] == "ok"
    scan = nib.load(str(REALMRI / "wholehead_robex-refvol_T1_1.5mm.nii.gz"))
    mask = nib.load(str(ROBEX_MASK))
    assert np.allclose(mask.affine, scan.affine) and mask.shape[:3] == scan.shape[:3], "ROBEX mask is of this scan"
    dice = _dice_in_template(mask, out / "transforms" / f"{iid}.tfm")
    assert dice >= 0.88, dice
    assert 0.75 <= qc.loc[iid, "scale"] <= 0.95, qc.loc[iid, "scale"]  # squeezed into the brain it was 1.07


def test_skull_stripped_scan_fits_the_brain_outline(preprocessed):
    out, _ = preprocessed
    stem = "brain_niimath-bitmap_T1_0.8mm"
    scan = nib.load(str(REALMRI / f"{stem}.nii.gz"))
    mask = nib.Nifti1Image((np.asarray(scan.dataobj) > 0).astype(np.uint8), scan.affine)
    assert _dice_in_template(mask, out / "transforms" / f"{_iid(stem)}.tfm") >= 0.9
