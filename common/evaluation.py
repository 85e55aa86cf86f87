"""From manifest rows to predictions, and from the selected checkpoint to ``report.json``.

Shared by the ServerApp and the baselines: the best round and the decision threshold come from the
validation rows only; the test rows are evaluated once, on the selected checkpoint, with
subject-level bootstrap confidence intervals.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from common import keys
from common.config import RunConfig
from common.data import build_dataset, class_counts, class_weights, make_loader
from common.device import Runtime
from common.errors import CheckpointError
from common.keys import NUM_CLASSES
from common.metrics import MetricUndefinedWarning, binary_metrics, bootstrap_ci, best_threshold
from common.model import build_med3d
from common.records import RoundRecord
from common.run import SELECTION_RULE, RunDir, atomic_write_bytes, atomic_write_text, select_round
from common.train import EvalResult, load_state_numpy, predict

__all__ = ["make_model", "model_args", "model_from_checkpoint", "train_loader", "eval_loader", "evaluate_rows",
           "validation_metrics", "close_round", "finalize_run", "data_source", "save_selected_model",
           "PREDICTIONS_FILE", "MODEL_FILE"]

log = logging.getLogger("fedpd.evaluation")


def make_model(cfg: RunConfig, pretrained: bool = False) -> torch.nn.Module:
    """The Med3D of this run-config; MedicalNet weights only when ``pretrained`` (server init)."""
    path = cfg.pretrained_path if (pretrained and cfg.pretrained_path) else None
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without resetting the caller's RNG
        torch.manual_seed(cfg.seed)  # random init (from scratch, and the head) follows the run's seed
        return build_med3d(depth=cfg.model_depth, num_classes=2, pretrained=path, dropout=cfg.dropout)


def model_args(cfg: RunConfig) -> dict:
    """What builds this run's Med3D, as stored in every checkpoint's ``model`` entry."""
    return {"depth": cfg.model_depth, "num_classes": NUM_CLASSES, "dropout": cfg.dropout}


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> torch.nn.Module:
    """The Med3D a fedpd checkpoint describes, with its weights: the one way from a checkpoint to a model.

    The architecture comes from the checkpoint itself (its ``model`` entry, else its stored run-config), never
    from the caller's run-config, so a model is always rebuilt as it was trained. The caller's RNG is left
    as it was (the weights replace the random initialisation anyway).

    Raises:
        CheckpointError: the weights do not fit the model the checkpoint names (the message names ``path``).
    """
    args = dict(ckpt.get("model") or {})
    config = ckpt.get("config") or {}
    try:
        depth = int(args.get("depth", config.get("model-depth", 10)))
        classes = int(args.get("num_classes", NUM_CLASSES))
        dropout = float(args.get("dropout", config.get("dropout", 0.0)))
        with torch.random.fork_rng(devices=[]):
            model = build_med3d(depth=depth, num_classes=classes, dropout=dropout)
        load_state_numpy(model, {k: v.numpy() for k, v in ckpt["state_dict"].items()})
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit Med3D {args or {'depth': config.get('model-depth')}}: "
                              f"{str(exc).splitlines()[0][:300]}") from exc
    return model


def _records(rows: pd.DataFrame) -> list[dict]:
    return rows.to_dict("records")


def train_loader(rows: pd.DataFrame, cfg: RunConfig, cache_dir: Path, seed: int):
    """Loader over training rows with the run's class balancing; also returns the counts and loss weights."""
    recs = _records(rows)
    ds = build_dataset(recs, cfg.input_shape, cfg.spacing, cache_dir, train=True, seed=seed)
    labels = [int(r["label"]) for r in recs]
    loader = make_loader(ds, labels, cfg.batch_size, cfg.class_balancing, seed=seed, num_workers=cfg.num_workers)
    counts = class_counts(recs)
    weights = class_weights(counts) if cfg.class_balancing == "loss" else None
    return loader, counts, weights


def eval_loader(rows: pd.DataFrame, cfg: RunConfig, cache_dir: Path):
    """Deterministic loader (no augmentation, no sampler) in row order."""
    recs = _records(rows)
    ds = build_dataset(recs, cfg.input_shape, cfg.spacing, cache_dir, train=False, seed=cfg.seed)
    labels = [int(r["label"]) for r in recs]
    return make_loader(ds, labels, cfg.batch_size, "none", seed=cfg.seed, num_workers=cfg.num_workers, shuffle=False)


def evaluate_rows(model: torch.nn.Module, rows: pd.DataFrame, cfg: RunConfig, rt: Runtime, cache_dir: Path) -> EvalResult:
    """Predict every row (in order)."""
    return predict(model, eval_loader(rows, cfg, cache_dir), rt)


def validation_metrics(model: torch.nn.Module, rows: pd.DataFrame, cfg: RunConfig, rt: Runtime,
                       cache_dir: Path) -> dict[str, float]:
    """The threshold-free validation figures of a model on ``rows`` (a round's record, a site's evaluate
    reply): :func:`binary_metrics` plus ``loss``. Undefined figures (a one-class split) are NaN, quietly:
    NaN is what the record keeps."""
    res = evaluate_rows(model, rows, cfg, rt, cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        return binary_metrics(res.y_true, res.y_score) | {"loss": res.loss}


def _train_loss(sites: dict[str, dict]) -> float | None:
    """The round's training loss: the sites' losses weighted by their examples (one site: its own loss)."""
    if len(sites) == 1:
        (only,) = sites.values()
        return only[keys.TRAIN_LOSS]
    total = sum(s.get(keys.NUM_EXAMPLES, 0) for s in sites.values())
    return (sum(s[keys.TRAIN_LOSS] * s[keys.NUM_EXAMPLES] for s in sites.values()) / total) if total else None


def close_round(run: RunDir, model: torch.nn.Module, g: int, *, cfg: RunConfig, rt: Runtime, val_rows: pd.DataFrame,
                cache_dir: Path, started: float, strategy: str, sites: dict[str, dict],
                site_eval: dict | None = None, missing_sites: list | None = None, failures: list | None = None,
                rejected: list | None = None, site_qc: dict | None = None) -> RoundRecord:
    """The server side of a round, the same for the ServerApp and every baseline arm: validate the round's
    model on the server's val rows, build the round record, append it to ``rounds.jsonl``, then checkpoint.

    ``sites`` maps each aggregated site (or the arm) to its train-reply metrics. The record goes first: a
    crash before the checkpoint lands makes resume repeat round ``g`` (its record is truncated away), and
    never leaves a checkpoint without its record. Returns the record.
    """
    metrics = validation_metrics(model, val_rows, cfg, rt, cache_dir)
    total = sum(s.get(keys.NUM_EXAMPLES, 0) for s in sites.values())
    record = RoundRecord(round=g, val=metrics, train_loss=_train_loss(sites), num_examples=total, sites=sites,
                         site_eval=site_eval or {}, missing_sites=missing_sites or [], failures=failures or [],
                         rejected=rejected or [], site_qc=site_qc or {}, wall_seconds=time.time() - started)
    run.append_round(record)
    run.save_checkpoint(g, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, config=cfg.to_dict(),
                        metrics=record.to_dict(), model=model_args(cfg), strategy={"name": strategy, "round": g})
    return record


def data_source(rows: pd.DataFrame) -> str:
    """``phantom`` or ``ppmi`` from the manifest's ``source`` column (``unknown`` if absent)."""
    if "source" in rows.columns and rows["source"].notna().any():
        values = sorted(set(rows["source"].dropna().astype(str)))
        return values[0] if len(values) == 1 else "mixed:" + "+".join(values)
    return "unknown"


def save_selected_model(run: RunDir, ckpt: dict, *, threshold: float, selected_round: int, source: str,
                        arm: str) -> Path:
    """``model.pt``: the selected round's checkpoint plus the validated threshold (loadable by RunDir.load_checkpoint)."""
    payload = dict(ckpt) | {"threshold": float(threshold), "selected_round": int(selected_round), "source": source,
                            "arm": arm}
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
                 cache_dir: Path, extra: dict | None = None, arm: str = "fedavg") -> dict:
    """Select the best round on validation, choose the threshold on validation, evaluate test once.

    Writes ``report.json`` (DESIGN.md "Outputs"), ``predictions.csv`` (val and test scores of the selected
    model, for the figures) and ``model.pt`` (the selected checkpoint plus its validated ``threshold``, what
    ``fedpd predict`` loads); returns the report. ``arm`` names the comparison arm (fedavg, centralized,
    local:<site>, scratch, ...).
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
    save_selected_model(run, ckpt, threshold=threshold, selected_round=selected, source=source, arm=arm)
    report = {
        "arm": arm,
        "data": {
            "source": source,
            **(extra or {}).get("data", {}),
        },
        "selected_round": selected,
        "selection": SELECTION_RULE,
        "threshold": threshold,
        "threshold_rule": "Youden's J on the server validation rows of the selected round",
        "val": val_metrics,
        "test": test_metrics,
        "test_per_site": per_site,
        "test_counts": {"scans": int(len(test_rows)), "subjects": int(test_rows["subject_id"].nunique())},
        "rounds": len(records),
        "config": cfg.to_dict(),
        "device": rt.describe(),
        "git_commit": ckpt.get("git_commit", "unknown"),
    }
    for key, value in (extra or {}).items():
        if key != "data":
            report[key] = value
    run.write_json("report.json", report)
    html = None
    try:  # the HTML report is a view of report.json: a failure here must never lose the run's results
        from common.report import render_report

        html = render_report(run.root)
    except Exception as exc:
        log.warning("report.html not rendered (%s: %s); report.json is complete, re-render with: fedpd report %s",
                    type(exc).__name__, exc, run.root)
    log.info("report written to %s%s (selected round %d, %.1fs)", run.report_file, f" and {html}" if html else "",
             selected, time.perf_counter() - start)
    return report
