"""From the selected checkpoint to ``report.json``, ``predictions.csv`` and ``model.pt``.

Shared by the ServerApp and the baselines: the best round and the decision threshold come from the
validation rows only; the test rows are evaluated once, on the selected checkpoint, with
subject-level bootstrap confidence intervals.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from common.config import RunConfig
from common.device import Runtime
from common.files import atomic_write_bytes, atomic_write_text
from common.learning.metrics import binary_metrics, bootstrap_ci, best_threshold
from common.learning.model import model_from_checkpoint
from common.learning.train import evaluate_rows
from common.runs.records import RunReport
from common.runs.rundir import SELECTION_RULE, RunDir, select_round

__all__ = ["finalize_run", "data_source", "save_selected_model", "PREDICTIONS_FILE", "MODEL_FILE"]

log = logging.getLogger("fedpd.finalize")


def data_source(rows: pd.DataFrame) -> str:
    """``phantom`` or ``ppmi`` from the manifest's ``source`` column (``unknown`` if absent)."""
    if "source" in rows.columns and rows["source"].notna().any():
        values = sorted(set(rows["source"].dropna().astype(str)))
        return values[0] if len(values) == 1 else "mixed:" + "+".join(values)
    return "unknown"


def save_selected_model(run: RunDir, ckpt: dict, *, threshold: float, selected_round: int, source: str,
                        arm: str, preparation: dict | None = None) -> Path:
    """``model.pt``: the selected round's checkpoint plus the validated threshold (loadable by RunDir.load_checkpoint),
    and ``preparation`` (how the scans were prepared) when given; else the checkpoint's own, if any."""
    payload = dict(ckpt) | {"threshold": float(threshold), "selected_round": int(selected_round), "source": source,
                            "arm": arm}
    if preparation is not None:
        payload["preparation"] = preparation
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = run.root / MODEL_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def _with_ci(y_true, y_score, groups, threshold, seed) -> dict[str, Any]:
    return bootstrap_ci(y_true, y_score, groups, threshold=threshold, n_boot=1000, seed=seed)


PREDICTIONS_FILE = "predictions.csv"
MODEL_FILE = "model.pt"


def _predictions(rows: pd.DataFrame, split: str, scores) -> pd.DataFrame:
    """Per-scan scores of the selected model; stays in the run folder on the server host, never sent anywhere."""
    cols = [c for c in ("image_id", "subject_id", "site", "label", "path") if c in rows.columns]
    out = rows[cols].copy()
    out.insert(0, "split", split)
    out["score"] = scores
    return out


def finalize_run(run: RunDir, cfg: RunConfig, rt: Runtime, val_rows: pd.DataFrame, test_rows: pd.DataFrame,
                 cache_dir: Path, extra: dict | None = None, arm: str = "fedavg",
                 render: Callable[[Path], Path] | None = None, preparation: dict | None = None) -> RunReport:
    """Select the best round on validation, choose the threshold on validation, evaluate test once.

    Writes ``report.json`` (DESIGN.md "Outputs"), ``predictions.csv`` (val and test scores of the selected
    model, for the figures) and ``model.pt`` (the selected checkpoint plus its validated ``threshold``, what
    ``fedpd predict`` loads); returns the report. ``arm`` names the comparison arm (fedavg, centralized,
    local:<site>, scratch, ...). ``render`` (:func:`common.report.render.render_report`, passed in by the
    callers, which may import the report layer) turns the written ``report.json`` into ``report.html``; a
    failure there is logged and never loses the run's results.

    ``preparation`` (:func:`common.preprocessing.provenance.scan_preparation` of the server's scans; default: the
    selected checkpoint's) goes into ``report.json`` as ``data.preparation`` and into ``model.pt``, so the two
    always agree; a run that knows none records none (``fedpd predict`` then treats its scans as unknown).
    """
    start = time.perf_counter()
    records = run.read_rounds()
    selected = select_round(records)
    ckpt = RunDir.load_checkpoint(run.checkpoint_path(selected))
    model = model_from_checkpoint(ckpt, run.checkpoint_path(selected))

    val = evaluate_rows(model, val_rows, cfg, rt, cache_dir)
    threshold = float(best_threshold(val.y_true, val.y_score))
    val_metrics = binary_metrics(val.y_true, val.y_score, threshold=threshold)

    test = evaluate_rows(model, test_rows, cfg, rt, cache_dir)  # the one and only look at test
    preds = pd.concat([_predictions(val_rows, "val", val.y_score), _predictions(test_rows, "test", test.y_score)])
    atomic_write_text(run.root / PREDICTIONS_FILE, preds.to_csv(index=False))
    groups = test_rows["subject_id"].astype(str).to_numpy()
    test_metrics = _with_ci(test.y_true, test.y_score, groups, threshold, cfg.seed)
    per_site = {}
    for site, idx in test_rows.reset_index(drop=True).groupby("site").groups.items():
        idx = list(idx)
        per_site[str(site)] = _with_ci(test.y_true[idx], test.y_score[idx], groups[idx], threshold, cfg.seed)

    source = data_source(pd.concat([val_rows, test_rows]))
    if preparation is None:
        preparation = ckpt.get("preparation")
    save_selected_model(run, ckpt, threshold=threshold, selected_round=selected, source=source, arm=arm,
                        preparation=preparation)
    extra = dict(extra or {})
    data = {"source": source, **extra.pop("data", {})}
    if preparation is not None:
        data["preparation"] = preparation
    report = RunReport(
        arm=arm,
        data=data,
        selected_round=selected,
        selection=SELECTION_RULE,
        threshold=threshold,
        threshold_rule="Youden's J on the server validation rows of the selected round",
        val=val_metrics,
        test=test_metrics,
        test_per_site=per_site,
        test_counts={"scans": int(len(test_rows)), "subjects": int(test_rows["subject_id"].nunique())},
        rounds=len(records),
        config=cfg.to_dict(),
        device=rt.describe(),
        git_commit=ckpt.get("git_commit", "unknown"),
        **extra,  # participation, holdout_site
    )
    run.write_json("report.json", report.to_dict())
    html = None
    try:  # the HTML report is a view of report.json: a failure here must never lose the run's results
        html = render(run.root) if render is not None else None
    except Exception as exc:
        log.warning("report.html not rendered (%s: %s); report.json is complete, re-render with: fedpd report %s",
                    type(exc).__name__, exc, run.root)
    log.info("report written to %s%s (selected round %d, %.1fs)", run.report_file, f" and {html}" if html else "",
             selected, time.perf_counter() - start)
    return report
