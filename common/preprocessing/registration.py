"""One raw T1 head scan onto the MNI152 template: the per-scan core of ``fedpd preprocess``.

Steps (:func:`preprocess_scan`; the why of each is in :mod:`common.preprocessing.pipeline`'s docstring): scan check,
Otsu head mask, N4 on a ~6 mm copy, moments initialisation, coarse pose search, similarity then affine
registration (Mattes MI inside the dilated template brain mask, fixed sampling seed), resampling onto the
template grid, the template brain mask (background exactly 0), QC figures. SimpleITK does the work;
callers set its thread count (one thread gives the same transform every run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from common.cohort.scans import scan_problem
from common.errors import ConfigError, DataError

__all__ = ["DEFAULT_TEMPLATE_MM", "REGISTRATION_MARGIN_MM", "N4_VOXEL_MM", "MIN_EXTENT_MM", "SEED", "Template",
           "ScanResult", "load_template", "nifti_to_sitk", "head_mask", "n4_correct", "register_to_template",
           "qc_metrics", "preprocess_scan"]

DEFAULT_TEMPLATE_MM = 2       # template voxel size (mm); 1 = full resolution, ~4x slower
REGISTRATION_MARGIN_MM = 8.0  # the metric sees the template brain mask dilated by this much
N4_VOXEL_MM = 6.0             # N4 works on a copy shrunk to about this voxel size
MIN_EXTENT_MM = 60.0          # a scan covering less along any axis is no whole-head T1
SEED = 1                      # metric sampling seed (fixed: results are reproducible)


@dataclass(frozen=True)
class Template:
    """The MNI152 template on one grid: T1 (0-1, skull-stripped), brain mask, registration mask."""

    mm: int
    t1: sitk.Image      # float32
    brain: sitk.Image   # uint8, nilearn's load_mni152_brain_mask (T1 > 0.2)
    region: sitk.Image  # uint8, brain dilated by REGISTRATION_MARGIN_MM: where the metric samples
    affine: np.ndarray  # RAS voxel -> mm of the grid (written into every output header)


@dataclass
class ScanResult:
    """One registered scan on the template grid: masked (the output), unmasked (for QC), transform, figures."""

    image: sitk.Image
    head: sitk.Image
    transform: sitk.Transform
    metrics: dict


def nifti_to_sitk(img: nib.Nifti1Image, dtype=np.float32) -> sitk.Image:
    """A nibabel image as a SimpleITK image with the same voxels and world geometry (RAS -> LPS).

    A 4D image with one volume is taken as 3D. A sheared affine is replaced by its nearest rotation.
    """
    data = np.asarray(img.dataobj, dtype=dtype)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(affine[:3, :3] / spacing)
    lps = np.diag([-1.0, -1.0, 1.0])
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection([float(v) for v in (lps @ (u @ vt)).ravel()])
    out.SetOrigin([float(v) for v in lps @ affine[:3, 3]])
    return out


@functools.lru_cache(maxsize=2)
def load_template(template_mm: int = DEFAULT_TEMPLATE_MM) -> Template:
    """The nilearn MNI152 T1 template and brain mask at ``template_mm`` mm (any whole number >= 1).

    nilearn stores the 1 mm template and resamples it for other resolutions. Nothing is downloaded.
    """
    if isinstance(template_mm, bool) or int(template_mm) != template_mm or not 1 <= template_mm <= 8:
        raise ConfigError(f"template_mm={template_mm!r}: the template voxel size (--template-mm) must be a whole "
                          "number of mm from 1 to 8 (default 2; 1 = full resolution)")
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=int(template_mm))
    brain = nifti_to_sitk(load_mni152_brain_mask(resolution=int(template_mm)), np.uint8)
    radius = max(1, round(REGISTRATION_MARGIN_MM / template_mm))
    region = sitk.BinaryDilate(brain, [radius] * 3, sitk.sitkBall)
    return Template(int(template_mm), nifti_to_sitk(t1), brain, region, np.asarray(t1.affine, dtype=np.float64))


def head_mask(image: sitk.Image) -> sitk.Image:
    """The head: Otsu threshold, its largest connected component, holes filled (uint8 0/1).

    Intensities are clipped at their 99.5th percentile first, so a few very bright voxels (fat, vessels,
    artefacts) cannot pull the threshold above the brain.
    """
    top = float(np.percentile(sitk.GetArrayViewFromImage(image)[::3, ::3, ::3], 99.5))
    mask = sitk.OtsuThreshold(sitk.Clamp(image, lowerBound=0.0, upperBound=top), 0, 1, 128)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.Cast(components == 1, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise DataError("no head found (Otsu threshold leaves nothing); is this an empty or non-T1 image?")
    return sitk.BinaryFillhole(mask)


def _shrink(image: sitk.Image, target_mm: float) -> list[int]:
    return [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]


def n4_correct(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """N4 bias-field correction (Tustison 2010), fitted on a ~4 mm copy inside ``mask``, applied at full size."""
    shrink = _shrink(image, N4_VOXEL_MM)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([30, 20, 10])  # 3 levels: a 4th fits anatomy, not bias
    n4.Execute(sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink))
    return sitk.Cast(image / sitk.Exp(n4.GetLogBiasFieldAsImage(image)), sitk.sitkFloat32)


def _registration(template: Template, levels_mm, sigmas_mm, iterations: int, seed: int) -> sitk.ImageRegistrationMethod:
    """Mattes MI on 5 % of the voxels (fixed seed) of the dilated brain mask, a multi-resolution pyramid."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed)
    reg.SetMetricFixedMask(template.region)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([max(1, int(round(mm / template.mm))) for mm in levels_mm])
    reg.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


# Coarse pose search (as FSL FLIRT does): a grid of rotations about the template's L-R (+-30 deg), A-P and
# S-I axes (+-15 deg) and shifts along the scan's S-I axis (+-25 mm: a neck pulls the head's centre of mass
# down), scored at 8 mm; the best _STARTS grid points are refined and the best refined one goes on.
_GRID_STEPS = [2, 1, 1, 0, 0, 1]                                   # Euler3D: angle x, y, z, tx, ty, tz
_GRID_STEP_SIZE = [np.deg2rad(15.0)] * 3 + [1.0, 1.0, 25.0]
_STARTS = 4


def _coarse_search(fixed: sitk.Image, moving: sitk.Image, region: sitk.Image,
                   init: sitk.Euler3DTransform) -> sitk.Similarity3DTransform:
    """The best similarity start from a grid of rotations and shifts around ``init``, scored at 8 mm."""
    f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 4.0), _shrink(fixed, 8.0))
    m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, 4.0), _shrink(moving, 4.0))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(sitk.Resample(region, f, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsExhaustive(_GRID_STEPS)
    reg.SetOptimizerScales(_GRID_STEP_SIZE)
    grid = []
    reg.AddCommand(sitk.sitkIterationEvent, lambda: grid.append((reg.GetMetricValue(), reg.GetOptimizerPosition())))
    reg.SetInitialTransform(sitk.Euler3DTransform(init), inPlace=True)
    reg.Execute(f, m)
    reg.RemoveAllCommands()
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=0.1, numberOfIterations=60,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    best = None
    for _, position in sorted(grid)[:_STARTS]:
        euler = sitk.Euler3DTransform(init)
        euler.SetParameters(position)
        start = sitk.Similarity3DTransform()
        start.SetCenter(euler.GetCenter())
        start.SetMatrix(euler.GetMatrix())
        start.SetTranslation(euler.GetTranslation())
        reg.SetInitialTransform(start, inPlace=True)
        reg.Execute(f, m)
        if best is None or reg.GetMetricValue() < best[0]:
            best = (reg.GetMetricValue(), start)
    return best[1]


def register_to_template(image: sitk.Image, head: sitk.Image, template: Template,
                         seed: int = SEED) -> tuple[sitk.AffineTransform, float]:
    """Register a head scan to the template: moments -> pose search -> similarity -> 12-parameter affine.

    Args:
        image: the scan (bias-corrected), any pose and voxel size.
        head: its head mask (:func:`head_mask`), used for the moments initialisation.
        template: from :func:`load_template`.
        seed: metric sampling seed.

    Returns:
        The transform mapping template points to scan points (``sitk.Resample(image, template.t1,
        transform)`` puts the scan on the template grid) and the final Mattes MI (lower is better).
    """
    fixed = template.t1
    moving = sitk.Cast(image, sitk.sitkFloat32)
    factors = _shrink(moving, template.mm)
    if max(factors) > 1:  # detail finer than the template's voxels only costs time (a 1 mm scan: ~4x)
        moving, head = sitk.BinShrink(moving, factors), sitk.BinShrink(head, factors) > 0
    init = sitk.CenteredTransformInitializer(fixed, sitk.Mask(moving, head), sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = _coarse_search(fixed, moving, template.region, init)
    stage = _registration(template, (8.0, 4.0), (4.0, 2.0), 100, seed)
    stage.SetInitialTransform(similarity, inPlace=True)
    stage.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    stage = _registration(template, (8.0, 4.0, 2.0), (4.0, 2.0, 1.0), 100, seed)
    stage.SetInitialTransform(affine, inPlace=True)
    stage.Execute(fixed, moving)
    return affine, float(stage.GetMetricValue())


def qc_metrics(registered: sitk.Image, image: sitk.Image, transform: sitk.Transform, template: Template) -> dict:
    """QC figures of a registered scan.

    Returns:
        ``correlation`` (Pearson, registered scan vs template inside the brain mask), ``brain_in_fov``
        (share of the brain mask that maps inside the scan's field of view) and ``scale`` (cube root of
        the transform's determinant: the head size relative to the template; far from 1 = suspect).
    """
    brain = sitk.GetArrayViewFromImage(template.brain) > 0
    a = sitk.GetArrayViewFromImage(registered)[brain].astype(np.float64)
    b = sitk.GetArrayViewFromImage(template.t1)[brain].astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    # A copy, not GetArrayViewFromImage: a view does not keep the temporary resampled image alive, so it read freed
    # memory (brain_in_fov came out as 1.0044 against 1.0 for the same scan in two builds of one cohort)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, template.t1, transform, sitk.sitkNearestNeighbor, 0))
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    return {"correlation": round(corr if np.isfinite(corr) else 0.0, 4),
            "brain_in_fov": round(float(inside[brain].mean()), 4),
            "scale": round(float(abs(np.linalg.det(matrix)) ** (1 / 3)), 4)}


def preprocess_scan(path, template: Template, *, n4: bool = True, seed: int = SEED) -> ScanResult:
    """N4, register, resample and mask one scan (module docstring, steps 1-6).

    Raises:
        DataError: the file is no usable whole-head 3D volume (the message is the reason, without the path).
        RuntimeError: SimpleITK failed (e.g. registration of a non-brain volume); callers exclude the scan.
    """
    path = str(path)
    problem = scan_problem(path)
    if problem:
        raise DataError(problem)
    image = nifti_to_sitk(nib.load(path))
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if min(extent) < MIN_EXTENT_MM:
        raise DataError(f"covers only {min(extent):.0f} mm along one axis (size {image.GetSize()}, spacing "
                        f"{tuple(round(s, 2) for s in image.GetSpacing())} mm); a whole-head T1 covers > 150 mm "
                        "(scout or slab?): give the 3D T1 series, or drop the row")
    image = sitk.Maximum(image, 0.0)
    head = head_mask(image)
    if n4:
        image = n4_correct(image, head)
    transform, mattes_mi = register_to_template(image, head, template, seed)
    resampled = sitk.Maximum(sitk.Resample(image, template.t1, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32), 0.0)
    registered = sitk.Mask(resampled, template.brain)
    metrics = qc_metrics(registered, image, transform, template)
    metrics["mattes_mi"] = round(mattes_mi, 4)
    return ScanResult(registered, resampled, transform, metrics)
