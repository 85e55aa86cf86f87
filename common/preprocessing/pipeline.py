"""Site-local preprocessing of raw T1 head scans into MNI space (DESIGN.md, "Preprocessing").

Per scan (:func:`common.preprocessing.registration.preprocess_scan`, re-exported here), with SimpleITK doing the work:

1. read the NIfTI (nibabel, as everywhere in fedpd) after :func:`common.cohort.scans.scan_problem`'s checks;
2. head mask: Otsu threshold, largest connected component, holes filled (:func:`head_mask`);
3. N4 bias-field correction on a ~6 mm copy inside the head mask (:func:`n4_correct`);
4. registration to the skull-stripped MNI152 T1 template that nilearn ships (:func:`register_to_template`),
   with the scan block-averaged to about the template's voxel size (a 1 mm scan: 5x faster, same result):
   centre-of-mass (moments) initialisation on the masked head; a coarse pose search as in FSL FLIRT
   (rotations up to 30 deg, shifts up to 25 mm, scored at 8 mm; the best 4 refined); a similarity stage
   (8, 4 mm) and a 12-parameter affine stage (8, 4, 2 mm; smoothing 4, 2, 1 mm), Mattes mutual information
   on 5 % of the voxels (fixed seed). The pose search and similarity stage run twice, against a head built
   around the template (:func:`common.preprocessing.registration.build_head`: CSF, skull, scalp, neck) and
   against the skull-stripped template in its brain mask dilated by 8 mm; the affine stage (brain template)
   follows each, and the lower final metric wins. Against the brain-only template alone a skull-on
   head-and-neck scan settled with its scalp on the brain's outline (scale 1.07, Dice of its own brain mask
   0.69); the head start puts it right (scale 0.82, Dice 0.91);
5. resampling onto the template grid and the template brain mask (background exactly 0);
6. QC (:func:`qc_metrics`): the correlation of scan and template, both smoothed (Gaussian sigma 3 mm), inside
   the brain mask dilated by 4 mm; the share of the brain mask inside the scan's field of view; the
   transform's scale. 2D thick-slice series are excluded before registration, with their own reason
   (:func:`common.preprocessing.registration.thick_slice_problem`).

:func:`preprocess_manifest` runs this over a manifest and writes into ``out``::

    <image_id>.nii.gz     registered, masked scan (float32, template grid, sform/qform = MNI)
    transforms/<id>.tfm   the final affine (sitk.ReadTransform; maps template points to scan points, LPS mm)
    qc/<id>.png           three planes of the registered scan with the brain-mask outline
    manifest.csv          the input rows and columns, path -> the registered scan, excluded rows dropped
    qc.csv, qc.html       one row per input scan: figures, status ok/excluded and the reason
    preprocess.json       settings, versions and counts (provenance)
    cache/<id>.json       per-scan results keyed by input content + settings (resume, no repeated work)

Registered volumes are written for every scan that registered, including those QC excludes, so a
changed ``qc_threshold`` recomputes nothing; only ``manifest.csv`` says which scans go on.

Default QC threshold (:data:`DEFAULT_QC_THRESHOLD` = 0.7), one for real scans and the phantom, measured with
``benchmarks/qc_calibration.py`` (EXPERIMENTS.md "QC calibrated on real scans") at the 2 mm template:

- good registrations of five real 3D T1s (whole heads, a head-and-neck, a skull-stripped brain, a 4 mm scan):
  0.734-0.942; native-space phantom scans (demo size) 0.955-0.978 (0.937-0.962 with the known transforms);
- the real scans with the found transform moved by 20 mm: <= 0.464; by 10 mm: 0.570-0.724 (14 of 15 below
  0.7); scaled 0.9 or 1.1: 0.532-0.825 (8 of 10 below); rotated by 10 deg: 0.682-0.851 and by 5 mm / 5 deg:
  0.683-0.914 (an absolute threshold cannot catch these across people: each lowers its own scan's figure by
  0.02-0.09, less than real people differ);
- contrast-inverted (T2-like) versions of the real scans 0.332-0.653, noise 0.362, a 2D spin echo 0.266.

0.7 lies below every good real registration (the lowest, 0.734, is the noisy head-and-neck scan) and above every
non-T1 and noise input and every 20 mm error. The correlation inside the brain alone without smoothing, the
earlier figure, gave 0.46-0.59 on the same real good registrations (they differ from the population template),
so its 0.7 excluded every real scan.
"""

from __future__ import annotations

import logging
import base64
import hashlib
import html
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

from common.cohort.manifest import read_manifest, write_manifest
from common.errors import ConfigError, DataError
from common.learning.data import file_fingerprint
from common.preprocessing import QC_CSV, QC_HTML
from common.preprocessing.registration import (DEFAULT_TEMPLATE_MM, N4_VOXEL_MM, REGISTRATION_MARGIN_MM, SEED, ScanResult, Template,
                                 head_mask, load_template, n4_correct, nifti_to_sitk, preprocess_scan, qc_metrics,
                                 register_to_template)

log = logging.getLogger("fedpd.preprocess")

__all__ = ["PREPROCESS_VERSION", "DEFAULT_TEMPLATE_MM", "DEFAULT_QC_THRESHOLD", "Template", "ScanResult",
           "load_template", "nifti_to_sitk", "head_mask", "n4_correct", "register_to_template", "qc_metrics",
           "preprocess_scan", "preprocess_manifest", "default_workers", "qc_verdict", "scan_settings", "save_registered",
           "sitk_failure"]

PREPROCESS_VERSION = 2        # bump when a step changes: invalidates every cached scan
DEFAULT_QC_THRESHOLD = 0.7    # min QC correlation (smoothed, brain + 4 mm), calibrated on real scans (docstring)
_QC_COLUMNS = ["image_id", "subject_id", "site", "status", "reason", "correlation", "brain_in_fov", "scale",
               "mattes_mi", "seconds", "cached"]


# ---------------------------------------------------------------------------------------------- a manifest

def default_workers(cpus: int | None = None) -> int:
    """Scans processed at once: one single-threaded process per core.

    SimpleITK runs single-threaded in every worker: its multi-threaded registration and N4 sum in an order
    that depends on thread timing, so two runs on the same scan gave transforms that differ in the last
    digits (4 of 4 scans, 2 threads) while one thread gives identical ones (0 of 4). It is also faster on
    small scans: 2 workers x 1 thread processed demo-size scans at 1.2 s/scan against 1.5 s/scan for
    1 worker x 2 threads (2 cores).
    """
    return max(1, cpus or _cpus())


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def scan_settings(template_mm: int, n4: bool) -> dict:
    """What a preprocessed scan depends on besides its input file (the QC threshold is applied afterwards): the
    cache key, and what ``fedpd predict`` compares with a run's record before it prepares a scan."""
    return {"pipeline_version": PREPROCESS_VERSION, "template_mm": int(template_mm), "n4": bool(n4), "seed": SEED,
            "simpleitk": sitk.Version_VersionString()}


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: readers never see half a file, a kill leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{''.join(path.suffixes[-2:]) or '.tmp'}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str) + "\n"))


def save_registered(image: sitk.Image, affine: np.ndarray, path: Path) -> None:
    """A registered scan as float32 NIfTI on the template grid (sform/qform = MNI), written atomically."""
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code="mni")
    img.set_qform(affine, code="mni")
    _atomic(path, lambda tmp: nib.save(img, str(tmp)))


def _qc_png(result: ScanResult, template: Template, path: Path, title: str) -> None:
    """Sagittal, coronal and axial planes through the brain's centre: the registered head (not masked) in
    grey, the template brain-mask outline in red. The template grid is RAS-aligned, so no reorientation."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, works in worker processes

    vol = sitk.GetArrayFromImage(result.head).transpose(2, 1, 0)
    brain = sitk.GetArrayFromImage(template.brain).transpose(2, 1, 0) > 0
    c = np.round(np.argwhere(brain).mean(axis=0)).astype(int)
    vmax = float(np.percentile(vol[brain], 99.5)) or 1.0
    fig = Figure(figsize=(7.5, 2.7), dpi=72)
    planes = [("sagittal", vol[c[0]], brain[c[0]]), ("coronal", vol[:, c[1]], brain[:, c[1]]),
              ("axial", vol[:, :, c[2]], brain[:, :, c[2]])]
    for ax, (name, img, mask) in zip(fig.subplots(1, 3), planes):
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=vmax, interpolation="nearest")
        ax.contour(mask.T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.82, wspace=0.02)
    _atomic(path, lambda tmp: fig.savefig(str(tmp), format="png"))


def sitk_failure(exc: RuntimeError) -> str:
    """The one line of a SimpleITK (ITK) exception a user can read: its Description, else its last line."""
    text = str(exc)
    found = re.search(r"Description: *(.+)", text)
    line = (found.group(1) if found else text.strip().splitlines()[-1] if text.strip() else type(exc).__name__)
    return line.strip()[:200]


def _sitk_reason(exc: RuntimeError) -> str:
    return (f"registration failed in SimpleITK ({sitk_failure(exc)}); is this a T1 head scan? Check the file, "
            "or drop the row")


def _run_scan(job: dict) -> dict:
    """Preprocess one scan and write its outputs and cache sidecar (runs in a worker process or inline)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job["threads"])
    t0 = time.perf_counter()
    out, iid = Path(job["out"]), job["image_id"]
    record = {k: job[k] for k in ("key", "image_id", "input", "fingerprint", "settings")}
    record.update(registered=False, reason=None, metrics={})
    template = load_template(job["settings"]["template_mm"])
    try:
        result = preprocess_scan(job["input"], template, n4=job["settings"]["n4"])
    except DataError as exc:
        record["reason"] = str(exc)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for ITK exceptions
        record["reason"] = _sitk_reason(exc)
    else:
        save_registered(result.image, template.affine, out / f"{iid}.nii.gz")
        _atomic(out / "transforms" / f"{iid}.tfm", lambda tmp: sitk.WriteTransform(result.transform, str(tmp)))
        _qc_png(result, template, out / "qc" / f"{iid}.png", f"{iid}: correlation {result.metrics['correlation']:.3f}")
        record.update(registered=True, metrics=result.metrics)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    _write_json(out / "cache" / f"{iid}.json", record)  # last: a sidecar means every output is in place
    return record


def _cached(out: Path, iid: str, key: str) -> dict | None:
    """The sidecar of an earlier run with the same input content and settings, if its outputs exist."""
    try:
        record = json.loads((out / "cache" / f"{iid}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if record.get("registered") and not all((out / p).is_file() for p in
                                            (f"{iid}.nii.gz", f"transforms/{iid}.tfm", f"qc/{iid}.png")):
        return None
    return record


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _preflight(manifest: Path, out: Path, df: pd.DataFrame) -> None:
    """Refuse, before any work, an ``out`` that would overwrite input, and ids or files that cannot work."""
    src = manifest.resolve()
    dst = out.resolve()
    if dst == src.parent:
        raise DataError(f"{out}: --out is the folder of the input manifest {manifest}; the outputs would overwrite "
                        f"input files. Choose a new folder, e.g. {src.parent / 'mni'}")
    if dst in src.parents:
        raise DataError(f"{out}: --out contains the input manifest {manifest}; choose a folder outside it.")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{out}: --out is a file; give a folder (new, empty, or an earlier preprocess output).")
    inside = [p for p in df["path"] if dst in Path(p).resolve().parents]
    if inside:
        raise DataError(f"{out}: --out holds {len(inside)} input scan(s) (e.g. {inside[0]}); they could be "
                        "overwritten: choose a folder outside the input data.")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "preprocess.json").is_file():
        raise DataError(f"{out}: --out exists and holds other files (no preprocess.json from an earlier "
                        "`fedpd preprocess`); choose a new or empty folder.")
    bad = [f"{iid} (line {i + 2})" for i, iid in enumerate(df["image_id"]) if not _SAFE_ID.match(iid)]
    if bad:
        raise DataError(f"{manifest}: image_id {', '.join(bad[:10])} cannot name the output files; use letters, "
                        "digits, '.', '_' and '-' (starting with a letter or digit) in those rows.")
    missing = [f"{iid}: {p}" for iid, p in zip(df["image_id"], df["path"]) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{manifest}: {len(missing)} scan file(s) not found:\n  " + "\n  ".join(missing[:20]) +
                        ("\n  ..." if len(missing) > 20 else "") + "\nRestore the files or fix/drop those rows.")


def _check_options(template_mm, qc_threshold, workers) -> None:
    load_template(template_mm)  # checks template_mm (and loads the template once, before any work)
    if isinstance(qc_threshold, bool) or not isinstance(qc_threshold, (int, float)) or not -1 <= qc_threshold <= 1:
        raise ConfigError(f"qc_threshold={qc_threshold!r}: --qc-threshold is a correlation from -1 to 1 "
                          f"(default {DEFAULT_QC_THRESHOLD})")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers={workers!r}: --workers is a whole number >= 1 (default: one per two cores, "
                          f"{default_workers()} here)")


def _execute(jobs: list[dict], workers: int, progress: bool):
    """Yield each job's record as it finishes: inline for one worker, else a process pool."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="preprocess", unit="scan", disable=not progress or not jobs, file=sys.stderr)

    def done(record):
        bar.set_postfix_str(f"{record['image_id']} {record['seconds']:.0f}s", refresh=False)
        bar.update(1)
        return record

    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield done(_run_scan(job))
            return
        # spawn, not fork: SimpleITK's and torch's thread pools do not survive a fork.
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"))
        try:
            for future in as_completed([pool.submit(_run_scan, job) for job in jobs]):
                yield done(future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: finished scans are cached, the rest is dropped
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
        bar.close()


def qc_verdict(metrics: dict, qc_threshold: float = None) -> str:
    """Why a registered scan fails QC ("" when it passes), from its :func:`qc_metrics` figures."""
    qc_threshold = DEFAULT_QC_THRESHOLD if qc_threshold is None else qc_threshold
    corr = metrics["correlation"]
    if corr < qc_threshold:
        return (f"correlation with the template {corr:.3f} < qc_threshold {qc_threshold}: misregistered "
                "or not a T1 head scan")
    return ""


def _status(record: dict, qc_threshold: float) -> tuple[str, str]:
    if not record["registered"]:
        return "excluded", record["reason"]
    reason = qc_verdict(record["metrics"], qc_threshold)
    if reason:
        return "excluded", f"{reason}; look at qc/{record['image_id']}.png"
    return "ok", ""


def preprocess_manifest(manifest, out, *, template_mm: int = DEFAULT_TEMPLATE_MM, n4: bool = True,
                        qc_threshold: float = DEFAULT_QC_THRESHOLD, workers: int | None = None,
                        progress: bool = True) -> pd.DataFrame:
    """Preprocess every scan of a manifest into MNI space (``fedpd preprocess MANIFEST --out DIR``).

    Writes the files listed in the module docstring into ``out``. Per-scan results are cached by input
    content (:func:`common.learning.data.file_fingerprint`) and settings (template resolution, N4, pipeline and
    SimpleITK version), each in ``cache/<image_id>.json`` written after that scan's outputs: a re-run
    does no work, a killed run keeps every finished scan, and a changed setting or input file recomputes
    only what it affects. The QC threshold is applied after the cache, so changing it recomputes nothing.

    Args:
        manifest: the input manifest CSV (raw scans; :func:`common.cohort.manifest.read_manifest`).
        out: output folder: new, empty, or an earlier output of this function (resumed). It must not be
            the manifest's folder, contain the manifest or contain any input scan.
        template_mm: template voxel size in mm (nilearn's MNI152 T1, resampled by nilearn when not 1).
        n4: N4 bias-field correction before registration.
        qc_threshold: minimum correlation with the template inside the brain mask; scans below it are
            excluded from ``manifest.csv`` with the reason in ``qc.csv`` (module docstring: why 0.7).
        workers: scans processed at once in a process pool (default :func:`default_workers`: one per core);
            SimpleITK runs single-threaded in each, so results do not depend on thread timing.
        progress: show a tqdm bar (seconds per scan) on stderr.

    Returns:
        The QC table (also ``qc.csv``): one row per input scan in manifest order, with ``status``
        (``ok``/``excluded``), ``reason``, the figures of :func:`qc_metrics`, ``mattes_mi``, ``seconds`` and
        ``cached`` (True when taken from an earlier run).

    Raises:
        DataError: bad manifest, missing scan files, or an ``out`` that would overwrite input; all before
            any scan is processed.
        ConfigError: a bad ``template_mm``, ``qc_threshold`` or ``workers``.
    """
    manifest, out = Path(manifest), Path(out).expanduser().absolute()
    df = read_manifest(manifest)
    _check_options(template_mm, qc_threshold, workers)
    _preflight(manifest, out, df)
    workers = workers or default_workers()
    threads = 1  # deterministic results (default_workers): parallelism comes from worker processes
    settings = scan_settings(template_mm, n4)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    provenance = {"manifest": str(manifest.resolve()), "out": str(out), "complete": False, "started": started,
                  "settings": {**settings, "qc_threshold": qc_threshold, "workers": workers,
                               "threads_per_worker": threads,
                               "template": f"MNI152 ICBM 2009a T1 (nilearn), {int(template_mm)} mm",
                               "qc_figure": "correlation of scan and template, both smoothed (sigma 3 mm), in the "
                                            "brain mask dilated by 4 mm",
                               "registration_margin_mm": REGISTRATION_MARGIN_MM, "n4_voxel_mm": N4_VOXEL_MM},
                  "versions": _versions()}
    _write_json(out / "preprocess.json", provenance)

    records, jobs = {}, []
    for iid, path in zip(df["image_id"], df["path"]):
        fingerprint = file_fingerprint(path)
        key = hashlib.sha256(json.dumps({"fingerprint": fingerprint, **settings}, sort_keys=True).encode())
        key = key.hexdigest()[:20]
        record = _cached(out, iid, key)
        if record is not None:
            records[iid] = {**record, "cached": True}
        else:
            jobs.append({"key": key, "image_id": iid, "input": path, "fingerprint": fingerprint, "settings": settings,
                         "out": str(out), "threads": threads})
    for record in _execute(jobs, workers, progress):
        records[record["image_id"]] = {**record, "cached": False}

    rows = []
    for _, row in df.iterrows():
        rec = records[row["image_id"]]
        status, reason = _status(rec, qc_threshold)
        rows.append({"image_id": row["image_id"], "subject_id": row["subject_id"], "site": row["site"],
                     "status": status, "reason": reason, **{k: rec["metrics"].get(k, np.nan) for k in
                                                           ("correlation", "brain_in_fov", "scale", "mattes_mi")},
                     "seconds": rec["seconds"], "cached": rec["cached"]})
    qc = pd.DataFrame(rows, columns=_QC_COLUMNS)
    _atomic(out / QC_CSV, lambda tmp: qc.to_csv(tmp, index=False))
    kept = df[(qc["status"] == "ok").to_numpy()].copy()
    kept["path"] = [str(out / f"{iid}.nii.gz") for iid in kept["image_id"]]
    write_manifest(kept, out / "manifest.csv")
    counts = {"scans": len(qc), "ok": int((qc["status"] == "ok").sum()), "excluded": int((qc["status"] != "ok").sum()),
              "computed": len(jobs), "cached": len(qc) - len(jobs)}
    _qc_html(qc, out, provenance["settings"], counts)
    _write_json(out / "preprocess.json", {**provenance, "complete": True, "counts": counts,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info(f"preprocess: {counts['scans']} scan(s), {counts['computed']} processed, {counts['cached']} from cache; "
             f"{counts['ok']} ok, {counts['excluded']} excluded (reasons in {out / 'qc.csv'}, figures in "
             f"{out / 'qc.html'})")
    return qc


def _versions() -> dict:
    import nilearn

    return {"simpleitk": sitk.Version_VersionString(), "nilearn": nilearn.__version__, "nibabel": nib.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def _qc_html(qc: pd.DataFrame, out: Path, settings: dict, counts: dict) -> None:
    """A self-contained page: settings, counts and one table row per scan (worst first) with its figure."""
    order = qc.assign(_ok=qc["status"] == "ok").sort_values(["_ok", "correlation"], na_position="first", kind="stable")
    rows = []
    for _, r in order.iterrows():
        png = out / "qc" / f"{r['image_id']}.png"
        img = ""
        if pd.notna(r["correlation"]) and png.is_file():  # registered: its figure is current
            img = (f'<img alt="{html.escape(r["image_id"])}" '
                   f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">')
        figures = "".join(f"<td>{'' if pd.isna(r[k]) else f'{r[k]:.3f}'}</td>" for k in
                          ("correlation", "brain_in_fov", "scale"))
        rows.append(f'<tr class="{r["status"]}"><td>{html.escape(r["image_id"])}<br>{html.escape(r["subject_id"])} / '
                    f'{html.escape(r["site"])}</td><td>{r["status"]}</td>{figures}<td>{r["seconds"]:.1f}</td>'
                    f'<td>{html.escape(r["reason"] or "")}</td><td>{img}</td></tr>')
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>fedpd preprocess QC</title><style>
body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px;
vertical-align:top;font-size:13px}} tr.excluded td{{background:#fde8e8}} td:nth-child(7){{max-width:22em}}
</style></head><body>
<h1>fedpd preprocess: quality control</h1>
<p>{counts['scans']} scans: {counts['ok']} ok, {counts['excluded']} excluded. Excluded scans first, then by
correlation.</p>
<p><b>What the QC figure means.</b> <i>correlation</i> is the Pearson correlation of the registered scan and the
MNI152 template, both smoothed (Gaussian, sigma 3 mm), inside the template's brain mask widened by 4 mm. Smoothing
averages out what makes a person differ from the population template (folding, sulcal width), so the figure
tells whether the white matter, ventricles, deep grey matter and the brain's outline with its dark ring of CSF and
skull lie where the template has them. <b>Threshold: {settings['qc_threshold']}</b>: scans below it are excluded
(misregistered, or not a T1 head). Calibrated on real scans (EXPERIMENTS.md): good registrations of real 3D T1s
0.73-0.94; the same scans 20 mm off &le; 0.46, 10 mm off 0.57-0.72; contrast-inverted (T2-like) images &le; 0.65;
noise 0.36. A shift of 5 mm or a rotation of 10&deg; lowers a scan's figure by only 0.02-0.09, less than people
differ, so look at the figures too. <i>brain in FOV</i>: share of the template brain inside the scan's field of
view. <i>scale</i>: head size relative to the template (adults about 0.8-1.0). 2D thick-slice series are excluded
before registration, with their own reason.
Red line: template brain mask; a good registration puts the brain just inside it in all three planes.</p>
<p>Settings: {html.escape(json.dumps(settings))}</p>
<table><tr><th>image / subject / site</th><th>status</th><th>correlation</th><th>brain in FOV</th><th>scale</th>
<th>seconds</th><th>reason</th><th>registered head (template space)</th></tr>
{''.join(rows)}
</table></body></html>
"""
    _atomic(out / QC_HTML, lambda tmp: tmp.write_text(page))
