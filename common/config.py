"""Run-config: parsed once into a frozen dataclass, checked key by key.

Defaults live in one place only, ``[tool.flwr.app.config]`` of ``pyproject.toml``. A source checkout and an
installed FAB have it beside the packages; an installed wheel carries a copy of that file as
``common/app-pyproject.toml`` (hatch ``force-include``), so the defaults are the same wherever fedpd runs
(:data:`PYPROJECT`). Flower hands the
merged dict (defaults + ``flwr run -c`` overrides) to the apps as ``context.run_config``, and the
``fedpd`` commands merge their ``--run-config "k=v ..."`` the same way. Keys are kebab-case and keep
their names everywhere; the dataclass field is the same name with ``_`` for ``-``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from common.errors import ConfigError
from common.keys import ATTACKS, CHECKPOINT_RETENTION, CLASS_BALANCING, DP_MODES, MODEL_DEPTHS, STRATEGIES, TRANSPORT_DTYPES

__all__ = ["RunConfig", "load_defaults", "parse_overrides", "PYPROJECT"]

_CHECKOUT_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"  # a source checkout or a FAB
_WHEEL_PYPROJECT = Path(__file__).resolve().parent / "app-pyproject.toml"  # an installed wheel
PYPROJECT = _CHECKOUT_PYPROJECT if _CHECKOUT_PYPROJECT.is_file() else _WHEEL_PYPROJECT


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


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(","))


def _joined(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class Key:
    """How one run-config key is read: its TOML type, its check, its help, and how its text becomes the
    field's value (``parse``) and back (``unparse``, for config.json, checkpoints and Flower)."""

    kind: type
    check: Callable[[Any], str | None] | None
    help: str
    parse: Callable[[Any], Any] | None = None
    unparse: Callable[[Any], Any] | None = None

    @staticmethod
    def of(f: dataclasses.Field) -> "Key":
        return f.metadata["key"]


def key(kind: type, check, help_: str, parse=None, unparse=None):
    """A RunConfig field: the one declaration of a run-config key (name = field name with ``-`` for ``_``)."""
    return dataclasses.field(metadata={"key": Key(kind, check, help_, parse, unparse)})


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The run-config as typed, validated values. Build it with :meth:`from_mapping`.

    Each field is one key, declared once: its type, check and help are the field's metadata, in the order
    users see in error messages. Shapes are parsed into tuples when the config is read.
    """

    num_server_rounds: int = key(int, _at_least(1), "federated rounds")
    local_epochs: int = key(int, _at_least(1), "epochs each site trains per round")
    batch_size: int = key(int, _at_least(1), "scans per batch")
    lr: float = key(float, _at_least(0.0, exclusive=True), "learning rate (Adam)")
    weight_decay: float = key(float, _at_least(0.0), "AdamW weight decay")
    dropout: float = key(float, lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)", "dropout before the linear head")
    model_depth: int = key(int, _choice(MODEL_DEPTHS), "Med3D / MedicalNet ResNet depth")
    pretrained_path: str = key(str, None, 'MedicalNet checkpoint path on this host ("" = random init)')
    input_shape: tuple[int, int, int] = key(str, _triple(int, 8), "D,H,W voxels fed to the network", _ints, _joined)
    spacing: tuple[float, float, float] = key(str, _triple(float, 0.1), "target voxel size in mm, D,H,W", _floats, _joined)
    class_balancing: str = key(str, _choice(CLASS_BALANCING), "local class balancing")
    amp: bool = key(bool, None, "mixed precision on CUDA")
    strategy: str = key(str, _choice(STRATEGIES), "aggregation strategy (Flower's, in flwr.serverapp.strategy)")
    proximal_mu: float = key(float, _at_least(0.0), "fedprox: weight of the proximal term mu/2 |w - w_global|^2")
    server_lr: float = key(float, _at_least(0.0, exclusive=True), "fedadam/fedyogi: server learning rate (eta)")
    server_beta1: float = key(float, lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)",
                              "fedadam/fedyogi: first-moment decay")
    server_beta2: float = key(float, lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)",
                              "fedadam/fedyogi: second-moment decay")
    server_tau: float = key(float, _at_least(0.0, exclusive=True), "fedadam/fedyogi: adaptivity (epsilon) tau")
    trim_beta: float = key(float, lambda v: None if 0.0 < v < 0.5 else "must be in (0, 0.5)",
                           "fedtrimmedavg: share of sites cut at each end, per coordinate")
    byzantine_sites: int = key(int, _at_least(0), "krum: number of sites assumed Byzantine (f)")
    secure_aggregation: bool = key(bool, None, "SecAgg+ (Flower's legacy workflow): the server sees only the sum "
                                   "of the sites' updates")
    dp: str = key(str, _choice(DP_MODES), "differential privacy (site level), on Flower's DP wrappers and mods")
    clipping_norm: float = key(float, _at_least(0.0, exclusive=True), "dp: L2 clipping norm of a site's update "
                               "(client-adaptive: the initial norm)")
    noise_multiplier: float = key(float, _at_least(0.0, exclusive=True), "dp: Gaussian noise std / clipping norm")
    dp_delta: float = key(float, lambda v: None if 0.0 < v < 1.0 else "must be in (0, 1)", "dp: the delta epsilon is reported at")
    dp_max_epsilon: float = key(float, _at_least(0.0), "dp: stop training before a round would pass this epsilon (0 = no limit)")
    attack: str = key(str, _choice(ATTACKS), "simulation only: one site sends a harmful update that passes screening "
                      "(w_global + attack-factor * update, or minus it for sign-flip)")
    attack_site: str = key(str, None, "simulation only: the name of the attacking site (a sites/*.csv stem)")
    attack_factor: float = key(float, _at_least(0.0, exclusive=True), "simulation only: how many times the site's "
                               "update the attacker sends")
    transport_dtype: str = key(str, _choice(TRANSPORT_DTYPES), "how weights travel: float32, or float16 (the server "
                               "keeps float32 weights; sites send their update in float16)")
    log_message_size: bool = key(bool, None, "sites log each message's size (Flower's message_size_mod, SuperNode log)")
    fraction_train: float = key(float, _fraction, "share of available sites sampled per round")
    min_nodes: int = key(int, _at_least(1), "sites required to start a round")
    partition_dir: str = key(str, None, "simulation: folder holding sites/*.csv")
    server_manifest: str = key(str, None, "server.csv with the held-out val+test rows")
    out_dir: str = key(str, None, "where checkpoints, rounds.jsonl and the report go")
    resume: bool = key(bool, None, "continue from the last checkpoint in out-dir")
    keep_checkpoints: str = key(str, _choice(CHECKPOINT_RETENTION), "which round checkpoints stay: all, or "
                                "selected-and-last (the round validation selects so far, and the last, for resume)")
    seed: int = key(int, _at_least(0), "random seed")
    round_timeout: float = key(float, _at_least(0.0, exclusive=True), "seconds to wait for replies per round")
    poll_interval: float = key(float, _at_least(0.0, exclusive=True),
                               "seconds between the server's checks for site replies (Flower's deployment Grid: 3)")
    num_workers: int = key(int, _at_least(0), "DataLoader worker processes")

    @staticmethod
    def keys() -> dict[str, Key]:
        """Every run-config key (kebab-case) with its declaration, in declaration order."""
        return {f.name.replace("_", "-"): Key.of(f) for f in fields(RunConfig)}

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
        spec = cls.keys()
        unknown = sorted(set(values) - set(spec))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(unknown)}. Valid keys: {', '.join(spec)}"
            )
        merged = dict(load_defaults() if defaults is None else defaults)
        merged.update(values)
        kwargs = {}
        for name, k in spec.items():
            if name not in merged:
                raise ConfigError(f"run-config key {name!r} ({k.help}) is missing; add it to [tool.flwr.app.config] in pyproject.toml")
            value = merged[name]
            if k.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not k.kind:
                raise ConfigError(
                    f"run-config key {name!r} must be {k.kind.__name__} ({k.help}), got {type(value).__name__} {value!r}"
                )
            if k.kind is float and not math.isfinite(value):
                raise ConfigError(f"run-config key {name!r} = {value!r} is not a finite number ({k.help}); give a finite value")
            problem = k.check(value) if k.check else None
            if problem:
                raise ConfigError(f"run-config key {name!r} = {value!r} {problem}")
            kwargs[name.replace("-", "_")] = k.parse(value) if k.parse else value
        cfg = cls(**kwargs)
        problem = _combination_problem(cfg)
        if problem:
            raise ConfigError(problem)
        return cfg

    @property
    def statistics_shared(self) -> bool:
        """Whether BatchNorm running statistics travel (and are trained) at all: not under DP or secure
        aggregation (:func:`common.learning.model.exchanged_keys`)."""
        return self.dp == "none" and not self.secure_aggregation

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with fields changed (python names, values as in the run-config), re-validated."""
        mapping = self.to_dict()
        mapping.update({k.replace("_", "-"): v for k, v in changes.items()})
        return RunConfig.from_mapping(mapping, defaults={})

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, the same shape as Flower's run_config (for config.json and checkpoints)."""
        out = {}
        for f in fields(self):
            k, value = Key.of(f), getattr(self, f.name)
            out[f.name.replace("_", "-")] = k.unparse(value) if k.unparse else value
        return out


# strategies whose aggregation is Flower's FedAvg.aggregate_train: the only ones its DP accounting accepts
DP_STRATEGIES = ("fedavg", "fedprox", "fedbn")


def _combination_problem(cfg: "RunConfig") -> str | None:
    """Why these keys cannot go together, or ``None``."""
    if cfg.dp != "none" and cfg.strategy not in DP_STRATEGIES:
        return (f"run-config dp = {cfg.dp!r} with strategy = {cfg.strategy!r}: differential privacy runs with a strategy "
                f"that averages the clipped updates ({', '.join(DP_STRATEGIES)}); Flower's privacy accounting assumes "
                "FedAvg's average, and a median, trimmed mean, Krum or server optimizer change the sensitivity")
    if cfg.secure_aggregation and cfg.strategy not in DP_STRATEGIES:
        return (f"run-config secure-aggregation = true with strategy = {cfg.strategy!r}: the server sees only the sum "
                f"of the updates, so only an average can be formed ({', '.join(DP_STRATEGIES)}); a median, trimmed "
                "mean or Krum needs every site's update, a server optimizer is not wired to the secure round")
    if cfg.secure_aggregation and cfg.dp != "none":
        return ("run-config secure-aggregation = true with dp = " + repr(cfg.dp) + ": not supported together yet; "
                "choose one (dp = 'none', or secure-aggregation = false)")
    if cfg.secure_aggregation and cfg.transport_dtype != "float32":
        return (f"run-config secure-aggregation = true with transport-dtype = {cfg.transport_dtype!r}: SecAgg+ "
                "quantizes the weights itself (Flower's legacy FitIns); use transport-dtype = 'float32'")
    if cfg.secure_aggregation and cfg.min_nodes < 2:
        return (f"run-config secure-aggregation = true needs min-nodes >= 2 (got {cfg.min_nodes}): a sum over one site "
                "is that site's update (use 3 or more: with two, each site can derive the other's update from the "
                "next global model)")
    if cfg.attack != "none" and not cfg.attack_site:
        return f"run-config attack = {cfg.attack!r} needs attack-site, the name of the attacking site (a sites/*.csv stem)"
    if cfg.dp != "none" and cfg.fraction_train != 1.0:
        return (f"run-config dp = {cfg.dp!r} needs fraction-train = 1.0 (got {cfg.fraction_train}): the privacy "
                "accounting counts every site in every round (no sampling amplification)")
    return None


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


def _override_items(text: str) -> list[tuple[str, bool]]:
    """Split ``text`` at unquoted whitespace like a shell; each item with whether its value (after the first
    ``=``) was quoted, so that ``site='10'`` stays the string "10" (``shlex.split`` would lose the quotes)."""
    items, buf, quoted, quote, has = [], [], False, None, False
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
            else:
                buf.append(ch)
        elif ch in "'\"":
            quote, has = ch, True
            quoted = quoted or "=" in "".join(buf)
        elif ch.isspace():
            if has:
                items.append(("".join(buf), quoted))
            buf, quoted, has = [], False, False
        else:
            buf.append(ch)
            has = True
    if quote:
        raise ConfigError(f"run-config overrides {text!r}: unbalanced {quote}")
    if has:
        items.append(("".join(buf), quoted))
    return items


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` like ``flwr run -c``: values are TOML (``lr=0.01``, ``amp=false``); a quoted
    value is a string (``out-dir='runs/x y'``, ``attack-site='10'``); a bare word that is not TOML is taken
    as a string.

    Raises:
        ConfigError: an item without ``=``, or an unbalanced quote.
    """
    out: dict[str, Any] = {}
    for item, quoted in _override_items(text or ""):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config override {item!r} is not of the form key=value")
        if quoted:
            out[key] = raw
            continue
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out
