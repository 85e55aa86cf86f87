"""Registration accuracy of ``fedpd preprocess`` against the native-space phantom's known transforms.

The phantom records, per scan, ``template_to_native``: the map from the unwarped MNI152 template's world to
the scan's world (the subject's linear anatomy and visit jitter undone, then the head pose), i.e. what a
12-parameter registration to the template should find up to the subject's smooth non-linear field.
``fedpd preprocess`` writes the transform it found (``transforms/<id>.tfm``, template -> scan, LPS mm).
This script compares the two, per scan:

- error in mm at named brain landmarks (MNI coordinates below) and over the whole brain mask (every
  4th voxel): ``|found(p) - true(p)|`` in the scan's world;
- brain-mask Dice: the template brain mask against itself carried through ``found^-1 o true``;
- the QC correlation ``fedpd preprocess`` recorded, and that of the known transform (the ceiling the
  phantom's anatomy allows), and with the known transform moved by 5 and 10 mm (what QC must reject).

Usage::

    python benchmarks/registration_accuracy.py RUN_DATA   # e.g. runs/demo/data (holds download/, preprocessed/)

Prints one line per statistic and writes ``<RUN_DATA>/registration_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.preprocessing.pipeline import load_template, nifti_to_sitk, qc_metrics  # noqa: E402

# MNI152 (RAS mm) brain landmarks, approximate: deep structures the phantom's PD effect lives in, and poles
LANDMARKS = {
    "anterior commissure": (0, 2, -4), "posterior commissure": (0, -24, -2), "midbrain": (0, -20, -12),
    "left putamen": (-25, 2, 0), "right putamen": (25, 2, 0), "left caudate head": (-13, 12, 9),
    "right caudate head": (13, 12, 9), "frontal pole": (0, 62, 0), "occipital pole": (0, -100, 8),
    "vertex": (0, -20, 72), "left temporal pole": (-40, 15, -35), "right temporal pole": (40, 15, -35),
}
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def _lps_affine(ras_matrix) -> sitk.AffineTransform:
    m = _FLIP @ np.asarray(ras_matrix, float) @ _FLIP
    t = sitk.AffineTransform(3)
    t.SetMatrix(m[:3, :3].ravel().tolist())
    t.SetTranslation(m[:3, 3].tolist())
    return t


def _errors(found: sitk.Transform, true: sitk.Transform, points_lps: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(found.TransformPoint(p), true.TransformPoint(p)))
                     for p in points_lps.tolist()])


def _dice(mask: sitk.Image, found: sitk.Transform, true: sitk.Transform) -> float:
    both = sitk.CompositeTransform(found.GetInverse())
    both.AddTransform(true)  # applied first: template -> scan (truth), then scan -> template (found^-1)
    # a copy: a view (GetArrayViewFromImage) of the temporary resampled image would outlive it
    moved = sitk.GetArrayFromImage(sitk.Resample(mask, mask, both, sitk.sitkNearestNeighbor, 0)) > 0
    ref = sitk.GetArrayViewFromImage(mask) > 0
    return float(2 * (moved & ref).sum() / (moved.sum() + ref.sum()))


def measure(data: Path) -> dict:
    marker = json.loads((data / "download" / "phantom.json").read_text())
    known = marker["native"]["scans"]
    pre = data / "preprocessed"
    settings = json.loads((pre / "preprocess.json").read_text())
    template_mm = int(settings.get("settings", settings).get("template_mm", 2))
    tpl = load_template(template_mm)
    qc = pd.read_csv(pre / "qc.csv", dtype={"image_id": str})
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str})
    paths = {r.image_id: (data / r.path if not Path(r.path).is_absolute() else Path(r.path)) for r in manifest.itertuples()}
    landmarks = np.array([(-x, -y, z) for x, y, z in LANDMARKS.values()], float)
    brain = sitk.GetArrayFromImage(tpl.brain)
    idx = np.argwhere(brain > 0)[::4][:, ::-1].astype(float)
    brain_pts = np.array([tpl.brain.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    rows = []
    import nibabel as nib

    for rec in qc.itertuples():
        tfm = pre / "transforms" / f"{rec.image_id}.tfm"
        if rec.image_id not in known or not tfm.is_file():
            continue
        found = sitk.ReadTransform(str(tfm))
        true = _lps_affine(known[rec.image_id]["template_to_native"])
        lm = _errors(found, true, landmarks)
        br = _errors(found, true, brain_pts)
        image = nifti_to_sitk(nib.load(str(paths[rec.image_id])))
        ceiling = qc_metrics(sitk.Resample(image, tpl.t1, true, sitk.sitkLinear, 0.0), image, true, tpl)["correlation"]
        shifted = {}
        for mm in (5, 10):
            off = sitk.AffineTransform(true)
            off.SetTranslation((np.asarray(true.GetTranslation()) + [mm, 0, 0]).tolist())
            shifted[mm] = qc_metrics(sitk.Resample(image, tpl.t1, off, sitk.sitkLinear, 0.0), image, off, tpl)["correlation"]
        rows.append({"image_id": rec.image_id, "status": rec.status, "landmark_mean_mm": lm.mean(),
                     "landmark_max_mm": lm.max(), "brain_mean_mm": br.mean(), "brain_max_mm": br.max(),
                     "dice": _dice(tpl.brain, found, true), "correlation": rec.correlation,
                     "correlation_known": ceiling, "correlation_5mm_off": shifted[5],
                     "correlation_10mm_off": shifted[10], "seconds": rec.seconds})
    df = pd.DataFrame(rows)
    voxel = marker.get("summary", {}).get("native_voxel_mm")
    out = {
        "scans": len(df), "native_voxel_mm": voxel, "template_mm": template_mm,
        "landmark_error_mm": {"mean": df.landmark_mean_mm.mean(), "worst": df.landmark_max_mm.max()},
        "brain_error_mm": {"mean": df.brain_mean_mm.mean(), "worst": df.brain_max_mm.max()},
        "scans_with_landmark_error_over_2_voxels": int((df.landmark_max_mm > 2 * max(voxel or [1])).sum()),
        "dice": {"mean": df.dice.mean(), "min": df.dice.min()},
        "correlation_found": [df.correlation.min(), df.correlation.median(), df.correlation.max()],
        "correlation_known": [df.correlation_known.min(), df.correlation_known.median(), df.correlation_known.max()],
        "correlation_5mm_off": [df.correlation_5mm_off.min(), df.correlation_5mm_off.median(), df.correlation_5mm_off.max()],
        "correlation_10mm_off": [df.correlation_10mm_off.min(), df.correlation_10mm_off.median(),
                                 df.correlation_10mm_off.max()],
        "seconds_per_scan": {"mean": df.seconds.mean(), "max": df.seconds.max()},
        "qc_status": {str(k): int(v) for k, v in qc.status.value_counts().items()},
    }
    out = json.loads(json.dumps(out, default=float))
    (data / "registration_accuracy.json").write_text(json.dumps(out, indent=2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a demo's data folder (download/ with phantom.json, preprocessed/)")
    a = p.parse_args(argv)
    res = measure(a.data)
    for k, v in res.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
