"""``fedpd phantom``: a synthetic, PPMI-shaped IDA download (never a clinical result).

It writes into ``out`` exactly what ``fedpd ingest`` reads from a real download (DESIGN.md, "Input
formats" and "The phantom cohort"):

- ``idaSearch.csv``: IDA search results (:data:`IDA_COLUMNS`), one row per scan;
- ``centres.csv``: PPMI-style centre list ``PATNO,CNO``;
- ``PPMI/<Subject>/<Description>/<YYYY-MM-DD_HH_MM_SS.0>/<Image Data ID>/`` holding one ``.nii.gz`` or a
  DICOM series (MR Image Storage, one slice per file, 12-bit unsigned with RescaleSlope);
- ``phantom.json``: the parameters and counts; it marks the folder as a phantom that may be regenerated.
  In native space it also records every scan's MNI -> scanner transform (``native.scans``).

Two output spaces (``space``). ``"mni"``: the scan is the ``shape``^3 MNI grid itself, zero background.
``"native"`` (scanner space, like a real download): the same MNI-space brain, PD included, gets a head
around it (CSF, skull, scalp, neck) and is moved by a random head pose into a larger, anisotropic,
variously oriented field of view; bias field, blur and Rician noise are applied on that grid
(:func:`_render_native`), and ``fedpd preprocess`` has to undo it all.

Image model, per scan (in the ``shape``^3 MNI grid, ``FOV_MM / shape`` mm isotropic voxels):
the MNI152 T1 template shipped inside nilearn (GM/WM templates locate deep grey matter) is resampled once
per call; each scan then samples it through one composed displacement field: subject anatomy (global and
per-axis scale, smooth low-frequency field), visit (head position, small longitudinal field), age
(ventricular enlargement) and PD (shrinkage of putamen, caudate and midbrain plus ventricular enlargement,
both scaled by ``effect`` x subject severity, growing with follow-up). PD also darkens deep grey matter.
The site's scanner profile then applies intensity scale, contrast (gamma), a smooth multiplicative bias
field, blur and Rician or Gaussian noise.

Randomness comes from separate streams keyed on (seed, purpose, index): anatomy, age, noise and scanner
never depend on the label, so with ``effect=0`` a subject's images are identical whatever its group (the
negative control). Per-site PD shares differ (non-IID), so the site itself is a weak label proxy,
as at real centres. Same seed, same arguments -> byte-identical files (fixed dates, gzip mtime 0, UIDs
derived from the seed).
"""

from __future__ import annotations

import logging
import csv
import datetime as dt
import gzip
import json
import math
import numbers
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from common.errors import DataError

log = logging.getLogger("fedpd.phantom")

__all__ = ["generate_phantom", "IDA_COLUMNS", "FOV_MM", "MARKER", "IDA_CSV", "CENTRES_CSV", "SPACES", "ORIENTATIONS",
           "NATIVE_DIRECTION"]

IDA_COLUMNS = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
               "Acq Date", "Format", "Downloaded")
FOV_MM = 192.0                      # cubic field of view; the MNI brain spans 144 x 180 x 154 mm
MARKER, IDA_CSV, CENTRES_CSV = "phantom.json", "idaSearch.csv", "centres.csv"
VISITS = ("Baseline", "Month 12", "Month 24")
# Scanner profiles: (series description, manufacturer model, field strength T), cycled over sites.
SCANNERS = (("MPRAGE GRAPPA", "TrioTim", 3.0), ("SAG 3D T1 FSPGR", "Signa HDxt", 1.5),
            ("T1-anatomical", "Achieva", 3.0), ("MPRAGE", "Verio", 3.0), ("SAG 3D MPRAGE", "Skyra", 3.0),
            ("3D T1-weighted", "Ingenia", 1.5))
# PD target regions in MNI mm: (centre, sigma) of putamen, caudate head and midbrain (substantia nigra).
DEEP_GM = (((-25, 2, 1), 7.0), ((25, 2, 1), 7.0), ((-13, 13, 9), 5.0), ((13, 13, 9), 5.0), ((0, -19, -11), 7.0))
# Lateral ventricles: centroids (+-11.5, -9.7, 15.9) and spread (7, 21, 7) mm measured on the nilearn template.
# Their enlargement is one radial Gaussian displacement bump centred between them, wider than the ventricles,
# so it also pushes periventricular tissue outwards (central atrophy): up to ~15 mm at the cap, where bumps the
# size of each ventricle moved tissue by less than one 4 mm voxel laterally and a from-scratch Med3D could not
# learn the effect at demo size. One bump, not two overlapping ones, keeps the warp fold-free below the cap.
VENTRICLES = (((0, -10, 16), (20.0, 30.0, 16.0)),)
# Effect sizes at effect=1 and severity 1: deep-GM shrink, ventricle expansion, deep-GM darkening.
PD_SHRINK, PD_VENTRICLE, PD_DARKEN = 0.6, 0.6, 0.4
AGE_VENTRICLE = 0.004               # ventricle expansion per year of age around 63 (label independent)
GROUP_SEVERITY = {"PD": 1.0, "Prodromal": 0.4, "SWEDD": 0.0, "Control": 0.0}
SEVERITY_RANGE = (0.4, 1.6)         # per-subject PD severity, uniform
# Caps keep the warp fold-free (Jacobian determinant > 0 with both at their caps, tests/test_phantom.py).
DARKEN_CAP, VENTRICLE_CAP, SHRINK_CAP = 0.6, 0.85, 0.8
SITE_GAMMA, SITE_CONTRAST = (0.9, 1.1), 0.15  # scanner nuisance: gamma range, +- GM/WM contrast
_BASIS = 3                          # cosine orders 0..2 for smooth fields
_STREAMS = {"cohort": 0, "site": 1, "anatomy": 2, "severity": 3, "scan": 4, "format": 5, "pose": 6}
SPACES = ("mni", "native")
# Native space (scanner space, ``space="native"``): what `fedpd preprocess` must undo. Per scan a rigid head pose
# (uniform rotations and translations), a larger field of view holding scalp, skull and neck, anisotropic voxels
# (the slice axis is the last voxel axis), a voxel-axis orientation from ORIENTATIONS, the site's bias field fixed to
# the scanner grid, and Rician (magnitude) noise, so the background is never zero.
NATIVE_FOV_MM = 256.0               # along every voxel axis; the rotated, shifted brain stays inside (<= 94 + 20 mm)
NATIVE_ANISOTROPY = (1.0, 1.0, 1.2)  # voxel size / (FOV_MM / shape) per voxel axis, e.g. 1 x 1 x 1.2 mm at 192^3
POSE_ROTATION_DEG, POSE_SHIFT_MM, TABLE_OFFSET_MM = 15.0, 20.0, 30.0  # uniform +- ranges per axis
ORIENTATIONS = ("RAS", "LAS", "LPS", "RPI", "PIR", "ASL", "LIP", "RSA")  # axial, sagittal and coronal slices
_AXIS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
# Head outside the brain, by distance d (mm) from the brain: CSF (0, 3], skull (3, 9] with marrow, scalp fat (9, 16];
# and a neck: elliptic cylinder (centre x, y; semi-axes; top z, all MNI mm) of muscle with a fat rim. Intensities in
# template units (white matter ~0.85).
CSF_MM, SKULL_MM, SCALP_MM = 3.0, 9.0, 16.0
CSF_LEVEL, BONE_LEVEL, MARROW_LEVEL, FAT_LEVEL, MUSCLE_LEVEL = 0.08, 0.03, 0.15, 0.75, 0.35
NECK = ((0.0, -20.0), (50.0, 55.0), -35.0)
NECK_RIM_MM = 6.0
_PAD_MM, _NECK_PAD_MM = 24.0, 110.0  # head grid beyond the MNI grid: every side, and extra below for the neck
NATIVE_DIRECTION = ("mni_to_native: x_native = M @ [x_mni, y_mni, z_mni, 1], both in RAS mm; x_mni in the world "
                    "of the MNI152 template (= the space=\"mni\" rendering of the same seed, which already holds the "
                    "subject's anatomy and a ~1 deg/1 mm visit jitter), x_native in the scan's world (its NIfTI "
                    "affine; for a DICOM series, the affine dicom2nifti gives it). template_to_native: the same for "
                    "x_tmpl in the world of the unwarped template: the subject's linear anatomy (scale) and visit "
                    "jitter undone, then the pose; what a 12-parameter registration to the template should find, "
                    "up to the subject's smooth non-linear field")


def _rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], *keys])


# ----------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class _Templates:
    """The MNI templates resampled once onto the output grid, plus unit fields (voxel units)."""
    affine: np.ndarray      # output voxel -> RAS mm
    t1: np.ndarray          # (S,S,S) T1 intensities in [0, 1]
    deep: np.ndarray        # (S,S,S) deep-GM weight in [0, 1] (putamen, caudate, midbrain x GM probability)
    tissue: np.ndarray      # (S,S,S) WM - GM probability: scanners differ in GM/WM contrast
    grid: np.ndarray        # (3,S,S,S) voxel indices minus the centre
    shrink: np.ndarray      # (3,S,S,S) displacement that shrinks deep GM when scaled up
    ventricle: np.ndarray   # (3,S,S,S) displacement that enlarges the lateral ventricles
    basis: np.ndarray       # (_BASIS, S) 1D cosine basis


def _resample(data: np.ndarray, src: np.ndarray, dst: np.ndarray, shape: int, voxel: float) -> np.ndarray:
    """Anti-aliased resampling of a 1 mm template onto the output grid (block mean, Gaussian, linear)."""
    f = max(1, int(voxel // 2))
    if f > 1:
        n = [d // f * f for d in data.shape]
        data = data[:n[0], :n[1], :n[2]].reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))
        src = src @ np.array([[f, 0, 0, (f - 1) / 2], [0, f, 0, (f - 1) / 2], [0, 0, f, (f - 1) / 2], [0, 0, 0, 1]])
    sigma = math.sqrt(max((0.42 * voxel) ** 2 - f * f / 12.0, 0.0)) / f
    data = ndimage.gaussian_filter(data, sigma) if sigma > 0.3 else data
    m = np.linalg.inv(src) @ dst
    return ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=(shape,) * 3, order=1,
                                    mode="constant", cval=0.0).astype(np.float32)


def _bump_field(world: np.ndarray, centre, sigma, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian weight g and radial displacement (x - c) * g in voxels, for one region."""
    d = world - np.asarray(centre, np.float32).reshape(3, 1, 1, 1)
    s = np.broadcast_to(np.asarray(sigma, np.float32), (3,)).reshape(3, 1, 1, 1)
    g = np.exp(-0.5 * ((d / s) ** 2).sum(0))
    return g, (d / voxel * g).astype(np.float32)


def _load_templates(shape: int) -> _Templates:
    from nilearn import datasets  # local: nilearn is slow to import and only needed here

    imgs = [datasets.load_mni152_template(resolution=1), datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1)]
    t1, gm, wm = (np.asarray(i.dataobj, dtype=np.float32) for i in imgs)
    src = imgs[0].affine
    idx = np.argwhere(t1 > 0.01)
    centre = np.round((src[:3, :3] @ (idx.min(0) + idx.max(0)) / 2 + src[:3, 3]))
    voxel = FOV_MM / shape
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = centre - voxel * (shape - 1) / 2
    t1_out, gm_out, wm_out = (np.clip(_resample(d, src, affine, shape, voxel), 0, None) for d in (t1, gm, wm))
    ijk = np.indices((shape,) * 3, dtype=np.float32)
    world = np.einsum("ij,jxyz->ixyz", affine[:3, :3].astype(np.float32), ijk) + \
        affine[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    weight, shrink = np.zeros(ijk.shape[1:], np.float32), np.zeros_like(ijk)
    for c, s in DEEP_GM:
        g, u = _bump_field(world, c, s, voxel)
        weight += g
        shrink += u
    ventricle = np.zeros_like(ijk)
    for c, s in VENTRICLES:
        ventricle -= _bump_field(world, c, s, voxel)[1]
    x = (np.arange(shape) + 0.5) / shape
    basis = np.stack([np.cos(np.pi * k * x) for k in range(_BASIS)]).astype(np.float32)
    return _Templates(affine=affine, t1=t1_out, deep=np.clip(weight * gm_out, 0, 1), tissue=wm_out - gm_out,
                      grid=ijk - (shape - 1) / 2, shrink=shrink, ventricle=ventricle, basis=basis)


def _site_volumes(tpl: _Templates, site: dict) -> tuple[np.ndarray, np.ndarray]:
    """The site's T1 contrast and T1 x deep-GM weight, once per site (warping is linear, so the scan's
    deep-GM darkening is warp(t1) - b * warp(t1 * deep))."""
    t1 = tpl.t1 * (1.0 + np.float32(site["contrast"]) * tpl.tissue)
    return t1, t1 * tpl.deep


def _smooth(coef: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Low-frequency field sum_lmn coef[c,l,m,n] B_l(i) B_m(j) B_n(k), shape (C,S,S,S)."""
    return np.einsum("clmn,li,mj,nk->cijk", coef, basis, basis, basis, optimize=True).astype(np.float32)


def _coefficients(rng: np.random.Generator, channels: int, sd: float, constant: bool = False) -> np.ndarray:
    order = np.add.outer(np.add.outer(np.arange(_BASIS), np.arange(_BASIS)), np.arange(_BASIS))
    c = rng.normal(0.0, 1.0, (channels, _BASIS, _BASIS, _BASIS)) * sd / (1.0 + order)
    if not constant:
        c[:, 0, 0, 0] = 0.0
    return c.astype(np.float32)


# ----------------------------------------------------------------------------------------- the cohort
def _site_name(k: int) -> str:
    """site-A .. site-Z, site-AA, site-AB, ..."""
    return f"site-{_site_name(k // 26 - 1)[5:] if k >= 26 else ''}{chr(65 + k % 26)}"


def _plan(subjects: int, sites: int, seed: int, dicom_fraction: float):
    """Sites, subjects and scans (no images): every draw that does not need the templates."""
    rng = _rng(seed, "cohort")
    ranks = [rng.permutation(sites) / max(sites - 1, 1) for _ in range(3)]
    shares = 0.72 + 0.16 * rng.permutation(sites) / max(sites - 1, 1) if sites > 1 else np.array([0.8])
    site_list = []
    for k in range(sites):
        r = _rng(seed, "site", k)
        desc, model, tesla = SCANNERS[k % len(SCANNERS)]
        site_list.append({
            "name": _site_name(k), "cno": str(10 * (k + 1)), "description": desc, "model": model, "tesla": tesla,
            "pd_share": float(shares[k]), "scale": 0.75 + 0.6 * ranks[0][k] + r.normal(0, 0.02),
            "noise": 0.012 + 0.03 * ranks[1][k], "blur": np.array([0.2, 0.2, 0.2 + 1.0 * ranks[2][k]]),
            "gamma": float(r.uniform(*SITE_GAMMA)), "rician": bool(r.random() < 0.5),
            "bias": _coefficients(r, 1, 0.12), "contrast": float(r.uniform(-SITE_CONTRAST, SITE_CONTRAST))})
    sizes = 4 + rng.multinomial(subjects - 4 * sites, rng.dirichlet(np.full(sites, 2.5)))
    site_of = rng.permutation(np.repeat(np.arange(sites), sizes))
    patnos = rng.choice(np.arange(3000, 3000 + max(2000, 4 * subjects)), subjects, replace=False)
    groups = np.array(["Control"] * subjects, dtype=object)
    n_other = max(2, round(0.08 * subjects))
    left = sizes.copy()
    others = []
    for i in rng.permutation(subjects):
        if len(others) < n_other and left[site_of[i]] > 3:
            others.append(i)
            left[site_of[i]] -= 1
    n_prod = min(max(round(0.6 * len(others)), 1), len(others) - 1)  # at least one of each group
    groups[others[:n_prod]], groups[others[n_prod:]] = "Prodromal", "SWEDD"
    for k, site in enumerate(site_list):
        members = [i for i in range(subjects) if site_of[i] == k and groups[i] == "Control"]
        n_pd = min(max(round(site["pd_share"] * len(members)), 1), len(members) - 1)
        groups[rng.choice(members, n_pd, replace=False)] = "PD"
    downloaded = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 366)))
    subject_list, scans = [], []
    for i in range(subjects):
        subject_list.append({"index": i, "patno": str(patnos[i]), "site": int(site_of[i]), "group": str(groups[i]),
                             "sex": "M" if rng.random() < 0.6 else "F",
                             "age": float(np.clip(rng.normal(63, 9), 40, 85))})
        start = dt.datetime(2010, 7, 1, 7, 30) + dt.timedelta(days=int(rng.integers(0, 9 * 365)),
                                                              seconds=int(rng.integers(0, 10 * 3600)))
        for v in range(int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))):
            when = start + dt.timedelta(days=365 * v + (int(rng.integers(-30, 31)) if v else 0))
            scans.append({"subject": i, "visit": v, "when": when})
    scans.sort(key=lambda s: (s["when"], s["subject"]))
    ids = np.sort(rng.choice(np.arange(100000, 1000000), len(scans), replace=False))
    n_dicom = math.ceil(dicom_fraction * len(scans) - 1e-9)
    dicom = set(_rng(seed, "format").choice(len(scans), n_dicom, replace=False).tolist())
    for n, s in enumerate(scans):
        s.update(image_id=f"I{ids[n]}", format="DCM" if n in dicom else "NiFTI")
    return site_list, subject_list, scans, downloaded


def _anatomy(seed: int, subject: dict, basis: np.ndarray, voxel: float) -> dict:
    """Label-independent per-subject draws: scale, smooth field (voxels), contrast; and the PD severity."""
    r = _rng(seed, "anatomy", subject["index"])
    scale = math.exp(r.normal(0, 0.035)) * (1.02 if subject["sex"] == "M" else 0.98) * np.exp(r.normal(0, 0.015, 3))
    field = _smooth(_coefficients(r, 3, 2.0 / voxel), basis)
    return {"scale": scale, "field": field, "gamma": math.exp(r.normal(0, 0.03)),
            "severity": float(_rng(seed, "severity", subject["index"]).uniform(*SEVERITY_RANGE))}


def _render(tpl: _Templates, volumes: tuple, site: dict, subject: dict, anatomy: dict, scan: dict, effect: float,
            seed: int) -> np.ndarray:
    """One scan as float32 (S,S,S) in MNI space: :func:`_brain`, then the site's scanner profile."""
    img, r, _ = _brain(tpl, volumes, site, subject, anatomy, scan, effect, seed)
    bias = np.exp(_smooth(site["bias"] + _coefficients(r, 1, 0.03), tpl.basis)[0])
    img *= bias * np.float32(1000.0 * site["scale"] * math.exp(r.normal(0, 0.02)))
    img = ndimage.gaussian_filter(img, site["blur"])
    sigma = np.float32(1000.0 * site["scale"] * site["noise"])
    img += sigma * r.standard_normal(img.shape, dtype=np.float32)
    if site["rician"]:
        img = np.hypot(img, sigma * r.standard_normal(img.shape, dtype=np.float32))
    return np.clip(img, 0, None)


def _brain(tpl: _Templates, volumes: tuple, site: dict, subject: dict, anatomy: dict, scan: dict, effect: float,
           seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """The noise-free brain in MNI space, (S,S,S) in template units: warp the site's template
    (:func:`_site_volumes`), apply PD and the contrast (gamma). Returns it with the scan's random stream, which
    the scanner profile goes on drawing from."""
    r = _rng(seed, "scan", subject["index"], scan["visit"])
    voxel = tpl.affine[0, 0]
    years = scan["visit"]
    age = subject["age"] + years
    pd = effect * anatomy["severity"] * GROUP_SEVERITY[subject["group"]] * (1.0 + 0.2 * years)
    m = Rotation.from_euler("xyz", r.normal(0, 1.0, 3), degrees=True).as_matrix() / anatomy["scale"][None, :]
    shift = r.normal(0, 1.0, 3) / voxel
    u = anatomy["field"] + _smooth(_coefficients(r, 3, 0.4 / voxel), tpl.basis)
    vent = min(AGE_VENTRICLE * (age - 63.0) + PD_VENTRICLE * pd, VENTRICLE_CAP)
    u += tpl.ventricle * np.float32(vent)
    if pd:
        u += tpl.shrink * np.float32(min(PD_SHRINK * pd, SHRINK_CAP))
    centre = (tpl.t1.shape[0] - 1) / 2
    t1, deep = volumes
    p = np.einsum("ij,jxyz->ixyz", m.astype(np.float32), tpl.grid) + u
    p += (centre + shift).astype(np.float32).reshape(3, 1, 1, 1)
    img = ndimage.map_coordinates(t1, p, order=1, mode="constant", cval=0.0, output=np.float32)
    if pd:
        darken = np.float32(min(PD_DARKEN * pd, DARKEN_CAP))
        img -= darken * ndimage.map_coordinates(deep, p, order=1, mode="constant", cval=0.0, output=np.float32)
    # the linear part of the warp, template voxel = linear @ [brain voxel, 1] (the smooth field u aside)
    linear = np.eye(4)
    linear[:3, :3] = m
    linear[:3, 3] = centre + shift - m @ np.full(3, centre)
    return np.clip(img, 0, None) ** np.float32(site["gamma"] * anatomy["gamma"]), r, linear


# ----------------------------------------------------------------------------------------- native space
@dataclass(frozen=True)
class _Head:
    """The head grid: the MNI grid padded on every side (scalp) and below (neck), same voxel size."""
    affine: np.ndarray      # head voxel -> MNI RAS mm
    shape: tuple            # (X, Y, Z)
    inner: tuple            # slices of the MNI grid inside the head grid
    neck: np.ndarray        # (X, Y, Z) neck intensity (muscle, fat rim), 0 outside the neck
    centre: np.ndarray      # MNI mm about which the head turns (centre of the brain's bounding box)


def _head_grid(tpl: _Templates) -> _Head:
    voxel, size = float(tpl.affine[0, 0]), tpl.t1.shape[0]
    pad, low = math.ceil(_PAD_MM / voxel), math.ceil((_PAD_MM + _NECK_PAD_MM) / voxel)
    shape = (size + 2 * pad, size + 2 * pad, size + pad + low)
    affine = tpl.affine.copy()
    affine[:3, 3] -= voxel * np.array([pad, pad, low])
    x, y, z = (affine[a, 3] + voxel * np.arange(n, dtype=np.float32) for a, n in enumerate(shape))
    (cx, cy), (ax, ay), top = NECK
    rho = np.sqrt(((x[:, None] - cx) / ax) ** 2 + ((y[None, :] - cy) / ay) ** 2)                 # (X, Y)
    level = np.where(rho < 1.0, np.where(rho > 1.0 - NECK_RIM_MM / min(ax, ay), FAT_LEVEL, MUSCLE_LEVEL), 0.0)
    neck = (level[:, :, None] * (z[None, None, :] < top)).astype(np.float32)
    inner = (slice(pad, pad + size), slice(pad, pad + size), slice(low, low + size))
    centre = tpl.affine[:3, :3] @ np.full(3, (size - 1) / 2) + tpl.affine[:3, 3]
    return _Head(affine=affine, shape=shape, inner=inner, neck=neck, centre=centre)


def _head_image(head: _Head, brain: np.ndarray, voxel: float) -> np.ndarray:
    """Brain (template units, MNI grid) + CSF, skull, scalp and neck on the head grid. The shells follow this
    scan's brain: they are bands of distance from it."""
    img = np.zeros(head.shape, np.float32)
    img[head.inner] = brain
    inside = img > 0.01
    d = ndimage.distance_transform_edt(~inside, sampling=voxel).astype(np.float32)
    skull = BONE_LEVEL + (MARROW_LEVEL - BONE_LEVEL) * np.exp(-0.5 * ((d - (CSF_MM + SKULL_MM) / 2) / 1.2) ** 2)
    soft = np.maximum(np.where(d <= SCALP_MM, np.float32(FAT_LEVEL), np.float32(0.0)), head.neck)
    shell = np.where(d <= CSF_MM, np.float32(CSF_LEVEL), np.where(d <= SKULL_MM, skull, soft))
    return np.where(inside, img, shell).astype(np.float32)


def _pose(seed: int, subject: dict, scan: dict, head: _Head, voxel: float) -> dict:
    """The scan's native grid and head pose: ``mni_to_native`` (4x4, MNI RAS mm -> scanner RAS mm), ``affine``
    (native voxel -> scanner RAS mm), ``shape``, ``orientation`` (nibabel axis codes) and ``voxel_mm``."""
    r = _rng(seed, "pose", subject["index"], scan["visit"])
    angles = r.uniform(-POSE_ROTATION_DEG, POSE_ROTATION_DEG, 3)
    shift = r.uniform(-POSE_SHIFT_MM, POSE_SHIFT_MM, 3)       # head centre relative to the field of view's centre
    table = r.uniform(-TABLE_OFFSET_MM, TABLE_OFFSET_MM, 3)   # where the scanner puts the field of view's centre
    code = ORIENTATIONS[int(r.integers(len(ORIENTATIONS)))]
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    to_native = np.eye(4)
    to_native[:3, :3] = rot
    to_native[:3, 3] = table + shift - rot @ head.centre
    zooms = voxel * np.asarray(NATIVE_ANISOTROPY)
    shape = tuple(int(round(NATIVE_FOV_MM / z)) for z in zooms)
    affine = np.eye(4)
    affine[:3, :3] = np.array([_AXIS[c] for c in code], float).T * zooms
    affine[:3, 3] = table - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return {"mni_to_native": to_native, "affine": affine, "shape": shape, "orientation": code,
            "voxel_mm": [round(float(z), 6) for z in zooms]}


def _render_native(tpl: _Templates, head: _Head, volumes: tuple, site: dict, subject: dict, anatomy: dict,
                   scan: dict, effect: float, seed: int) -> tuple[np.ndarray, dict]:
    """One scan in scanner space: the MNI-space brain of :func:`_brain` (PD applied there), a head around it,
    moved into the native grid by the scan's pose (:func:`_pose`); then bias, blur and Rician noise on that grid."""
    voxel = float(tpl.affine[0, 0])
    brain, r, linear = _brain(tpl, volumes, site, subject, anatomy, scan, effect, seed)
    pose = _pose(seed, subject, scan, head, voxel)
    # template world -> this scan's world: what an affine registration to the template should find (the
    # subject's smooth non-linear field aside): the brain's linear warp undone, then the head pose
    to_template = tpl.affine @ linear @ np.linalg.inv(tpl.affine)  # subject-MNI mm -> template mm
    pose["template_to_native"] = pose["mni_to_native"] @ np.linalg.inv(to_template)
    m = np.linalg.inv(head.affine) @ np.linalg.inv(pose["mni_to_native"]) @ pose["affine"]
    img = ndimage.affine_transform(_head_image(head, brain, voxel), m[:3, :3], offset=m[:3, 3],
                                   output_shape=pose["shape"], order=1, mode="constant", cval=0.0, output=np.float32)
    bases = [np.stack([np.cos(np.pi * k * (np.arange(n) + 0.5) / n) for k in range(_BASIS)]).astype(np.float32)
             for n in pose["shape"]]
    coef = site["bias"] + _coefficients(r, 1, 0.03)
    bias = np.exp(np.einsum("lmn,li,mj,nk->ijk", coef[0], *bases, optimize=True)).astype(np.float32)
    img *= bias * np.float32(1000.0 * site["scale"] * math.exp(r.normal(0, 0.02)))
    img = ndimage.gaussian_filter(img, site["blur"])           # the slice axis (last) is blurred most
    sigma = np.float32(1000.0 * site["scale"] * site["noise"])
    img = np.hypot(img + sigma * r.standard_normal(img.shape, dtype=np.float32),
                   sigma * r.standard_normal(img.shape, dtype=np.float32))  # magnitude image: Rician everywhere
    return img, pose


# ----------------------------------------------------------------------------------------- writers
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _nifti_bytes(vol: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.rint(vol).astype(np.int16), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"fedpd phantom (synthetic)"
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _dicom_number(x: float):
    """An int when whole (IOP of axis-aligned grids), else rounded to 6 decimals."""
    x = round(float(x), 6)
    return int(x) if x.is_integer() else x


def _write_dicom(folder: Path, vol: np.ndarray, affine: np.ndarray, meta: dict) -> None:
    """MR series, one slice per voxel index along the last axis, any axis-aligned or rotated ``affine`` (voxel ->
    RAS mm). DICOM patient coordinates are LPS; in-plane axes whose LPS direction points mostly backwards are
    flipped so rows and columns run forwards (an MNI-grid scan: axial, ImageOrientationPatient 1,0,0,0,1,0)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    def uid(*parts):
        return generate_uid(entropy_srcs=["fedpd-phantom", str(meta["seed"]), meta["image_id"], *map(str, parts)])

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    for a in (0, 1):
        if lps[np.argmax(np.abs(lps[:3, a])), a] < 0:
            vol = np.flip(vol, a)
            lps[:3, 3] += lps[:3, a] * (vol.shape[a] - 1)
            lps[:3, a] *= -1
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]   # directions of increasing column, row index
    normal = np.cross(row, col)
    slope = float(f"{max(float(vol.max()), 1.0) / 4095:.6g}")
    stored = np.clip(np.rint(vol / slope), 0, 4095).astype("<u2")
    n_i, n_j, n_k = vol.shape
    when = meta["when"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = f"{when:%Y%m%d}"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{when:%H%M%S}"
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber = "1", 2, 1
    ds.Modality, ds.Manufacturer = "MR", "fedpd phantom"
    ds.ManufacturerModelName, ds.MagneticFieldStrength = meta["model"], meta["tesla"]
    ds.InstitutionName, ds.SeriesDescription, ds.ProtocolName = meta["site"], meta["description"], meta["description"]
    ds.PatientName, ds.PatientID = f"PPMI^{meta['subject']}", meta["subject"]
    ds.PatientSex, ds.PatientAge = meta["sex"], f"{int(meta['age']):03d}Y"
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "BRAIN"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = ["GR", "IR"], ["SP", "MP"], "3D"
    ds.ImageOrientationPatient = [_dicom_number(v) for v in (*row, *col)]
    ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # between rows, between columns
    ds.SliceThickness = ds.SpacingBetweenSlices = round(float(spacing[2]), 6)
    ds.Rows, ds.Columns = n_j, n_i
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, slope, "US"
    stem = f"PPMI_{meta['subject']}_MR_{meta['description'].replace(' ', '_')}_{meta['image_id']}"
    for k in range(n_k):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("sop", k)
        ds.InstanceNumber = k + 1
        position = lps[:3, 3] + k * lps[:3, 2]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(normal @ position), 4)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"{stem}_{k + 1:04d}.dcm", enforce_file_format=True)


def _scan_folder(out: Path, subject: dict, site: dict, scan: dict) -> Path:
    return (out / "PPMI" / subject["patno"] / site["description"].replace(" ", "_")
            / f"{scan['when']:%Y-%m-%d_%H_%M_%S}.0" / scan["image_id"])


def _write_scan(out: Path, vol: np.ndarray, affine: np.ndarray, subject: dict, site: dict, scan: dict, seed: int):
    final = _scan_folder(out, subject, site, scan)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    desc = site["description"].replace(" ", "_")
    if scan["format"] == "NiFTI":
        (tmp / f"PPMI_{subject['patno']}_MR_{desc}_{scan['image_id']}.nii.gz").write_bytes(
            _nifti_bytes(vol, affine))
    else:
        _write_dicom(tmp, vol, affine, {
            "seed": seed, "image_id": scan["image_id"], "when": scan["when"], "model": site["model"],
            "tesla": site["tesla"], "site": site["name"], "description": site["description"],
            "subject": subject["patno"], "sex": subject["sex"], "age": subject["age"] + scan["visit"]})
    os.replace(tmp, final)


def _write_csv(path: Path, header, rows, quote_all: bool) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- entry point
def _check_args(out: Path, subjects, sites, shape, effect, seed, dicom_fraction, space) -> None:
    problems = []
    def whole(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not (whole(sites) and sites >= 1):
        problems.append(f"--sites must be an integer >= 1, got {sites!r}")
    elif not (whole(subjects) and subjects >= 4 * sites):
        problems.append(f"--subjects must be at least 4 per site (>= {4 * sites} for {sites} sites), got "
                        f"{subjects!r}; add subjects or use fewer sites")
    if not (whole(shape) and 16 <= shape <= 256):
        problems.append(f"--shape must be an integer in 16..256 voxels, got {shape!r}")
    if not (math.isfinite(effect) and effect >= 0):
        problems.append(f"--effect must be a finite number >= 0 (0 = negative control), got {effect!r}")
    if not (whole(seed) and seed >= 0):
        problems.append(f"--seed must be an integer >= 0, got {seed!r}")
    if not (0.1 <= dicom_fraction <= 1.0):
        problems.append(f"--dicom-fraction must be in [0.1, 1] so the DICOM path is exercised, got {dicom_fraction!r}")
    if space not in SPACES:
        problems.append(f"--space must be one of {', '.join(SPACES)} (native: scanner space like a real download; "
                        f"mni: already in template space), got {space!r}")
    if problems:
        raise DataError("; ".join(problems))
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another OUT folder for the phantom.")


def _prepare_out(out: Path) -> None:
    """Accept a missing or empty folder, or a previous phantom (whose own files are removed)."""
    if not out.is_dir():
        out.mkdir(parents=True)
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    marker = out / MARKER
    try:
        ours = json.loads(marker.read_text()).get("generator") == "fedpd phantom"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise DataError(f"{out}: folder is not empty and is not a fedpd phantom (no valid {MARKER}); it holds "
                        f"{', '.join(entries[:5])}{more}. Choose a new or empty OUT folder; fedpd never overwrites "
                        "data it did not write.")
    foreign = [e for e in entries if e not in {MARKER, IDA_CSV, CENTRES_CSV, "PPMI"} and not e.endswith(".partial")]
    if foreign:
        raise DataError(f"{out}: previous phantom folder also holds {', '.join(foreign[:5])}, which the phantom did "
                        "not write; move those away or choose a new OUT folder.")
    for name in (IDA_CSV, CENTRES_CSV):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "PPMI", ignore_errors=True)
    for e in entries:
        if e.endswith(".partial"):
            (out / e).unlink(missing_ok=True)


def generate_phantom(out, subjects: int = 120, sites: int = 3, shape: int = 64, effect: float = 1.0, seed: int = 0,
                     dicom_fraction: float = 0.15, space: str = "mni") -> dict:
    """Write a synthetic PPMI-shaped IDA download into ``out`` (see the module docstring).

    Args:
        out: folder to write; must be missing, empty, or a previous phantom (regenerated in place).
        subjects: number of subjects (>= 4 per site); about 8 % are Prodromal/SWEDD (excluded by ingestion).
        sites: number of acquisition sites, each with its own scanner profile, size and PD share.
        shape: edge of the cubic volume in voxels (16..256); voxels are ``FOV_MM / shape`` mm.
        effect: PD effect size; 0 = negative control (labels carry no image signal).
        seed: random seed; the same arguments give byte-identical files.
        dicom_fraction: share of scans written as DICOM series (0.1..1).
        space: ``"mni"``: scans on the ``shape``^3 MNI grid, zero background (the files are byte-identical to
            those written before this parameter existed). ``"native"``: scanner space, as a real download: the
            same MNI-space brain (PD defined there) with a head around it (CSF, skull, scalp, neck), moved by a
            random head pose (rotations up to +-15 deg, translations up to +-20 mm) into a 256 mm field of view
            with anisotropic voxels (``FOV_MM / shape`` x (1, 1, 1.2) mm) and a per-scan orientation
            (:data:`ORIENTATIONS`), then bias field, blur and Rician noise on that grid. The marker
            ``phantom.json`` then records each scan's transform (``native.scans.<image id>.mni_to_native``, see
            :data:`NATIVE_DIRECTION`).

    Returns:
        Summary dict: ``out, subjects, scans, dicom, nifti, groups, pd_share, sites`` (per site: ``cno,
        description, subjects, scans, groups``), ``shape, voxel_mm, effect, seed, space, seconds``.

    Raises:
        DataError: bad arguments, or ``out`` holds files that are not a previous phantom.
    """
    t0 = time.perf_counter()
    out = Path(out)
    _check_args(out, subjects, sites, shape, float(effect), seed, dicom_fraction, space)
    _prepare_out(out)
    effect = float(effect)
    params = {"subjects": subjects, "sites": sites, "shape": shape, "effect": effect, "seed": seed,
              "dicom_fraction": dicom_fraction}
    native = space == "native"
    if native:  # an MNI phantom's marker stays as it was before native space existed: no "space" key means mni
        params["space"] = space
    marker = {"generator": "fedpd phantom", "complete": False, "params": params,
              "note": "synthetic data for software testing; never a clinical result. complete=false: generation "
                      "was interrupted; run fedpd phantom again"}
    _write_atomic(out / MARKER, json.dumps(marker, indent=2).encode())
    site_list, subject_list, scans, downloaded = _plan(subjects, sites, seed, dicom_fraction)
    tpl = _load_templates(shape)
    voxel = float(tpl.affine[0, 0])
    volumes = [_site_volumes(tpl, site) for site in site_list]
    head = _head_grid(tpl) if native else None
    poses: dict[str, dict] = {}
    anatomy: dict[int, dict] = {}
    for scan in tqdm(sorted(scans, key=lambda s: (s["subject"], s["visit"])), desc="phantom", unit="scan"):
        subject = subject_list[scan["subject"]]
        site = site_list[subject["site"]]
        if subject["index"] not in anatomy:
            anatomy.clear()  # visits of a subject are consecutive: keep one subject's fields at a time
            anatomy[subject["index"]] = _anatomy(seed, subject, tpl.basis, voxel)
        if native:
            vol, pose = _render_native(tpl, head, volumes[subject["site"]], site, subject, anatomy[subject["index"]],
                                       scan, effect, seed)
            poses[scan["image_id"]] = pose
            _write_scan(out, vol, pose["affine"], subject, site, scan, seed)
        else:
            vol = _render(tpl, volumes[subject["site"]], site, subject, anatomy[subject["index"]], scan, effect,
                          seed)
            _write_scan(out, vol, tpl.affine, subject, site, scan, seed)
    _write_csv(out / CENTRES_CSV, ["PATNO", "CNO"],
               sorted(((s["patno"], site_list[s["site"]]["cno"]) for s in subject_list), key=lambda r: int(r[0])),
               quote_all=False)
    rows = []
    for scan in sorted(scans, key=lambda s: (int(subject_list[s["subject"]]["patno"]), s["when"])):
        s = subject_list[scan["subject"]]
        rows.append([scan["image_id"], s["patno"], s["group"], s["sex"], f"{s['age'] + scan['visit']:.1f}",
                     VISITS[scan["visit"]], "MRI", site_list[s["site"]]["description"], "Original",
                     f"{scan['when']:%m/%d/%Y}", scan["format"], f"{downloaded:%m/%d/%Y}"])
    _write_csv(out / IDA_CSV, IDA_COLUMNS, rows, quote_all=True)
    summary = _summary(out, site_list, subject_list, scans, params, voxel)
    if native:
        summary.update(space=space, native_voxel_mm=[round(voxel * a, 4) for a in NATIVE_ANISOTROPY])
    marker.update(complete=True, summary={k: v for k, v in summary.items() if k != "out"})  # bytes: no paths
    if native:
        marker["native"] = {"direction": NATIVE_DIRECTION, "scans": {
            iid: {"mni_to_native": np.round(pose["mni_to_native"], 6).tolist(),
                  "template_to_native": np.round(pose["template_to_native"], 6).tolist(),
                  "orientation": pose["orientation"],
                  "voxel_mm": pose["voxel_mm"], "shape": list(pose["shape"])} for iid, pose in sorted(poses.items())}}
    _write_atomic(out / MARKER, json.dumps(marker, indent=2).encode())
    summary.setdefault("space", space)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    _print_summary(summary)
    return summary


def _summary(out, site_list, subject_list, scans, params, voxel) -> dict:
    names = ("PD", "Control", "Prodromal", "SWEDD")
    per_site = {}
    for k, site in enumerate(site_list):
        members = [s for s in subject_list if s["site"] == k]
        idx = {s["index"] for s in members}
        per_site[site["name"]] = {
            "cno": site["cno"], "description": site["description"], "subjects": len(members),
            "scans": sum(sc["subject"] in idx for sc in scans),
            "groups": {g: sum(s["group"] == g for s in members) for g in names}}
    groups = {g: sum(s["group"] == g for s in subject_list) for g in names}
    n_dicom = sum(s["format"] == "DCM" for s in scans)
    return {"out": str(out), "subjects": len(subject_list), "scans": len(scans), "dicom": n_dicom,
            "nifti": len(scans) - n_dicom, "groups": groups,
            "pd_share": round(groups["PD"] / max(groups["PD"] + groups["Control"], 1), 4), "sites": per_site,
            "shape": params["shape"], "voxel_mm": round(voxel, 4), "effect": params["effect"], "seed": params["seed"]}


def _print_summary(s: dict) -> None:
    lines = [f"phantom: wrote {s['out']}: {s['subjects']} subjects, {s['scans']} scans ({s['dicom']} DICOM series, "
             f"{s['nifti']} NIfTI), {s['shape']}^3 at {s['voxel_mm']:g} mm, effect {s['effect']:g}, seed {s['seed']}, "
             f"{s['seconds']:.1f} s" + (f"; native space: head pose, skull, neck, bias field, "
                                        f"{' x '.join(f'{z:g}' for z in s['native_voxel_mm'])} mm voxels, "
                                        f"transforms in {MARKER}" if s["space"] == "native" else ""),
             f"  {'site':<10} {'CNO':>4} {'scans':>6} {'PD':>4} {'Control':>8} {'Prodromal':>10} {'SWEDD':>6}"
             "  (subjects by group)"]
    for name, v in s["sites"].items():
        g = v["groups"]
        lines.append(f"  {name:<10} {v['cno']:>4} {v['scans']:>6} {g['PD']:>4} {g['Control']:>8} {g['Prodromal']:>10} "
                     f"{g['SWEDD']:>6}  {v['description']}")
    lines.append(f"phantom: PD share {100 * s['pd_share']:.1f} % of PD+Control subjects. Synthetic data: never a "
                 f"clinical result. Next: fedpd ingest {s['out']} --csv {Path(s['out']) / IDA_CSV} --sites-csv "
                 f"{Path(s['out']) / CENTRES_CSV} --out manifest.csv")
    log.info("\n".join(lines))
