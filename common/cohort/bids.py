"""``fedpd ingest --bids``: a BIDS dataset (``participants.tsv`` + ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``) ->
``manifest.csv``, the same table :mod:`common.cohort.ingest` writes from an IDA download.

This is the layout a PPMI-to-BIDS conversion gives (one folder per participant, optionally one per session,
T1w scans already NIfTI). Steps, in order:

1. Check the outputs before any work (reusing :mod:`common.cohort.ingest`'s rules): ``out`` must not be
   ``participants.tsv`` or a scan, must not be a folder, and an existing manifest is replaced only with
   ``force`` (the old file is kept as ``<out>.bak-<YYYYmmdd-HHMMSS>``).
2. Read ``participants.tsv`` (tab-separated; ``n/a`` or empty = missing). It needs ``participant_id``
   (``sub-<label>``, unique), the diagnosis column and the site column; a missing column is an error naming
   the file, the flag that chose the column, and the columns there are.
3. Map the diagnosis (case-insensitive, spaces trimmed): ``pd_values`` -> 1, ``control_values`` -> 0; every
   other value (Prodromal, SWEDD, missing, ...) excludes the subject, with a count printed per value.
   Subject folders missing from ``participants.tsv`` are excluded and counted as well.
4. Find every ``sub-<label>/anat/*_T1w.nii[.gz]`` and ``sub-<label>/ses-<s>/anat/*_T1w.nii[.gz]``; the file
   name must start with its folders' ``sub-``/``ses-`` entities. ``image_id`` is the file name without the
   ``_T1w`` suffix and extension (e.g. ``sub-PPMI3001_ses-BL_run-01``): unique in a valid BIDS dataset and
   stable across runs. ``subject_id`` is the ``participant_id``; ``visit`` the session label.
5. Every scan goes through :func:`common.cohort.scans.check_scans` (cached by file content in
   ``<out folder>/.scan-check.json``). A scan that fails, or whose name breaks the rules above, is left out
   with its reason: the manifest of the good scans is written, a table of the failures printed, and then a
   :class:`DataError` lists them (as :mod:`common.cohort.ingest` does).

Optional manifest columns come from ``participants.tsv`` when it has them: ``sex`` and ``age``.
``source`` is ``bids``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from common.errors import DataError
from common.files import same_file
from common.cohort.ingest import (SCAN_CHECK_CACHE, UNKNOWN_SITE, _check_outputs, _check_writable, _report_failures,
                           write_ingested)
from common.cohort.manifest import validate_manifest
from common.cohort.scans import check_scans

log = logging.getLogger("fedpd.ingest")

__all__ = ["ingest_bids", "PARTICIPANTS", "BIDS_SOURCE"]

PARTICIPANTS = "participants.tsv"
BIDS_SOURCE = "bids"             # the manifest's source column
_MISSING = {"", "n/a", "na", "nan"}
_T1W = re.compile(r"^(?P<stem>.+)_T1w\.nii(\.gz)?$")
_SHOW = 10


def _norm(text) -> str:
    return re.sub(r"\s+", " ", str(text).strip()).lower()


def _listing(items: list, show: int = _SHOW) -> str:
    return ", ".join(map(str, items[:show])) + (f" and {len(items) - show} more" if len(items) > show else "")


def _read_participants(tsv: Path, diagnosis_column: str, site_column: str | None) -> pd.DataFrame:
    if not tsv.is_file():
        raise DataError(f"{tsv}: not found; a BIDS dataset lists its participants in {PARTICIPANTS} at its top "
                        "(columns participant_id and the diagnosis); pass the dataset's root folder with --bids.")
    try:
        df = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{tsv}: cannot read it as a tab-separated table ({exc}); fix or re-export it.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    wanted = [("participant_id", None, None), (diagnosis_column, "--diagnosis-column", "diagnosis")]
    if site_column is not None:
        wanted.append((site_column, "--site-column", "acquisition site"))
    for column, flag, what in wanted:
        if column not in df.columns:
            how = (f"pass the column that holds the {what} with {flag}" if flag else
                   "BIDS requires it (values sub-<label>)")
            raise DataError(f"{tsv}: no column {column!r}" + (f" (chosen by {flag})" if flag else "") + f"; {how}. "
                            f"Its columns are: {', '.join(df.columns)}.")
    for col in df.columns:
        df[col] = df[col].str.strip()
    ids = df["participant_id"]
    bad = [f"line {i + 2}: {v!r}" for i, v in enumerate(ids) if not re.fullmatch(r"sub-[A-Za-z0-9]+", v)]
    if bad:
        raise DataError(f"{tsv}: participant_id must be sub-<label> (letters and digits), as the folder names; bad "
                        f"values at {_listing(bad)}. Fix those rows.")
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise DataError(f"{tsv}: participant_id listed more than once: {_listing(dup)}; keep one row per "
                        "participant.")
    return df


def _labels(df: pd.DataFrame, tsv: Path, column: str, pd_values, control_values) -> tuple[dict, Counter]:
    """participant_id -> label for PD/control rows, and the count of excluded participants per diagnosis."""
    pd_set, hc_set = {_norm(v) for v in pd_values}, {_norm(v) for v in control_values}
    both = sorted(pd_set & hc_set)
    if not pd_set or not hc_set or both:
        raise DataError(f"--pd-values {list(pd_values)} and --control-values {list(control_values)} must both be "
                        f"given and must not share a value{f' (both hold {both})' if both else ''}.")
    labels, excluded = {}, Counter()
    for pid, value in zip(df["participant_id"], df[column]):
        v = _norm(value)
        if v in pd_set:
            labels[pid] = 1
        elif v in hc_set:
            labels[pid] = 0
        else:
            excluded["(missing)" if v in _MISSING else value] += 1
    if not labels:
        values = sorted(set(df[column]))
        raise DataError(f"{tsv}: no participant has a {column!r} value in --pd-values {list(pd_values)} or "
                        f"--control-values {list(control_values)}; the values there are: {_listing(values, 20)}. "
                        "Pass the values this dataset uses.")
    return labels, excluded


def _find_scans(root: Path) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Every T1w NIfTI under sub-*/[ses-*/]anat: rows (image_id, subject_id, visit, path) and the files that
    cannot be used, as (image id, subject folder, reason)."""
    rows, failed = [], []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        anats = [(sub / "anat", "")] + [(ses / "anat", ses.name) for ses in sorted(sub.glob("ses-*")) if ses.is_dir()]
        for anat, session in anats:
            for f in sorted(anat.glob("*_T1w.nii*")) if anat.is_dir() else []:
                m = _T1W.match(f.name)
                if not m or not f.is_file():
                    continue
                stem = m["stem"]
                prefix = f"{sub.name}_{session}" if session else sub.name
                if stem != prefix and not stem.startswith(prefix + "_"):
                    failed.append((stem, sub.name, f"{f}: the file name must start with {prefix}_ (its folders' "
                                                    "entities); rename it"))
                    continue
                rows.append({"image_id": stem, "subject_id": sub.name, "visit": session[4:], "path": f})
    seen = Counter(r["image_id"] for r in rows)
    for iid in sorted(i for i, n in seen.items() if n > 1):
        same = [r for r in rows if r["image_id"] == iid]
        paths = [str(r["path"]) for r in same]
        failed.append((iid, same[0]["subject_id"], f"{len(paths)} files for one scan ({', '.join(paths)}); keep "
                                                   "one (.nii or .nii.gz)"))
    return [r for r in rows if seen[r["image_id"]] == 1], failed


def ingest_bids(bids_dir, out, *, diagnosis_column: str = "group", pd_values=("PD",),
                control_values=("Control", "HC"), site_column: str | None = "site",
                force: bool = False) -> pd.DataFrame:
    """Build ``manifest.csv`` from a BIDS dataset (see the module docstring for the rules).

    Args:
        bids_dir: the dataset's root folder (holds ``participants.tsv`` and the ``sub-*`` folders).
        out: the manifest CSV to write (a new file, or an existing one with ``force``).
        diagnosis_column: the ``participants.tsv`` column with the diagnosis.
        pd_values: diagnosis values labelled PD (1), compared case-insensitively.
        control_values: diagnosis values labelled control (0); other values are excluded and counted.
        site_column: the ``participants.tsv`` column with the acquisition site; ``None``: every subject gets
            site ``unknown`` (with a warning).
        force: replace an existing ``out``, keeping the old file as ``<out>.bak-<YYYYmmdd-HHMMSS>``.

    Returns:
        The manifest rows written (good scans only).

    Raises:
        DataError: an output that would overwrite an input or an earlier manifest, a missing or bad
        ``participants.tsv`` or column (before any scan is read), or, after writing the manifest of the good
        scans, the list of scans that could not be used.
    """
    root, out = Path(bids_dir).absolute(), Path(out).absolute()
    tsv = root / PARTICIPANTS
    if same_file(out, tsv):
        raise DataError(f"{out}: --out is the dataset's {PARTICIPANTS}; ingest never overwrites its input: choose "
                        "another --out (a new manifest file).")
    _check_outputs(tsv, None, out, out.parent, force)
    if not root.is_dir():
        raise DataError(f"{root}: BIDS folder not found; pass the dataset's root folder (the one holding "
                        f"{PARTICIPANTS} and the sub-* folders).")
    df = _read_participants(tsv, diagnosis_column, site_column)
    labels, excluded = _labels(df, tsv, diagnosis_column, pd_values, control_values)
    found, misnamed = _find_scans(root)
    hit = [str(r["path"]) for r in found if same_file(out, r["path"])]
    if hit:
        raise DataError(f"{out}: --out is a scan of the dataset ({hit[0]}); choose another --out.")
    _check_writable(out.parent, "output")

    listed = set(df["participant_id"])
    unlisted = sorted({r["subject_id"] for r in found} - listed)
    scans = [r for r in found if r["subject_id"] in labels]
    log.info(f"ingest: {len(df)} participants in {tsv.name}; {len(labels)} PD/control; {len(found) + len(misnamed)} T1w "
             f"scan(s) found, {len(scans)} of PD/control participants")
    for value, n in sorted(excluded.items()):
        log.info(f"ingest: excluded {n} participant(s) with {diagnosis_column} {value!r} (not in --pd-values or "
                 "--control-values)")
    if unlisted:
        log.warning(f"ingest: excluded {len(unlisted)} subject folder(s) not listed in {tsv.name} (no diagnosis): "
                    f"{_listing(unlisted)}")
    without = sorted(set(labels) - {r["subject_id"] for r in scans})
    if without:
        log.warning(f"ingest: warning: {len(without)} PD/control participant(s) have no T1w scan: {_listing(without)}")
    failed = [(iid, why) for iid, sub, why in misnamed if sub in labels]  # excluded subjects' files don't count

    cache = out.parent / SCAN_CHECK_CACHE
    problems = check_scans([{"image_id": r["image_id"], "path": str(r["path"])} for r in scans], cache_file=cache,
                           progress=True, desc="scan check")
    bad = {p.image_id for p in problems}
    failed += [(p.image_id, f"{p.path}: {p.problem}") for p in problems]
    scans = [r for r in scans if r["image_id"] not in bad]
    log.info(f"ingest: scan check: {len(scans)} of {len(scans) + len(bad)} scan(s) usable (results cached in {cache})")

    failed.sort()
    info = df.set_index("participant_id")
    sites = _sites(info, site_column, sorted({r["subject_id"] for r in scans}), tsv)
    rows = pd.DataFrame({
        "image_id": [r["image_id"] for r in scans], "subject_id": [r["subject_id"] for r in scans],
        "visit": [r["visit"] for r in scans], "label": [labels[r["subject_id"]] for r in scans],
        "site": [sites[r["subject_id"]] for r in scans], "path": [str(r["path"]) for r in scans],
    })
    if "sex" in info.columns:
        rows["sex"] = [_value(info.at[r["subject_id"], "sex"]) for r in scans]
    if "age" in info.columns:
        rows["age"] = pd.to_numeric(pd.Series([_value(info.at[r["subject_id"], "age"]) for r in scans],
                                              dtype=object), errors="coerce").to_numpy()
    rows["source"] = BIDS_SOURCE
    if rows.empty:
        if failed:
            _report_failures(failed)
        raise DataError(f"{root}: no usable T1w scan of a PD/control participant ({len(failed)} failed"
                        f"{', see the table above' if failed else ''}); nothing written to {out}.")
    validate_manifest(rows, tsv)
    return write_ingested(rows, out, force, failed, None, "fix or remove the failed files and re-run with --force")


def _value(v):
    return None if v is None or _norm(v) in _MISSING else v


def _sites(info: pd.DataFrame, column: str | None, subjects: list[str], tsv: Path) -> dict[str, str]:
    sites = {s: (_value(info.at[s, column]) if column else None) or UNKNOWN_SITE for s in subjects}
    unknown = [s for s in subjects if sites[s] == UNKNOWN_SITE]
    if unknown:
        why = f"no {column!r} value in {tsv.name}" if column else "no --site-column"
        log.warning(f"ingest: warning: {len(unknown)} subject(s) have site {UNKNOWN_SITE!r} ({why}): {_listing(unknown)}; "
                    "fill in the site to use the natural per-site partition")
    return sites
