"""A run's folder on disk: checkpoints, ``rounds.jsonl``, ``config.json``, resume and round selection.

Used by the ServerApp and by the baselines, so every arm writes the same files. Every file is written
to a temporary name and moved into place, so a killed process never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import CheckpointError, DataError
from common.files import atomic_write_text
from common.runs.records import RoundRecord

__all__ = ["RunDir", "CHECKPOINT_FORMAT", "select_round", "SELECTION_RULE", "git_commit", "GIT_COMMIT_ENV"]

CHECKPOINT_FORMAT = "fedpd-checkpoint-1"


GIT_COMMIT_ENV = "FEDPD_GIT_COMMIT"


def git_commit() -> str:
    """The commit of the code that runs, or ``"unknown"`` outside a git checkout.

    Flower runs the app from an installed FAB (no ``.git``), so whoever starts the Flower processes from a
    checkout passes its commit down in ``FEDPD_GIT_COMMIT`` (``fedpd simulate`` does), which wins.
    """
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(obj: Any) -> str:
    """JSON with NaN written as null (strict JSON readers choke on NaN)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=None, sort_keys=False)


class RunDir:
    """The output folder of one run (``runs/<name>/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.rounds_file = self.root / "rounds.jsonl"
        self.config_file = self.root / "config.json"
        self.report_file = self.root / "report.json"

    def prepare(self) -> "RunDir":
        """Create the folder; raise a clear error when it cannot be written."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise DataError(f"{self.root}: cannot write the run folder ({exc.strerror or exc}); set out-dir (--out) to a "
                            "writable folder") from exc
        return self

    def existing_run(self) -> str | None:
        """What in this folder shows an earlier run (checkpoints, rounds.jsonl, report.json), or ``None``."""
        found = []
        saved = self.saved_rounds() if self.checkpoints.is_dir() else []
        if saved:
            found.append(f"checkpoints of round(s) {saved[0]}..{saved[-1]}" if len(saved) > 1 else f"the checkpoint of round {saved[0]}")
        for name in ("rounds.jsonl", "report.json", "model.pt"):
            if (self.root / name).is_file():
                found.append(name)
        return ", ".join(found) or None

    def checkpoint_path(self, round_: int) -> Path:
        return self.checkpoints / f"round-{round_}.pt"

    def save_checkpoint(self, round_: int, state: dict[str, np.ndarray], *, config: dict, metrics: dict,
                        model: dict, strategy: dict | None = None, preparation: dict | None = None) -> Path:
        """Save a self-describing checkpoint: weights, config, round, metrics, model args, git commit, and how the
        run's scans were prepared (``preparation``, :mod:`common.preprocessing.provenance`; absent when not given,
        which ``fedpd predict`` reads as unknown)."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "round": int(round_),
            "state_dict": {k: torch.as_tensor(np.asarray(v)).clone() for k, v in state.items()},
            "config": dict(config),
            "metrics": json.loads(dumps(metrics)),
            "model": dict(model),
            "strategy": dict(strategy or {}),
            "git_commit": git_commit(),
        }
        if preparation is not None:
            payload["preparation"] = json.loads(dumps(preparation))
        path = self.checkpoint_path(round_)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def keep_only(self, rounds: set[int]) -> list[int]:
        """Delete the round checkpoints of every round not in ``rounds`` (run-config ``keep-checkpoints``);
        returns the rounds deleted."""
        gone = [r for r in self.saved_rounds() if r not in rounds]
        for r in gone:
            self.checkpoint_path(r).unlink(missing_ok=True)
        return gone

    def saved_rounds(self) -> list[int]:
        """Round numbers with a checkpoint, ascending."""
        rounds = []
        for p in self.checkpoints.glob("round-*.pt"):
            try:
                rounds.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(rounds)

    @staticmethod
    def load_checkpoint(path: str | Path) -> dict:
        """Load a fedpd run checkpoint with ``weights_only=True``; a clear error if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file; list {path.parent} for the rounds that were saved")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file (pickle, zip, EOF)
            raise CheckpointError(f"{path}: not a readable fedpd checkpoint ({type(exc).__name__}: {exc}); the file may be truncated, re-run or resume from an earlier round") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a fedpd run checkpoint (no format {CHECKPOINT_FORMAT!r}); for a MedicalNet file use pretrained-path")
        return payload

    def append_round(self, record: RoundRecord) -> None:
        """Append one JSON line to ``rounds.jsonl`` and flush it to disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_file, "a") as fh:
            fh.write(dumps(record.to_dict()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_rounds(self) -> list[RoundRecord]:
        """All round records, in file order.

        Raises:
            DataError: a line that is not JSON or not a round record (the message names file and line).
        """
        if not self.rounds_file.exists():
            return []
        records = []
        for n, line in enumerate(self.rounds_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.rounds_file}:{n}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg}); the file was edited or cut short: restore it, or "
                                "delete the run folder and start over") from exc
            records.append(RoundRecord.from_dict(data, where))
        return records

    def truncate_rounds(self, last_round: int) -> list[RoundRecord]:
        """Keep only records with ``round <= last_round`` (used when resuming after a crash)."""
        kept = [r for r in self.read_rounds() if r.round <= last_round]
        atomic_write_text(self.rounds_file, "".join(dumps(r.to_dict()) + "\n" for r in kept))
        return kept

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.root / name
        atomic_write_text(path, json.dumps(json.loads(dumps(obj)), indent=2) + "\n")
        return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


SELECTION_RULE = "lowest validation loss (ties: higher validation AUC, then earlier round)"


def select_round(records: list[RoundRecord], by: str = "loss") -> int:
    """The round whose model is best on *validation*; test is never used.

    ``by="loss"`` (the default, :data:`SELECTION_RULE`): the lowest validation cross-entropy; ties go to the
    higher validation AUC, then to the earlier round. The loss is a proper scoring rule over every validation
    scan's probability. Validation AUC alone, with the few control subjects a PPMI-sized validation split
    holds, can rank a handful of controls correctly by chance in an early round whose scores barely differ
    (EXPERIMENTS.md: 0.98 on 9 control scans for a round that was at chance on test).

    ``by`` may also name another validation metric where higher is better (``auc``, ``balanced_accuracy``):
    the highest wins, ties go to the lower validation loss, then to the earlier round.

    Rounds whose criterion is undefined (None/NaN) never win. If it is undefined in every round, the other
    criterion (AUC for loss, loss for a metric) is used, with a warning.

    Raises:
        ValueError: no record has a defined validation metric or loss.
    """
    def val(r, key):
        v = r.val.get(key)
        return v if _finite(v) else None

    def by_loss(rs):
        return min(rs, key=lambda r: (val(r, "loss"), -(val(r, "auc") if val(r, "auc") is not None else -math.inf),
                                      r.round)).round

    def by_metric(rs, metric):
        return max(rs, key=lambda r: (val(r, metric), -(val(r, "loss") if val(r, "loss") is not None else math.inf),
                                      -r.round)).round

    metric = "auc" if by == "loss" else by
    with_loss = [r for r in records if val(r, "loss") is not None]
    with_metric = [r for r in records if val(r, metric) is not None]
    if by == "loss" and with_loss:
        return by_loss(with_loss)
    if by != "loss" and with_metric:
        return by_metric(with_metric, metric)
    if by == "loss" and with_metric:
        warnings.warn("validation loss is undefined in every round; selecting by highest validation AUC", RuntimeWarning)
        return by_metric(with_metric, metric)
    if by != "loss" and with_loss:
        warnings.warn(f"validation {metric} is undefined in every round; selecting by lowest validation loss", RuntimeWarning)
        return by_loss(with_loss)
    raise ValueError(f"no round has a validation {metric} or loss to select by")
