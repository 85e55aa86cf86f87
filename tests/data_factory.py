"""Tiny, hermetic fixtures for the data-pipeline tests: NIfTI volumes, DICOM series, IDA CSVs, manifests.

Everything is written under a caller-given folder (pytest's ``tmp_path``); nothing is downloaded.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["write_nifti", "write_dicom_series", "write_ida_download", "write_sites_csv", "make_manifest",
           "IDA_COLUMNS", "split_and_partition", "scan_cohort", "phantom_cohort"]

IDA_COLUMNS = ["Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
               "Acq Date", "Format", "Downloaded"]


def write_nifti(path: Path, shape=(16, 16, 16), seed: int = 0) -> Path:
    """A small random float32 NIfTI volume with 1 mm voxels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def write_dicom_series(folder: Path, slices: int = 8, size: int = 16, institution: str | None = "Hospital A",
                       seed: int = 0, garbage: bool = False) -> Path:
    """An axial MR Image Storage series that dicom2nifti converts (or, with ``garbage``, files it cannot read)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if garbage:
        for i in range(slices):
            (folder / f"slice_{i:03d}.dcm").write_bytes(b"this is not a DICOM file " * (i + 1))
        return folder
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for i in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "MR"
        ds.Manufacturer = "Phantom"
        if institution is not None:
            ds.InstitutionName = institution
        ds.PatientID = "test"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.SpacingBetweenSlices = 1.0
        ds.SliceLocation = float(i)
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = rng.integers(0, 1000, (size, size), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"slice_{i:03d}.dcm", enforce_file_format=True)
    return folder


def write_ida_download(root: Path, scans: list[dict], csv_name: str = "idaSearch.csv") -> tuple[Path, Path]:
    """Write ``root/PPMI/<Subject>/<Description>/<date-time>/<Image Data ID>/`` folders and the IDA CSV.

    Each scan dict needs ``id, subject, group`` and may give ``kind`` ("nifti" (default), "dicom", "garbage":
    unreadable .dcm files, "empty": a folder without images, "missing": no folder), ``visit``,
    ``institution`` (DICOM only), ``description``. Returns ``(download_folder, csv_path)``.
    """
    root = Path(root)
    download = root / "download"
    rows = []
    for n, s in enumerate(scans):
        desc = s.get("description", "MPRAGE")
        date = dt.date(2020, 1, 1) + dt.timedelta(days=n)
        folder = download / "PPMI" / s["subject"] / desc / f"{date:%Y-%m-%d}_10_00_00.0" / s["id"]
        kind = s.get("kind", "nifti")
        if kind == "nifti":
            write_nifti(folder / f"PPMI_{s['subject']}_{s['id']}.nii.gz", seed=n)
        elif kind in ("dicom", "garbage"):
            write_dicom_series(folder, institution=s.get("institution", "Hospital A"), seed=n,
                               garbage=kind == "garbage")
        elif kind == "empty":
            folder.mkdir(parents=True, exist_ok=True)
        elif kind != "missing":
            raise ValueError(kind)
        rows.append({"Image Data ID": s["id"], "Subject": s["subject"], "Group": s["group"], "Sex": s.get("sex", "M"),
                     "Age": s.get("age", 65), "Visit": s.get("visit", "BL"), "Modality": "MRI", "Description": desc,
                     "Type": "Original", "Acq Date": f"{date:%m/%d/%Y}",
                     "Format": "DCM" if kind in ("dicom", "garbage") else "NiFTI", "Downloaded": "1/1/2024"})
    csv_path = root / csv_name
    pd.DataFrame(rows, columns=IDA_COLUMNS).to_csv(csv_path, index=False)
    return download, csv_path


def write_sites_csv(path: Path, mapping: dict[str, str]) -> Path:
    """A PPMI centre list: ``PATNO,CNO``."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PATNO", "CNO"])
        for k, v in mapping.items():
            w.writerow([k, v])
    return path


def make_manifest(n_subjects_per_stratum: dict[tuple[int, str], int], visits=(1, 3), seed: int = 0,
                  folder: Path | None = None) -> pd.DataFrame:
    """A synthetic manifest: ``{(label, site): n_subjects}``, 1..3 visits per subject, fake paths."""
    rng = np.random.default_rng(seed)
    rows = []
    sid = 1000
    for (label, site), n in sorted(n_subjects_per_stratum.items()):
        for _ in range(n):
            sid += 1
            for v in range(int(rng.integers(visits[0], visits[1] + 1))):
                iid = f"I{sid}{v}"
                rows.append({"image_id": iid, "subject_id": str(sid), "visit": f"V{v:02d}", "label": label,
                             "site": site, "path": str((folder or Path("/nonexistent")) / f"{iid}.nii.gz")})
    return pd.DataFrame(rows)


# --- whole cohorts: the real ingest -> subject split -> natural partition chain, written once ----------------


def split_and_partition(root: Path, val: float = 0.2, test: float = 0.25) -> Path:
    """Subject-level split of ``root/manifest.csv`` (in place), then a natural partition into
    ``root/partition`` (sites/*.csv, server.csv); returns the partition folder."""
    from common.cohort.splits import partition_manifest, split_manifest

    split_manifest(root / "manifest.csv", val=val, test=test, seed=0)
    partition_manifest(root / "manifest.csv", scheme="natural", out=root / "partition", seed=0)
    return root / "partition"


def scan_cohort(root: Path, strata: dict[tuple[int, str], int], seed: int = 0, shape=(16, 16, 16),
                source: str | None = None, **split) -> Path:
    """Random 16^3 NIfTI scans for ``make_manifest(strata)`` under ``root/scans``, split and partitioned;
    returns the partition folder. For tests of the plumbing, where no model has to learn anything."""
    from common.cohort.manifest import write_manifest

    root = Path(root)
    df = make_manifest(strata, seed=seed, folder=root / "scans")
    for i, path in enumerate(df["path"]):
        write_nifti(Path(path), shape=shape, seed=i)
    if source:
        df["source"] = source
    write_manifest(df, root / "manifest.csv")
    return split_and_partition(root, **split)


def phantom_cohort(root: Path, subjects: int = 30, sites: int = 3, shape: int = 32, effect: float = 1.0,
                   seed: int = 1, quiet: bool = False, **split) -> Path:
    """The phantom (MNI space) as an IDA download under ``root/download``, ingested into
    ``root/manifest.csv``, split and partitioned: what a user runs before ``fedpd simulate``. Returns the
    partition folder. ``quiet`` swallows the commands' console output."""
    import contextlib
    import io

    from common.cohort.ingest import ingest
    from simulation.phantom import generate_phantom

    root = Path(root)
    sink = io.StringIO()
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        generate_phantom(root / "download", subjects=subjects, sites=sites, shape=shape, effect=effect, seed=seed)
        ingest(root / "download", csv=root / "download" / "idaSearch.csv",
               sites_csv=root / "download" / "centres.csv", out=root / "manifest.csv")
        return split_and_partition(root, **split)
