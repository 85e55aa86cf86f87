"""The schemas of a run's two record files, written and read only through this module.

``rounds.jsonl``: one :class:`RoundRecord` per line. ``report.json``: one :class:`RunReport`.

A round record is what the server side of a round knows once the round is closed
(:func:`common.runs.rounds.close_round`): which sites were aggregated and what they reported (counts and
scalars only), who was missing, failed or was rejected, and the round's model on the server's validation
rows. Its ``schema`` is :data:`ROUNDS_SCHEMA`; lines without one come from fedpd before the schema was
versioned and have the same layout (schema 1), so older run folders still load.

A run report is what :func:`common.runs.finalize.finalize_run` concludes: the selected round, the threshold
chosen on validation, the validation figures and the test figures with subject-level bootstrap CIs (all
scans and per site), the cohort facts under ``data`` and the provenance. Its ``schema`` is
:data:`REPORT_SCHEMA`; a ``report.json`` without one was written before the schema was versioned, with the
same layout. Missing keys take their defaults, so a partial report (a run that stopped, a hand-made
comparison arm) still loads and renders what it has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import DataError

__all__ = ["RoundRecord", "ROUNDS_SCHEMA", "VAL_METRICS", "RunReport", "REPORT_SCHEMA", "load_report"]

ROUNDS_SCHEMA = 1
REPORT_SCHEMA = 1
# the server-side validation figures every record carries (None where undefined, e.g. AUC on one class)
VAL_METRICS = ("n", "loss", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``."""

    round: int
    val: dict[str, float | None]  # the round's model on the server's val rows: VAL_METRICS and more (``seconds``)
    train_loss: float | None = None  # the sites' training losses weighted by their examples
    num_examples: int = 0  # training examples aggregated this round
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # aggregated site -> its train-reply metrics
    site_eval: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its evaluate-reply metrics
    missing_sites: list[str] = field(default_factory=list)  # sampled, but no usable update
    failures: list[dict[str, Any]] = field(default_factory=list)  # {site, node, phase, reason}
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {site, round, phase, reason}: update screening
    site_qc: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> {kept, excluded} preprocessing QC
    wall_seconds: float | None = None
    # DP runs: the privacy spent so far {epsilon, delta, releases, noise_multiplier, clipping_norm, noise_to_update}
    privacy: dict[str, Any] | None = None
    # federated runs: the bytes of every site reply the server received this round (train and evaluate replies,
    # each SecAgg+ stage), as Flower counts a message's content; None for the baseline arms
    received_bytes: int | None = None
    schema: int = ROUNDS_SCHEMA

    def __post_init__(self) -> None:
        self.val = dict(self.val) | {k: None for k in VAL_METRICS if k not in self.val}

    def to_dict(self) -> dict[str, Any]:
        """The JSON line's object, keys in declaration order (``site_qc`` only when a site reported QC,
        ``privacy`` only in DP runs, ``received_bytes`` only in federated runs)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.site_qc:
            del out["site_qc"]
        if self.privacy is None:
            del out["privacy"]
        if self.received_bytes is None:
            del out["received_bytes"]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "rounds.jsonl") -> "RoundRecord":
        """Read one record; missing optional keys take their defaults (older files).

        Raises:
            DataError: not an object, no integer ``round``, a key this version does not know, or a schema
                newer than this fedpd (the message names ``where``).
        """
        if not isinstance(data, dict):
            raise DataError(f"{where}: a round record must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > ROUNDS_SCHEMA:
            raise DataError(f"{where}: round record schema {schema!r} is newer than this fedpd reads ({ROUNDS_SCHEMA}); "
                            "read it with the fedpd version that wrote it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"{where}: unknown key(s) in a round record: {', '.join(unknown)}")
        if not isinstance(data.get("round"), int) or isinstance(data.get("round"), bool):
            raise DataError(f"{where}: a round record needs an integer 'round', got {data.get('round')!r}")
        values = {k: v for k, v in data.items() if v is not None or k in ("train_loss", "wall_seconds")}
        values.setdefault("val", {})
        return cls(**values)


def _check_schema(data: dict, newest: int, what: str, where: str) -> None:
    schema = data.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema > newest:
        raise DataError(f"{where}: {what} schema {schema!r} is newer than this fedpd reads ({newest}); "
                        "read it with the fedpd version that wrote it")


@dataclass
class RunReport:
    """``report.json``: the conclusion of a run (one arm of a comparison)."""

    arm: str = "run"  # fedavg, fedavg+holdout:<site>, centralized, local:<site>, scratch, ...
    data: dict[str, Any] = field(default_factory=dict)  # cohort facts: source, partition, site_train_counts, ...
    selected_round: int | None = None
    selection: str = ""  # the round-selection rule
    threshold: float | None = None  # chosen on validation (Youden's J)
    threshold_rule: str = ""
    val: dict[str, Any] = field(default_factory=dict)  # binary_metrics at the threshold, server val rows
    test: dict[str, Any] = field(default_factory=dict)  # metric -> {value, ci95, n_boot_valid}
    test_per_site: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> like ``test``
    test_counts: dict[str, int] = field(default_factory=dict)  # {scans, subjects}
    rounds: int = 0  # rounds recorded
    config: dict[str, Any] = field(default_factory=dict)  # the run-config
    device: Any = None
    git_commit: str = "unknown"
    participation: dict[str, Any] | None = None  # federated runs: who trained which round
    holdout_site: str | None = None  # leave-one-site-out runs
    privacy: dict[str, Any] | None = None  # DP runs: the privacy spent by the selected round's model, and in all
    schema: int = REPORT_SCHEMA

    _DICTS = ("data", "val", "test", "test_per_site", "test_counts", "config")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in declaration order; ``participation``/``holdout_site``/``privacy`` only when set."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("participation", "holdout_site", "privacy"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "report.json") -> "RunReport":
        """Read a report; missing keys take their defaults (older or partial reports).

        Raises:
            DataError: not an object, a key this version does not know, a section of the wrong type, or a
                schema newer than this fedpd (the message names ``where``).
        """
        if not isinstance(data, dict):
            raise DataError(f"{where}: holds a {type(data).__name__}, not a run report object")
        _check_schema(data, REPORT_SCHEMA, "run report", where)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{where}: unknown key(s) in a run report: {', '.join(unknown)}")
        for key in cls._DICTS:
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise DataError(f"{where}: '{key}' must be an object, got {type(data[key]).__name__}")
        values = {k: v for k, v in data.items() if v is not None or k in ("threshold", "selected_round", "device")}
        return cls(**values)

    # --- the facts readers ask for, each answered here once -------------------------------------------------

    @property
    def source(self) -> str:
        """``phantom``, ``ppmi``, ``mixed:...`` or ``unknown``: where the scans came from."""
        return str(self.data.get("source") or "unknown")

    @property
    def seed(self) -> int:
        seed = self.config.get("seed", 0)
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    @property
    def held_out_site(self) -> str | None:
        """The site a leave-one-site-out run tests on (wherever the run recorded it), else ``None``."""
        partition = self.data.get("partition") or {}
        for value in (self.holdout_site, self.data.get("holdout_site"), partition.get("holdout_site")):
            if value:
                return str(value)
        return None

    @property
    def partition_sites(self) -> dict[str, Any]:
        """``partition.json``'s per-site counts, when the run recorded them."""
        return (self.data.get("partition") or {}).get("sites") or {}

    @property
    def site_train_counts(self) -> dict[str, Any]:
        return self.data.get("site_train_counts") or {}

    @property
    def preparation(self) -> dict[str, Any] | None:
        """How the server's scans were prepared (:mod:`common.preprocessing.provenance`), ``None`` when not recorded."""
        value = self.data.get("preparation")
        return value if isinstance(value, dict) else None

    @property
    def preprocessing_qc(self) -> dict[str, dict[str, int]]:
        return self.data.get("preprocessing_qc") or {}

    @property
    def split_audit(self) -> dict[str, Any]:
        return self.data.get("server_split_audit") or {}

    @property
    def unsafe_scan_split(self) -> bool:
        return bool(self.data.get("unsafe_scan_split"))


def load_report(path: str | Path) -> RunReport:
    """Read a ``report.json``.

    Raises:
        DataError: the file is missing, not JSON or not a run report (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; a run folder gets its report.json when the run finishes its final "
                        "evaluation (give the run folder, e.g. runs/NAME)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc})") from exc
    return RunReport.from_dict(data, str(path))

