"""The schema of ``rounds.jsonl``: one :class:`RoundRecord` per line, written and read through this module.

A round record is what the server side of a round knows once the round is closed
(:func:`common.runs.rounds.close_round`): which sites were aggregated and what they reported (counts and
scalars only), who was missing, failed or was rejected, and the round's model on the server's validation
rows. Its ``schema`` is :data:`ROUNDS_SCHEMA`; lines without one come from fedpd before the schema was
versioned and have the same layout (schema 1), so older run folders still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from common.errors import DataError

__all__ = ["RoundRecord", "ROUNDS_SCHEMA", "VAL_METRICS"]

ROUNDS_SCHEMA = 1
# the server-side validation figures every record carries (None where undefined, e.g. AUC on one class)
VAL_METRICS = ("n", "loss", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``."""

    round: int
    val: dict[str, float | None]  # the round's model on the server's val rows: VAL_METRICS and more
    train_loss: float | None = None  # the sites' training losses weighted by their examples
    num_examples: int = 0  # training examples aggregated this round
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # aggregated site -> its train-reply metrics
    site_eval: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its evaluate-reply metrics
    missing_sites: list[str] = field(default_factory=list)  # sampled, but no usable update
    failures: list[dict[str, Any]] = field(default_factory=list)  # {site, node, phase, reason}
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {site, round, phase, reason}: update screening
    site_qc: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> {kept, excluded} preprocessing QC
    wall_seconds: float | None = None
    schema: int = ROUNDS_SCHEMA

    def __post_init__(self) -> None:
        self.val = dict(self.val) | {k: None for k in VAL_METRICS if k not in self.val}

    def to_dict(self) -> dict[str, Any]:
        """The JSON line's object, keys in declaration order (``site_qc`` only when a site reported QC)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.site_qc:
            del out["site_qc"]
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
