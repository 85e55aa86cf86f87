"""The server side of a round, written once: the ServerApp and every baseline arm close their rounds here."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from common import keys
from common.config import RunConfig
from common.device import Runtime
from common.learning.model import model_args
from common.learning.train import validation_metrics
from common.runs.records import RoundRecord
from common.runs.rundir import RunDir, select_round

__all__ = ["close_round"]


def _train_loss(sites: dict[str, dict], total: int) -> float | None:
    """The round's training loss: the sites' losses weighted by their ``total`` examples (one site: its own loss)."""
    if len(sites) == 1:
        (only,) = sites.values()
        return only[keys.TRAIN_LOSS]
    return (sum(s[keys.TRAIN_LOSS] * s[keys.NUM_EXAMPLES] for s in sites.values()) / total) if total else None


def close_round(run: RunDir, model: torch.nn.Module, g: int, *, cfg: RunConfig, rt: Runtime, val_rows: pd.DataFrame,
                cache_dir: Path, started: float, strategy: str, sites: dict[str, dict],
                site_eval: dict | None = None, missing_sites: list | None = None, failures: list | None = None,
                rejected: list | None = None, site_qc: dict | None = None, privacy: dict | None = None,
                strategy_state: dict | None = None, received_bytes: int | None = None,
                preparation: dict | None = None) -> RoundRecord:
    """The server side of a round, the same for the ServerApp and every baseline arm: validate the round's
    model on the server's val rows, build the round record, append it to ``rounds.jsonl``, then checkpoint.

    ``sites`` maps each aggregated site (or the arm) to its train-reply metrics. The record goes first: a
    crash before the checkpoint lands makes resume repeat round ``g`` (its record is truncated away), and
    never leaves a checkpoint without its record. The record's ``val`` also holds ``seconds``, the time the
    validation took. ``privacy`` (DP runs) and ``received_bytes`` (federated runs) go into the record;
    ``strategy_state`` (a server optimizer's moments, the privacy ledger: tensors and plain values) into the
    checkpoint, for resume; ``preparation`` (how the run's scans were prepared,
    :func:`common.preprocessing.provenance.scan_preparation`) into the checkpoint, for ``fedpd predict``. Returns
    the record.
    """
    began = time.monotonic()
    metrics = validation_metrics(model, val_rows, cfg, rt, cache_dir)
    metrics["seconds"] = time.monotonic() - began  # the server's validation loop (round overhead: benchmarks/)
    total = sum(s.get(keys.NUM_EXAMPLES, 0) for s in sites.values())
    record = RoundRecord(round=g, val=metrics, train_loss=_train_loss(sites, total), num_examples=total, sites=sites,
                         site_eval=site_eval or {}, missing_sites=missing_sites or [], failures=failures or [],
                         rejected=rejected or [], site_qc=site_qc or {}, wall_seconds=time.time() - started,
                         privacy=privacy, received_bytes=received_bytes)
    run.append_round(record)
    run.save_checkpoint(g, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, config=cfg.to_dict(),
                        metrics=record.to_dict(), model=model_args(cfg),
                        strategy={"name": strategy, "dp": cfg.dp, "round": g, "state": dict(strategy_state or {})},
                        preparation=preparation)
    if cfg.keep_checkpoints == "selected-and-last":
        _keep_selected_and_last(run, g)
    return record


def _keep_selected_and_last(run: RunDir, g: int) -> None:
    """Delete every round checkpoint but round ``g``'s (the last: resume starts there) and the one the selection
    rule picks from the records so far (finalize tests it). Only after round ``g``'s checkpoint landed, so a
    crash at any point leaves the checkpoint resume needs and the one selection needs."""
    with warnings.catch_warnings():  # finalize warns once, with the same words, if it falls back
        warnings.simplefilter("ignore")
        try:
            selected = select_round(run.read_rounds())
        except ValueError:  # no round has a validation figure yet: nothing to choose by, keep everything
            return
    run.keep_only({selected, g})
