"""One raw T1 head scan onto the MNI152 template: the per-scan core of ``fedpd preprocess``.

Steps (:func:`preprocess_scan`; the why of each is in :mod:`common.preprocessing.pipeline`'s docstring): scan check
(2D thick-slice series refused), Otsu head mask, N4 on a ~6 mm copy, moments initialisation, coarse pose search and
similarity stage from two starts (a head built around the template, and the brain-only template), then affine
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
           "ScanResult", "load_template", "build_head", "nifti_to_sitk", "head_mask", "n4_correct",
           "register_to_template", "qc_metrics", "thick_slice_problem", "preprocess_scan"]

DEFAULT_TEMPLATE_MM = 2       # template voxel size (mm); 1 = full resolution, ~4x slower
REGISTRATION_MARGIN_MM = 8.0  # the metric sees the template brain mask dilated by this much
N4_VOXEL_MM = 6.0             # N4 works on a copy shrunk to about this voxel size
MIN_EXTENT_MM = 60.0          # a scan covering less along any axis is no whole-head T1
# A 2D (thick-slice) acquisition: slices thicker than this many mm AND this many times the in-plane voxel. A 3D
# T1 is near-isotropic (1 mm MPRAGE; 1.2-1.5 mm slices); clinical 2D spin echo has 0.5-1 mm pixels and 4-6 mm
# slices with gaps, which no affine registration or 3D CNN can use. Low-resolution isotropic 3D (4 mm) is kept.
MAX_SLICE_MM = 3.0
MAX_ANISOTROPY = 2.5
HEAD_MARGIN_MM = 6.0          # the head stages' metric sees the built head dilated by this much
QC_SMOOTHING_MM = 3.0         # QC: Gaussian sigma applied to scan and template (individual folding averages out)
QC_MARGIN_MM = 4.0            # QC: brain mask dilated by this much (the brain's outline and the dark ring around it)
SEED = 1                      # metric sampling seed (fixed: results are reproducible)


@dataclass(frozen=True)
class Template:
    """The MNI152 template on one grid: T1 (0-1, skull-stripped), brain mask, registration mask; a head built
    around it (for the first registration stages of skull-on scans); the QC's smoothed T1 and region."""

    mm: int
    t1: sitk.Image      # float32
    brain: sitk.Image   # uint8, nilearn's load_mni152_brain_mask (T1 > 0.2)
    region: sitk.Image  # uint8, brain dilated by REGISTRATION_MARGIN_MM: where the metric samples
    affine: np.ndarray  # RAS voxel -> mm of the grid (written into every output header)
    head: sitk.Image = None         # float32, the T1 with CSF, skull, scalp and neck around the brain (padded grid)
    head_region: sitk.Image = None  # uint8, that head dilated by HEAD_MARGIN_MM
    qc_t1: sitk.Image = None        # float32, the T1 smoothed by QC_SMOOTHING_MM
    qc_region: sitk.Image = None    # uint8, brain dilated by QC_MARGIN_MM: where the QC correlation is taken


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
    t1_sitk = nifti_to_sitk(t1)

    def dilated(mask, mm):
        return sitk.BinaryDilate(mask, [max(1, round(mm / template_mm))] * 3, sitk.sitkBall)

    head = build_head(t1_sitk, brain)
    return Template(int(template_mm), t1_sitk, brain, dilated(brain, REGISTRATION_MARGIN_MM),
                    np.asarray(t1.affine, dtype=np.float64), head=head,
                    head_region=dilated(sitk.Cast(head > 0.01, sitk.sitkUInt8), HEAD_MARGIN_MM),
                    qc_t1=sitk.SmoothingRecursiveGaussian(t1_sitk, QC_SMOOTHING_MM),
                    qc_region=dilated(brain, QC_MARGIN_MM) if QC_MARGIN_MM else brain)


# Shells around the template brain (distance from the brain mask in mm, intensity on the template's 0-1 scale):
# CSF, inner skull table, marrow, outer table, scalp; typical adult thicknesses, T1 contrast (CSF and cortical
# bone dark, marrow and scalp fat bright). Below the brain, an elliptic neck cylinder of muscle-like intensity.
_HEAD_SHELLS = ((0, 3, 0.12), (3, 5, 0.04), (5, 8, 0.45), (8, 10, 0.04), (10, 15, 0.8))
_HEAD_PAD_MM = ((20, 20, 90), (20, 20, 20))  # grid padding (x, y, z) below / above: room for scalp and neck


def build_head(t1: sitk.Image, brain: sitk.Image) -> sitk.Image:
    """A whole head around the skull-stripped template: the registration target of skull-on scans' first stages.

    nilearn ships the MNI152 brain only. Registered to it, a skull-on head can settle with its scalp on the brain's
    outline (the head squeezed into the brain, scale ~1.1 instead of ~0.9). Against this head the skull and scalp
    have a place to go; the last (affine) stage then fits the brain alone. Built from the template alone, so
    nothing is downloaded or vendored.
    """
    mm = t1.GetSpacing()[0]
    lo, hi = ([int(round(v / mm)) for v in pad] for pad in _HEAD_PAD_MM)
    t1, brain = sitk.ConstantPad(t1, lo, hi, 0.0), sitk.ConstantPad(brain, lo, hi, 0)
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))
    head = sitk.GetArrayFromImage(t1) * (dist <= 0)
    for a, b, value in _HEAD_SHELLS:
        head[(dist > a) & (dist <= b)] = value
    k, j, i = np.ogrid[:head.shape[0], :head.shape[1], :head.shape[2]]  # broadcast: no full index arrays
    direction = np.asarray(t1.GetDirection()).reshape(3, 3) * mm
    x, y, z = (t1.GetOrigin()[r] + direction[r, 0] * i + direction[r, 1] * j + direction[r, 2] * k for r in range(3))
    # LPS mm (y runs posterior): the neck's centre lies 15 mm behind the origin, below the temporal lobes
    head[((x / 45) ** 2 + ((y - 15) / 40) ** 2 < 1) & (z < -30) & (head == 0)] = 0.5
    out = sitk.GetImageFromArray(head.astype(np.float32))
    out.CopyInformation(t1)
    return out


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
    """N4 bias-field correction (Tustison 2010), fitted on a ~6 mm copy inside ``mask``, applied at full size."""
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

    Two starts, and the one whose similarity result scores the lower affine-stage metric (Mattes MI against the
    brain template, evaluated once) goes on to the affine stage: (1) the pose search and the
    similarity stage match the scan to the template's built head (:func:`build_head`: skull, scalp and neck
    around the brain, inside the head dilated by :data:`HEAD_MARGIN_MM`), so a skull-on scan cannot settle
    with its scalp on the brain's outline; (2) the same stages against the skull-stripped template inside the
    dilated brain mask (what a skull-stripped scan matches best). From each, the affine stage matches the
    skull-stripped template inside the brain mask dilated by :data:`REGISTRATION_MARGIN_MM`. On the head-and-neck
    scan of the real test set the brain start ends squeezed (scale 1.07, final MI -0.28) and the head start right
    (scale 0.82, final MI -0.44); on the other real scans both starts end at the same transform.

    Args:
        image: the scan (bias-corrected), any pose and voxel size.
        head: its head mask (:func:`head_mask`), used for the moments initialisation.
        template: from :func:`load_template`.
        seed: metric sampling seed.

    Returns:
        The transform mapping template points to scan points (``sitk.Resample(image, template.t1,
        transform)`` puts the scan on the template grid) and the final Mattes MI (lower is better).
    """
    built = Template(template.mm, template.head, template.brain, template.head_region, template.affine)
    moving = sitk.Cast(image, sitk.sitkFloat32)
    factors = _shrink(moving, template.mm)
    if max(factors) > 1:  # detail finer than the template's voxels only costs time (a 1 mm scan: ~4x)
        moving, head = sitk.BinShrink(moving, factors), sitk.BinShrink(head, factors) > 0
    judge = _registration(template, (2.0,), (0.0,), 1, seed)  # the affine stage's metric, evaluated once
    best = None
    for start in (built, template):
        init = sitk.CenteredTransformInitializer(start.t1, sitk.Mask(moving, head), sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        similarity = _coarse_search(start.t1, moving, start.region, init)
        stage = _registration(start, (8.0, 4.0), (4.0, 2.0), 100, seed)
        stage.SetInitialTransform(similarity, inPlace=True)
        stage.Execute(start.t1, moving)
        judge.SetInitialTransform(similarity)
        score = judge.MetricEvaluate(template.t1, moving)
        if best is None or score < best[0]:
            best = (score, similarity)
    similarity = best[1]
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    stage = _registration(template, (8.0, 4.0, 2.0), (4.0, 2.0, 1.0), 100, seed)
    stage.SetInitialTransform(affine, inPlace=True)
    stage.Execute(template.t1, moving)
    return affine, float(stage.GetMetricValue())


def qc_metrics(resampled: sitk.Image, image: sitk.Image, transform: sitk.Transform, template: Template) -> dict:
    """QC figures of a registered scan.

    Args:
        resampled: the scan on the template grid, not masked (skull and all, as :func:`preprocess_scan` resamples it).
        image: the scan in its own space.
        transform: template point -> scan point.
        template: from :func:`load_template`.

    Returns:
        ``correlation``: Pearson correlation of the scan and the template, both smoothed by a Gaussian of sigma
        :data:`QC_SMOOTHING_MM`, inside the template brain mask dilated by :data:`QC_MARGIN_MM`. The smoothing
        averages out what makes a real person differ from the population average (folding, sulcal width), so
        what remains is where the white matter, the ventricles, the deep grey matter and the brain's outline
        lie; the margin adds the dark ring (CSF, skull) around the brain, whose place a shift, a rotation or a
        wrong scale move first. Measured on real scans and on the same scans misregistered
        (``benchmarks/qc_calibration.py``, EXPERIMENTS.md "QC calibrated on real scans").
        ``brain_in_fov``: share of the brain mask that maps inside the scan's field of view. ``scale``: cube root
        of the transform's determinant, the head size relative to the template (adults ~0.85-1.0).
    """
    brain = sitk.GetArrayViewFromImage(template.brain) > 0
    region = sitk.GetArrayViewFromImage(template.qc_region) > 0
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(resampled, sitk.sitkFloat32), QC_SMOOTHING_MM)
    a = sitk.GetArrayFromImage(smooth)[region].astype(np.float64)
    b = sitk.GetArrayViewFromImage(template.qc_t1)[region].astype(np.float64)
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


def thick_slice_problem(size, spacing) -> str:
    """Why a volume of this grid is a 2D thick-slice acquisition ("" when it is not): slices thicker than
    :data:`MAX_SLICE_MM` and :data:`MAX_ANISOTROPY` times the finest voxel. Such a series images the brain
    in a few thick sections; resampling it to a 3D grid invents the anatomy between them."""
    spacing = [float(v) for v in spacing]
    thick = int(np.argmax(spacing))
    fine = min(spacing)
    if spacing[thick] > MAX_SLICE_MM and spacing[thick] > MAX_ANISOTROPY * fine:
        return (f"2D thick-slice acquisition, not a 3D T1: {int(size[thick])} slices of {spacing[thick]:.1f} mm "
                f"against {fine:.2f} mm in-plane voxels (a 3D T1 has near-isotropic voxels, slices <= "
                f"{MAX_SLICE_MM:g} mm); give the subject's 3D T1 series (MPRAGE, SPGR, TFE), or drop the row")
    return ""


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
    problem = thick_slice_problem(image.GetSize(), image.GetSpacing())
    if problem:
        raise DataError(problem)
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
    metrics = qc_metrics(resampled, image, transform, template)
    metrics["mattes_mi"] = round(mattes_mi, 4)
    return ScanResult(registered, resampled, transform, metrics)
