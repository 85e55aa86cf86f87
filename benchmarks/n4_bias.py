"""Benchmark N4 in `common.preprocessing.registration.preprocess_scan`: how much of a known bias field is left.

Fixtures: the template-derived synthetic head of ``benchmarks/preprocess.py`` (``synthetic_head``: MNI152 brain,
CSF, skull, marrow, scalp, neck) at 1 mm, written as int16 NIfTI with 1 x 1 mm in-plane and 1.2 mm slices (the
third voxel axis) in three voxel orders (direction cosines): LPS (axial slices), PIR (sagittal), ILA (coronal),
field of view 210 (R-L) x 250 (A-P) x 256 (S-I) mm, a mild rigid pose (7 deg / 6 mm at most), then a smooth
multiplicative bias field b = 1 + 0.2 g (exactly 0.8-1.2 over the head: g is scaled to [-1, 1] there), with g a
function of scanner coordinates u (each in [-1, 1] over the field of view):

    linear     g ~ 0.6 ux - 0.5 uy + 0.6 uz
    quadratic  g ~ ux^2 + 0.5 uy - 0.8 uz^2 + 0.4 ux uz
    coil       g ~ exp(-|u - (0.5, -0.6, 0.4)|^2 / 0.5)    (a surface-coil-like bright spot, front left top)
    voxel      g ~ 0.6 vi - 0.5 vj + 0.4 vk^2               (benchmarks/preprocess.py's field; v = voxel axes i, j, k
                                                          in [-1, 1]: it turns with the voxel order)

and Rician noise (sd 2 % of the maximum). Each scan goes through ``preprocess_scan`` (with and without N4); the
KNOWN bias field (on the scan's grid) is mapped onto the template grid with the transform that
``preprocess_scan`` found (the same mapping as the image), and log(output / template T1) is regressed on
log(bias) over the white matter: nilearn's ``load_mni152_wm_mask(threshold=0.5, n_iter=1)`` and template
T1 >= 0.6 (WM-like intensity; 0.61-0.89 is its 5-95 % range). The slope is the share of the bias left in the
output: ~1 without N4, 0 for a perfect correction of the bias alone. "floor" is the same slope for N4's output of
the same scan WITHOUT bias: N4 also flattens the template's own smooth white-matter trend (its WM is 0.61-0.89,
brighter deep than near the cortex), and that trend correlates with some fields (slope of log T1 on log bias:
+0.23 linear, -0.31 quadratic, +0.16 coil), so a correction that flattens WM perfectly scores -0.23 / +0.31 /
-0.16, not 0; slope N4 - floor is the bias N4 left. ``--true-transform`` maps with the known transform instead;
``--n4-only`` skips registration (N4 alone, true transform: seconds are N4's alone).

    .venv/bin/python benchmarks/n4_bias.py --template-mm 2
    .venv/bin/python benchmarks/n4_bias.py --template-mm 2 --n4-only      # fast: N4 and the true transform only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.preprocess import synthetic_head  # noqa: E402
from common.preprocessing.registration import (head_mask, load_template, n4_correct, nifti_to_sitk,  # noqa: E402
                                               preprocess_scan)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ORIENTATIONS = {  # LPS direction cosines (row-major, columns = voxel axes i, j, k); k is the slice axis
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),    # i->L, j->P, k->S: axial slices
    "PIR": (0, 0, -1, 1, 0, 0, 0, -1, 0),  # i->P, j->I, k->R: sagittal slices
    "ILA": (0, 1, 0, 0, 0, -1, -1, 0, 0),  # i->I, j->L, k->A: coronal slices
}
FOV_MM = (210.0, 250.0, 256.0)     # along scanner x (R-L), y (A-P), z (S-I)
CENTRE = (0.0, 10.0, -20.0)        # field-of-view centre, LPS mm (MNI space before the pose)
POSE = ((5.0, -4.0, 7.0), (4.0, -6.0, 5.0))  # degrees about x, y, z; shift mm (true native -> MNI transform)
BIASES = ("linear", "quadratic", "coil", "voxel")
AMPLITUDE = 0.2                    # b = 1 + AMPLITUDE * g, g in [-1, 1] over the head
NOISE = 0.02                       # Rician noise sd, share of the maximum


def bias_shape(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unscaled smooth field g at normalized scanner coordinates ``u`` and voxel coordinates ``v`` (..., 3),
    each in [-1, 1]."""
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    if name == "voxel":
        return 0.6 * v[..., 0] - 0.5 * v[..., 1] + 0.4 * v[..., 2] ** 2
    if name == "linear":
        return 0.6 * x - 0.5 * y + 0.6 * z
    if name == "quadratic":
        return x * x + 0.5 * y - 0.8 * z * z + 0.4 * x * z
    if name == "coil":
        return np.exp(-((x - 0.5) ** 2 + (y + 0.6) ** 2 + (z - 0.4) ** 2) / 0.5)
    raise ValueError(name)


def oriented_scan(head: sitk.Image, path: Path, orientation: str, bias: str, *, slice_mm: float = 1.2,
                  inplane_mm: float = 1.0, seed: int = 0, amplitude: float = AMPLITUDE) -> tuple[sitk.Euler3DTransform, sitk.Image]:
    """Write ``head`` (MNI space) in POSE on a grid with ``orientation``'s voxel order, times the ``bias`` field,
    plus Rician noise, as int16 NIfTI; return the true native -> MNI transform and the bias field (native grid).
    ``amplitude`` 0 writes the same scan without bias (the field returned is still the +-AMPLITUDE one)."""
    direction = np.asarray(ORIENTATIONS[orientation], dtype=float).reshape(3, 3)
    spacing = np.array([inplane_mm, inplane_mm, slice_mm])
    world_axis = np.abs(direction).argmax(axis=0)                     # scanner axis of each voxel axis
    size = [int(round(FOV_MM[w] / s)) for w, s in zip(world_axis, spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(direction.ravel().tolist())
    ref.SetOrigin(tuple(np.asarray(CENTRE) - direction @ (spacing * (np.array(size) - 1) / 2)))
    angles, shift = POSE
    truth = sitk.Euler3DTransform((0, 0, 0), *np.deg2rad(angles), shift)
    img = sitk.GetArrayFromImage(sitk.Resample(head, ref, truth, sitk.sitkLinear, 0.0))  # (k, j, i)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(np.float64)  # i, j, k
    world = (idx * spacing) @ direction.T + np.asarray(ref.GetOrigin())
    u = (world - np.asarray(CENTRE)) / (np.asarray(FOV_MM) / 2)
    g = bias_shape(bias, u, 2 * idx / (np.array(size) - 1) - 1).transpose(2, 1, 0)                         # -> (k, j, i) like img
    inside = img > 0.02
    lo, hi = g[inside].min(), g[inside].max()
    field = (1 + AMPLITUDE * (2 * (g - lo) / (hi - lo) - 1)).astype(np.float32)
    s = img * (1 + amplitude * (2 * (g - lo) / (hi - lo) - 1))
    rng = np.random.default_rng(seed)
    sd = NOISE * s.max()
    s = np.sqrt((s + rng.normal(0, sd, s.shape)) ** 2 + rng.normal(0, sd, s.shape) ** 2)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(ref.GetOrigin())
    nib.save(nib.Nifti1Image(np.rint(1000 * s / s.max()).astype(np.int16).transpose(2, 1, 0), affine), str(path))
    field_img = sitk.GetImageFromArray(field)
    field_img.CopyInformation(ref)
    return truth, field_img


def wm_mask(template) -> np.ndarray:
    """White matter on the template grid (k, j, i): nilearn's WM mask (threshold 0.5) and template T1 >= 0.6."""
    from nilearn.datasets import load_mni152_wm_mask

    wm = sitk.GetArrayFromImage(nifti_to_sitk(load_mni152_wm_mask(resolution=template.mm, threshold=0.5, n_iter=1),
                                              np.uint8)) > 0
    t1 = sitk.GetArrayFromImage(template.t1)
    return wm & (t1 >= 0.6) & (sitk.GetArrayFromImage(template.brain) > 0)


def bias_slope(output: sitk.Image, field: sitk.Image, to_native: sitk.Transform, template, wm: np.ndarray) -> float:
    """Slope of log(output / template T1) on log(bias) over ``wm`` voxels, the field mapped with ``to_native``
    (template points -> scan points)."""
    b = sitk.GetArrayFromImage(sitk.Resample(field, template.t1, to_native, sitk.sitkLinear, 0.0))
    out = sitk.GetArrayFromImage(output).astype(np.float64)
    t1 = sitk.GetArrayFromImage(template.t1).astype(np.float64)
    use = wm & (out > 0) & (b > 0)
    x, y = np.log(b[use]), np.log(out[use] / t1[use])
    return float(np.polyfit(x, y, 1)[0])


def run_n4_only(path: Path, truth: sitk.Transform, template, n4: bool) -> sitk.Image:
    """N4 alone (as ``preprocess_scan`` does it), then the scan on the template grid with the true transform."""
    image = sitk.Maximum(nifti_to_sitk(nib.load(str(path))), 0.0)
    if n4:
        image = n4_correct(image, head_mask(image))
    return sitk.Resample(image, template.t1, truth.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template-mm", type=int, default=2)
    p.add_argument("--orientations", default=",".join(ORIENTATIONS))
    p.add_argument("--biases", default=",".join(BIASES))
    p.add_argument("--slice-mm", type=float, default=1.2)
    p.add_argument("--inplane-mm", type=float, default=1.0, help="also the synthetic head's voxel size (whole mm)")
    p.add_argument("--true-transform", action="store_true", help="map the bias field with the known transform")
    p.add_argument("--n4-only", action="store_true", help="N4 alone, true transform (no registration)")
    p.add_argument("--threads", type=int, default=1, help="SimpleITK threads (1 = as one preprocess worker)")
    a = p.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    template = load_template(a.template_mm)
    wm = wm_mask(template)
    head, _ = synthetic_head(max(1, int(a.inplane_mm)))
    print(f"template {a.template_mm} mm ({wm.sum()} WM voxels), native {a.inplane_mm:g}x{a.inplane_mm:g}x"
          f"{a.slice_mm:g} mm, bias +-{AMPLITUDE:.0%}, noise {NOISE:.0%}, "
          f"{'N4 only, true transform' if a.n4_only else 'preprocess_scan'}"
          f"{', true transform' if a.true_transform and not a.n4_only else ''}, {a.threads} thread(s), "
          f"N4 settings: {os.environ.get('FEDPD_N4_NOTE', 'as in registration.py')}")
    print(f"{'orient':<6} {'bias':<10} {'slope no N4':>11} {'slope N4':>9} {'floor':>6} {'s/scan no N4':>12} "
          f"{'s/scan N4':>9} {'corr N4':>8}")

    def process(path, truth, n4):
        t0 = time.perf_counter()
        if a.n4_only:
            return run_n4_only(path, truth, template, n4), truth.GetInverse(), float("nan"), time.perf_counter() - t0
        res = preprocess_scan(path, template, n4=n4)
        return (res.image, truth.GetInverse() if a.true_transform else res.transform, res.metrics["correlation"],
                time.perf_counter() - t0)

    worst, times = 0.0, []
    with tempfile.TemporaryDirectory(prefix="fedpd-n4-bench-") as tmp:
        for orientation in a.orientations.split(","):
            path = Path(tmp) / f"none-{orientation}.nii.gz"
            truth, _ = oriented_scan(head, path, orientation, "linear", slice_mm=a.slice_mm, inplane_mm=a.inplane_mm,
                                     seed=99, amplitude=0.0)
            reference = process(path, truth, True)  # N4 on the same scan without bias: what N4 does to anatomy
            for k, bias in enumerate(a.biases.split(",")):
                path = Path(tmp) / f"{bias}-{orientation}.nii.gz"
                truth, field = oriented_scan(head, path, orientation, bias, slice_mm=a.slice_mm,
                                             inplane_mm=a.inplane_mm, seed=k)
                row = {}
                for n4 in (False, True):
                    out, to_native, corr, seconds = process(path, truth, n4)
                    row[n4] = (bias_slope(out, field, to_native, template, wm), seconds, corr)
                floor = bias_slope(reference[0], field, reference[1], template, wm)
                worst = max(worst, row[True][0])
                times.append(row[True][1])
                print(f"{orientation:<6} {bias:<10} {row[False][0]:>11.3f} {row[True][0]:>9.3f} {floor:>6.3f} "
                      f"{row[False][1]:>12.1f} {row[True][1]:>9.1f} {row[True][2]:>8.3f}", flush=True)
    print(f"worst slope with N4: {worst:.3f}; mean {np.mean(times):.1f} s/scan with N4")


if __name__ == "__main__":
    main()
