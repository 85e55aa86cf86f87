"""What the ServerApp needs before round 1: checked paths, held-out rows, the run folder, resume state."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from common.cohort.manifest import read_manifest
from common.cohort.scans import check_scans, format_problems
from common.cohort.splits import split_audit
from common.config import RunConfig
from common.device import Runtime
from common.errors import ConfigError, DataError
from common.learning.model import make_model, model_from_checkpoint
from common.preprocessing.provenance import scan_preparation
from common.runs.preflight import check_run_dir
from common.runs.rundir import RunDir

__all__ = ["ServerSetup", "prepare", "absolute"]

log = logging.getLogger("fedpd.server")


def absolute(value: str, key: str) -> Path:
    """A run-config path that must be absolute: files are written/read on the SuperLink host."""
    if not value:
        raise ConfigError(f"run-config key {key!r} is empty; pass it with flwr run -c \"{key}='/absolute/path'\"")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"run-config key {key!r} = {value!r} must be an absolute path (the ServerApp runs in its own folder)")
    return path


@dataclass
class ServerSetup:
    cfg: RunConfig
    rt: Runtime
    run: RunDir
    val_rows: pd.DataFrame
    test_rows: pd.DataFrame
    cache_dir: Path
    start_round: int
    model: torch.nn.Module  # initial weights; reused (weights replaced) for every round's validation
    data_info: dict = field(default_factory=dict)
    strategy_state: dict = field(default_factory=dict)  # resume: the strategy's state saved with the checkpoint
    preparation: dict | None = None  # how the server's scans were prepared (common.preprocessing.provenance)


def prepare(cfg: RunConfig, rt: Runtime) -> ServerSetup:
    """Validate inputs, create or resume the run folder, build the initial model.

    Raises:
        ConfigError: a path key is empty or relative, or out-dir holds a run and ``resume`` is false.
    """
    out = absolute(cfg.out_dir, "out-dir")
    manifest_path = absolute(cfg.server_manifest, "server-manifest")
    rows = read_manifest(manifest_path, require_split=True)
    val_rows = rows[rows["split"] == "val"].reset_index(drop=True)
    test_rows = rows[rows["split"] == "test"].reset_index(drop=True)
    for name, part in (("val", val_rows), ("test", test_rows)):
        if part.empty:
            raise ConfigError(f"{manifest_path}: no '{name}' rows; the server needs val and test rows (fedpd split, then fedpd partition)")
    run = check_run_dir(out, cfg.resume)  # also refused before Flower starts by fedpd simulate's preflight
    # the scans this server reads (val + test), with the same content-keyed cache as the preflight
    scan_problems = check_scans(rows, cache_file=out / "cache" / "server" / "scan-check.json")
    if scan_problems:
        raise DataError(f"{manifest_path}: " + format_problems(scan_problems, total=len(rows)))
    try:  # recorded in every checkpoint, model.pt and report.json: fedpd predict prepares a new scan the same way
        preparation = scan_preparation(rows["path"])
    except DataError as exc:
        raise DataError(f"{manifest_path}: {exc}") from exc
    saved = run.saved_rounds()
    start_round = 0
    strategy_state: dict = {}
    if cfg.resume and saved:
        start_round = saved[-1]
        ckpt = RunDir.load_checkpoint(run.checkpoint_path(start_round))
        if ckpt.get("model", {}).get("depth") != cfg.model_depth:
            raise ConfigError(f"{run.checkpoint_path(start_round)} holds model-depth {ckpt['model'].get('depth')}, run-config says {cfg.model_depth}; resume with the same model-depth")
        saved_strategy = ckpt.get("strategy") or {}
        for key, now in (("name", cfg.strategy), ("dp", cfg.dp)):
            then = saved_strategy.get(key, {"name": "fedavg", "dp": "none"}[key])  # older checkpoints: FedAvg, no DP
            if then != now:
                what = "strategy" if key == "name" else "dp"
                raise ConfigError(f"{run.checkpoint_path(start_round)} was trained with {what} = {then!r}, run-config says "
                                  f"{now!r}; resume with the same {what} (its optimizer state and privacy ledger belong "
                                  "to it), or start a new out-dir")
        strategy_state = dict(saved_strategy.get("state") or {})
        model = model_from_checkpoint(ckpt, run.checkpoint_path(start_round))
        run.truncate_rounds(start_round)
        log.info("resuming %s after round %d", out, start_round)
    elif cfg.resume and run.rounds_file.exists():
        raise ConfigError(f"{out}: resume=true but there is no checkpoint to resume from (only {run.rounds_file.name}); "
                          "delete that file to start over, or choose a new out-dir")
    else:
        model = make_model(cfg, pretrained=True)
    run.write_json("config.json", cfg.to_dict())
    audit = split_audit(rows)
    data_info = {"server_split_audit": audit, "unsafe_scan_split": audit["unsafe_split_by_scan"]}
    if audit["unsafe_split_by_scan"]:
        log.warning("%s was split by SCAN (fedpd split --unsafe-split-by-scan): test figures are inflated by leakage",
                    manifest_path)
    if cfg.partition_dir:
        part = Path(cfg.partition_dir) / "partition.json"
        if part.is_file():
            data_info["partition"] = json.loads(part.read_text())
            if data_info["partition"].get("holdout_site"):
                data_info["holdout_site"] = data_info["partition"]["holdout_site"]
    return ServerSetup(cfg=cfg, rt=rt, run=run, val_rows=val_rows, test_rows=test_rows,
                       cache_dir=out / "cache" / "server", start_round=start_round,
                       model=model, data_info=data_info, strategy_state=strategy_state, preparation=preparation)
