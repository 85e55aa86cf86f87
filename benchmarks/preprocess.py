"""Benchmark `common.preprocessing.pipeline`: seconds per scan, accuracy against known poses, QC correlation of
good, misaligned and non-brain inputs (the evidence for ``DEFAULT_QC_THRESHOLD``).

Synthetic native-space heads are built from nilearn's MNI152 template: the skull-stripped brain plus
CSF, skull (two tables and marrow) and scalp shells and a neck, a known rigid pose (10-25 deg, 10-35 mm),
a PIR voxel order with anisotropic voxels, a smooth multiplicative bias field and Rician noise (so the
background is not zero). Registration error = mean/max |T_true(T_found(q)) - q| over template brain
points q, Dice = template brain mask vs the true brain mask mapped back with the found transform.

    .venv/bin/python benchmarks/preprocess.py --template-mm 2 --voxel 1 --scans 5 --workers 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.preprocessing.pipeline import head_mask, load_template, n4_correct, nifti_to_sitk, preprocess_manifest  # noqa: E402

POSES = [((10, -6, 8), (10, -8, 6)), ((-15, 10, 5), (20, 15, -10)), ((5, 20, -10), (-15, 25, 15)),
         ((25, 5, -5), (5, -20, 30)), ((-20, -10, 12), (-25, 10, -25))]
PIR = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # LPS direction cosines of voxel axes i->P, j->I, k->R


def synthetic_head(mm: int) -> tuple[sitk.Image, sitk.Image]:
    """Head (0-1) and brain mask in MNI space at ``mm``: template brain + CSF, skull, scalp and a neck."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = nifti_to_sitk(load_mni152_template(resolution=mm))
    brain = nifti_to_sitk(load_mni152_brain_mask(resolution=mm), np.uint8)
    lo, hi = [20 // mm, 20 // mm, 90 // mm], [20 // mm] * 3
    t1, brain = sitk.ConstantPad(t1, lo, hi, 0.0), sitk.ConstantPad(brain, lo, hi, 0)
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))
    head = sitk.GetArrayFromImage(t1) * (dist <= 0)
    for a, b, v in ((0, 3, 0.12), (3, 5, 0.04), (5, 8, 0.45), (8, 10, 0.04), (10, 15, 0.8)):
        head[(dist > a) & (dist <= b)] = v
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in head.shape[::-1]], indexing="ij"), -1)  # x, y, z order
    world = idx.reshape(-1, 3) * mm @ np.asarray(t1.GetDirection()).reshape(3, 3).T + t1.GetOrigin()
    x, y, z = (world[:, i].reshape(idx.shape[:3]).transpose(2, 1, 0) for i in range(3))
    neck = ((x / 45) ** 2 + ((y - 15) / 40) ** 2 < 1) & (z < -30) & (z > -160) & (head == 0)
    head[neck] = 0.5
    out = sitk.GetImageFromArray(head.astype(np.float32))
    out.CopyInformation(t1)
    return out, brain


def native_scan(head: sitk.Image, path: Path, pose, voxel=(1.2, 1.0, 1.0), fov=(240, 256, 256), bias=0.4,
                noise=0.03, seed=0) -> sitk.Euler3DTransform:
    """Write ``head`` in a scanner pose as int16 NIfTI (nibabel); return the true native -> MNI transform."""
    angles, shift = pose
    truth = sitk.Euler3DTransform((0, 0, 0), *np.deg2rad(angles), shift)
    size = [int(round(f / v)) for f, v in zip(fov, voxel)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(voxel)
    ref.SetDirection(PIR)
    d = np.asarray(PIR, dtype=float).reshape(3, 3)
    ref.SetOrigin(tuple(np.array([0.0, 10.0, -20.0]) - d @ (np.array(voxel) * (np.array(size) - 1) / 2)))
    img = sitk.GetArrayFromImage(sitk.Resample(head, ref, truth, sitk.sitkLinear, 0.0))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in img.shape], indexing="ij")
    s = img * np.exp(bias * (0.6 * x - 0.5 * y + 0.4 * z * z))
    rng = np.random.default_rng(seed)
    sd = noise * s.max()
    s = np.sqrt((s + rng.normal(0, sd, s.shape)) ** 2 + rng.normal(0, sd, s.shape) ** 2)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ d @ np.diag(voxel)
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(ref.GetOrigin())
    nib.save(nib.Nifti1Image(np.rint(1000 * s / s.max()).astype(np.int16).transpose(2, 1, 0), affine), str(path))
    return truth


def accuracy(truth: sitk.Transform, found: sitk.Transform, template) -> tuple[float, float, float]:
    """(mean, max) registration error in mm over template brain points, and the brain-mask Dice."""
    brain = sitk.GetArrayFromImage(template.brain) > 0
    pts = [template.brain.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in np.argwhere(brain)[::5]]
    err = np.array([np.linalg.norm(np.subtract(truth.TransformPoint(found.TransformPoint(q)), q)) for q in pts])
    composed = sitk.CompositeTransform([truth, found])  # applied last-first: found, then truth
    mapped = sitk.GetArrayFromImage(sitk.Resample(template.brain, template.brain, composed,
                                                  sitk.sitkNearestNeighbor, 0)) > 0
    dice = 2 * (mapped & brain).sum() / (mapped.sum() + brain.sum())
    return float(err.mean()), float(err.max()), float(dice)


def correlation_after(offset_mm: float, degrees: float, image: sitk.Image, found: sitk.Transform, template) -> float:
    """QC correlation of a (bias-corrected) scan resampled with ``found`` moved by a shift along x and a
    rotation about x, i.e. a registration that is off by that much."""
    moved = sitk.AffineTransform(found)
    moved.Rotate(1, 2, np.deg2rad(degrees), pre=True)
    moved.Translate((offset_mm, 0, 0), pre=True)
    moved.SetCenter(found.GetCenter())
    out = sitk.GetArrayFromImage(sitk.Resample(image, template.t1, moved, sitk.sitkLinear, 0.0))
    brain = sitk.GetArrayFromImage(template.brain) > 0
    return float(np.corrcoef(out[brain], sitk.GetArrayFromImage(template.t1)[brain])[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template-mm", type=int, default=2)
    p.add_argument("--voxel", type=float, default=1.0, help="native voxel size in mm (x1.2 along the first axis)")
    p.add_argument("--scans", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-n4", action="store_true")
    p.add_argument("--gamma", type=float, default=1.0, help="contrast change: head intensities ** gamma")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpd-preprocess-bench-") as tmp:
        root = Path(tmp)
        head, _ = synthetic_head(max(1, int(a.voxel)))
        head = sitk.Pow(head, a.gamma)
        rows, truths = [], {}
        for k in range(a.scans):
            iid = f"S{k}"
            truths[iid] = native_scan(head, root / f"{iid}.nii.gz", POSES[k % len(POSES)],
                                      voxel=(1.2 * a.voxel, a.voxel, a.voxel), seed=k)
            rows.append({"image_id": iid, "subject_id": f"P{k}", "visit": "BL", "label": k % 2, "site": "A",
                         "path": f"{iid}.nii.gz"})
        noise = np.random.default_rng(0).normal(300, 100, (128, 128, 100)).astype(np.float32)
        nib.save(nib.Nifti1Image(noise, np.diag([2.0, 2.0, 2.0, 1.0])), str(root / "noise.nii.gz"))
        rows.append({"image_id": "NOISE", "subject_id": "N", "visit": "BL", "label": 0, "site": "A",
                     "path": "noise.nii.gz"})
        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
        t0 = time.perf_counter()
        qc = preprocess_manifest(root / "manifest.csv", root / "out", template_mm=a.template_mm, n4=not a.no_n4,
                                 workers=a.workers, progress=False)
        wall = time.perf_counter() - t0
        template = load_template(a.template_mm)
        print(f"template {a.template_mm} mm, native {1.2 * a.voxel:g}x{a.voxel:g}x{a.voxel:g} mm, n4 {not a.no_n4}, "
              f"gamma {a.gamma:g}, workers {a.workers}: {len(qc)} scans in {wall:.1f} s wall")
        for _, r in qc.iterrows():
            extra = ""
            if r["image_id"] in truths:
                found = sitk.ReadTransform(str(root / "out" / "transforms" / f"{r['image_id']}.tfm"))
                mean, worst, dice = accuracy(truths[r["image_id"]], found, template)
                extra = f" error mean {mean:.2f} max {worst:.2f} mm, Dice {dice:.3f}"
            print(f"  {r['image_id']}: {r['status']} correlation {r['correlation']:.3f} {r['seconds']:.1f} s/scan"
                  + extra)
        found = sitk.ReadTransform(str(root / "out" / "transforms" / "S0.tfm"))
        image = sitk.Maximum(nifti_to_sitk(nib.load(str(root / "S0.nii.gz"))), 0.0)
        image = image if a.no_n4 else n4_correct(image, head_mask(image))
        print("correlation of S0 with its transform moved by (mm shift, deg rotation):")
        for shift, deg in ((0, 0), (5, 0), (10, 0), (20, 0), (0, 5), (0, 10), (0, 20), (10, 10)):
            print(f"  {shift:>2} mm {deg:>2} deg: {correlation_after(shift, deg, image, found, template):.3f}")


if __name__ == "__main__":
    main()
