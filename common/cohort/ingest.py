"""``fedpd ingest``: a PPMI IDA download (search-results CSV + image tree) -> ``manifest.csv``.

Steps, in order (DESIGN.md, "Input formats"):

1. Check that the output folders can be written, before anything is converted.
2. Read the IDA CSV (needs at least ``Image Data ID, Subject, Group``), reject duplicate ids, map
   ``Group`` to a label (:data:`GROUP_LABELS`) or exclude it with a printed count
   (:data:`EXCLUDED_GROUPS`); any other Group value is an error listing the values and lines.
3. Index the tree once (``os.walk``) for folders named like the wanted image ids, wherever they are
   (IDA writes ``PPMI/<Subject>/<Description>/<date-time>/<Image Data ID>/``).
4. A folder with one ``.nii``/``.nii.gz`` is used as is. A DICOM series (``.dcm``) is converted once
   with dicom2nifti into ``<nifti_cache>/<image_id>.nii.gz``: written under a temporary name and renamed,
   so an interrupted run leaves no half file, and a re-run reuses it (cached by image id: IDA ids are
   immutable; delete the file to force a new conversion).
5. Every NIfTI (given or converted) goes through :func:`common.cohort.scans.check_scans` (readable, not
   truncated, one 3D volume of >= 8 voxels per axis, finite, some voxel > 0, not constant, usable
   affine); results are cached by file content in ``<nifti_cache>/.scan-check.json``. A failing scan is
   excluded with its reason, like a failed conversion.
6. Site per subject: the ``--sites-csv`` (``PATNO,CNO``; the CNO value kept as written), else the DICOM
   ``InstitutionName`` of the subject's series, else ``unknown`` with a warning naming the subjects.

Nothing the user gave is overwritten (DESIGN.md, "Bad input"): ``out`` equal to the IDA CSV or the
sites CSV, or a NIfTI cache equal to one of them, is refused before any work; an existing ``out`` is
refused unless ``force``, and then the old file is kept beside it as ``<out>.bak-<YYYYmmdd-HHMMSS>``
(an existing backup is never replaced). SIGTERM is turned into ``KeyboardInterrupt`` while ingest
runs: temporary files are removed, and what was kept (cached conversions, manifest or not) is printed.

Failure policy for single scans (image folder missing, no image in it, unreadable DICOM series, failed
scan check): the
other scans are still processed and converted, the manifest of the good rows is written, a table of
the failed ids is printed, and then a :class:`DataError` listing them is raised, so the exit code is
non-zero and nothing already converted is lost. Problems with the tables themselves (missing columns,
duplicate ids, unknown groups) stop the run before any conversion.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from common.cohort.manifest import validate_manifest, write_manifest
from common.cohort.scans import check_scans
from common.errors import DataError
from common.files import same_file

log = logging.getLogger("fedpd.ingest")

__all__ = ["PHANTOM_MARKER", "ingest", "IDA_COLUMNS", "IDA_REQUIRED", "GROUP_LABELS", "EXCLUDED_GROUPS", "UNKNOWN_SITE"]

IDA_COLUMNS = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
               "Acq Date", "Format", "Downloaded")
IDA_REQUIRED = ("Image Data ID", "Subject", "Group")
# Group spellings (lower case, spaces collapsed) -> label. PD = 1, control = 0.
GROUP_LABELS = {"pd": 1, "parkinson's disease": 1, "parkinsons disease": 1,
                "control": 0, "hc": 0, "healthy control": 0, "healthy controls": 0}
# PPMI cohorts that are neither PD nor healthy control: excluded with a printed count.
EXCLUDED_GROUPS = frozenset({"prodromal", "swedd", "gencohort", "gencohort pd", "gencohort unaff", "genreg pd",
                             "genreg unaff", "phantom"})
UNKNOWN_SITE = "unknown"
SCAN_CHECK_CACHE = ".scan-check.json"  # in the NIfTI cache folder
_NIFTI = (".nii", ".nii.gz")
_SHOW = 10  # ids listed in a warning before "and N more"


def _norm(text) -> str:
    return re.sub(r"\s+", " ", str(text).strip()).lower()


def _check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and prove a file can be written there, or raise a DataError with the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedpd-write-test."):
            pass
    except OSError as exc:
        raise DataError(f"{what} folder {folder} is not writable ({exc.strerror or exc}); choose a writable "
                        "location or fix its permissions. Nothing was converted.") from exc


def _read_ida(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise DataError(f"{csv}: IDA CSV not found; pass the search-results CSV exported from IDA with --csv.")
    try:
        df = pd.read_csv(csv, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv}: cannot read it as CSV ({exc}); export the search results from IDA again.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in IDA_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: missing column(s) {', '.join(missing)}; fedpd needs at least "
                        f"{', '.join(IDA_REQUIRED)}. IDA's search-results CSV has the columns "
                        f"{', '.join(IDA_COLUMNS)}: download it again from the IDA search page.")
    for col in IDA_REQUIRED:
        df[col] = df[col].fillna("").str.strip()
        empty = [i + 2 for i, v in enumerate(df[col]) if not v]
        if empty:
            raise DataError(f"{csv}: empty {col!r} on line(s) {', '.join(map(str, empty[:10]))}; fill it in or "
                            "drop those rows.")
    dup = df["Image Data ID"][df["Image Data ID"].duplicated(keep=False)]
    if len(dup):
        where = [f"{i} (lines {', '.join(str(p + 2) for p in dup.index[dup == i])})" for i in sorted(set(dup))]
        raise DataError(f"{csv}: duplicate Image Data ID {', '.join(where[:10])}; each image must appear once, "
                        "drop the repeated rows.")
    return df


def _labels(df: pd.DataFrame, csv: Path) -> tuple[pd.DataFrame, Counter]:
    """Rows with a PD/control label (``label`` column added) and the count of excluded rows per group."""
    norm = df["Group"].map(_norm)
    unknown = sorted(set(norm) - set(GROUP_LABELS) - EXCLUDED_GROUPS)
    if unknown:
        where = [f"{df['Group'][norm == g].iloc[0]!r} (lines "
                 f"{', '.join(str(i + 2) for i in list(df.index[norm == g])[:10])})" for g in unknown]
        raise DataError(f"{csv}: unknown Group value(s) {'; '.join(where)}. Known labels: PD -> 1, Control -> 0 "
                        f"(aliases: {', '.join(sorted(GROUP_LABELS))}); excluded cohorts: "
                        f"{', '.join(sorted(EXCLUDED_GROUPS))}. Fix the Group column or drop those rows.")
    excluded = Counter(df["Group"][norm.isin(EXCLUDED_GROUPS)])
    kept = df[norm.isin(list(GROUP_LABELS))].copy()
    kept["label"] = norm[kept.index].map(GROUP_LABELS).astype(int)
    per = kept.groupby("Subject").agg(n=("label", "nunique"), groups=("Group", lambda g: "/".join(sorted(set(g)))))
    bad = [f"{s} ({g})" for s, n, g in zip(per.index, per["n"], per["groups"]) if n > 1]
    if bad:
        raise DataError(f"{csv}: subject(s) listed both as PD and as control: {', '.join(bad[:10])}; one diagnosis "
                        "per subject: fix the Group column or drop the odd rows.")
    return kept, excluded


def _read_sites(sites_csv: Path | None) -> dict[str, str]:
    if sites_csv is None:
        return {}
    if not sites_csv.is_file():
        raise DataError(f"{sites_csv}: sites CSV not found; pass PPMI's centre list (columns PATNO,CNO) or leave "
                        "--sites-csv out.")
    df = pd.read_csv(sites_csv, dtype=str)
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("PATNO", "CNO") if c not in df.columns]
    if missing:
        raise DataError(f"{sites_csv}: missing column(s) {', '.join(missing)}; the sites CSV needs PATNO "
                        "(subject) and CNO (centre number), as in PPMI's centre list.")
    df = df.dropna(subset=["PATNO", "CNO"])
    df["PATNO"], df["CNO"] = df["PATNO"].str.strip(), df["CNO"].str.strip()
    per = df.groupby("PATNO")["CNO"].agg(lambda s: sorted(set(s)))
    bad = [f"{p} ({'/'.join(v)})" for p, v in per.items() if len(v) > 1]
    if bad:
        raise DataError(f"{sites_csv}: subject(s) with more than one CNO: {', '.join(bad[:10])}; keep one centre "
                        "per subject.")
    return {p: v[0] for p, v in per.items()}


def _index_tree(download: Path, wanted: set[str]) -> dict[str, list[Path]]:
    """Folders named like a wanted image id, anywhere under ``download`` (one walk)."""
    found: dict[str, list[Path]] = {}
    for root, dirs, _ in os.walk(download):
        for d in dirs:
            if d in wanted:
                found.setdefault(d, []).append(Path(root) / d)
    return found


def _institution(files: list[Path]) -> str | None:
    """InstitutionName from the first readable header of a DICOM series, if any."""
    import pydicom

    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["InstitutionName"])
        except Exception:  # noqa: BLE001 - any unreadable file: try the next one
            continue
        name = str(ds.get("InstitutionName", "") or "").strip()
        if name:
            return name
    return None


def _why(folder: Path, exc: Exception) -> str:
    """A readable reason for a failed conversion (the converter's own errors can be terse)."""
    import pydicom

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    readable = 0
    for f in files:
        try:
            pydicom.dcmread(f, stop_before_pixels=True)
            readable += 1
        except Exception:  # noqa: BLE001 - counting unreadable files is the point
            pass
    if not readable:
        return f"none of its {len(files)} .dcm files is a readable DICOM file"
    return f"{type(exc).__name__}: {exc}"


def _convert(series: Path, target: Path) -> None:
    """Convert one DICOM series to ``target`` (.nii.gz) via a temporary file and an atomic rename."""
    import dicom2nifti

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:-7]}.", suffix=".tmp.nii.gz")
    os.close(fd)
    try:
        dicom2nifti.dicom_series_to_nifti(str(series), tmp, reorient_nifti=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _locate(iid: str, folders: list[Path] | None, download: Path) -> tuple[str, object]:
    """("nifti", path) | ("dicom", [files]) | ("error", message) for one image id."""
    if not folders:
        return "error", (f"no folder named {iid} under {download}; download this image from IDA again or drop its "
                         "row from the CSV")
    if len(folders) > 1:
        return "error", f"{len(folders)} folders named {iid} ({', '.join(map(str, folders))}); keep one"
    folder = folders[0]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    nifti = [p for p in files if p.name.lower().endswith(_NIFTI)]
    dicom = [p for p in files if p.suffix.lower() == ".dcm"]
    if len(nifti) == 1:
        return "nifti", nifti[0]
    if len(nifti) > 1:
        return "error", f"{folder} holds {len(nifti)} NIfTI files; keep exactly one"
    if dicom:
        return "dicom", dicom
    return "error", f"{folder} holds no .nii/.nii.gz/.dcm file; download this image from IDA again"


PHANTOM_MARKER = "phantom.json"  # written by `fedpd phantom` at the top of its download folder


def _check_outputs(csv: Path, sites_csv: Path | None, out: Path, cache: Path, force: bool) -> None:
    """Refuse outputs that would overwrite what the user gave, before any work."""
    inputs = [("--csv", csv), ("--sites-csv", sites_csv)]
    for flag, path in inputs:
        if same_file(out, path):
            raise DataError(f"{out}: --out is the same file as {flag} {path}; ingest never overwrites its input: "
                            "choose another --out (a new manifest file). Nothing was converted.")
    for flag, path in inputs + [("--out", out)]:
        if same_file(cache, path):
            raise DataError(f"{cache}: --nifti-cache is the same path as {flag} {path}; the NIfTI cache is a folder "
                            "for converted scans: choose another folder (default: <out folder>/nifti). Nothing was "
                            "converted.")
    if out.is_dir():
        raise DataError(f"{out}: --out is a folder; pass the manifest file to write, e.g. {out / 'manifest.csv'}.")
    if out.exists() and not force:
        try:
            with open(out, encoding="utf-8", errors="replace") as fh:
                has_split = "split" in [c.strip() for c in fh.readline().split(",")]
        except OSError:
            has_split = False
        note = " (with a split column, which a new ingest would drop)" if has_split else ""
        raise DataError(f"{out}: a manifest already exists here{note}; ingest does not replace it: pass --force to "
                        f"replace it (the old file is kept beside it as {out.name}.bak-<date-time>) or choose another "
                        "--out. Nothing was converted.")


def _backup(out: Path) -> Path:
    """Keep the existing ``out`` as ``<out>.bak-<YYYYmmdd-HHMMSS>[-k]`` (a hard link, else a copy; never
    replacing an existing backup)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        backup = out.with_name(f"{out.name}.bak-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            try:
                os.link(out, backup)  # atomic; FileExistsError if that backup exists
            except FileExistsError:
                raise
            except OSError:  # no hard links here: copy into a new file
                with open(out, "rb") as src, open(backup, "xb") as dst:
                    shutil.copyfileobj(src, dst)
            return backup
        except FileExistsError:
            continue
        except OSError as exc:
            raise DataError(f"cannot keep a backup of {out} as {backup} ({exc.strerror or exc}); make "
                            f"{out.parent} writable or choose another --out.") from exc
    raise DataError(f"{out}: too many backups {out.name}.bak-{stamp}*; move some away or choose another --out.")


def _temp_files(*folders: Path) -> set[Path]:
    """Our hidden temporary files (``.<name>.<random>.tmp[.nii.gz]``) in ``folders``."""
    return {p for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(".") and ".tmp" in p.name}


def _terminate_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt (main thread only); returns what :func:`_restore` needs."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not break the clean-up
        raise KeyboardInterrupt

    return (signal.signal(signal.SIGTERM, handler),)


def _restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous[0] if previous[0] is not None else signal.SIG_DFL)


def ingest(download, csv, sites_csv=None, out="manifest.csv", nifti_cache=None, force=False) -> pd.DataFrame:
    """Build ``manifest.csv`` from a PPMI IDA download (see the module docstring for the rules).

    Args:
        download: folder holding the ``PPMI/`` image tree (searched recursively).
        csv: the IDA search-results CSV.
        sites_csv: optional subject -> centre table with columns ``PATNO,CNO``.
        out: the manifest CSV to write (a new file, or an existing one with ``force``).
        nifti_cache: where DICOM series are converted to (default ``<folder of out>/nifti``); also holds
            the scan-check cache ``.scan-check.json``.
        force: replace an existing ``out``, keeping the old file as ``<out>.bak-<YYYYmmdd-HHMMSS>``.

    Returns:
        The manifest rows written (good scans only).

    Raises:
        DataError: an output that would overwrite an input or an earlier manifest, bad input tables or
        unwritable output (before any conversion), or, after writing the manifest of the good scans, the
        list of scans that could not be used.
        KeyboardInterrupt: Ctrl-C or SIGTERM; temporary files are removed and what was kept is printed.
    """
    download, csv, out = Path(download).absolute(), Path(csv).absolute(), Path(out).absolute()
    sites_csv = Path(sites_csv).absolute() if sites_csv is not None else None
    cache = Path(nifti_cache).absolute() if nifti_cache is not None else out.parent / "nifti"
    _check_outputs(csv, sites_csv, out, cache, force)
    _check_writable(out.parent, "output")
    _check_writable(cache, "NIfTI cache")
    if not download.is_dir():
        raise DataError(f"{download}: download folder not found; pass the folder that holds the PPMI/ image tree.")
    state = {"converted": 0, "written": False, "existed": out.exists()}
    before = _temp_files(out.parent, cache)
    previous = _terminate_as_interrupt()
    try:
        return _ingest(download, csv, sites_csv, out, cache, force, state)
    except KeyboardInterrupt:
        for p in _temp_files(out.parent, cache) - before:
            p.unlink(missing_ok=True)
        kept = sum(1 for p in cache.glob("*.nii.gz") if not p.name.startswith("."))
        done = (f"{out} was written before the interruption" if state["written"] else
                f"no manifest was written ({out} {'is unchanged' if state['existed'] else 'does not exist'})")
        log.warning(f"ingest: interrupted: {kept} converted NIfTI file(s) stay cached in {cache} ({state['converted']} "
                    f"converted by this run; a re-run reuses them); {done}; no temporary file was left.")
        raise
    finally:
        for p in _temp_files(out.parent, cache) - before:
            p.unlink(missing_ok=True)
        _restore(previous)


def _ingest(download: Path, csv: Path, sites_csv: Path | None, out: Path, cache: Path, force: bool,
            state: dict) -> pd.DataFrame:
    ida = _read_ida(csv)
    kept, excluded = _labels(ida, csv)
    site_table = _read_sites(sites_csv)
    log.info(f"ingest: {len(ida)} rows in {csv.name}; {len(kept)} PD/control scans kept")
    for group, n in sorted(excluded.items()):
        log.info(f"ingest: excluded {n} scan(s) of group {group!r} (not PD or control)")

    index = _index_tree(download, set(kept["Image Data ID"]))
    failed: list[tuple[str, str]] = []
    paths: dict[str, Path] = {}
    institutions: dict[str, list[str]] = {}
    todo: list[tuple[str, Path]] = []
    reused = 0
    for iid, subject in zip(kept["Image Data ID"], kept["Subject"]):
        kind, what = _locate(iid, index.get(iid), download)
        if kind == "error":
            failed.append((iid, what))
            continue
        if kind == "nifti":
            paths[iid] = what
            continue
        if subject not in site_table:
            name = _institution(what)
            if name:
                institutions.setdefault(subject, []).append(name)
        target = cache / f"{iid}.nii.gz"
        if target.is_file():
            paths[iid] = target
            reused += 1
        else:
            todo.append((iid, index[iid][0]))  # the image-id folder (the converter searches it recursively)
    for iid, folder in tqdm(todo, desc="DICOM -> NIfTI", unit="scan", disable=not todo):
        target = cache / f"{iid}.nii.gz"
        try:
            _convert(folder, target)
        except Exception as exc:  # noqa: BLE001 - any converter failure is reported per scan, others go on
            failed.append((iid, f"cannot convert the DICOM series in {folder} ({_why(folder, exc)}); download "
                                "this series again or drop its row"))
            continue
        state["converted"] += 1
        paths[iid] = target
    log.info(f"ingest: DICOM series converted {state['converted']}, reused {reused} (cache {cache})")
    _scan_check(paths, cache, failed)

    failed.sort()
    rows = kept[kept["Image Data ID"].isin(list(paths))]
    sites = _subject_sites(rows["Subject"], site_table, institutions)
    df = pd.DataFrame({
        "image_id": rows["Image Data ID"].to_numpy(), "subject_id": rows["Subject"].to_numpy(),
        "visit": _col(rows, "Visit"), "label": rows["label"].astype(int).to_numpy(),
        "site": rows["Subject"].map(sites).to_numpy(),
        "path": [str(paths[i]) for i in rows["Image Data ID"]],
        "sex": _col(rows, "Sex"), "age": pd.to_numeric(pd.Series(_col(rows, "Age")), errors="coerce").to_numpy(),
        "acq_date": _col(rows, "Acq Date"), "description": _col(rows, "Description"),
        # every report says whether its data were synthetic: the phantom leaves a marker file
        "source": "phantom" if (download / PHANTOM_MARKER).is_file() else "ppmi",
    })
    if df.empty:
        _report_failures(failed)
        raise DataError(f"{csv}: no usable PD/control scan ({len(failed)} failed, see the table above); nothing "
                        f"written to {out}.")
    validate_manifest(df, csv)
    return write_ingested(df, out, force, failed, state,
                          f"converted series stay cached in {cache}; fix or drop the failed rows in the CSV and re-run "
                          "with --force (nothing is converted twice)")


def write_ingested(df: pd.DataFrame, out: Path, force: bool, failed: list[tuple[str, str]], state: dict | None,
                   fix: str) -> pd.DataFrame:
    """Write the manifest of the good scans (keeping an old ``out`` as a backup under ``force``), print its
    summary, then the failed scans' table and a :class:`DataError` naming them, with ``fix`` as the advice.
    Shared by IDA and BIDS ingestion."""
    backup = _backup(out) if force and out.is_file() else None
    write_manifest(df, out)
    if state is not None:
        state["written"] = True
    if backup is not None:
        log.info(f"ingest: replaced {out} (--force); the previous file is kept as {backup} (a split column it had is "
                 "not carried over: run fedpd split again)")
    _summary(df, out)
    if failed:
        _report_failures(failed)
        ids = ", ".join(i for i, _ in failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
        raise DataError(f"{len(failed)} scan(s) could not be ingested: {ids} (reasons in the table above). "
                        f"{out} holds the {len(df)} good scans; {fix}.")
    return df


def _scan_check(paths: dict[str, Path], cache: Path, failed: list[tuple[str, str]]) -> None:
    """Run the scan check on every NIfTI; move failures from ``paths`` into ``failed`` with the reason."""
    if not paths:
        return
    problems = check_scans([{"image_id": i, "path": str(p)} for i, p in paths.items()],
                           cache_file=cache / SCAN_CHECK_CACHE, progress=True, desc="scan check")
    for p in problems:
        converted = Path(p.path).parent == cache
        failed.append((p.image_id, f"{p.path}: {p.problem}" + ("; it was converted from DICOM: delete it to "
                                                               "convert the series again" if converted else "")))
        del paths[p.image_id]
    log.info(f"ingest: scan check: {len(paths)} of {len(paths) + len(problems)} scan(s) usable "
             f"(results cached in {cache / SCAN_CHECK_CACHE})")


def _col(rows: pd.DataFrame, name: str):
    return rows[name].to_numpy() if name in rows.columns else [None] * len(rows)


def _subject_sites(subjects: pd.Series, table: dict[str, str], institutions: dict[str, list[str]]) -> dict:
    sites, source = {}, Counter()
    for s in sorted(set(subjects)):
        if s in table:
            sites[s], src = table[s], "sites CSV"
        elif s in institutions:
            counts = Counter(institutions[s]).most_common()
            if len(counts) > 1:
                log.warning(f"ingest: warning: subject {s} has series from {len(counts)} institutions "
                            f"({', '.join(n for n, _ in counts)}); using {counts[0][0]!r}")
            sites[s], src = counts[0][0], "DICOM InstitutionName"
        else:
            sites[s], src = UNKNOWN_SITE, UNKNOWN_SITE
        source[src] += 1
    log.info("ingest: site from " + ", ".join(f"{k}: {v} subject(s)" for k, v in sorted(source.items())))
    if source[UNKNOWN_SITE]:
        unknown = [s for s in sorted(sites) if sites[s] == UNKNOWN_SITE]
        names = ", ".join(unknown[:_SHOW]) + (f" and {len(unknown) - _SHOW} more" if len(unknown) > _SHOW else "")
        log.warning(f"ingest: warning: {source[UNKNOWN_SITE]} subject(s) have site {UNKNOWN_SITE!r} (not in --sites-csv "
                    f"and no DICOM InstitutionName): {names}; pass --sites-csv with PPMI's centre list (PATNO,CNO) "
                    "listing them to fix it")
    return sites


def _summary(df: pd.DataFrame, out: Path) -> None:
    n_pd, n_hc = int((df["label"] == 1).sum()), int((df["label"] == 0).sum())
    subj = df.drop_duplicates("subject_id")
    log.info(f"ingest: wrote {out}: {len(df)} scans ({n_pd} PD, {n_hc} control) of {len(subj)} subjects "
             f"({int((subj['label'] == 1).sum())} PD, {int((subj['label'] == 0).sum())} control) at "
             f"{df['site'].nunique()} site(s)")


def _report_failures(failed: list[tuple[str, str]]) -> None:
    width = max(len("image id"), *(len(i) for i, _ in failed)) if failed else 8
    lines = [f"ingest: {len(failed)} scan(s) failed:", f"  {'image id':<{width}}  problem"]
    lines += [f"  {i:<{width}}  {why}" for i, why in failed]
    log.warning("\n".join(lines))
