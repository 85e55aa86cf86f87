"""The scan check: is a file one usable 3D T1 volume? Run on every scan before long work starts.

One rule set, used everywhere a scan enters fedpd: ``fedpd ingest`` (after DICOM conversion), the
preflight of ``fedpd simulate`` / ``fedpd baseline`` and the ServerApp, and the training pipeline
itself (:class:`common.learning.transforms.CheckScand`). A scan passes when its file exists, reads as NIfTI, is
not truncated, holds one 3D volume with at least :data:`~common.learning.transforms.MIN_SLICES` voxels along
every axis, has only finite voxels, some voxel > 0, is not constant, and has a usable affine.

The check reads every voxel, so results are cached by file content: the cache key is the file's
fingerprint (size, mtime and a hash of its first and last 64 KiB, :func:`common.learning.data.file_fingerprint`)
plus :data:`SCAN_CHECK_VERSION`, so a second run over the same files costs seconds and an edited file
is checked again. The cache is a small JSON file chosen by the caller (e.g. beside the partition);
it holds fingerprints and problem texts only, no paths of other files and no voxels.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import nibabel as nib
import numpy as np

from common.errors import DataError
from common.learning.data import file_fingerprint
from common.learning.transforms import NIFTI_READ_ERRORS, CheckScand, LoadNiftid

__all__ = ["SCAN_CHECK_VERSION", "ScanProblem", "scan_problem", "check_scans", "format_problems", "preflight_scans"]

SCAN_CHECK_VERSION = 1  # bump when scan_problem's rules change (invalidates every cache entry)
_SHOW = 50  # rows shown in a problem table before "... and N more"


@dataclass(frozen=True)
class ScanProblem:
    """One scan that failed the check."""

    image_id: str
    path: str
    problem: str
    where: str = ""  # which table the row came from, e.g. "sites/10.csv" or "server.csv"


def _header_problem(path: str) -> str | None:
    """What is wrong with a file by its NIfTI header alone (cheap), or ``None``."""
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except NIFTI_READ_ERRORS as exc:
        return (f"cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-download or re-convert it, or drop "
                "the row")
    if not path.endswith(".gz") and hasattr(img, "header") and "vox_offset" in img.header:
        need = int(img.header["vox_offset"]) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if os.path.getsize(path) < need:
            return f"is truncated ({os.path.getsize(path)} of {need} bytes); re-download or re-convert it"
    return None


def scan_problem(path) -> str | None:
    """Why ``path`` is not a usable 3D T1 volume (a sentence with the fix), or ``None`` when it is.

    Reads the whole image (compressed-data truncation, NaN/Inf and empty images are only seen then).
    The message does not repeat the path; callers put it beside the image id.
    """
    path = str(Path(str(path)).expanduser().absolute())
    if not os.path.isfile(path):
        return "image file not found; restore the file or fix the manifest's path column (or drop the row)"
    problem = _header_problem(path)
    if problem:
        return problem
    item = {"image": path}
    try:
        CheckScand()(LoadNiftid()(item))
    except DataError as exc:
        text = str(exc)
        return text[len(path) + 2:] if text.startswith(path + ": ") else text
    return None


def _load_cache(cache_file: Path | None) -> dict[str, str | None]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is only a cache: check again and rewrite it
    if not isinstance(data, dict) or data.get("version") != SCAN_CHECK_VERSION or not isinstance(data.get("checked"), dict):
        return {}
    return dict(data["checked"])


def _save_cache(cache_file: Path | None, checked: Mapping[str, str | None]) -> None:
    if cache_file is None:
        return
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": SCAN_CHECK_VERSION, "checked": dict(checked)}, fh)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # an unwritable cache costs time on the next run, never correctness


def check_scans(rows: Iterable[Mapping], cache_file=None, progress: bool = False, desc: str = "scan check") -> list[ScanProblem]:
    """Check every row's scan; return the failures (all of them, in row order).

    Args:
        rows: dicts (or a DataFrame) with ``image_id`` and ``path`` (absolute, or relative to the current
            folder) and optionally ``where`` (the table the row came from, shown in the report).
        cache_file: JSON cache of earlier results, keyed by file content; ``None`` checks without a cache.
        progress: show a tqdm bar.
        desc: the bar's label.
    """
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else [dict(r) for r in rows]
    cache_file = Path(cache_file) if cache_file is not None else None
    cache = _load_cache(cache_file)
    fresh: dict[str, str | None] = {}
    problems = []
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=desc, unit="scan", leave=False)
    for rec in iterator:
        path = str(Path(str(rec["path"])).expanduser().absolute())
        fingerprint = file_fingerprint(path)
        if fingerprint is None:
            problem = scan_problem(path)  # missing file: never cached
        else:
            if fingerprint not in fresh:
                fresh[fingerprint] = cache[fingerprint] if fingerprint in cache else scan_problem(path)
            problem = fresh[fingerprint]
        if problem:
            problems.append(ScanProblem(str(rec["image_id"]), path, problem, str(rec.get("where", "") or "")))
    if fresh != cache:
        _save_cache(cache_file, fresh)  # only the files seen now: entries of deleted files do not pile up
    return problems


def format_problems(problems: list[ScanProblem], total: int | None = None) -> str:
    """A table of failed scans, one line each: where, image id, path, problem and fix."""
    head = f"{len(problems)}" + (f" of {total}" if total is not None else "") + " scan(s) cannot be used"
    lines = [head + "; fix or drop these rows:"]
    for p in problems[:_SHOW]:
        where = f"{p.where}: " if p.where else ""
        lines.append(f"  {where}image_id {p.image_id}: {p.path}: {p.problem}")
    if len(problems) > _SHOW:
        lines.append(f"  ... and {len(problems) - _SHOW} more")
    return "\n".join(lines)


def preflight_scans(rows: Iterable[Mapping], cache_file=None, progress: bool = False) -> int:
    """Check every scan; raise one :class:`DataError` listing all failures, else return the count checked."""
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else [dict(r) for r in rows]
    problems = check_scans(records, cache_file=cache_file, progress=progress)
    if problems:
        raise DataError(format_problems(problems, total=len(records)))
    return len(records)
