"""Where in the scan Med3D finds its evidence: Grad-CAM on layer4, and a PNG overlay placed in world mm.

Method: MONAI's :class:`monai.visualize.GradCAM` (Selvaraju et al., arXiv:1610.02391) on
``backbone.layer4``, the last feature map before the head. Why this and not the alternatives:

- Med3D's head is global average pooling followed by one linear layer. The gradient of a logit with
  respect to layer4 is therefore the same at every position (``w_c / N``), so Grad-CAM's map
  ``sum_c w_c A_c(p) / N`` is exactly the class activation map of Zhou et al. (arXiv:1512.04150): its
  mean over positions *is* the logit minus the bias. The map is a literal additive decomposition of the
  score over layer4 positions, not a heuristic.
- Grad-CAM++ (``GradCAMpp``) keeps only channels with a positive gradient and reweights them by
  ``1 / (2 + g_c * sum A_c)``; with a pooled linear head that breaks the decomposition above without
  a benefit (its gain is for several object instances under a non-linear head).
- ``OcclusionSensitivity`` needs one forward pass per occluder position: hundreds of 3D passes
  (minutes on CPU at 48^3) where Grad-CAM needs one forward and one backward pass (0.5-1.5 s
  at 48^3 on two CPU cores).
- MedicalNet's layer3 and layer4 dilate instead of striding, so layer4 is 1/8 of the input
  (6^3 at 48^3, 12x14x12 at 96x112x96), not 1/32 as in ImageNet ResNets: coarse but usable.

The score explained is the log-odds of one class, ``logit_c - logsumexp(other logits)``
(``= log p_c / (1 - p_c)``; with two classes ``logit_PD - logit_control``), so the map shows what moves
the PD probability, rather than one raw logit. Negative evidence is cut at 0 (Grad-CAM's ReLU).

Geometry: conv1, the max-pool and layer2 each stride 2 with ``(k-1)/2`` padding, so layer4 voxel ``k``
is centred on input voxel ``8k`` (checked by the receptive field in the tests). The map is upsampled
with that alignment (trilinear, ``align_corners=True`` onto ``0, 8, 16, ...``, edge values beyond the
last centre) instead of MONAI's default upsampler, which would shift it by 3.5 voxels.

The input is the output of :func:`common.learning.transforms.deterministic_transforms`; :func:`preprocess_scan`
runs that same pipeline and keeps the affine, so :func:`overlay_png` can place the map in world mm.
"""

from __future__ import annotations

import copy
import io
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.visualize import GradCAM
from scipy import ndimage
from torch import nn

from common.device import Runtime
from common.files import atomic_write_bytes
from common.learning.transforms import deterministic_transforms

__all__ = ["saliency_map", "overlay_png", "preprocess_scan", "head_mask", "TARGET_LAYER", "FEATURE_STRIDE",
           "BACKGROUNDS", "TEMPLATE_NOTE", "REGISTERED_NOTE"]

TARGET_LAYER = "backbone.layer4"  # Med3D's last feature map (MedicalNet layer4)
PNG_SOFTWARE = "fedpd saliency overlay"  # the PNG "Software" text chunk of every overlay_png figure
FEATURE_STRIDE = 8  # input voxels per layer4 voxel along each axis (conv1, max-pool and layer2 stride 2)
BACKGROUNDS = ("template", "scan")
TEMPLATE_NOTE = ("Background: MNI152 template (nilearn). The map is placed by the scan's world (scanner) "
                 "coordinates; the scan is not registered to MNI space, so the anatomy under the colours "
                 "is only approximate unless the scan was made or registered in MNI space (the phantom is "
                 "generated in MNI space; real PPMI scans are not registered).")
REGISTERED_NOTE = ("Background: MNI152 template (nilearn). The scan was registered to this template (affine, fedpd "
                   "preprocess) before the model saw it, so the map lies on the template's anatomy up to the "
                   "registration's accuracy.")


class _LogOdds(nn.Module):
    """Output ``[:, c] = logit_c - logsumexp(logits of the other classes)`` = log(p_c / (1 - p_c))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        n = logits.shape[1]
        if n < 2:
            raise ValueError(f"saliency needs a classifier with >= 2 outputs, got {n}")
        cols = [logits[:, c] - torch.logsumexp(torch.cat([logits[:, :c], logits[:, c + 1:]], 1), 1) for c in range(n)]
        return torch.stack(cols, 1)


def _centred_upsampler(stride: int):
    """MONAI ``upsampler`` factory: feature voxel ``k`` -> input voxel ``stride * k``, edges held constant."""

    def factory(spatial_size: Sequence[int]):
        size = [int(s) for s in spatial_size]

        def up(cam: torch.Tensor) -> torch.Tensor:
            span = [stride * (k - 1) + 1 for k in cam.shape[2:]]  # input voxels from first to last centre
            if any(s > t for s, t in zip(span, size)):
                raise ValueError(f"layer4 map {list(cam.shape[2:])} does not fit input {size} at stride {stride}")
            out = F.interpolate(cam, size=span, mode="trilinear", align_corners=True)
            pad = []
            for s, t in reversed(list(zip(span, size))):  # F.pad lists the last axis first
                pad += [0, t - s]
            return F.pad(out, pad, mode="replicate")

        return up

    return factory


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Voxels of the head in a preprocessed scan: Otsu threshold, largest component, holes filled.

    After the pipeline, "foreground" is every voxel > 0, which includes the scanner's background noise
    (MR magnitude noise is positive), so ``!= 0`` would keep the whole field of view. Otsu's threshold
    (Otsu 1979) over the non-zero voxels separates noise from tissue; filling holes keeps the dark
    ventricles, where part of the PD effect lies. Returns all ``False`` for an empty volume.
    """
    vol = np.asarray(volume, dtype=np.float64)
    values = vol[vol != 0]
    if values.size == 0 or values.min() == values.max():
        return vol != 0
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]  # voxels at or below each cut between bins
    w1 = values.size - w0
    s0 = np.cumsum(counts * centres)[:-1]
    total = float(np.sum(counts * centres))
    m0, m1 = s0 / np.maximum(w0, 1), (total - s0) / np.maximum(w1, 1)
    cut = edges[1:-1][int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]  # maximal between-class variance
    labels, n = ndimage.label((vol > cut) & (vol != 0))
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return ndimage.binary_fill_holes(labels == largest)


def _volume(image) -> torch.Tensor:
    """``[1, 1, D, H, W]`` float32 plain CPU tensor, or a ValueError saying what was given."""
    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"image must be one single-channel volume [1, 1, D, H, W], got shape {list(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def saliency_map(model: nn.Module, image, rt: Runtime, class_idx: int = 1, target_layer: str = TARGET_LAYER,
                 mask_background: bool = True) -> np.ndarray:
    """Grad-CAM of ``model`` for one preprocessed scan, in the input's voxel grid, scaled to [0, 1].

    Args:
        model: a Med3D (or any classifier with ``target_layer`` feeding a pooled linear head at stride
            :data:`FEATURE_STRIDE`). Not modified: the hooks go on a copy, in eval mode.
        image: ``[1, 1, D, H, W]`` tensor/array as the network sees it (the pipeline output with a
            batch axis), e.g. ``preprocess_scan(...)[None]``.
        rt: device to compute on (float32 always; AMP is not used for gradients here).
        class_idx: the class whose log-odds is explained: 1 = PD (default), 0 = control.
        target_layer: module name of the feature map.
        mask_background: set voxels outside :func:`head_mask` of the input to 0 before scaling, so the
            scale is set inside the head (Grad-CAM's coarse map otherwise spills into the air).

    Returns:
        float32 ``(D, H, W)``: 0 = no positive evidence, 1 = the strongest. All zeros when nothing in the
        scan speaks for ``class_idx`` (the map is cut at 0 before scaling).

    Raises:
        ValueError: bad image shape, unknown ``target_layer``, or a non-finite map (NaN weights/input).
    """
    x = _volume(image)
    if target_layer not in dict(model.named_modules()):
        raise ValueError(f"target_layer {target_layer!r} is not a module of {type(model).__name__}")
    net = _LogOdds(copy.deepcopy(model)).to(rt.device).float().eval()  # MONAI's hooks stay on the copy
    for p in net.parameters():
        p.requires_grad_(True)
    cam = GradCAM(net, target_layers=f"model.{target_layer}", upsampler=_centred_upsampler(FEATURE_STRIDE),
                  postprocessing=lambda m: m)
    raw = cam(x.to(rt.device), class_idx=int(class_idx))[0, 0].detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(raw).all():
        raise ValueError("the saliency map has NaN/Inf values; check the model weights and the input")
    if mask_background:
        raw = np.where(head_mask(x[0, 0].numpy()), raw, 0.0)
    peak = float(raw.max())
    out = raw / peak if peak > 0 else np.zeros_like(raw)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def preprocess_scan(path: str | Path, input_shape: Sequence[int], spacing: Sequence[float]) -> MetaTensor:
    """One scan through the training pipeline, returned with the affine of its final grid.

    The transforms are those of :func:`common.learning.transforms.deterministic_transforms`, applied one by one:
    the values equal the pipeline's output exactly; the affine is read before the last step drops the
    metadata. A :class:`~common.errors.DataError` from the pipeline (missing file, not NIfTI, 4D, NaN,
    empty, bad affine) propagates unchanged, naming the file.

    Returns:
        float32 ``MetaTensor [1, D, H, W]`` (``input_shape``) whose ``affine`` maps voxels to world mm.
    """
    data: dict = {"image": str(path)}
    affine = None
    for transform in deterministic_transforms(tuple(input_shape), tuple(spacing)).transforms:
        data = transform(data)
        if isinstance(data["image"], MetaTensor):
            affine = data["image"].affine.clone()
    if affine is None:  # the pipeline always starts with a MetaTensor; guard against a reordered pipeline
        raise RuntimeError("the deterministic pipeline produced no MetaTensor; cannot recover the affine")
    image = data["image"]
    image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    return MetaTensor(image.to(torch.float32), affine=affine)


def _affine_of(image, affine) -> np.ndarray:
    if affine is None:
        affine = getattr(image, "affine", None)
    if affine is None:
        raise ValueError("overlay_png needs the image's affine: pass a MetaTensor (from preprocess_scan) or affine=")
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    return a


def overlay_png(image, saliency: np.ndarray, out_png: str | Path, title: str = "", background: str = "template",
                affine=None, caption: str | None = None, threshold: float = 0.2, dpi: int = 100,
                registered: bool = False) -> Path:
    """Write an orthogonal-slices PNG of ``saliency`` over a background, placed in world mm by nilearn.

    Args:
        image: the preprocessed scan, ``[1, D, H, W]`` or ``(D, H, W)``: a MetaTensor carrying its affine
            (:func:`preprocess_scan`), or an array with ``affine`` given.
        saliency: ``(D, H, W)`` in [0, 1] on the image's grid (:func:`saliency_map`).
        out_png: file to write (folders are created; written atomically).
        title: first line above the slices.
        background: ``"template"`` (nilearn's MNI152, aligned by world coordinates only; the figure
            says so, see :data:`TEMPLATE_NOTE`) or ``"scan"`` (the preprocessed scan itself).
        affine: voxel -> world mm, when ``image`` carries none.
        caption: extra text under the slices (wrapped).
        threshold: map values below it are not coloured.
        dpi: resolution of the PNG (the figure is 9 x 4 inches).
        registered: ``image`` is a scan registered to the MNI152 template (``fedpd preprocess``, or ``fedpd
            predict`` on a raw scan of a preprocessed run): the template background says so
            (:data:`REGISTERED_NOTE`) instead of warning that the scan is not registered (:data:`TEMPLATE_NOTE`).

    Slices are cut through the map's peak. The map is drawn only inside :func:`head_mask` of the image,
    with opacity rising with its value (``threshold`` transparent, 1 opaque) so the anatomy shows through.

    Raises:
        ValueError: unknown background, missing affine, or shapes that differ.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} must be one of {', '.join(BACKGROUNDS)}")
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from nilearn import plotting
    from nilearn.datasets import load_mni152_template

    a = _affine_of(image, affine)
    vol = image.as_tensor() if isinstance(image, MetaTensor) else image
    vol = np.asarray(vol.detach().cpu() if isinstance(vol, torch.Tensor) else vol, dtype=np.float32)
    vol = vol[0] if vol.ndim == 4 and vol.shape[0] == 1 else vol
    sal = np.asarray(saliency, dtype=np.float32)
    if vol.ndim != 3 or sal.shape != vol.shape:
        raise ValueError(f"saliency shape {list(sal.shape)} must equal the image's spatial shape {list(vol.shape)}")
    sal = np.where(head_mask(vol), np.nan_to_num(sal), 0.0).astype(np.float32)
    peak = np.unravel_index(int(np.argmax(sal)), sal.shape) if sal.max() > 0 else tuple((s - 1) / 2 for s in sal.shape)
    cut = tuple(float(v) for v in (a @ np.array([*peak, 1.0]))[:3])
    bg = load_mni152_template(resolution=2) if background == "template" else nib.Nifti1Image(vol, a)

    fig = Figure(figsize=(9, 4), facecolor="black")
    FigureCanvasAgg(fig)
    sal_img = nib.Nifti1Image(sal, a)
    drawn = sal.max() > threshold  # nilearn refuses a transparency range with nothing in it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="empty mask")  # nilearn, for a map with nothing to draw
        plotting.plot_stat_map(sal_img, bg_img=bg, cut_coords=cut, display_mode="ortho", figure=fig,
                               axes=(0.0, 0.2, 1.0, 0.68), threshold=threshold, vmin=0.0, vmax=1.0, cmap="hot",
                               transparency=sal_img if drawn else None,
                               transparency_range=[threshold, 1.0] if drawn else None,  # opacity rises with the value
                               symmetric_cbar=False, colorbar=True, black_bg=True, draw_cross=False, annotate=True)
    if sal.max() <= 0:
        title = f"{title} (no positive evidence: empty map)".strip()
    fig.text(0.01, 0.97, title, color="white", fontsize=11, va="top", ha="left")
    notes = [caption or ""] + ([REGISTERED_NOTE if registered else TEMPLATE_NOTE] if background == "template" else [])
    text = "\n".join(textwrap.fill(n, 150) for n in notes if n)
    if text:
        fig.text(0.01, 0.02, text, color="white", fontsize=7, va="bottom", ha="left")
    buf = io.BytesIO()
    # The PNG's "Software" text chunk marks it as a fedpd overlay: `fedpd predict --saliency` overwrites an
    # existing file only when it carries this mark (common.inference.predict.is_fedpd_png), never another file.
    fig.savefig(buf, format="png", dpi=dpi, facecolor="black", metadata={"Software": PNG_SOFTWARE})
    out = Path(out_png)
    atomic_write_bytes(out, buf.getvalue())
    return out
