"""How a run's scans were prepared: the ``preparation`` record a run keeps (report.json, checkpoints, model.pt).

``fedpd predict`` must give a new scan the preparation the model's scans had: a model trained on
``fedpd preprocess`` output (N4, affine registration to MNI152, brain mask) is meaningless on a raw,
skull-on scanner-space head. So a run records, from the ``preprocess.json`` that ``fedpd preprocess``
writes beside its scans (:mod:`common.preprocessing.pipeline`), how the server's scans (the val and test
rows of ``server.csv``: the scans the model was selected and tested on) were prepared::

    {"method": "fedpd-preprocess",
     "settings": {"pipeline_version": 1, "template_mm": 2, "n4": true, "seed": 1, "simpleitk": "2.4.0",
                  "qc_threshold": 0.7, "template": "...", ...},   # preprocess.json "settings", less the
                                                                  # worker counts (no effect on a scan)
     "versions": {"simpleitk": ..., "nilearn": ..., ...},         # preprocess.json "versions"
     "folders": ["/data/mni"]}                                    # where the scans lie

    {"method": "none", "folders": [...]}   # no preprocess.json beside the scans: the phantom's --space mni,
                                           # or scans a user prepared: used as given

A run whose checkpoints carry no record (fedpd before this record existed) is *unknown*:
``fedpd predict`` then refuses raw scans (see :mod:`common.inference.predict`).

Scans from several folders: their settings must agree (the SimpleITK version aside: it is kept as a
comma-separated list); a mix of preprocessed and other scans, or of different settings, is refused
(:class:`~common.errors.DataError`): a model selected on scans prepared two ways has no one preparation to
give a new scan.

This module imports no SimpleITK: the server and the baselines read the record cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from common.errors import DataError

__all__ = ["PREPROCESS_JSON", "FEDPD_PREPROCESS", "NONE", "scan_preparation", "describe_preparation"]

PREPROCESS_JSON = "preprocess.json"  # what common.preprocessing.pipeline.preprocess_manifest writes into --out
FEDPD_PREPROCESS, NONE = "fedpd-preprocess", "none"
_REQUIRED = ("pipeline_version", "template_mm", "n4", "qc_threshold")
_NO_EFFECT = ("workers", "threads_per_worker")  # how fast, not what: dropped from the record
_MAY_DIFFER = ("simpleitk",)  # recorded (joined), not a reason to refuse


def _read(folder: Path) -> dict | None:
    """The ``settings`` and ``versions`` of ``folder/preprocess.json``, or ``None`` when there is none."""
    path = folder / PREPROCESS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc}); it records how the scans beside it were "
                        "preprocessed: restore it, or re-run fedpd preprocess into that folder") from exc
    settings = data.get("settings") if isinstance(data, dict) else None
    missing = [k for k in _REQUIRED if not isinstance(settings, dict) or k not in settings]
    if missing:
        raise DataError(f"{path}: not a fedpd preprocess record (no settings {', '.join(missing)}); restore it, or "
                        "re-run fedpd preprocess into that folder")
    versions = data.get("versions")
    return {"settings": {k: v for k, v in settings.items() if k not in _NO_EFFECT},
            "versions": dict(versions) if isinstance(versions, dict) else {}}


def scan_preparation(paths: Iterable[str | Path]) -> dict:
    """The ``preparation`` record (module docstring) of scans at ``paths`` (a manifest's ``path`` column).

    Raises:
        DataError: no paths; an unreadable ``preprocess.json``; scans from preprocessed and other folders, or
            from folders preprocessed with different settings (the message names the folders and the fix).
    """
    folders = sorted({str(Path(str(p)).expanduser().absolute().parent) for p in paths})
    if not folders:
        raise DataError("no scans: the preparation of an empty manifest cannot be told")
    found = {f: _read(Path(f)) for f in folders}
    prepared = [f for f in folders if found[f] is not None]
    if not prepared:
        return {"method": NONE, "folders": folders}
    raw = [f for f in folders if found[f] is None]
    if raw:
        raise DataError(f"the server's scans come from {len(prepared)} folder(s) that fedpd preprocess wrote "
                        f"({', '.join(prepared[:3])}) and {len(raw)} that it did not ({', '.join(raw[:3])}): the model "
                        "would be selected and tested on scans prepared two ways, and fedpd predict could not tell how "
                        "to prepare a new scan. Preprocess every scan (fedpd preprocess), then split and partition "
                        "its manifest.csv")
    first = found[prepared[0]]

    def key(record: dict) -> dict:
        return {k: v for k, v in record["settings"].items() if k not in _MAY_DIFFER}

    other = [f for f in prepared if key(found[f]) != key(first)]
    if other:
        diff = sorted(k for k in set(key(first)) | set(key(found[other[0]]))
                      if key(first).get(k) != key(found[other[0]]).get(k))
        raise DataError(f"the server's scans come from folders preprocessed with different settings ({', '.join(diff)}"
                        ": "
                        f"{prepared[0]} has {', '.join(f'{k}={key(first).get(k)!r}' for k in diff)}, {other[0]} has "
                        f"{', '.join(f'{k}={key(found[other[0]]).get(k)!r}' for k in diff)}); fedpd predict could not "
                        "tell how to prepare a new scan. Preprocess every scan with the same settings")
    settings = dict(first["settings"])
    for k in _MAY_DIFFER:
        values = sorted({str(found[f]["settings"][k]) for f in prepared if k in found[f]["settings"]})
        if len(values) > 1:
            settings[k] = ", ".join(values)
    return {"method": FEDPD_PREPROCESS, "settings": settings, "versions": first["versions"], "folders": prepared}


def describe_preparation(record: dict | None) -> str:
    """One line for people: what the record says (``unknown`` for ``None``)."""
    if record is None:
        return "unknown (the run records no preparation: written by an older fedpd)"
    if record.get("method") == NONE:
        return "none (the scans were used as given: not preprocessed by fedpd)"
    s = record.get("settings") or {}
    return (f"fedpd preprocess v{s.get('pipeline_version')}: "
            f"{'N4, ' if s.get('n4') else 'no N4, '}affine registration to MNI152 at {s.get('template_mm')} mm, "
            f"brain mask, QC correlation >= {s.get('qc_threshold')}")
