"""The run's aggregation, built from run-config on Flower's own strategies and DP wrappers.

``strategy`` picks the Flower strategy (``flwr.serverapp.strategy``); ``dp`` wraps it in Flower's
differential-privacy wrapper; :class:`server.strategy.RecordingStrategy` goes around both, so every arm
has the same screening, bookkeeping, checkpoints and report. What fedpd adds to Flower here:

- ``fedadam``/``fedyogi``: the server optimizer steps the trained parameters only; BatchNorm running
  statistics and batch counts are averaged as FedAvg does (an Adam step on a running variance can drive it
  below zero). Their moments (``m_t``, ``v_t``) are saved with every checkpoint and restored on resume.
- ``fedbn``: FedAvg on the server; each site keeps its own BatchNorm (client/app.py). The server's
  validation, test and exported model use the FedAvg average of the sites' BatchNorm, the only BatchNorm
  the server holds.
- ``dp``: every site weighs 1 in the average (Flower's accounting needs equal weights; the sites send
  ``unit-weight``), and the privacy spent (epsilon at ``dp-delta``) is composed with Flower's
  ``RdpAccountant`` after every round: by Flower's fixed-clipping wrappers themselves, and for adaptive
  clipping (which Flower does not account) here, with the same accountant and the run's noise multiplier,
  which is the effective multiplier of the model and clipped-count noise together (Andrew et al. 2021).
  BatchNorm running statistics are not sent under DP or secure aggregation (they cannot be clipped or
  quantized with the update): each site keeps its own, and the server re-estimates its own on its validation
  images every round (server/app.py, ``common.learning.train.recalibrate_batchnorm``).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common import log
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi, Krum)
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from logging import INFO, WARNING

from common import keys
from common.config import RunConfig
from common.errors import ConfigError
from server.strategy import RecordingStrategy, nan_aware_mean, train_metrics_summary

__all__ = ["build_strategy", "strategy_state", "restore_strategy_state", "privacy_spent", "noise_to_update", "arm_name"]


class _StatisticsAveraged:
    """Mixin for Flower's FedOpt strategies: the named statistics keys are FedAvg's average, not an optimizer step."""

    statistics_keys: frozenset[str] = frozenset()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        stepped, metrics = super().aggregate_train(server_round, replies)
        if stepped is None or not self.statistics_keys:
            return stepped, metrics
        # the weighted mean of the statistics only (FedAvg's rule), not a second average of every parameter
        usable = [r for r in replies if not r.has_error()]
        weights = np.array([float(next(iter(r.content.metric_records.values()))[self.weighted_by_key]) for r in usable])
        weights /= weights.sum()
        arrays = [next(iter(r.content.array_records.values())) for r in usable]
        averaged = {k: Array(np.asarray(sum(w * a[k].numpy() for w, a in zip(weights, arrays)))) for k in self.statistics_keys
                    if k in stepped}
        return ArrayRecord({k: averaged.get(k, v) for k, v in stepped.items()}), metrics


class FedpdFedAdam(_StatisticsAveraged, FedAdam):
    pass


class FedpdFedYogi(_StatisticsAveraged, FedYogi):
    pass


def arm_name(cfg: RunConfig) -> str:
    """The comparison-table name of a federated run: strategy, privacy, float16 transport, and random init when
    not pretrained."""
    name = cfg.strategy + (f"+dp:{cfg.dp}" if cfg.dp != "none" else "") + ("+secagg" if cfg.secure_aggregation else "")
    name += "+fp16" if cfg.transport_dtype == "float16" else ""
    name += "" if cfg.pretrained_path else " (random init)"
    if cfg.attack != "none":
        name += f" [attack: {cfg.attack} x{cfg.attack_factor:g} at {cfg.attack_site}]"
    return name


def _accounting(cfg: RunConfig, sites: int):
    from flwr.serverapp import RdpAccountant  # needs dp-accounting (the flwr[dp] extra)

    return RdpAccountant(PrivacyConfig(
        target_delta=cfg.dp_delta, population_size=sites, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=cfg.dp_max_epsilon or None))


def _all_sites(messages: list, expected: int) -> list:
    """The DP noise and ledger are set for exactly ``expected`` sites per round: refuse another number clearly."""
    if len(messages) != expected:
        raise ConfigError(f"dp: {len(messages)} site(s) are taking part in this round but min-nodes = {expected}: the "
                          "noise and the privacy accounting are set for exactly min-nodes sites; start the run with "
                          f"min-nodes = {len(messages)} (every site of the federation)")
    return messages


class _FixedServer(DifferentialPrivacyServerSideFixedClipping):
    def _prepare_accounting(self, server_round, messages):
        return super()._prepare_accounting(server_round, _all_sites(list(messages), self.num_sampled_clients))


class _FixedClient(DifferentialPrivacyClientSideFixedClipping):
    def _prepare_accounting(self, server_round, messages):
        return super()._prepare_accounting(server_round, _all_sites(list(messages), self.num_sampled_clients))


class _AccountedAdaptive(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, with the release of every aggregated round composed into an
    RdpAccountant (Flower's adaptive wrappers take none), the budget checked before each round as Flower's
    fixed wrappers do, and a round without every site's usable update not released (as there)."""

    def __init__(self, *args, accountant, effective_noise_multiplier: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.accountant = accountant
        self.effective_noise_multiplier = effective_noise_multiplier

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.effective_noise_multiplier, sample_size=self.num_sampled_clients,
                                    population_size=self.accountant.config.population_size)

    def configure_train(self, server_round, arrays, config, grid):
        messages = _all_sites(list(super().configure_train(server_round, arrays, config, grid)), self.num_sampled_clients)
        self.check_budget()
        return messages

    def check_budget(self) -> None:
        """Raise PrivacyBudgetExhausted when the next round's release would pass dp-max-epsilon."""
        if self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(self._event()):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(f"The next private release would exceed max_epsilon (current epsilon: "
                                         f"{spent.epsilon}, delta: {spent.delta}).")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        usable = [r for r in replies if not r.has_error()]
        if len(usable) != self.num_sampled_clients:
            log(WARNING, "round %d: %d of %d sites sent a usable update: the round is not released (DP noise is "
                "set for all of them)", server_round, len(usable), self.num_sampled_clients)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.accountant.compose(self._event())
        return arrays, metrics

    def privacy_spent(self):
        return self.accountant.get_privacy_spent()


def _inner(cfg: RunConfig, statistics_keys: Iterable[str]) -> FedAvg:
    weight = keys.UNIT_WEIGHT if cfg.dp != "none" else keys.NUM_EXAMPLES
    common = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0, min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes, weighted_by_key=weight,
        # the round's loss and the federation's val figures stay sample-weighted whatever weights the average
        train_metrics_aggr_fn=lambda records, _key: train_metrics_summary(records, keys.NUM_EXAMPLES),
        evaluate_metrics_aggr_fn=lambda records, _key: nan_aware_mean(records, keys.NUM_EXAMPLES),
    )
    if cfg.strategy in ("fedavg", "fedbn"):
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy in ("fedadam", "fedyogi"):
        cls = FedpdFedAdam if cfg.strategy == "fedadam" else FedpdFedYogi
        strategy = cls(eta=cfg.server_lr, eta_l=cfg.lr, beta_1=cfg.server_beta1, beta_2=cfg.server_beta2,
                       tau=cfg.server_tau, **common)
        strategy.statistics_keys = frozenset(statistics_keys)
        return strategy
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trim_beta, **common)
    if cfg.strategy == "krum":
        return Krum(num_malicious_nodes=cfg.byzantine_sites, **common)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")  # RunConfig has checked it


def build_strategy(cfg: RunConfig, *, round_offset: int, statistics_keys: Iterable[str]) -> RecordingStrategy:
    """The run's strategy: Flower's ``cfg.strategy``, in Flower's DP wrapper for ``cfg.dp``, screened.

    ``statistics_keys`` are the model's BatchNorm buffers (averaged, never stepped, by fedadam/fedyogi). With
    DP, every round needs all ``min-nodes`` sites (RunConfig requires fraction-train 1): the noise is
    calibrated for that many, and a round in which fewer sites send a usable update is not released
    (Flower's wrappers skip it).
    """
    inner = _inner(cfg, statistics_keys)
    extra = ()
    sites = cfg.min_nodes
    if cfg.dp in ("server-fixed", "client-fixed"):
        wrapper = _FixedServer if cfg.dp == "server-fixed" else _FixedClient
        inner = wrapper(inner, noise_multiplier=cfg.noise_multiplier, clipping_norm=cfg.clipping_norm,
                        num_sampled_clients=sites, accountant=_accounting(cfg, sites))
        extra = (keys.UNIT_WEIGHT,)
    elif cfg.dp == "client-adaptive":
        # the clipped-count noise: std = noise-multiplier (Flower's default, sites/20, cannot reach a multiplier
        # of 1 below 40 sites); the model noise is then noise-multiplier * (1 - 1/4)^-1/2, and both together
        # spend what one Gaussian release with noise-multiplier does
        inner = _AccountedAdaptive(inner, noise_multiplier=cfg.noise_multiplier, num_sampled_clients=sites,
                                   initial_clipping_norm=cfg.clipping_norm, clipped_count_stddev=cfg.noise_multiplier,
                                   accountant=_accounting(cfg, sites), effective_noise_multiplier=cfg.noise_multiplier)
        extra = (keys.UNIT_WEIGHT, KEY_NORM_BIT)
    return RecordingStrategy(inner, round_offset=round_offset, extra_train_metrics=extra,
                             extra_evaluate_metrics=extra[:1], transport_dtype=cfg.transport_dtype)


def _dp_wrapper(strategy: RecordingStrategy):
    inner = strategy.inner
    return inner if hasattr(inner, "accountant") else None


def privacy_spent(strategy: RecordingStrategy, parameters: int | None = None) -> dict | None:
    """``{"epsilon", "delta", "releases", "noise_multiplier", "clipping_norm"}`` so far, plus ``noise_to_update``
    (:func:`noise_to_update`) when the number of noised ``parameters`` is given; ``None`` without DP."""
    dp = _dp_wrapper(strategy)
    if dp is None or dp.accountant is None:
        return None
    spent = dp.accountant.get_privacy_spent()
    out = {"epsilon": float(spent.epsilon), "delta": float(spent.delta), "releases": int(spent.num_releases),
           # adaptive clipping: the multiplier of model and clipped-count noise together (the run-config's)
           "noise_multiplier": float(getattr(dp, "effective_noise_multiplier", dp.noise_multiplier)),
           "clipping_norm": float(dp.clipping_norm)}
    if parameters is not None:
        out["noise_to_update"] = noise_to_update(strategy, parameters)
    return out


def noise_to_update(strategy: RecordingStrategy, parameters: int) -> float | None:
    """How loud a DP round's noise is against the update it hides, or ``None`` without DP.

    Flower's DP wrappers add Gaussian noise of std ``z * C / n`` to each of the ``parameters`` numbers of the
    averaged update (``z``: the model's noise multiplier, for adaptive clipping the one Flower derives from the
    run's; ``C``: the clipping norm; ``n``: the sites per round), whose norm is at most ``C``. The noise's
    expected norm is then ``z * sqrt(parameters) / n`` times the largest update the sites can send, whatever
    ``C``. Above 1 the noise is louder than any one round's update (at 3 sites and a 14.4 M-parameter model, z 0.5
    gives 632); whether the model still learns depends on the noise per number against its weights (server/app.py).
    """
    dp = _dp_wrapper(strategy)
    if dp is None:
        return None
    return float(dp.noise_multiplier) * float(np.sqrt(parameters)) / int(dp.num_sampled_clients)


def strategy_state(strategy: RecordingStrategy) -> dict:
    """What a resume needs of the strategy: a server optimizer's moments, the privacy ledger, an adaptive
    clipping norm (tensors and plain values only: checkpoints load with ``weights_only``)."""
    import torch

    state: dict = {}
    dp = _dp_wrapper(strategy)
    core = dp.strategy if dp is not None else strategy.inner
    for name in ("m_t", "v_t"):
        moments = getattr(core, name, None)
        if moments:
            state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}  # 0-d stays 0-d
    if dp is not None:
        if dp.accountant is not None:
            state["accountant"] = dp.accountant.state_dict()
        state["clipping_norm"] = float(dp.clipping_norm)
    return state


def restore_strategy_state(strategy: RecordingStrategy, state: dict) -> list[str]:
    """Put a checkpoint's :func:`strategy_state` back; returns what was restored (for the log)."""
    restored = []
    dp = _dp_wrapper(strategy)
    core = dp.strategy if dp is not None else strategy.inner
    for name in ("m_t", "v_t"):
        if name in state and hasattr(core, name):
            setattr(core, name, {k: v.numpy().copy() for k, v in state[name].items()})
            restored.append(name)
    if dp is not None and "accountant" in state and dp.accountant is not None:
        dp.accountant.load_state_dict(state["accountant"])
        restored.append(f"privacy ledger ({dp.accountant.num_releases} releases)")
    if dp is not None and "clipping_norm" in state:
        dp.clipping_norm = float(state["clipping_norm"])
        restored.append("clipping norm")
    if restored:
        log(INFO, "resume: restored the strategy's %s", ", ".join(restored))
    return restored

