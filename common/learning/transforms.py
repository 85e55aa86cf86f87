"""MONAI dictionary transforms: from a NIfTI path to the tensor Med3D sees.

All transforms act on ``keys=("image",)`` with ``allow_missing_keys=False``; every other key (``label``,
...) passes through untouched. The deterministic part comes first and is what
:class:`monai.data.PersistentDataset` caches; the random part (training only) follows it.

Deterministic part (:func:`deterministic_transforms`), in order:

1. :class:`LoadNiftid` -- nibabel reads the file (float32, affine kept as metadata). A missing or
   unreadable file raises :class:`~common.errors.DataError` naming it.
2. :class:`CheckScand` -- refuses what cannot be a 3D T1 scan: 2D, 5D+, 4D with more than one volume,
   fewer than :data:`MIN_SLICES` voxels along an axis (a scout), NaN/Inf voxels, no voxel > 0, a constant
   image, a non-finite or singular affine. The same check runs in ``fedpd ingest`` and in the preflight
   (:mod:`common.cohort.scans`).
3. ``EnsureChannelFirstd`` -> ``[1, X, Y, Z]``; ``Orientationd("RAS")``, so axis 0 runs left->right,
   axis 1 posterior->anterior, axis 2 inferior->superior, whatever the file's orientation (LPS, ...).
4. ``Spacingd(spacing, bilinear, zeros padding)`` -- resample to ``spacing`` mm (same axis order).
5. ``ThresholdIntensityd`` -- voxels <= 0 (interpolation undershoot, odd exports) become 0, so
   "foreground" means exactly "voxel > 0" from here on.
6. ``CropForegroundd`` (voxels > 0, margin :data:`FOREGROUND_MARGIN` voxels) then
   ``ResizeWithPadOrCropd(input_shape)`` -- centre pad with 0 or centre crop. We crop/pad rather than
   resize so that one voxel is always ``spacing`` mm in every scan: atrophy (smaller structures,
   larger ventricles) stays visible as size, instead of being undone by stretching each head to fill
   the window. The price: a head larger than ``input_shape * spacing`` mm is cropped at its edges
   (centred on the bounding box), so choose ``input-shape`` and ``spacing`` to cover the brain.
7. ``NormalizeIntensityd(nonzero=True)`` -- z-score over the voxels > 0 (MedicalNet's convention),
   computed on the cropped/padded window; background stays exactly 0. Unlike MedicalNet we do not fill
   the background with random noise, so the cached tensor is deterministic.
8. ``EnsureTyped(float32, track_meta=False)`` -- a plain ``torch.Tensor`` (no metadata, no file paths).

:func:`pipeline_fingerprint` hashes every class and parameter above plus :data:`PIPELINE_VERSION` and
the library versions; the dataset caches under ``<cache-dir>/<fingerprint>/`` so a changed shape,
spacing, transform or library never reuses a stale cache. Bump :data:`PIPELINE_VERSION` whenever the
behaviour of :class:`LoadNiftid` or :class:`CheckScand` changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Hashable, Mapping, Sequence

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    Spacingd,
    ThresholdIntensityd,
)
from monai.transforms.io.array import switch_endianness
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from common.errors import DataError

__all__ = ["KEYS", "PIPELINE_VERSION", "FOREGROUND_MARGIN", "NIFTI_READ_ERRORS", "LoadNiftid", "CheckScand", "MIN_SLICES",
           "deterministic_transforms", "train_augmentations", "build_pipeline", "pipeline_fingerprint"]

KEYS = ("image",)
PIPELINE_VERSION = 2  # bump when LoadNiftid / CheckScand / the step list changes behaviour
FOREGROUND_MARGIN = 4  # voxels kept around the > 0 bounding box before pad/crop
# Fewest voxels along any axis of a usable 3D T1: a localiser/scout (1-3 slices) or a single-slab export is
# not a head volume. 8 is far below any real T1 (>= 128 slices) and below our 16^3 test volumes.
MIN_SLICES = 8
# What nibabel raises for a file that exists but is not a readable NIfTI (garbage, truncated, bad header).
NIFTI_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError, WrapStructError)
_UNREADABLE_FIX = ("the file is corrupt, truncated or not NIfTI; re-download or re-convert it (fedpd ingest converts "
                   "DICOM series), or drop the row from the manifest")


class LoadNiftid(MapTransform):
    """Read a NIfTI path into a float32 ``MetaTensor`` (affine and filename in its metadata).

    A thin wrapper around MONAI's ``NibabelReader`` that, unlike ``LoadImaged``, does not fall back to
    other readers and reports failures as :class:`DataError` naming the file and the fix.
    """

    def __init__(self, keys=KEYS, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader = NibabelReader(mmap=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            if not os.path.isfile(path):
                raise DataError(f"{path}: image file not found; restore the file or fix the manifest's path "
                                "column (or drop the row)")
            try:
                array, meta = self.reader.get_data(self.reader.read(path))
                array = np.asarray(array, dtype=np.float32)
            except NIFTI_READ_ERRORS as exc:
                raise DataError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); "
                                f"{_UNREADABLE_FIX}") from exc
            meta = switch_endianness(meta, "<")
            meta["filename_or_obj"] = path
            d[key] = MetaTensor.ensure_torch_and_prune_meta(array, meta)
        return d


class CheckScand(MapTransform):
    """Refuse images that are not one finite, non-empty 3D volume with a usable affine.

    Expects the output of :class:`LoadNiftid` (channel-last, i.e. before ``EnsureChannelFirstd``).
    A 4D image with a single volume (``X, Y, Z, 1``) is accepted.
    """

    def __init__(self, keys=KEYS, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = getattr(img, "meta", {})
            name = meta.get("filename_or_obj", f"<{key}>")
            shape = tuple(img.shape)
            if len(shape) == 4 and shape[3] > 1:
                raise DataError(f"{name}: is 4D with {shape[3]} volumes (shape {shape}); give one 3D volume "
                                "(e.g. the first echo/frame: nibabel `img.slicer[..., 0]` or `fslroi in out 0 1`) "
                                "and point the manifest at it")
            if len(shape) not in (3, 4):
                raise DataError(f"{name}: has {len(shape)} dimensions (shape {shape}); a 3D T1 volume is needed, "
                                "re-export the series as one 3D NIfTI")
            spatial = shape[:3]
            if min(spatial) < MIN_SLICES:
                raise DataError(f"{name}: has only {min(spatial)} voxel(s) along one axis (shape {shape}); a 3D T1 "
                                f"head volume needs at least {MIN_SLICES} along every axis (is this a scout/localiser "
                                "or a single slab?): give the whole-head T1 series, or drop the row")
            values = torch.as_tensor(img)
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise DataError(f"{name}: has {bad} NaN/Inf voxels; replace them (e.g. `fslmaths in -nan out` or "
                                "numpy.nan_to_num, then save again) or re-export the scan from DICOM")
            if not bool((values > 0).any()):
                raise DataError(f"{name}: has no voxel > 0 (all zero or negative); the scan is empty or not a T1 "
                                "magnitude image, re-export it or drop the row")
            if bool((values == values.reshape(-1)[0]).all()):
                raise DataError(f"{name}: is a constant image (every voxel = {float(values.reshape(-1)[0]):g}); it holds "
                                "no anatomy: re-export the scan, or drop the row")
            affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
            if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise DataError(f"{name}: its affine (sform/qform) is non-finite or singular; fix the header "
                                "or re-convert the scan from DICOM")
        return d


def _checked(input_shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(s) for s in input_shape)
    mm = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(mm) != 3 or min(mm) <= 0:
        raise ValueError(f"input_shape must be 3 positive ints and spacing 3 positive mm, got {input_shape}, {spacing}")
    return shape, mm  # type: ignore[return-value]


def _steps(input_shape, spacing) -> list[tuple[type, dict]]:
    """The deterministic steps as (class, kwargs): the one source of both the Compose and the fingerprint."""
    shape, mm = _checked(input_shape, spacing)
    return [
        (LoadNiftid, {}),
        (CheckScand, {}),
        (EnsureChannelFirstd, {}),
        (Orientationd, {"axcodes": "RAS", "labels": (("L", "R"), ("P", "A"), ("I", "S"))}),
        (Spacingd, {"pixdim": mm, "mode": "bilinear", "padding_mode": "zeros"}),
        (ThresholdIntensityd, {"threshold": 0.0, "above": True, "cval": 0.0}),
        (CropForegroundd, {"source_key": "image", "margin": FOREGROUND_MARGIN, "allow_smaller": True,
                           "start_coord_key": None, "end_coord_key": None}),
        (ResizeWithPadOrCropd, {"spatial_size": shape, "mode": "constant"}),
        (NormalizeIntensityd, {"nonzero": True, "channel_wise": True}),
        (EnsureTyped, {"data_type": "tensor", "dtype": torch.float32, "track_meta": False}),
    ]


def deterministic_transforms(input_shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Compose:
    """Path -> ``{"image": float32 Tensor [1, *input_shape], ...}``; the cached, augmentation-free part.

    Args:
        input_shape: voxels ``(D, H, W)`` along the RAS axes (left->right, posterior->anterior,
            inferior->superior).
        spacing: target voxel size in mm along the same axes.

    Raises (when called on an item):
        DataError: missing/unreadable file, 4D with several volumes, NaN/Inf, no voxel > 0, bad affine.
    """
    return Compose([cls(keys=KEYS, allow_missing_keys=False, **kw) for cls, kw in _steps(input_shape, spacing)])


def train_augmentations(seed: int, spatial_size: Sequence[int] | None = None) -> Compose:
    """The random training augmentations, seeded (validation and test use none).

    Small affine (rotations up to ~6 degrees, scale +-5 %), a left-right flip (axis 0 after RAS; PD is
    not lateralised in the label, so a flipped scan keeps its label), small intensity scale/shift and
    Gaussian noise on the z-scored image. Applied after :func:`deterministic_transforms`.

    Args:
        seed: seeds every random transform through ``set_random_state``; derive it from the run seed
            plus the site index so sites differ but a run is reproducible.
        spatial_size: the input shape, when known (:func:`build_pipeline` passes it): the affine's identity
            sampling grid is then made once and reused (MONAI's ``cache_grid``) instead of for every scan, about
            a tenth of the training data path at 48^3 (BENCHMARKS.md). The output is the same.
    """
    keys = dict(keys=KEYS, allow_missing_keys=False)
    aug = Compose([
        RandAffined(**keys, prob=0.5, rotate_range=(0.1, 0.1, 0.1), scale_range=(0.05, 0.05, 0.05),
                    mode="bilinear", padding_mode="zeros",
                    **({"spatial_size": tuple(int(s) for s in spatial_size), "cache_grid": True} if spatial_size else {})),
        RandFlipd(**keys, prob=0.5, spatial_axis=0),
        RandScaleIntensityd(**keys, factors=0.1, prob=0.5),
        RandShiftIntensityd(**keys, offsets=0.1, prob=0.5),
        RandGaussianNoised(**keys, prob=0.2, mean=0.0, std=0.05),
        EnsureTyped(**keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
    aug.set_random_state(seed=int(seed))
    return aug


def build_pipeline(input_shape, spacing, train: bool, seed: int) -> Compose:
    """One flat Compose: the deterministic steps, then (``train`` only) the augmentations.

    Flat on purpose: ``PersistentDataset`` caches up to the first random *top-level* item, and a nested
    ``Compose`` counts as random, which would disable caching altogether. Seeded after flattening,
    because ``Compose()`` re-seeds its children from MONAI's global seed.
    """
    steps = list(deterministic_transforms(input_shape, spacing).transforms)
    if train:
        steps += list(train_augmentations(seed, spatial_size=_checked(input_shape, spacing)[0]).transforms)
    pipeline = Compose(steps)
    pipeline.set_random_state(seed=int(seed))
    return pipeline


def pipeline_fingerprint(input_shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> str:
    """A stable name for everything that determines the cached tensors.

    Covers each deterministic step's class and parameters, :data:`PIPELINE_VERSION` and the monai,
    nibabel and torch (major.minor) versions. Readable prefix, hash suffix, e.g.
    ``v1-64x64x64-1.5x1.5x1.5mm-0123456789abcdef``.
    """
    shape, mm = _checked(input_shape, spacing)
    spec = {
        "pipeline_version": PIPELINE_VERSION,
        "monai": monai.__version__,
        "nibabel": nib.__version__,
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
        "keys": list(KEYS),
        "steps": [[f"{cls.__module__}.{cls.__qualname__}", kw] for cls, kw in _steps(shape, mm)],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return f"v{PIPELINE_VERSION}-{'x'.join(map(str, shape))}-{'x'.join(f'{s:g}' for s in mm)}mm-{digest}"
