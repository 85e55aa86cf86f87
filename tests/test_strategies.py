"""The run's aggregation arms (server/strategies.py) and what they need elsewhere, on real Flower objects:

- the run-config keys of the strategies and of differential privacy, and the combinations refused;
- ``build_strategy``: Flower's strategy and DP wrapper for each choice, with the run-config's parameters;
- aggregation of site replies built by the ClientApp's own ``_reply``, through the screening
  ``RecordingStrategy``: median, trimmed mean, Krum, robustness to one sign-flipped site, FedAdam/FedYogi
  averaging the BatchNorm statistics, and the DP wrappers (global round, clipping, equal weights, no release
  of an incomplete round);
- the local side: FedProx's proximal term in ``train_local``; the keys a DP run exchanges, the BatchNorm state
  a site keeps, and their partial loading;
- a resume's strategy state (server optimizer moments, privacy ledger, clipping norm) through a
  ``weights_only`` checkpoint; the privacy entries of rounds.jsonl and report.json; the arm names.

No Flower process is started: the strategies are driven by calling ``aggregate_train`` with the global
model's shapes recorded in ``reference`` (what ``configure_train`` does) and, where a strategy keeps what it
sent (FedOpt's ``current_arrays``, the server-side DP wrapper's ``current_arrays`` and the fixed-clipping
wrappers' pending privacy event), that state set as ``configure_train`` sets it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi, Krum)
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.handlers import _reply
from client.site import Site
from common import keys
from common.config import DP_STRATEGIES, RunConfig
from common.device import Runtime
from common.errors import ConfigError
from common.keys import DP_MODES, STRATEGIES
from common.learning.model import (batchnorm_keys, build_med3d, exchanged_keys, load_state_numpy,
                                   statistics_keys)
from common.learning.train import train_local
from common.runs.records import RoundRecord, RunReport
from server.strategies import (FedpdFedAdam, FedpdFedYogi, _AccountedAdaptive, arm_name, build_strategy,
                               noise_to_update, privacy_spent, restore_strategy_state, strategy_state)
from server.strategy import RecordingStrategy

torch.set_num_threads(2)

CPU = Runtime(device=torch.device("cpu"), amp=False)


# --- helpers -----------------------------------------------------------------------------------------


def _cfg(**values) -> RunConfig:
    """pyproject's defaults with ``values`` (python names) changed."""
    return RunConfig.from_mapping({k.replace("_", "-"): v for k, v in values.items()})


def _instruction(node: int, message_type: str = "train") -> Message:
    meta = Metadata(run_id=1, message_id=f"msg-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


def _metrics(n: int = 20, loss: float = 0.5) -> dict:
    return {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss, keys.TRAIN_SECONDS: 1.0, keys.SAMPLES_PER_SECOND: float(n),
            keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5,
            keys.class_count_key(0): n // 4, keys.class_count_key(1): n - n // 4}


def _reply_msg(node: int, site: str, arrays: dict[str, np.ndarray], metrics: dict, dp: str = "none") -> Message:
    """A train reply as the ClientApp packs it (``dp`` adds ``unit-weight``)."""
    s = Site(name=site, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return _reply(_instruction(node), s, metrics, record, dp=dp)


def _shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in arrays.items()}


def _aggregate(strategy: RecordingStrategy, server_round: int, replies: list[Message],
               reference: dict[str, np.ndarray]) -> tuple[ArrayRecord | None, object]:
    """``aggregate_train`` after recording the global model's shapes for the round, as ``configure_train`` does."""
    strategy.reference[strategy.global_round(server_round)] = _shapes(reference)
    return strategy.aggregate_train(server_round, replies)


def _np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class TinyConvBN(nn.Module):
    """Two conv + BatchNorm3d blocks and a linear head: Med3D's kinds of tensors (conv weights, BatchNorm affine
    weights, running statistics, an int64 batch count) in a network that trains in milliseconds."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv3d(1, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm3d(4)
            self.conv2 = nn.Conv3d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm3d(4)
            self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3, 4)))


class DictDataset(Dataset):
    """Items shaped like the data pipeline's: ``{"image": [1, D, H, W], "label": int}``."""

    def __init__(self, n: int = 8, seed: int = 0, side: int = 16):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, side, side, side, generator=gen) * 2 + 1
        self.labels = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# --- 1. run-config -----------------------------------------------------------------------------------

BAD_VALUES = {
    "strategy": ["x", "FedAvg", 3],
    "proximal-mu": [-0.1, float("nan"), "0.1"],
    "server-lr": [0.0, -1.0],
    "server-beta1": [1.0, -0.1],
    "server-beta2": [1.0, 1.5],
    "server-tau": [0.0, float("inf")],
    "trim-beta": [0.0, 0.5, 0.7],
    "byzantine-sites": [-1, 1.5, True],
    "secure-aggregation": ["yes", 1],
    "dp": ["x", "fixed", None],
    "clipping-norm": [0.0, -1.0],
    "noise-multiplier": [0.0, -0.5],
    "dp-delta": [0.0, 1.0, 2.0],
    "dp-max-epsilon": [-1.0, float("nan")],
}


@pytest.mark.parametrize("key, value", [(k, v) for k, values in BAD_VALUES.items() for v in values])
def test_bad_value_of_a_new_key_is_refused_naming_the_key(key, value):
    """Every strategy/DP key refuses an out-of-range, non-finite or wrongly typed value, and the message names the key."""
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert f"{key!r}" in str(err.value)


def test_strategy_and_dp_choice_errors_list_every_choice():
    """An unknown strategy or dp mode is refused with the full list of choices."""
    with pytest.raises(ConfigError, match="'strategy'") as err:
        RunConfig.from_mapping({"strategy": "x"})
    assert "must be one of " + ", ".join(STRATEGIES) in str(err.value)
    assert all(name in str(err.value) for name in STRATEGIES)
    with pytest.raises(ConfigError, match="'dp'") as err:
        RunConfig.from_mapping({"dp": "x"})
    assert "must be one of " + ", ".join(DP_MODES) in str(err.value)


def test_new_keys_take_their_values():
    """Valid values of the new keys reach the RunConfig fields (ints given to float keys become floats)."""
    cfg = _cfg(strategy="fedtrimmedavg", proximal_mu=2, server_lr=0.5, server_beta1=0.0, server_beta2=0.5,
               server_tau=1e-6, trim_beta=0.1, byzantine_sites=3, clipping_norm=5, noise_multiplier=0.5,
               dp_delta=1e-3, dp_max_epsilon=8)
    assert (cfg.strategy, cfg.proximal_mu, cfg.server_lr, cfg.server_beta1, cfg.server_beta2, cfg.server_tau,
            cfg.trim_beta, cfg.byzantine_sites, cfg.clipping_norm, cfg.noise_multiplier, cfg.dp_delta,
            cfg.dp_max_epsilon) == ("fedtrimmedavg", 2.0, 0.5, 0.0, 0.5, 1e-6, 0.1, 3, 5.0, 0.5, 1e-3, 8.0)
    assert isinstance(cfg.proximal_mu, float) and isinstance(cfg.dp_max_epsilon, float)
    assert RunConfig.from_mapping(cfg.to_dict(), defaults={}) == cfg  # config.json / checkpoint round trip


NON_AVERAGING = [s for s in STRATEGIES if s not in DP_STRATEGIES]


@pytest.mark.parametrize("dp, strategy", [("server-fixed", s) for s in NON_AVERAGING]
                         + [(d, "krum") for d in ("client-fixed", "client-adaptive")])
def test_dp_with_a_non_averaging_strategy_is_refused(dp, strategy):
    """dp with a median, trimmed mean, Krum or server optimizer is refused; the message names dp and strategy."""
    with pytest.raises(ConfigError) as err:
        _cfg(dp=dp, strategy=strategy)
    text = str(err.value)
    assert f"dp = {dp!r}" in text and f"strategy = {strategy!r}" in text
    assert ", ".join(DP_STRATEGIES) in text  # what would be accepted


def test_dp_with_sampling_of_sites_is_refused():
    """dp with fraction-train below 1 is refused; the message names dp and fraction-train."""
    with pytest.raises(ConfigError) as err:
        _cfg(dp="server-fixed", fraction_train=0.5)
    text = str(err.value)
    assert "dp = 'server-fixed'" in text and "fraction-train = 1.0" in text and "0.5" in text


def test_replace_revalidates_the_combination():
    """``RunConfig.replace`` refuses a combination as ``from_mapping`` does."""
    cfg = _cfg(strategy="krum")
    with pytest.raises(ConfigError, match="strategy = 'krum'"):
        cfg.replace(dp="client-fixed")
    assert cfg.replace(strategy="fedavg", dp="client-fixed").dp == "client-fixed"


@pytest.mark.parametrize("changes, named", [
    ({"strategy": "krum", "min_nodes": 3}, ("secure-aggregation = true", "strategy = 'krum'")),
    ({"strategy": "fedadam", "min_nodes": 3}, ("secure-aggregation = true", "strategy = 'fedadam'")),
    ({"dp": "client-fixed", "min_nodes": 3}, ("secure-aggregation = true", "dp = 'client-fixed'")),
    ({"min_nodes": 1}, ("secure-aggregation = true", "min-nodes >= 2")),
])
def test_secure_aggregation_combinations_are_refused(changes, named):
    """secure-aggregation with a non-averaging strategy, with dp, or with fewer than 3 sites is refused naming both keys."""
    with pytest.raises(ConfigError) as err:
        _cfg(secure_aggregation=True, **changes)
    assert all(part in str(err.value) for part in named), str(err.value)


@pytest.mark.parametrize("strategy", DP_STRATEGIES)
def test_secure_aggregation_with_an_averaging_strategy_passes(strategy):
    """secure-aggregation goes with fedavg, fedprox and fedbn from 3 sites, and keeps the statistics home."""
    cfg = _cfg(strategy=strategy, secure_aggregation=True, min_nodes=3)
    assert cfg.secure_aggregation and not cfg.statistics_shared


@pytest.mark.parametrize("dp", [d for d in DP_MODES if d != "none"])
@pytest.mark.parametrize("strategy", DP_STRATEGIES)
def test_dp_with_an_averaging_strategy_passes(strategy, dp):
    """Every dp mode goes with fedavg, fedprox and fedbn at fraction-train 1."""
    cfg = _cfg(strategy=strategy, dp=dp, fraction_train=1.0)
    assert (cfg.strategy, cfg.dp) == (strategy, dp)


def test_without_dp_every_strategy_and_sampling_passes():
    """dp = none goes with every strategy and any fraction-train."""
    for strategy in STRATEGIES:
        assert _cfg(strategy=strategy, fraction_train=0.5).strategy == strategy


# --- 2. build_strategy -------------------------------------------------------------------------------

STATS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedpdFedAdam),
                                       ("fedyogi", FedpdFedYogi), ("fedmedian", FedMedian),
                                       ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum), ("fedbn", FedAvg)])
def test_build_strategy_picks_flowers_strategy(name, cls):
    """Each strategy name gives Flower's class (fedbn: plain FedAvg) with the run-config's parameters, screened."""
    cfg = _cfg(strategy=name, proximal_mu=0.3, server_lr=0.05, server_beta1=0.8, server_beta2=0.95, server_tau=0.002,
               trim_beta=0.25, byzantine_sites=1, min_nodes=3, fraction_train=0.5)
    strategy = build_strategy(cfg, round_offset=4, statistics_keys=STATS)
    assert isinstance(strategy, RecordingStrategy) and strategy.round_offset == 4
    inner = strategy.inner
    assert type(inner) is cls
    assert inner.weighted_by_key == keys.NUM_EXAMPLES  # no DP: sample-weighted
    assert (inner.fraction_train, inner.min_train_nodes, inner.min_available_nodes) == (0.5, 3, 3)
    assert strategy.train_metric_keys == keys.TRAIN_METRIC_KEYS  # no DP metrics expected in replies
    if name == "fedprox":
        assert inner.proximal_mu == 0.3
    if name in ("fedadam", "fedyogi"):
        assert isinstance(inner, FedAdam if name == "fedadam" else FedYogi)
        assert (inner.eta, inner.eta_l, inner.beta_1, inner.beta_2, inner.tau) == (0.05, cfg.lr, 0.8, 0.95, 0.002)
        assert inner.statistics_keys == frozenset(STATS)
    if name == "fedtrimmedavg":
        assert inner.beta == 0.25
    if name == "krum":
        assert (inner.num_malicious_nodes, inner.num_nodes_to_select) == (1, 1)


@pytest.mark.parametrize("dp, wrapper", [("server-fixed", DifferentialPrivacyServerSideFixedClipping),
                                         ("client-fixed", DifferentialPrivacyClientSideFixedClipping),
                                         ("client-adaptive", _AccountedAdaptive)])
@pytest.mark.parametrize("strategy", DP_STRATEGIES)
def test_build_strategy_wraps_in_flowers_dp_wrapper_with_an_accountant(strategy, dp, wrapper):
    """Each dp mode gives Flower's wrapper (unit weights, min-nodes sites) with an RdpAccountant."""
    cfg = _cfg(strategy=strategy, dp=dp, min_nodes=3, clipping_norm=0.8, noise_multiplier=1.5, dp_delta=1e-4,
               dp_max_epsilon=6.0)
    built = build_strategy(cfg, round_offset=0, statistics_keys=STATS)
    dp_strategy = built.inner
    assert isinstance(dp_strategy, wrapper)  # fedpd's subclass: Flower's wrapper, number of sites checked
    assert type(dp_strategy.strategy) is (FedProx if strategy == "fedprox" else FedAvg)
    assert dp_strategy.strategy.weighted_by_key == keys.UNIT_WEIGHT
    assert dp_strategy.num_sampled_clients == 3 and dp_strategy.clipping_norm == 0.8
    accountant = dp_strategy.accountant
    assert isinstance(accountant, RdpAccountant)
    assert (accountant.config.target_delta, accountant.config.population_size, accountant.config.max_epsilon) == \
        (1e-4, 3, 6.0)
    assert accountant.num_releases == 0
    assert keys.UNIT_WEIGHT in built.train_metric_keys and built.evaluate_metric_keys[-1] == keys.UNIT_WEIGHT
    if dp == "client-adaptive":
        assert isinstance(dp_strategy, DifferentialPrivacyClientSideAdaptiveClipping)
        assert KEY_NORM_BIT in built.train_metric_keys
        # the model noise and the clipped-count noise together make one release of noise-multiplier 1.5
        assert dp_strategy.clipped_count_stddev == 1.5
        assert dp_strategy.noise_multiplier == pytest.approx(1.5 * (1 - 1 / 4) ** -0.5)
        assert (1 / dp_strategy.noise_multiplier ** 2 + 1 / (2 * 1.5) ** 2) == pytest.approx(1 / 1.5 ** 2)
        assert dp_strategy.effective_noise_multiplier == 1.5
    else:
        assert dp_strategy.noise_multiplier == 1.5
        assert KEY_NORM_BIT not in built.train_metric_keys
    spent = privacy_spent(built)
    assert spent["releases"] == 0 and spent["epsilon"] == 0.0 and spent["delta"] == 1e-4
    assert (spent["noise_multiplier"], spent["clipping_norm"]) == (1.5, 0.8)


@pytest.mark.parametrize("dp", ["server-fixed", "client-fixed", "client-adaptive"])
def test_noise_to_update_is_the_noise_norm_over_the_largest_update(dp):
    """z x sqrt(parameters) / sites, with Flower's model noise multiplier (adaptive: the one it derives), whatever
    the clipping norm: what README quotes for 3 sites, noise-multiplier 0.5 and Med3D-10's 14.4 M numbers."""
    parameters = 14_361_292
    ratios = []
    for clipping_norm in (0.1, 10.0):
        built = build_strategy(_cfg(dp=dp, min_nodes=3, noise_multiplier=0.5, clipping_norm=clipping_norm),
                               round_offset=0, statistics_keys=STATS)
        ratios.append(noise_to_update(built, parameters))
        assert privacy_spent(built, parameters)["noise_to_update"] == ratios[-1]
        assert "noise_to_update" not in privacy_spent(built)
        # check against the noise Flower's wrapper really draws: std z C / n per number
        std = built.inner.noise_multiplier * clipping_norm / 3
        assert ratios[-1] == pytest.approx(std * math.sqrt(parameters) / clipping_norm)
    assert ratios[0] == ratios[1]
    z = 0.5 * ((1 - 1 / 4) ** -0.5 if dp == "client-adaptive" else 1.0)
    assert ratios[0] == pytest.approx(z * math.sqrt(parameters) / 3)
    if dp != "client-adaptive":
        assert round(ratios[0]) == 632  # README's figure
    more_sites = build_strategy(_cfg(dp=dp, min_nodes=30, noise_multiplier=0.5), round_offset=0, statistics_keys=STATS)
    assert noise_to_update(more_sites, parameters) == pytest.approx(ratios[0] / 10)
    assert noise_to_update(build_strategy(_cfg(), round_offset=0, statistics_keys=STATS), parameters) is None


def test_no_dp_no_accountant():
    """Without DP there is no privacy to report and no strategy state besides a server optimizer's."""
    built = build_strategy(_cfg(strategy="fedavg"), round_offset=0, statistics_keys=STATS)
    assert privacy_spent(built) is None
    assert strategy_state(built) == {}
    assert restore_strategy_state(built, {}) == []
    assert _cfg(dp="client-fixed").dp_max_epsilon == 0.0
    dp_built = build_strategy(_cfg(dp="client-fixed"), round_offset=0, statistics_keys=STATS)
    assert dp_built.inner.accountant.config.max_epsilon is None  # 0 = no limit


# --- 3. aggregation through build_strategy -----------------------------------------------------------


def _vector_replies(values: list[np.ndarray], ns: list[int] | None = None, dp: str = "none",
                    extra: dict | None = None) -> list[Message]:
    ns = ns or [20] * len(values)
    sites = "ABCDEFGH"
    return [_reply_msg(101 + i, sites[i], {"w": v.astype(np.float32)}, _metrics(n) | (extra or {}), dp=dp)
            for i, (v, n) in enumerate(zip(values, ns))]


def test_fedmedian_returns_the_coordinate_median():
    """fedmedian: each coordinate is the median of the sites' values, whatever their sample counts."""
    values = [np.array([1.0, 10.0, 0.0, -4.0]), np.array([2.0, -5.0, 7.0, -4.0]), np.array([30.0, 0.0, 3.0, 8.0])]
    built = build_strategy(_cfg(strategy="fedmedian"), round_offset=0, statistics_keys=())
    arrays, metrics = _aggregate(built, 1, _vector_replies(values, ns=[10, 30, 60]), {"w": values[0]})
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 0.0, 3.0, -4.0])
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(0.5)
    assert set(built.train_sites[1]) == {"A", "B", "C"}


def test_fedtrimmedavg_cuts_trim_beta_at_each_end_per_coordinate():
    """fedtrimmedavg, trim-beta 0.2, 5 sites: each coordinate's extremes are cut and the rest averaged."""
    values = [np.array([1.0, -100.0]), np.array([2.0, 5.0]), np.array([3.0, 6.0]), np.array([4.0, 7.0]),
              np.array([1000.0, 8.0])]
    built = build_strategy(_cfg(strategy="fedtrimmedavg", trim_beta=0.2), round_offset=0, statistics_keys=())
    arrays, _ = _aggregate(built, 1, _vector_replies(values, ns=[10, 20, 30, 40, 50]), {"w": values[0]})
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 6.0], rtol=1e-6)


def test_fedtrimmedavg_of_three_sites_is_their_median():
    """With 3 sites, trim-beta 0.34 cuts one site per end and coordinate: the mean of what is left is the
    median, so FedTrimmedAvg and FedMedian give the same model (the 3-site robustness experiment runs one)."""
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(200) * s for s in (1.0, 3.0, 10.0)]
    out = {}
    for strategy in ("fedmedian", "fedtrimmedavg"):
        built = build_strategy(_cfg(strategy=strategy, trim_beta=0.34), round_offset=0, statistics_keys=())
        out[strategy], _ = _aggregate(built, 1, _vector_replies(values, ns=[10, 30, 60]), {"w": values[0]})
    np.testing.assert_allclose(out["fedtrimmedavg"]["w"].numpy(), out["fedmedian"]["w"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["fedmedian"]["w"].numpy(), np.median(values, axis=0).astype(np.float32), rtol=1e-6)


def test_krum_picks_one_honest_update():
    """krum with byzantine-sites 1 returns exactly one of the clustered updates, never the distant one."""
    honest = [np.array([1.0, 1.0, 1.0]), np.array([1.1, 0.9, 1.0]), np.array([0.9, 1.0, 1.1]),
              np.array([1.0, 1.05, 0.95])]
    attacker = np.array([100.0, -100.0, 50.0])
    built = build_strategy(_cfg(strategy="krum", byzantine_sites=1), round_offset=0, statistics_keys=())
    arrays, _ = _aggregate(built, 1, _vector_replies(honest + [attacker]), {"w": honest[0]})
    w = arrays["w"].numpy()
    assert any(np.array_equal(w, h.astype(np.float32)) for h in honest), w
    assert np.abs(w - attacker).min() > 40


@pytest.mark.parametrize("robust", ["fedmedian", "fedtrimmedavg", "krum"])
def test_one_sign_flipped_site_moves_fedavg_but_not_the_robust_strategies(robust):
    """One of 5 sites sign-flipped and x10 drags FedAvg against the honest sites; the robust strategy stays near them."""
    rng = np.random.default_rng(0)
    w0 = np.full(50, 0.5)
    deltas = [0.1 + 0.01 * rng.standard_normal(50) for _ in range(4)]
    honest_mean = w0 + np.mean(deltas, axis=0)
    values = [w0 + d for d in deltas] + [w0 - 10 * np.mean(deltas, axis=0)]
    replies = lambda: _vector_replies(values)  # noqa: E731 (FedMedian and FedTrimmedAvg pop the replies' arrays)

    fedavg, _ = _aggregate(build_strategy(_cfg(strategy="fedavg"), round_offset=0, statistics_keys=()), 1,
                           replies(), {"w": w0})
    other, _ = _aggregate(build_strategy(_cfg(strategy=robust, trim_beta=0.2, byzantine_sites=1), round_offset=0,
                                         statistics_keys=()), 1, replies(), {"w": w0})
    avg_err = np.linalg.norm(fedavg["w"].numpy() - honest_mean)
    robust_err = np.linalg.norm(other["w"].numpy() - honest_mean)
    assert np.dot(fedavg["w"].numpy() - w0, honest_mean - w0) < 0  # FedAvg stepped against the honest direction
    assert robust_err < 0.1 * avg_err, (robust_err, avg_err)
    assert np.dot(other["w"].numpy() - w0, honest_mean - w0) > 0


def _tiny_global() -> tuple[dict[str, np.ndarray], list[str]]:
    model = TinyConvBN(seed=0)
    return _numpy_state(model), statistics_keys(model)


def _site_states(global_state: dict[str, np.ndarray], n_sites: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """What sites return after a round: every float tensor moved, the running variance shrunk, 3 more batches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sites):
        state = {}
        for k, v in global_state.items():
            if k.endswith("num_batches_tracked"):
                state[k] = np.asarray(v + 3, dtype=np.int64)
            elif k.endswith("running_var"):
                state[k] = (v * rng.uniform(0.3, 0.6, v.shape)).astype(np.float32)
            else:
                state[k] = (v + rng.normal(0.05, 0.02, v.shape)).astype(np.float32)
        out.append(state)
    return out


def _fedopt(cfg: RunConfig, global_state: dict[str, np.ndarray], stats: list[str], round_offset: int = 0):
    built = build_strategy(cfg, round_offset=round_offset, statistics_keys=stats)
    built.inner.current_arrays = {k: np.asarray(v) for k, v in global_state.items()}  # as configure_train keeps it
    return built


def _state_replies(states: list[dict[str, np.ndarray]], ns: list[int]) -> list[Message]:
    return [_reply_msg(101 + i, "ABCDE"[i], s, _metrics(n)) for i, (s, n) in enumerate(zip(states, ns))]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedopt_averages_batchnorm_statistics_and_steps_the_parameters(name):
    """fedadam/fedyogi: BatchNorm statistics are FedAvg's average (variance stays > 0), parameters the server step."""
    global_state, stats = _tiny_global()
    assert set(stats) == {f"bn{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked")}
    states, ns = _site_states(global_state), [10, 30, 60]
    weights = np.array(ns) / sum(ns)
    average = {k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, states)) for k in global_state}

    built = _fedopt(_cfg(strategy=name, server_lr=2.0), global_state, stats)
    arrays, metrics = _aggregate(built, 1, _state_replies(states, ns), global_state)
    out = _np(arrays)
    assert set(out) == set(global_state)
    for k in stats:
        np.testing.assert_allclose(out[k], average[k], rtol=1e-6, err_msg=k)
    for k in global_state:
        if k.endswith("running_var"):
            assert (out[k] > 0).all()
        if k not in stats:
            assert np.abs(out[k] - average[k]).max() > 0.1, k  # a server step of eta = 2, not the average
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(0.5)

    # the stepped running variance would have gone negative: the averaging is what keeps it a variance
    plain = {"fedadam": FedAdam, "fedyogi": FedYogi}[name](eta=2.0, eta_l=1e-4, beta_1=0.9, beta_2=0.99, tau=1e-3)
    plain.current_arrays = {k: np.asarray(v) for k, v in global_state.items()}
    stepped, _ = plain.aggregate_train(1, _state_replies(states, ns))
    assert (stepped["bn1.running_var"].numpy() < 0).any()
    for k in global_state:
        if k not in stats:
            np.testing.assert_allclose(out[k], stepped[k].numpy(), rtol=1e-6, err_msg=k)  # the same step


def test_fedadam_step_uses_the_global_round():
    """The server optimizer's bias correction counts global rounds: round 1 after a resume at round 5 steps as round 6."""
    global_state, stats = _tiny_global()
    states, ns = _site_states(global_state), [10, 30, 60]
    cfg = _cfg(strategy="fedadam", server_lr=0.1, server_beta1=0.9, server_beta2=0.99, server_tau=1e-3)

    def step(offset: int) -> np.ndarray:
        built = _fedopt(cfg, global_state, stats, round_offset=offset)
        arrays, _ = _aggregate(built, 1, _state_replies(states, ns), global_state)
        return arrays["conv1.weight"].numpy().astype(np.float64) - global_state["conv1.weight"]

    weights = np.array(ns) / sum(ns)
    delta = sum(w * s["conv1.weight"].astype(np.float64) for w, s in zip(weights, states)) - global_state["conv1.weight"]
    for offset in (0, 5):
        t = offset + 1
        eta_norm = 0.1 * math.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
        expected = eta_norm * (0.1 * delta) / (np.sqrt(0.01 * delta ** 2) + 1e-3)
        np.testing.assert_allclose(step(offset), expected, rtol=1e-4, atol=1e-7)


# --- DP wrappers through build_strategy --------------------------------------------------------------

NEAR_ZERO_NOISE = 1e-6  # a noise multiplier that leaves the aggregate readable to 1e-6


def _dp_strategy(dp: str, *, round_offset: int = 0, min_nodes: int = 3, clipping_norm: float = 1.0,
                 noise_multiplier: float = NEAR_ZERO_NOISE) -> RecordingStrategy:
    cfg = _cfg(strategy="fedavg", dp=dp, min_nodes=min_nodes, clipping_norm=clipping_norm,
               noise_multiplier=noise_multiplier)
    return build_strategy(cfg, round_offset=round_offset, statistics_keys=())


def _arm_round(built: RecordingStrategy, g: int, global_arrays: dict[str, np.ndarray]) -> None:
    """What the DP wrappers' ``configure_train`` keeps for global round ``g``: the arrays sent and (fixed clipping)
    the round's pending privacy event."""
    dp = built.inner
    dp.current_arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in global_arrays.items()})
    if not isinstance(dp, _AccountedAdaptive):
        dp._pending_events[g] = GaussianPrivacyEvent(noise_multiplier=dp.noise_multiplier,
                                                     sample_size=dp.num_sampled_clients,
                                                     population_size=dp.accountant.config.population_size)


def _dp_extra(dp: str) -> dict:
    return {KEY_NORM_BIT: 1} if dp == "client-adaptive" else {}


@pytest.mark.parametrize("dp", ["server-fixed", "client-fixed", "client-adaptive"])
def test_dp_round_weighs_every_site_equally_and_is_accounted(dp):
    """A DP round (global round 5) averages the sites unweighted and composes one release into the accountant."""
    w0 = np.zeros(4)
    values = [np.full(4, 0.1), np.full(4, 0.2), np.full(4, 0.4)]  # each update's L2 norm within the clipping norm 1
    built = _dp_strategy(dp, round_offset=4)
    _arm_round(built, 5, {"w": w0})
    arrays, _ = _aggregate(built, 1, _vector_replies(values, ns=[10, 30, 60], dp=dp, extra=_dp_extra(dp)), {"w": w0})
    np.testing.assert_allclose(arrays["w"].numpy(), 0.7 / 3, atol=1e-4)  # (0.1 + 0.2 + 0.4) / 3, not by samples (0.31)
    spent = privacy_spent(built)
    assert spent["releases"] == 1 and spent["epsilon"] > 0
    assert set(built.train_sites[5]) == {"A", "B", "C"}


def test_server_side_fixed_clipping_bounds_each_update():
    """server-fixed: a site's update larger than clipping-norm is scaled down to it before averaging."""
    w0 = np.full(4, 1.0)
    values = [w0 + np.array([10.0, 0.0, 0.0, 0.0]), w0 + np.array([0.0, 0.0, 0.0, 10.0]), w0 + 0.1]
    built = _dp_strategy("server-fixed", clipping_norm=1.0)
    _arm_round(built, 1, {"w": w0})
    arrays, _ = _aggregate(built, 1, _vector_replies(values, dp="server-fixed"), {"w": w0})
    expected = w0 + (np.array([1.0, 0, 0, 0]) + np.array([0, 0, 0, 1.0]) + np.full(4, 0.1)) / 3
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("dp", [
    "server-fixed", "client-fixed",
    # Flower's adaptive wrapper validates replies non-strictly: fedpd's subclass refuses the incomplete round
    "client-adaptive",
])
def test_dp_round_with_a_rejected_site_is_not_released(dp):
    """A DP round with one of 3 updates rejected by screening is not released and composes nothing."""
    w0 = np.zeros(4)
    values = [np.full(4, 0.1), np.full(4, 0.2), np.full(4, np.nan)]
    built = _dp_strategy(dp)
    _arm_round(built, 1, {"w": w0})
    arrays, _ = _aggregate(built, 1, _vector_replies(values, dp=dp, extra=_dp_extra(dp)), {"w": w0})
    assert [r["site"] for r in built.rejected[1]] == ["C"]
    assert arrays is None
    assert privacy_spent(built)["releases"] == 0


# --- 4. local training: FedProx ---------------------------------------------------------------------------


def _train(model: nn.Module, **kwargs) -> None:
    loader = DataLoader(DictDataset(n=8, seed=3), batch_size=2, shuffle=False)
    torch.manual_seed(0)
    train_local(model, loader, epochs=2, lr=1e-2, weight_decay=0.0, rt=CPU, **kwargs)


def _param_distance(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters()))


def test_proximal_term_keeps_the_model_near_the_global_weights():
    """train_local with a large proximal-mu ends much closer (L2 over the parameters) to its starting weights than mu=0."""
    start = TinyConvBN(seed=0)
    start_params = {n: p.detach().clone() for n, p in start.named_parameters()}
    plain, prox = copy.deepcopy(start), copy.deepcopy(start)
    _train(plain, proximal_mu=0.0)
    _train(prox, proximal_mu=100.0)
    d_plain, d_prox = _param_distance(plain, start_params), _param_distance(prox, start_params)
    assert d_prox > 0  # it still trains
    assert d_prox < 0.5 * d_plain, (d_prox, d_plain)
    again = copy.deepcopy(start)
    _train(again, proximal_mu=0.0)  # same seed and data: the comparison is not noise
    assert _param_distance(again, start_params) == pytest.approx(d_plain, rel=1e-6)


# --- 5. exchanged keys and partial loading -----------------------------------------------------------


@pytest.fixture(scope="module")
def med3d():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_med3d(10)


def test_exchanged_keys_with_statistics_are_the_whole_state(med3d):
    """Without DP or secure aggregation every state key travels, in state-dict order."""
    cfg = _cfg()
    assert cfg.statistics_shared
    assert exchanged_keys(med3d, cfg.statistics_shared) == list(med3d.state_dict())
    assert exchanged_keys(med3d) == list(med3d.state_dict())


@pytest.mark.parametrize("changes", [{"dp": d} for d in DP_MODES if d != "none"]
                         + [{"secure_aggregation": True, "min_nodes": 3}])
def test_exchanged_keys_under_dp_leave_out_exactly_the_buffers(med3d, changes):
    """Under DP or secure aggregation exactly the buffers (BatchNorm statistics and counts) stay home, order kept."""
    cfg = _cfg(**changes)
    assert not cfg.statistics_shared
    state = list(med3d.state_dict())
    exchanged = exchanged_keys(med3d, cfg.statistics_shared)
    buffers = [name for name, _ in med3d.named_buffers()]
    assert exchanged == [k for k in state if k not in set(buffers)]
    assert set(exchanged) == {name for name, _ in med3d.named_parameters()}
    assert set(state) - set(exchanged) == set(statistics_keys(med3d)) == set(buffers)
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in buffers)
    assert len(buffers) == 3 * 12  # Med3D-10: 12 BatchNorms
    assert set(statistics_keys(med3d)) < set(batchnorm_keys(med3d))  # BatchNorm affine weights do travel
    assert not set(batchnorm_keys(med3d)) - set(statistics_keys(med3d)) - set(exchanged)


def test_partial_load_replaces_parameters_and_keeps_buffers():
    """load_state_numpy with the DP keys replaces every parameter and leaves every buffer as it was."""
    model, other = TinyConvBN(seed=0), TinyConvBN(seed=1)
    with torch.no_grad():  # BatchNorm's affine weights start at 1 and 0 whatever the seed
        for bn in (other.bn1, other.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.bn1.running_mean.fill_(0.7)
    model.bn2.num_batches_tracked.fill_(11)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    sent = _numpy_state(other)
    exchanged = exchanged_keys(model, statistics=False)
    load_state_numpy(model, {k: sent[k] for k in exchanged}, keys=exchanged)
    state = model.state_dict()
    for k in exchanged:
        np.testing.assert_array_equal(state[k].numpy(), sent[k])
        assert not torch.equal(state[k], own[k]), k
    for k in statistics_keys(model):
        assert torch.equal(state[k], own[k]), k


def test_full_load_casts_averaged_batch_counts_back():
    """A full load (keys None) takes FedAvg's float batch counts back as int64."""
    model = TinyConvBN(seed=0)
    sent = _numpy_state(TinyConvBN(seed=1)) | {"bn1.num_batches_tracked": np.asarray(4.0)}
    load_state_numpy(model, sent)
    assert model.bn1.num_batches_tracked.dtype == torch.int64 and int(model.bn1.num_batches_tracked) == 4


def test_partial_load_refuses_missing_and_extra_keys():
    """A partial load refuses a missing or an extra key before loading; a full load refuses a missing key."""
    model = TinyConvBN(seed=0)
    sent = _numpy_state(TinyConvBN(seed=1))
    exchanged = exchanged_keys(model, statistics=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"missing \['conv1.weight'\]"):
        load_state_numpy(model, {k: sent[k] for k in exchanged if k != "conv1.weight"}, keys=exchanged)
    with pytest.raises(RuntimeError, match=r"unexpected \['bn1.running_mean'\]"):
        load_state_numpy(model, {k: sent[k] for k in exchanged} | {"bn1.running_mean": sent["bn1.running_mean"]},
                         keys=exchanged)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before loading anything
    with pytest.raises(RuntimeError, match="bn2.running_var"):
        load_state_numpy(model, {k: v for k, v in sent.items() if k != "bn2.running_var"})


# --- 6. strategy state through a checkpoint ----------------------------------------------------------


def _through_checkpoint(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"strategy": {"state": state}}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["strategy"]["state"]


def _fedadam_after_one_round(cfg: RunConfig):
    global_state, stats = _tiny_global()
    states, ns = _site_states(global_state), [10, 30, 60]
    built = _fedopt(cfg, global_state, stats)
    arrays, _ = _aggregate(built, 1, _state_replies(states, ns), global_state)
    return built, _np(arrays), stats


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_moments_survive_a_checkpoint(name):
    """FedAdam/FedYogi moments survive a weights_only checkpoint, and the next round from them is the same."""
    cfg = _cfg(strategy=name, server_lr=0.1)
    built, after_one, stats = _fedadam_after_one_round(cfg)
    state = strategy_state(built)
    assert set(state) == {"m_t", "v_t"}
    assert all(isinstance(v, torch.Tensor) for moments in state.values() for v in moments.values())
    loaded = _through_checkpoint(state)

    fresh = build_strategy(cfg, round_offset=1, statistics_keys=stats)
    assert restore_strategy_state(fresh, loaded) == ["m_t", "v_t"]
    for name_ in ("m_t", "v_t"):
        original, restored = getattr(built.inner, name_), getattr(fresh.inner, name_)
        assert set(restored) == set(original)
        for k in original:
            np.testing.assert_array_equal(restored[k], original[k], err_msg=k)
            assert restored[k].dtype == original[k].dtype

    # round 2 (global) from both: the same model
    built.round_offset = 1
    states2 = _site_states(after_one, seed=7)
    outs = []
    for strategy in (built, fresh):
        strategy.inner.current_arrays = {k: np.asarray(v) for k, v in after_one.items()}
        arrays, _ = _aggregate(strategy, 1, _state_replies(states2, [10, 30, 60]), after_one)
        outs.append(_np(arrays))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[1][k], outs[0][k], err_msg=k)
        assert outs[1][k].shape == outs[0][k].shape


def test_restored_moments_keep_their_shapes():
    """Every restored moment has the shape it had, 0-d batch counts included."""
    cfg = _cfg(strategy="fedadam")
    built, _, stats = _fedadam_after_one_round(cfg)
    fresh = build_strategy(cfg, round_offset=1, statistics_keys=stats)
    restore_strategy_state(fresh, _through_checkpoint(strategy_state(built)))
    shapes = {k: v.shape for k, v in built.inner.m_t.items()}
    assert shapes["bn1.num_batches_tracked"] == ()
    assert {k: v.shape for k, v in fresh.inner.m_t.items()} == shapes


@pytest.mark.parametrize("dp", ["server-fixed", "client-fixed"])
def test_privacy_ledger_survives_a_checkpoint(dp):
    """The fixed-clipping privacy ledger survives a weights_only checkpoint with the same epsilon and releases."""
    cfg = _cfg(strategy="fedavg", dp=dp, min_nodes=3, noise_multiplier=1.2, clipping_norm=0.5, dp_max_epsilon=50.0)
    built = build_strategy(cfg, round_offset=0, statistics_keys=())
    event = GaussianPrivacyEvent(noise_multiplier=1.2, sample_size=3, population_size=3)
    built.inner.accountant.compose(event)
    built.inner.accountant.compose(event)
    spent = privacy_spent(built)
    assert spent["releases"] == 2 and spent["epsilon"] > 0 and spent["delta"] == cfg.dp_delta
    state = strategy_state(built)
    assert set(state) == {"accountant", "clipping_norm"} and state["clipping_norm"] == 0.5
    loaded = _through_checkpoint(state)

    fresh = build_strategy(cfg, round_offset=2, statistics_keys=())
    assert privacy_spent(fresh)["releases"] == 0
    assert restore_strategy_state(fresh, loaded) == ["privacy ledger (2 releases)", "clipping norm"]
    assert privacy_spent(fresh) == spent
    assert fresh.inner.accountant.get_privacy_spent().epsilon == built.inner.accountant.get_privacy_spent().epsilon
    # and the ledger goes on: a third release from either gives the same epsilon
    for strategy in (built, fresh):
        strategy.inner.accountant.compose(event)
    assert privacy_spent(fresh) == privacy_spent(built) and privacy_spent(fresh)["epsilon"] > spent["epsilon"]


def test_adaptive_clipping_norm_and_ledger_survive_a_checkpoint():
    """client-adaptive: the adapted clipping norm and the ledger of an aggregated round restore into a fresh strategy."""
    cfg = _cfg(strategy="fedavg", dp="client-adaptive", min_nodes=3, noise_multiplier=1.0, clipping_norm=1.0)
    built = build_strategy(cfg, round_offset=0, statistics_keys=())
    w0 = np.zeros(3)
    _arm_round(built, 1, {"w": w0})
    np.random.seed(0)  # Flower's noise draws
    arrays, _ = _aggregate(built, 1, _vector_replies([np.full(3, 0.1)] * 3, dp="client-adaptive",
                                                     extra={KEY_NORM_BIT: 1}), {"w": w0})
    assert arrays is not None
    assert built.inner.clipping_norm != 1.0  # adapted
    spent = privacy_spent(built)
    assert spent["releases"] == 1 and spent["noise_multiplier"] == 1.0

    loaded = _through_checkpoint(strategy_state(built))
    fresh = build_strategy(cfg, round_offset=1, statistics_keys=())
    assert restore_strategy_state(fresh, loaded) == ["privacy ledger (1 releases)", "clipping norm"]
    assert fresh.inner.clipping_norm == built.inner.clipping_norm
    assert privacy_spent(fresh) == spent


def test_adaptive_release_is_accounted_as_one_gaussian_release_of_the_run_multiplier():
    """The adaptive wrapper's release costs what one fixed-clipping release with the same noise-multiplier costs."""
    adaptive = build_strategy(_cfg(dp="client-adaptive", min_nodes=3, noise_multiplier=1.0), round_offset=0,
                              statistics_keys=())
    fixed = build_strategy(_cfg(dp="client-fixed", min_nodes=3, noise_multiplier=1.0), round_offset=0,
                           statistics_keys=())
    _arm_round(adaptive, 1, {"w": np.zeros(3)})
    np.random.seed(0)
    _aggregate(adaptive, 1, _vector_replies([np.full(3, 0.1)] * 3, dp="client-adaptive", extra={KEY_NORM_BIT: 0}),
               {"w": np.zeros(3)})
    _arm_round(fixed, 1, {"w": np.zeros(3)})
    _aggregate(fixed, 1, _vector_replies([np.full(3, 0.1)] * 3, dp="client-fixed"), {"w": np.zeros(3)})
    assert privacy_spent(adaptive)["epsilon"] == pytest.approx(privacy_spent(fixed)["epsilon"])


# --- 7. records ----------------------------------------------------------------------------------------

PRIVACY = {"epsilon": 3.25, "delta": 1e-5, "releases": 4, "noise_multiplier": 1.0, "clipping_norm": 0.5}


def test_round_record_privacy_round_trips():
    """A DP round's privacy entry survives to_dict, JSON and from_dict; without DP the key is absent."""
    rec = RoundRecord(round=3, val={"auc": 0.8, "n": 12}, train_loss=0.4, num_examples=60, privacy=dict(PRIVACY))
    data = json.loads(json.dumps(rec.to_dict(), allow_nan=False))
    assert data["privacy"] == PRIVACY
    assert RoundRecord.from_dict(data) == rec

    plain = RoundRecord(round=3, val={"auc": 0.8})
    assert "privacy" not in plain.to_dict()
    back = RoundRecord.from_dict(json.loads(json.dumps(plain.to_dict())))
    assert back.privacy is None and back == plain
    assert RoundRecord.from_dict(plain.to_dict() | {"privacy": None}).privacy is None


def test_run_report_privacy_round_trips():
    """A DP report's privacy section survives to_dict, JSON and from_dict; without DP the key is absent."""
    report = RunReport(arm="fedavg+dp:client-fixed", rounds=4, privacy=PRIVACY | {"rounds": 4})
    data = json.loads(json.dumps(report.to_dict()))
    assert data["privacy"] == PRIVACY | {"rounds": 4}
    assert RunReport.from_dict(data) == report

    plain = RunReport(arm="fedavg", rounds=4)
    assert "privacy" not in plain.to_dict()
    assert RunReport.from_dict(json.loads(json.dumps(plain.to_dict()))).privacy is None


# --- 8. arm names --------------------------------------------------------------------------------------


def test_arm_name():
    """The arm name: strategy, +dp:<mode>, +secagg, and '(random init)' without a pretrained path."""
    assert arm_name(_cfg(strategy="fedavg", pretrained_path="")) == "fedavg (random init)"
    assert arm_name(_cfg(strategy="fedprox", dp="client-fixed", pretrained_path="/w/resnet_10.pth")) == \
        "fedprox+dp:client-fixed"
    assert arm_name(_cfg(strategy="fedbn", dp="client-adaptive")) == "fedbn+dp:client-adaptive (random init)"
    assert arm_name(_cfg(strategy="krum", pretrained_path="x")) == "krum"
    assert arm_name(_cfg(strategy="fedavg", secure_aggregation=True, min_nodes=3, pretrained_path="x")) == \
        "fedavg+secagg"


@pytest.mark.parametrize("dp", ["server-fixed", "client-fixed"])
def test_dp_refuses_a_round_with_another_number_of_sites_than_min_nodes(dp):
    """DP noise and ledger are set for min-nodes sites: a round sampling 4 of them stops with a ConfigError saying so."""
    built = build_strategy(_cfg(dp=dp, min_nodes=3), round_offset=0, statistics_keys=())
    with pytest.raises(ConfigError, match=r"4 site\(s\) are taking part in this round but min-nodes = 3.*min-nodes = 4"):
        built.inner._prepare_accounting(1, [_instruction(n) for n in (1, 2, 3, 4)])
    assert len(built.inner._prepare_accounting(1, [_instruction(n) for n in (1, 2, 3)])) == 3  # the right number passes


def test_client_adaptive_stops_before_a_round_past_dp_max_epsilon():
    """client-adaptive: once the next release would pass dp-max-epsilon, the round is refused before it is sent."""
    from flwr.serverapp.exception import PrivacyBudgetExhausted

    built = build_strategy(_cfg(dp="client-adaptive", noise_multiplier=0.5, dp_max_epsilon=60.0), round_offset=0,
                           statistics_keys=())
    dp = built.inner
    dp.check_budget()  # nothing spent yet
    releases = 0
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        for _ in range(100):
            dp.check_budget()
            dp.accountant.compose(dp._event())
            releases += 1
    assert 1 <= releases < 100 and dp.accountant.get_privacy_spent().epsilon <= 60.0
