"""Calibrate the preprocessing QC on real scans: the QC figures of good registrations against the same scans
deliberately misregistered, and against non-brain and non-T1 inputs (the evidence for ``DEFAULT_QC_THRESHOLD``).

For every 3D T1 in ``--real`` (default ``../shared/realmri``) the script runs the per-scan pipeline of
``fedpd preprocess`` (:func:`common.preprocessing.registration.preprocess_scan`: N4, registration, QC) and then
recomputes the QC figures with the found transform ``T`` (template point -> scan point) composed with a
perturbation ``P`` about the template brain's centre, ``T o P``:

- shifts of 5, 10 and 20 mm and rotations of 5 and 10 deg, each along / about 3 random directions (seeded);
- scaling by 0.9 and 1.1 (the head 10 % too large or too small in template space).

Non-brain / non-T1 inputs, registered by the same code:

- ``inverted``: each real scan with its contrast inverted inside the head (bright CSF, dark white matter: a
  T2-like image);
- ``noise``: a Gaussian noise volume of a head's size;
- ``2d``: a 2D thick-slice series (registered although ``fedpd preprocess`` excludes it before registration).

With ``--phantom DATA`` (a folder with ``download/phantom.json`` and ``manifest.csv`` from ``fedpd phantom
--space native`` + ``fedpd ingest``), the phantom's scans are added with their *known* transforms as "good"
and the same perturbations. One threshold serves both.

    .venv/bin/python benchmarks/qc_calibration.py --template-mm 2 --out /tmp/qc_calibration.json
    .venv/bin/python benchmarks/qc_calibration.py --template-mm 2 --phantom /tmp/ph/data --max-phantom 12

Prints a table (figure: min-max per scan and case) and writes every value to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.preprocessing.registration import (head_mask, load_template, n4_correct, nifti_to_sitk,  # noqa: E402
                                               preprocess_scan, qc_metrics, register_to_template,
                                               thick_slice_problem)

PERTURBATIONS = [("shift", 5.0), ("rotate", 5.0), ("shift", 10.0), ("rotate", 10.0), ("shift", 20.0),
                 ("scale", 0.9), ("scale", 1.1)]
DIRECTIONS = 3  # random directions per shift / rotation
REAL = Path(__file__).resolve().parents[2] / "shared" / "realmri"


def _centre(template) -> list[float]:
    idx = np.argwhere(sitk.GetArrayViewFromImage(template.brain) > 0).mean(axis=0)[::-1]
    return list(template.brain.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def perturbation(kind: str, amount: float, direction: np.ndarray, centre) -> sitk.Transform:
    """A shift (mm), rotation (deg) or scaling about ``centre``, in template space."""
    if kind == "rotate":
        p = sitk.VersorRigid3DTransform()
        p.SetCenter(centre)
        p.SetRotation(direction.tolist(), float(np.deg2rad(amount)))
        return p
    p = sitk.Similarity3DTransform()
    p.SetCenter(centre)
    if kind == "shift":
        p.SetTranslation((direction * amount).tolist())
    else:
        p.SetScale(amount)
    return p


def figures(image: sitk.Image, transform: sitk.Transform, template) -> dict:
    resampled = sitk.Maximum(sitk.Resample(image, template.t1, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32), 0.0)
    return qc_metrics(resampled, image, transform, template)


def _register(path: Path, template, *, check_slices: bool = True):
    """(bias-corrected scan, found transform, figures, seconds) by the pipeline's own steps."""
    t0 = time.perf_counter()
    if check_slices:
        result = preprocess_scan(path, template)
        seconds = time.perf_counter() - t0
        image = sitk.Maximum(nifti_to_sitk(nib.load(str(path))), 0.0)
        image = n4_correct(image, head_mask(image))
        return image, result.transform, result.metrics, seconds
    image = sitk.Maximum(nifti_to_sitk(nib.load(str(path))), 0.0)
    head = head_mask(image)
    image = n4_correct(image, head)
    transform, _ = register_to_template(image, head, template)
    return image, transform, figures(image, transform, template), time.perf_counter() - t0


def _perturbed(name: str, image, transform, template, rng, centre) -> list[dict]:
    rows = []
    for kind, amount in PERTURBATIONS:
        for k in range(1 if kind == "scale" else DIRECTIONS):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            moved = _as_affine(sitk.CompositeTransform([transform, perturbation(kind, amount, d, centre)]))  # P, then T
            rows.append({"scan": name, "case": f"{kind} {amount:g}", **figures(image, moved, template)})
    return rows


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """A composition of affine maps as one affine (read off the images of the origin and the unit vectors)."""
    o = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.stack([np.asarray(transform.TransformPoint(tuple(e))) - o for e in np.eye(3)], axis=1)
    out = sitk.AffineTransform(3)
    out.SetMatrix(m.ravel().tolist())
    out.SetTranslation(o.tolist())
    return out


def _inverted(path: Path, folder: Path) -> Path:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.squeeze(data)
    mask = sitk.GetArrayFromImage(head_mask(sitk.Maximum(nifti_to_sitk(nib.Nifti1Image(data, img.affine)), 0.0)))
    mask = mask.transpose(2, 1, 0) > 0
    top = float(np.percentile(data[mask], 99.5))
    out = np.where(mask, np.clip(top - data, 0, None), 0).astype(np.float32)
    dst = folder / f"inverted_{path.name}"
    nib.save(nib.Nifti1Image(out, img.affine), str(dst))
    return dst


def _noise(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    dst = folder / "noise.nii.gz"
    nib.save(nib.Nifti1Image(np.abs(rng.normal(100, 30, (160, 192, 160))).astype(np.float32),
                             np.diag([1.0, 1.0, 1.0, 1.0])), str(dst))
    return dst


def _phantom_rows(data: Path, template, rng, centre, limit: int) -> list[dict]:
    marker = json.loads((data / "download" / "phantom.json").read_text())
    known = marker["native"]["scans"]
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str})
    rows = []
    for r in manifest.itertuples():
        if r.image_id not in known or len({row["scan"] for row in rows}) >= limit:
            continue
        path = Path(r.path) if Path(r.path).is_absolute() else data / r.path
        true = _lps_affine(known[r.image_id]["template_to_native"])
        image = sitk.Maximum(nifti_to_sitk(nib.load(str(path))), 0.0)
        image = n4_correct(image, head_mask(image))
        name = f"phantom {r.image_id}"
        found, _ = register_to_template(image, head_mask(image), template)
        rows.append({"scan": name, "case": "good (known)", **figures(image, true, template)})
        rows.append({"scan": name, "case": "good", **figures(image, found, template)})
        rows += _perturbed(name, image, true, template, rng, centre)
    return rows


def _lps_affine(matrix) -> sitk.AffineTransform:
    """A 4x4 RAS world -> world matrix as a SimpleITK (LPS) affine."""
    m = np.asarray(matrix, dtype=float)
    flip = np.diag([-1.0, -1.0, 1.0])
    out = sitk.AffineTransform(3)
    out.SetMatrix((flip @ m[:3, :3] @ flip).ravel().tolist())
    out.SetTranslation((flip @ m[:3, 3]).tolist())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=REAL, help="folder of real T1 NIfTI files (default ../shared/realmri)")
    ap.add_argument("--template-mm", type=int, default=2)
    ap.add_argument("--phantom", type=Path, help="a native phantom's data folder (download/phantom.json, manifest.csv)")
    ap.add_argument("--max-phantom", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("qc_calibration.json"))
    a = ap.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    template = load_template(a.template_mm)
    centre = _centre(template)
    rng = np.random.default_rng(0)
    rows, timing = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for path in sorted(a.real.glob("*.nii*")):
            img = nib.load(str(path))
            spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
            name = path.name.split(".nii")[0]
            if thick_slice_problem(img.shape[:3], spacing):
                image, found, metrics, _ = _register(path, template, check_slices=False)
                rows.append({"scan": name, "case": "2d (not T1 3D)", **metrics})
                continue
            image, found, metrics, seconds = _register(path, template)
            timing[name] = round(seconds, 1)
            rows.append({"scan": name, "case": "good", **metrics})
            rows += _perturbed(name, image, found, template, rng, centre)
            _, _, inv, _ = _register(_inverted(path, tmp), template, check_slices=False)
            rows.append({"scan": name, "case": "inverted (T2-like)", **inv})
            print(f"{name}: done ({seconds:.1f} s)", file=sys.stderr, flush=True)
        _, _, noise, _ = _register(_noise(tmp), template, check_slices=False)
        rows.append({"scan": "noise", "case": "noise", **noise})
    if a.phantom:
        rows += _phantom_rows(a.phantom, template, rng, centre, a.max_phantom)
    df = pd.DataFrame(rows)
    a.out.write_text(json.dumps({"template_mm": a.template_mm, "seconds_per_scan": timing,
                                 "rows": df.to_dict(orient="records")}, indent=1) + "\n")
    table = df.groupby(["scan", "case"], sort=False)["correlation"].agg(["min", "max"]).round(3)
    with pd.option_context("display.max_rows", 500, "display.width", 160):
        print(table)
        print(df.groupby("case", sort=False)["correlation"].agg(["min", "median", "max", "count"]).round(3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
