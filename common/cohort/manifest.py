"""The manifest: the one table every stage reads (DESIGN.md, "Manifest").

CSV, one row per scan. Required columns ``image_id, subject_id, visit, label, site, path``; optional
``sex, age, acq_date, description, split``; other columns (e.g. ``origin_site``) are kept as they are.
``path`` is a NIfTI file, absolute or relative to the manifest's folder.

:func:`validate_manifest` is the single set of rules every stage applies:

- every required column is present;
- ``image_id`` is non-empty and unique;
- ``label`` is 0 (control) or 1 (PD);
- ``subject_id``, ``site`` and ``path`` are non-empty;
- ``split``, where present (always, with ``require_split``), is one of :data:`SPLITS` on every row;
- a subject has one label, one site and one split over all its scans. One site per subject is a rule,
  not a preference: partitions hand whole subjects to sites, so a subject seen at two centres would
  end up in two site files. Fix the sites table (or drop the odd scans) instead.

Image files are not checked by validation: :mod:`common.cohort.scans` checks them (ingest, preflight). Error messages count lines as in the CSV file (header = line 1).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from common.errors import DataError

__all__ = ["REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "SPLITS", "LABELS", "UNSAFE_SCAN_SPLIT", "read_manifest", "write_manifest",
           "validate_manifest"]

REQUIRED_COLUMNS = ("image_id", "subject_id", "visit", "label", "site", "path")
OPTIONAL_COLUMNS = ("sex", "age", "acq_date", "description", "source", "split", "unsafe_split")  # source: phantom | ppmi | bids
UNSAFE_SCAN_SPLIT = "by-scan"  # unsafe_split value of `fedpd split --unsafe-split-by-scan` (leakage demonstration only)
SPLITS = ("train", "val", "test")
LABELS = {0: "control", 1: "PD"}
# Read as text so ids such as "3001" or "I0123" keep their exact spelling.
_TEXT_COLUMNS = ("image_id", "subject_id", "visit", "site", "path", "sex", "acq_date", "description", "split",
                 "origin_site", "unsafe_split")
_SHOW = 10  # how many offending rows an error message lists


def _blank(series: pd.Series) -> pd.Series:
    """True where a cell is missing or only whitespace."""
    return series.isna() | (series.astype(str).str.strip() == "")


def _lines(df: pd.DataFrame, mask) -> list[int]:
    """CSV line numbers (header = line 1) of the rows selected by a boolean mask."""
    return [i + 2 for i, hit in enumerate(list(mask)) if hit]


def _listing(items: list, what: str = "") -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    more = f" and {len(items) - _SHOW} more{what}" if len(items) > _SHOW else ""
    return shown + more


def _show(v) -> str:
    """A cell as users should read it in a message ('(empty)' for a missing cell, no numpy reprs)."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "(empty)"
    return repr(v.item() if hasattr(v, "item") else v)


def _label_value(v) -> int | None:
    """0 or 1 for a valid label cell (int, float or text), else None."""
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v in ("0", "1") else None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f in (0.0, 1.0) else None


def validate_manifest(df: pd.DataFrame, source, require_split: bool = False) -> None:
    """Check a manifest table against the rules in this module's docstring.

    Args:
        df: the manifest rows, in file order.
        source: what to call the table in messages (usually the CSV path).
        require_split: also require a valid ``split`` on every row (after ``fedpd split``).

    Raises:
        DataError: naming ``source``, the offending lines/keys and the fix.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {', '.join(missing)}; a manifest needs the columns "
                        f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}). "
                        "Re-create it with `fedpd ingest`.")
    for col in ("image_id", "subject_id", "site", "path"):
        bad = _lines(df, _blank(df[col]))
        if bad:
            raise DataError(f"{source}: empty {col} on line(s) {_listing(bad)}; fill it in or drop those rows.")
    ids = df["image_id"].astype(str).str.strip()
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        where = [f"{i} (lines {', '.join(str(p + 2) for p in range(len(ids)) if ids.iloc[p] == i)})"
                 for i in sorted(set(dup))]
        raise DataError(f"{source}: duplicate image_id {_listing(where)}; each scan must appear once, "
                        "drop the repeated rows.")
    labels = [_label_value(v) for v in df["label"]]
    bad = [f"line {i + 2}: {_show(df['label'].iloc[i])}" for i, v in enumerate(labels) if v is None]
    if bad:
        raise DataError(f"{source}: label must be 0 (control) or 1 (PD); bad values at {_listing(bad)}. "
                        "Fix those rows or drop them.")
    has_split = "split" in df.columns
    if require_split and not has_split:
        raise DataError(f"{source}: no split column; run `fedpd split {source}` first.")
    if has_split:
        empty = _blank(df["split"])
        if require_split or not empty.all():
            bad = _lines(df, empty)
            if bad:
                raise DataError(f"{source}: empty split on line(s) {_listing(bad)}; re-run `fedpd split` to "
                                "assign every row.")
            val = df["split"].astype(str).str.strip()
            wrong = [f"line {i + 2}: {_show(v)}" for i, v in enumerate(val) if v not in SPLITS]
            if wrong:
                raise DataError(f"{source}: split must be one of {', '.join(SPLITS)}; bad values at "
                                f"{_listing(wrong)}. Re-run `fedpd split`.")
    _check_per_subject(df, source, labels, has_split)


def _check_per_subject(df: pd.DataFrame, source, labels: list[int], has_split: bool) -> None:
    """A subject carries one label, one site and (when split) one split over all its scans."""
    t = pd.DataFrame({"subject_id": df["subject_id"].astype(str).str.strip(), "label": labels,
                      "site": df["site"].astype(str).str.strip()})
    checks = [("label", "labels", "fix the Group of that subject's rows (one diagnosis per subject)"),
              ("site", "sites", "give the subject one site in the sites table, or drop the odd scans")]
    unsafe = "unsafe_split" in df.columns and bool((df["unsafe_split"].astype(str).str.strip() == UNSAFE_SCAN_SPLIT).all())
    if has_split and not unsafe and not _blank(df["split"]).all():
        t["split"] = df["split"].astype(str).str.strip().to_numpy()
        checks.insert(0, ("split", "splits", "subjects shared across splits must be 0: re-run `fedpd split`, "
                                             "which assigns whole subjects"))
    for col, plural, fix in checks:
        per = t.groupby("subject_id", sort=True)[col].agg(lambda s: sorted(set(map(str, s))))
        bad = [f"{sid} ({'/'.join(v)})" for sid, v in per.items() if len(v) > 1]
        if bad:
            raise DataError(f"{source}: {len(bad)} subject(s) with scans in different {plural}: {_listing(bad)}; "
                            f"{fix}.")


def read_manifest(path, require_split: bool = False, *, ignore_split: bool = False) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Args:
        path: the manifest CSV.
        require_split: also require a valid ``split`` column (see :func:`validate_manifest`).
        ignore_split: do not check an existing ``split`` column (``fedpd split`` replaces it anyway).

    Returns:
        The rows with ids as ``str``, ``label`` as ``int`` and ``path`` made absolute (relative paths are
        taken from the manifest's folder).

    Raises:
        DataError: the file is missing or unreadable, or breaks a manifest rule.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; create it with `fedpd ingest` (or pass the right path).")
    try:
        df = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the manifest as CSV ({exc}); re-create it with `fedpd ingest`.") from exc
    check_split = "split" in df.columns and not ignore_split
    validate_manifest(df if check_split or "split" not in df.columns else df.drop(columns=["split"]), path,
                      require_split=require_split and not ignore_split)
    df["label"] = [_label_value(v) for v in df["label"]]
    df["label"] = df["label"].astype(int)
    for col in ("image_id", "subject_id", "site", "path") + (("split",) if check_split else ()):
        df[col] = df[col].astype(str).str.strip()
    root = path.resolve().parent
    df["path"] = [str(p if p.is_absolute() else (root / p)) for p in map(Path, df["path"])]
    return df


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Required columns first, then the optional ones present, then anything else in its order."""
    known = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in df.columns]
    return df[known + [c for c in df.columns if c not in known]]


def write_manifest(df: pd.DataFrame, path) -> Path:
    """Write a manifest atomically (temp file in the same folder, then ``os.replace``).

    Paths under the manifest's folder are written relative to it, others absolute, so a folder of
    manifest + images can be moved as a whole. The table is not validated here: callers validate.

    Raises:
        DataError: the folder cannot be created or written.
    """
    path = Path(path).absolute()
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the folder {folder} for {path.name} ({exc.strerror or exc}); "
                        "choose an --out in a writable folder.") from exc
    out = _ordered(df.copy())
    if "path" in out.columns:
        out["path"] = [_relative_if_under(p, folder) for p in out["path"]]
    tmp = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False,
                                         newline="") as fh:
            tmp = fh.name
            out.to_csv(fh, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise DataError(f"cannot write {path} ({exc.strerror or exc}); make {folder} writable or choose another "
                        "--out.") from exc
    return path


def _relative_if_under(p, folder: Path) -> str:
    p = Path(str(p))
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(p)
