"""``fedpd predict``: the PD probability of one scan from a trained run, its decision, and a saliency figure.

The checkpoint is either a run's ``model.pt`` (the selected round, written when the run finishes, with
its validated ``threshold``, ``selected_round`` and data ``source``) or a ``checkpoints/round-<k>.pt``.
For a round checkpoint the threshold comes from the run's ``report.json`` (two folders up) when there is
one, else 0.5, and the output says that no validated threshold was stored.

The scan is first prepared as the run's scans were, by the checkpoint's ``preparation`` record
(:mod:`common.preprocessing.provenance`):

- ``fedpd-preprocess``: the site preprocessing at the recorded settings (N4, affine registration to the
  MNI152 template at ``template_mm``, brain mask: :func:`common.preprocessing.pipeline.preprocess_scan`, one
  SimpleITK thread as in ``fedpd preprocess``), then its QC at the recorded ``qc_threshold``
  (:func:`common.preprocessing.pipeline.qc_verdict`); a scan that fails either is refused
  (:class:`~common.errors.DataError`, exit code 2, with the reason). The registered, masked volume is written
  to a temporary NIfTI on the template grid and goes on from there. ``preprocessed=True`` (``--preprocessed``)
  takes a scan already in template space (``fedpd preprocess`` output) as it is.
- ``none``: the run's scans were used as given (the MNI-space phantom, scans a user prepared): so is this
  one, and the notes say so.
- no record (a checkpoint from fedpd before the record existed): unknown. A raw scan is refused, since a
  model trained on registered, skull-stripped scans gives meaningless answers on a raw head and nothing
  in the checkpoint says which it was; ``--preprocessed`` states that the scan is prepared as the training
  scans were, and it is used as given, with a note.

Then the very pipeline the model was trained with (input-shape and spacing from the checkpoint's
run-config), so the same bad-scan errors apply (:class:`~common.errors.DataError`).

Before any work, the inputs are checked: the saliency path (:func:`check_saliency_path`: never the scan,
the checkpoint or any existing file that is not an earlier fedpd overlay; a missing folder is created, a
folder blocked by a file or an unwritable one is refused), the scan (:func:`common.cohort.scans.scan_problem`: a
scout or a constant image cannot be a whole-head T1) and the weights (no NaN/Inf).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cohort.scans import scan_problem
from common.config import RunConfig
from common.device import Runtime, runtime
from common.errors import CheckpointError, ConfigError, DataError
from common.files import same_file
from common.keys import CLASS_NAMES
from common.learning.model import model_from_checkpoint, nonfinite_tensors
from common.learning.saliency import FEATURE_STRIDE, PNG_SOFTWARE, TARGET_LAYER, overlay_png, preprocess_scan, saliency_map
from common.preprocessing.provenance import FEDPD_PREPROCESS, NONE, describe_preparation
from common.runs.records import RunReport, load_report
from common.runs.rundir import RunDir

__all__ = ["Predictor", "load_predictor", "predict_scan", "format_result", "check_saliency_path", "is_fedpd_png",
           "DEFAULT_THRESHOLD", "CLASS_NAMES"]

DEFAULT_THRESHOLD = 0.5
_PIPELINE_KEYS = ("input-shape", "spacing", "model-depth")  # must come from the checkpoint, never from defaults
_PHANTOM_NOTE = ("This model was trained on phantom (synthetic) data: the result demonstrates the software only "
                 "and is not a clinical tool.")
_RESEARCH_NOTE = "Research software: not a medical device and not validated for clinical use."


@dataclass(frozen=True)
class Predictor:
    """A trained model with what is needed to apply it to a new scan."""

    model: torch.nn.Module
    cfg: RunConfig
    checkpoint: Path
    threshold: float
    threshold_source: str  # "checkpoint" (model.pt), "report" (<run>/report.json) or "default" (0.5)
    source: str  # data the model was trained on: phantom, ppmi, ... or unknown
    round: int | None
    selected_round: int | None
    notes: tuple[str, ...]
    preparation: dict | None = None  # how the run's scans were prepared (provenance record); None: unknown


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SALIENCY_FIX = "choose another --saliency path (a new .png file, or one an earlier fedpd predict wrote)"


def is_fedpd_png(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that fedpd wrote: its ``Software`` text chunk is :data:`PNG_SOFTWARE`.

    Reads the chunk headers up to the image data only (a few hundred bytes for fedpd's figures).
    """
    want = PNG_SOFTWARE.encode("latin-1")
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_MAGIC:
                return False
            for _ in range(64):  # text chunks come before the image data
                head = fh.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                if kind == b"tEXt":
                    key, _, value = fh.read(length).partition(b"\0")
                    if key == b"Software" and value == want:
                        return True
                    fh.seek(4, os.SEEK_CUR)  # CRC
                else:
                    fh.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return False
    return False


def check_saliency_path(out: str | Path, scan: str | Path, checkpoint: str | Path) -> Path:
    """Refuse a ``--saliency`` path that would overwrite an input or a file fedpd did not write.

    Allowed: a new ``.png`` file (missing folders are created when it is written), or an existing PNG
    that fedpd wrote (:func:`is_fedpd_png`), which is replaced. Paths are compared after resolving
    ``~``, relative parts and symbolic links.

    Returns:
        ``out`` as given (expanded ``~``).

    Raises:
        DataError: ``out`` is the scan or the checkpoint, an existing folder or other file, does not end
            in ``.png``, or lies under a file or in a folder that cannot be written.
    """
    given = Path(out).expanduser()
    target = given.resolve()
    for role, other in (("scan", scan), ("checkpoint", checkpoint)):
        if same_file(target, Path(other).expanduser().resolve()):
            raise DataError(f"{given}: is the {role} given to predict ({other}); writing the figure there would "
                            f"destroy it: {_SALIENCY_FIX}")
    if target.is_dir():
        raise DataError(f"{given}: is a folder; {_SALIENCY_FIX}")
    if os.path.lexists(target) or os.path.lexists(given):
        if not target.is_file():
            raise DataError(f"{given}: exists and is not a regular file; {_SALIENCY_FIX}")
        if not is_fedpd_png(target):
            raise DataError(f"{given}: already exists and is not a saliency figure fedpd wrote, so fedpd will not "
                            f"overwrite it; {_SALIENCY_FIX}, or move the file away")
    if given.suffix.lower() != ".png":
        raise DataError(f"{given}: the saliency figure is a PNG image; give a file name ending in .png")
    # The nearest folder that exists must be a folder we can write in; missing ones below it are created.
    parent = target.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{given}: {parent} is a file, not a folder, so the figure cannot be written under it; "
                        f"{_SALIENCY_FIX}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fedpd-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataError(f"{given}: cannot write in {parent} ({exc.strerror or exc}); {_SALIENCY_FIX} in a folder "
                        "you can write") from None
    return given


def _threshold(value, where: Path) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and 0.0 <= t <= 1.0) or isinstance(value, bool):
        raise CheckpointError(f"{where}: threshold {value!r} is not a probability in [0, 1]; re-run the final "
                              "evaluation of the run (it writes model.pt and report.json)")
    return t


def _read_report(path: Path) -> RunReport:
    try:
        return load_report(path)
    except DataError as exc:
        raise CheckpointError(f"{exc}; restore it, or delete it to predict with the default threshold 0.5") from exc


def _decide_threshold(ckpt: dict, path: Path) -> tuple[float, str, str | None, list[str]]:
    """(threshold, where it came from, data source named by the report or None, notes)."""
    if "threshold" in ckpt:
        return _threshold(ckpt["threshold"], path), "checkpoint", None, []
    report_path = path.parent.parent / "report.json"  # <run>/checkpoints/round-<k>.pt -> <run>/report.json
    if report_path.is_file():
        report = _read_report(report_path)
        source = report.data.get("source")
        if report.threshold is not None:
            notes = []
            selected, rnd = report.selected_round, ckpt.get("round")
            if selected is not None and rnd is not None and int(selected) != int(rnd):
                model_pt = path.parent.parent / "model.pt"
                hint = f"; {model_pt} holds the selected model" if model_pt.is_file() else ""
                notes.append(f"The threshold in {report_path} was chosen on validation for round {selected}, not for "
                             f"this checkpoint's round {rnd}{hint}.")
            return _threshold(report.threshold, report_path), "report", source, notes
        why = f"{report_path} has no 'threshold'"
    else:
        why = f"no model.pt threshold and no {report_path}"
    return DEFAULT_THRESHOLD, "default", None, [
        f"No validated threshold was stored ({why}): the decision uses the default threshold {DEFAULT_THRESHOLD}, "
        "which was not chosen on validation data."]


def load_predictor(checkpoint: str | Path) -> Predictor:
    """Load ``model.pt`` or ``checkpoints/round-<k>.pt`` with its run-config, threshold and data source.

    Raises:
        CheckpointError: not a fedpd checkpoint, missing keys, a stored run-config this version rejects,
            weights that do not fit the model, or a bad threshold; the message names the file.
    """
    path = Path(checkpoint).expanduser()
    ckpt = RunDir.load_checkpoint(path)
    missing = [k for k in ("state_dict", "config") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: fedpd checkpoint without {', '.join(missing)}; it cannot be used to predict")
    absent = [k for k in _PIPELINE_KEYS if k not in ckpt["config"]]
    if absent:
        raise CheckpointError(f"{path}: its stored run-config lacks {', '.join(absent)}, so the scan cannot be "
                              "preprocessed as in training; use a checkpoint written by fedpd's server or baselines")
    try:  # keys added to fedpd after this checkpoint was written take their defaults; none of them shapes the input
        cfg = RunConfig.from_mapping(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored run-config is not valid for this fedpd version ({exc}); predict "
                              "with the fedpd version that trained it") from exc
    bad = nonfinite_tensors({str(k): v for k, v in ckpt["state_dict"].items()})
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN/Inf values: "
                              f"{', '.join(f'{k} ({n:,})' for k, n in list(bad.items())[:10])}"
                              f"{', ...' if len(bad) > 10 else ''}; the training diverged or the file is corrupt: "
                              "use another round's checkpoint or re-run the training")
    model = model_from_checkpoint(ckpt, path)
    if model.head.fc.out_features != len(CLASS_NAMES):
        raise CheckpointError(f"{path}: the model has {model.head.fc.out_features} outputs; fedpd predict needs 2 "
                              "(control, PD)")
    threshold, threshold_source, report_source, notes = _decide_threshold(ckpt, path)
    source = str(ckpt.get("source") or report_source or "unknown")
    selected = ckpt.get("selected_round")
    return Predictor(model=model.eval(), cfg=cfg, checkpoint=path, threshold=threshold,
                     threshold_source=threshold_source, source=source,
                     round=int(ckpt["round"]) if ckpt.get("round") is not None else None,
                     selected_round=int(selected) if selected is not None else None, notes=tuple(notes),
                     preparation=_preparation(ckpt.get("preparation"), path))


def _preparation(record, path: Path) -> dict | None:
    """The checkpoint's ``preparation`` record, checked (``None``: the checkpoint has none)."""
    if record is None:
        return None
    ok = isinstance(record, dict) and record.get("method") in (NONE, FEDPD_PREPROCESS)
    if ok and record["method"] == FEDPD_PREPROCESS:
        s = record.get("settings")
        ok = (isinstance(s, dict) and isinstance(s.get("template_mm"), int) and isinstance(s.get("n4"), bool)
              and isinstance(s.get("qc_threshold"), (int, float)) and not isinstance(s.get("qc_threshold"), bool)
              and "pipeline_version" in s)
    if not ok:
        raise CheckpointError(f"{path}: its 'preparation' record ({record!r:.200}) is not one this fedpd reads, so the "
                              "scan cannot be prepared as the training scans were; predict with the fedpd version "
                              "that trained it")
    return record


def predict_scan(checkpoint: str | Path, scan: str | Path, saliency_png: str | Path | None = None, *,
                 background: str = "auto", rt: Runtime | None = None, preprocessed: bool = False) -> dict:
    """PD probability of ``scan`` under ``checkpoint``, the decision at its threshold, and a saliency figure.

    Args:
        checkpoint: a run's ``model.pt`` or ``checkpoints/round-<k>.pt``.
        scan: one 3D T1 NIfTI file: raw (scanner space; prepared here as the run's scans were, see the module
            docstring), or already prepared with ``preprocessed=True``.
        saliency_png: where to write the Grad-CAM overlay (:mod:`common.learning.saliency`); ``None`` for none.
            The map explains the decided class (evidence for PD when the decision is PD, else control).
        background: ``template`` (MNI152), ``scan`` (the scan as the model saw it: for a run of preprocessed
            scans, the registered, masked scan in template space) or ``auto``: the registered scan when
            the scan was prepared here or given prepared for a ``fedpd-preprocess`` run; otherwise the
            template for phantom models and the scan for others.
        rt: compute device; default :func:`common.device.runtime` without AMP (float32).
        preprocessed: the scan is already prepared as the run's scans were (for a ``fedpd-preprocess`` run:
            ``fedpd preprocess`` output, in template space): no preprocessing here.

    Returns:
        A JSON-ready dict: ``scan, checkpoint, probability, threshold, threshold_source, decision``
        (``"PD"``/``"control"``), ``source, round, selected_round, input_shape, spacing_mm, device,
        saliency`` (``None`` or ``{png, method, layer, explains, background, empty}``) and ``notes`` (the
        threshold's provenance, the phantom / research-use warnings).

    Raises:
        CheckpointError: a bad checkpoint (see :func:`load_predictor`).
        DataError: the scan is missing, a folder, not NIfTI, 4D, a scout, constant, has NaN/Inf, is empty, ...
            (names the file); it fails the run's preprocessing or its QC; the run records no preparation and
            ``preprocessed`` is not set; or ``saliency_png`` is refused (see :func:`check_saliency_path`). All
            are raised before the model runs.
    """
    if background not in ("auto", "template", "scan"):
        raise ValueError(f"background {background!r} must be one of auto, template, scan")
    scan_path = Path(scan).expanduser().absolute()
    if saliency_png is not None:
        saliency_png = check_saliency_path(saliency_png, scan_path, checkpoint)
    if scan_path.is_dir():
        raise DataError(f"{scan_path}: is a folder; give one NIfTI file (.nii or .nii.gz). A DICOM series is "
                        "converted by fedpd ingest, or by dcm2niix")
    if not scan_path.exists():
        raise DataError(f"{scan_path}: scan file not found; check the path")
    pred = load_predictor(checkpoint)
    problem = scan_problem(scan_path)  # the one scan check: a scout or a constant image is no whole-head T1
    if problem:
        raise DataError(f"{scan_path}: {problem}")
    notes = list(pred.notes)
    with tempfile.TemporaryDirectory(prefix="fedpd-predict-") as tmp:
        model_input, preparation = _prepare(pred, scan_path, preprocessed, Path(tmp), notes)
        image = preprocess_scan(model_input, pred.cfg.input_shape, pred.cfg.spacing)
    registered = preparation["applied"] == "fedpd preprocess" or (
        preparation["applied"] == "given" and pred.preparation is not None
        and pred.preparation["method"] == FEDPD_PREPROCESS)
    rt = rt or runtime(amp=False)
    x = rt.inputs(image.as_tensor()[None])
    model = rt.place(pred.model).eval()
    with torch.no_grad():
        prob = float(torch.softmax(model(x).float(), dim=1)[0, 1].cpu())
    if not math.isfinite(prob):
        raise CheckpointError(f"{pred.checkpoint}: the model gives a non-finite probability for {scan_path}; "
                              "its weights are probably corrupt (NaN)")
    is_pd = prob >= pred.threshold
    if "phantom" in pred.source:
        notes.append(_PHANTOM_NOTE)
    notes.append(_RESEARCH_NOTE)
    result = {
        "scan": str(scan_path),
        "checkpoint": str(pred.checkpoint),
        "probability": prob,
        "threshold": pred.threshold,
        "threshold_source": pred.threshold_source,
        "decision": CLASS_NAMES[int(is_pd)],
        "source": pred.source,
        "round": pred.round,
        "selected_round": pred.selected_round,
        "input_shape": list(pred.cfg.input_shape),
        "spacing_mm": list(pred.cfg.spacing),
        "device": rt.describe(),
        "preparation": preparation,
        "saliency": None,
        "notes": notes,
    }
    if saliency_png is not None:
        # auto: the registered scan whenever there is one (the map lies on the anatomy it was computed from);
        # else the template for phantom models (their scans were generated on its grid), the scan otherwise
        bg = background if background != "auto" else (
            "scan" if registered else "template" if "phantom" in pred.source else "scan")
        explains = CLASS_NAMES[int(is_pd)]
        sal = saliency_map(model, x, rt, class_idx=int(is_pd))
        caption = (f"Grad-CAM on {TARGET_LAYER} (1/{FEATURE_STRIDE} of the input resolution), evidence for "
                   f"{explains}; model trained on {pred.source} data. "
                   + (_PHANTOM_NOTE if "phantom" in pred.source else _RESEARCH_NOTE))
        title = f"{scan_path.name}: P(PD) = {prob:.3f}, decision {explains} (threshold {pred.threshold:.3f})"
        try:
            png = overlay_png(image, sal, saliency_png, title=title, background=bg, caption=caption,
                              registered=registered)
        except OSError as exc:  # checked before the run, but the disk can fill or the folder vanish meanwhile
            if not _about(exc, Path(saliency_png)):
                raise
            raise DataError(f"{saliency_png}: the figure could not be written ({exc.strerror or exc}); "
                            f"{_SALIENCY_FIX} in a folder you can write") from None
        result["saliency"] = {"png": str(Path(png).absolute()), "method": "Grad-CAM", "layer": TARGET_LAYER,
                              "explains": explains, "background": bg, "empty": not bool(sal.any())}
    return result


_UNKNOWN_FIX = ("the checkpoint records no scan preparation (it was written by a fedpd from before runs recorded "
                "one), so fedpd cannot tell whether its model was trained on raw scans or on fedpd preprocess output "
                "(N4, registered to MNI152, brain-masked); a model of the one gives meaningless answers on the "
                "other. If this scan is prepared as the run's training scans were (e.g. the run trained on fedpd "
                "preprocess output and this is fedpd preprocess output made with the same settings, or both are "
                "the MNI-space phantom), pass --preprocessed; otherwise prepare it so first")


def _prepare(pred: Predictor, scan: Path, preprocessed: bool, tmp: Path, notes: list[str]) -> tuple[Path, dict]:
    """The file the model pipeline reads for ``scan`` (the scan itself, or its registered copy in ``tmp``) and
    the result's ``preparation`` entry; appends what the user must know to ``notes``."""
    record = pred.preparation
    out = {"record": describe_preparation(record), "applied": "none", "settings": None, "qc": None}
    if record is None:
        if not preprocessed:
            raise DataError(f"{scan}: refused: {_UNKNOWN_FIX}")
        out["applied"] = "given"
        notes.append("The run records no scan preparation (older fedpd): the scan was used as given (--preprocessed); "
                     "the result is meaningful only if it was prepared as the run's training scans were.")
        return scan, out
    if record["method"] == NONE:
        notes.append("The run's scans were not preprocessed by fedpd (its record says none): this scan was used as "
                     "given, with no registration or brain mask; it must be prepared as the training scans were.")
        return scan, out
    settings = record["settings"]
    out["settings"] = {k: settings.get(k) for k in ("pipeline_version", "template_mm", "n4", "qc_threshold")}
    if preprocessed:
        out["applied"] = "given"
        notes.append(_grid_note(scan, settings))
        return scan, out
    path, metrics = _register(scan, settings, tmp, notes)
    out["applied"], out["qc"] = "fedpd preprocess", metrics
    return path, out


def _grid_note(scan: Path, settings: dict) -> str:
    """The note for ``--preprocessed`` on a preprocessed run: whether the scan lies on the template grid."""
    import nibabel as nib
    import numpy as np

    from common.preprocessing.pipeline import load_template

    template = load_template(int(settings["template_mm"]))
    img = nib.load(str(scan))
    on_grid = (tuple(img.shape[:3]) == tuple(template.t1.GetSize())
               and np.allclose(img.affine, template.affine, atol=1e-3))
    where = (f"it lies on the template grid (MNI152 at {settings['template_mm']} mm)" if on_grid else
             f"WARNING: it does NOT lie on the run's template grid (MNI152 at {settings['template_mm']} mm, as fedpd "
             "preprocess writes it), so it is probably not fedpd preprocess output: without --preprocessed fedpd "
             "prepares a raw scan itself")
    how = describe_preparation({"method": FEDPD_PREPROCESS, "settings": settings})
    return (f"--preprocessed: the scan was used as given, taken to be fedpd preprocess output made with the run's "
            f"settings ({how}); {where}.")


def _register(scan: Path, settings: dict, tmp: Path, notes: list[str]) -> tuple[Path, dict]:
    """``fedpd preprocess`` on one scan at the run's settings, then its QC: the registered, masked volume as a
    NIfTI on the template grid in ``tmp``, and the QC figures. Raises DataError when it fails either."""
    import numpy as np
    import SimpleITK as sitk

    from common.preprocessing import pipeline

    template_mm, n4 = int(settings["template_mm"]), bool(settings["n4"])
    now = pipeline.scan_settings(template_mm, n4)  # what this fedpd's preprocessing would record
    differ = sorted(k for k in now if k != "simpleitk" and k in settings and settings[k] != now[k])
    if differ:
        raise DataError(f"{scan}: refused: the run's scans were preprocessed with "
                        f"{', '.join(f'{k}={settings[k]!r}' for k in differ)}, this fedpd's preprocessing has "
                        f"{', '.join(f'{k}={now[k]!r}' for k in differ)}, so it cannot prepare this scan as they "
                        "were. Preprocess the scan with the fedpd version that prepared the run's scans (fedpd "
                        "preprocess) and pass the output with --preprocessed")
    if str(settings.get("simpleitk", now["simpleitk"])) != now["simpleitk"]:
        notes.append(f"The run's scans were preprocessed with SimpleITK {settings.get('simpleitk')}, this scan with "
                     f"{now['simpleitk']}: registrations can differ slightly between versions.")
    template = pipeline.load_template(template_mm)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # as fedpd preprocess: results independent of timing
    try:
        result = pipeline.preprocess_scan(scan, template, n4=n4)
    except DataError as exc:  # the reason, without the path
        raise DataError(f"{scan}: refused by the run's preprocessing: {exc}") from None
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for ITK exceptions
        raise DataError(f"{scan}: refused: the run's preprocessing (registration to the MNI152 template) failed in "
                        f"SimpleITK ({pipeline.sitk_failure(exc)}); is this a whole-head T1 scan?") from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    reason = pipeline.qc_verdict(result.metrics, float(settings["qc_threshold"]))
    if reason:
        raise DataError(f"{scan}: refused: the scan fails the run's preprocessing QC: {reason}. The model's scans "
                        f"passed this check, so its answer on this one would mean nothing; check the scan (a whole-"
                        "head 3D T1?). If it is already fedpd preprocess output, pass --preprocessed")
    path = tmp / "registered.nii.gz"
    pipeline.save_registered(result.image, template.affine, path)  # as fedpd preprocess writes it
    how = describe_preparation({"method": FEDPD_PREPROCESS, "settings": settings})
    notes.append(f"The scan was prepared as the run's scans were ({how}); QC correlation with the template "
                 f"{result.metrics['correlation']:.3f}.")
    return path, {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in result.metrics.items()}


def _about(exc: OSError, out: Path) -> bool:
    """Whether an OSError concerns writing ``out`` (its folder chain or the temporary file beside it)."""
    if not exc.filename:  # a write that failed midway: disk full, quota, read-only file system
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
    failed = Path(exc.filename).absolute()
    out = out.absolute()
    return failed == out or failed.parent == out.parent or failed in out.parents


def format_result(result: dict) -> str:
    """The human-readable report of :func:`predict_scan` (what ``fedpd predict`` prints)."""
    where = {"checkpoint": "chosen on validation, stored in the checkpoint",
             "report": "chosen on validation, from the run's report.json",
             "default": "DEFAULT, not validated"}[result["threshold_source"]]
    rnd = result["selected_round"] if result["selected_round"] is not None else result["round"]
    lines = [
        f"scan:           {result['scan']}",
        f"checkpoint:     {result['checkpoint']} (round {rnd}; trained on {result['source']} data)",
        f"PD probability: {result['probability']:.4f}",
        f"decision:       {result['decision']} (probability {'>=' if result['decision'] == 'PD' else '<'} "
        f"threshold {result['threshold']:.4f}, {where})",
    ]
    prep = result.get("preparation")
    if prep:
        done = {"fedpd preprocess": "N4, registered to MNI152, brain mask, QC passed",
                "given": "used as given (--preprocessed)", "none": "used as given"}[prep["applied"]]
        lines.append(f"preparation:    {done}; the run's scans: {prep['record']}")
    sal = result.get("saliency")
    if sal:
        empty = " (empty: no positive evidence found)" if sal.get("empty") else ""
        lines.append(f"saliency:       {sal['png']} ({sal['method']} on {sal['layer']}, evidence for "
                     f"{sal['explains']}, {sal['background']} background){empty}")
    lines += [f"NOTE: {n}" for n in result["notes"]]
    return "\n".join(lines)
