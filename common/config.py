"""Run-config: parsed once into a frozen dataclass, checked key by key.

Defaults live in one place only, ``[tool.flwr.app.config]`` of ``pyproject.toml``; Flower hands the
merged dict (defaults + ``flwr run -c`` overrides) to the apps as ``context.run_config``, and the
``fedpd`` commands merge their ``--run-config "k=v ..."`` the same way. Keys are kebab-case and keep
their names everywhere; the dataclass field is the same name with ``_`` for ``-``.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from common.errors import ConfigError
from common.keys import CLASS_BALANCING, MODEL_DEPTHS

__all__ = ["RunConfig", "load_defaults", "parse_overrides", "PYPROJECT"]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
STRATEGIES = ("fedavg",)


def _choice(options):
    def check(v):
        return None if v in options else f"must be one of {', '.join(map(str, options))}"
    return check


def _at_least(lo, exclusive=False):
    def check(v):
        ok = v > lo if exclusive else v >= lo
        return None if ok else f"must be {'>' if exclusive else '>='} {lo}"
    return check


def _fraction(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _triple(kind, positive_min):
    def check(v):
        parts = v.split(",")
        try:
            nums = [kind(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or any(n < positive_min for n in nums):
            return f'must be three comma-separated {kind.__name__}s >= {positive_min}, e.g. "64,64,64"'
        return None
    return check


# key -> (python type, validator or None, help). Order = the order users see in error messages.
_SPEC: dict[str, tuple[type, Any, str]] = {
    "num-server-rounds": (int, _at_least(1), "federated rounds"),
    "local-epochs": (int, _at_least(1), "epochs each site trains per round"),
    "batch-size": (int, _at_least(1), "scans per batch"),
    "lr": (float, _at_least(0.0, exclusive=True), "learning rate (Adam)"),
    "weight-decay": (float, _at_least(0.0), "AdamW weight decay"),
    "dropout": (float, lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)", "dropout before the linear head"),
    "model-depth": (int, _choice(MODEL_DEPTHS), "Med3D / MedicalNet ResNet depth"),
    "pretrained-path": (str, None, 'MedicalNet checkpoint path on this host ("" = random init)'),
    "input-shape": (str, _triple(int, 8), "D,H,W voxels fed to the network"),
    "spacing": (str, _triple(float, 0.1), "target voxel size in mm, D,H,W"),
    "class-balancing": (str, _choice(CLASS_BALANCING), "local class balancing"),
    "amp": (bool, None, "mixed precision on CUDA"),
    "strategy": (str, _choice(STRATEGIES), "aggregation strategy"),
    "fraction-train": (float, _fraction, "share of available sites sampled per round"),
    "min-nodes": (int, _at_least(1), "sites required to start a round"),
    "partition-dir": (str, None, "simulation: folder holding sites/*.csv"),
    "server-manifest": (str, None, "server.csv with the held-out val+test rows"),
    "out-dir": (str, None, "where checkpoints, rounds.jsonl and the report go"),
    "resume": (bool, None, "continue from the last checkpoint in out-dir"),
    "seed": (int, _at_least(0), "random seed"),
    "round-timeout": (float, _at_least(0.0, exclusive=True), "seconds to wait for replies per round"),
    "num-workers": (int, _at_least(0), "DataLoader worker processes"),
}


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The run-config as typed, validated values. Build it with :meth:`from_mapping`."""

    num_server_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    dropout: float
    model_depth: int
    pretrained_path: str
    input_shape: str
    spacing: str
    class_balancing: str
    amp: bool
    strategy: str
    fraction_train: float
    min_nodes: int
    partition_dir: str
    server_manifest: str
    out_dir: str
    resume: bool
    seed: int
    round_timeout: float
    num_workers: int

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None) -> "RunConfig":
        """Check and convert a run-config dict (kebab-case keys).

        Args:
            values: the keys to set, e.g. Flower's ``context.run_config`` or parsed overrides.
            defaults: values for keys missing from ``values``; ``None`` uses pyproject's defaults.

        Raises:
            ConfigError: unknown key (the valid keys are listed), missing key, wrong type, or a value
                out of range (the valid range or choices are given).
        """
        unknown = sorted(set(values) - set(_SPEC))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(unknown)}. Valid keys: {', '.join(_SPEC)}"
            )
        merged = dict(load_defaults() if defaults is None else defaults)
        merged.update(values)
        kwargs = {}
        for key, (kind, check, help_) in _SPEC.items():
            if key not in merged:
                raise ConfigError(f"run-config key {key!r} ({help_}) is missing; add it to [tool.flwr.app.config] in pyproject.toml")
            value = merged[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ConfigError(
                    f"run-config key {key!r} must be {kind.__name__} ({help_}), got {type(value).__name__} {value!r}"
                )
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"run-config key {key!r} = {value!r} is not a finite number ({help_}); give a finite value")
            problem = check(value) if check else None
            if problem:
                raise ConfigError(f"run-config key {key!r} = {value!r} {problem}")
            kwargs[key.replace("-", "_")] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with fields changed (python names), re-validated."""
        mapping = self.to_dict()
        mapping.update({k.replace("_", "-"): v for k, v in changes.items()})
        return RunConfig.from_mapping(mapping, defaults={})

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, the same shape as Flower's run_config (for config.json and checkpoints)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``input-shape`` as a tuple of ints."""
        return tuple(int(p) for p in self.input_shape.split(","))  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """``spacing`` as a tuple of floats."""
        return tuple(float(p) for p in self.spacing.split(","))  # type: ignore[return-value]


def load_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the app's pyproject.toml."""
    try:
        with open(pyproject, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{pyproject}: not found; fedpd reads its run-config defaults from the app's pyproject.toml") from None
    try:
        return dict(data["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise ConfigError(f"{pyproject}: no [tool.flwr.app.config] table") from None


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` like ``flwr run -c``: values are TOML (``lr=0.01``, ``amp=false``,
    ``out-dir='runs/x'``); a bare word that is not TOML is taken as a string.

    Raises:
        ConfigError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in shlex.split(text or ""):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config override {item!r} is not of the form key=value")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


# Keep the spec and the dataclass in step: a field without a spec entry is a programming error.
if [k.replace("-", "_") for k in _SPEC] != [f.name for f in dataclasses.fields(RunConfig)]:
    raise RuntimeError("common/config.py: _SPEC and RunConfig fields differ")
