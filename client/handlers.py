"""The site's training and evaluation: what a ClientApp message asks of the site, run in the site worker
(client/worker.py, deployment) or in the ClientApp process itself (simulation, or without a worker).

They unpack the message, call ``common/`` and build the reply; only weights and scalars leave, nothing per-sample.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.process import run_config
from client.site import resolve_site
from common import keys
from common.config import RunConfig
from common.errors import ConfigError
from common.device import deterministic_kernels, runtime
from common.learning.model import exchanged_keys, load_state_numpy, make_model, site_batchnorm_keys
from common.learning.train import train_local, train_loader, validation_metrics

__all__ = ["train", "evaluate", "SITE_BATCHNORM", "LEGACY_FIT_ARRAYS", "HANDLERS"]

LEGACY_FIT_ARRAYS = "fitins.parameters"  # the weights record of Flower's legacy FitIns (SecAgg+ rounds)
# context.state record (kept by the SuperNode per run and site between messages) holding the BatchNorm state the
# site keeps for itself (common.learning.model.site_batchnorm_keys): all of it under fedbn, the running statistics
# under DP and secure aggregation
SITE_BATCHNORM = "site-batchnorm"


def _incoming(msg: Message, model) -> tuple[dict, dict, bool]:
    """The server's weights (key -> array, in the order sent) and config of a message, and whether it is a
    SecAgg+ training message (Flower's legacy FitIns records: weights as an ordered list, no keys)."""
    if LEGACY_FIT_ARRAYS in msg.content.array_records:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        values = parameters_to_ndarrays(fitins.parameters)
        names = exchanged_keys(model, statistics=False)
        if len(values) != len(names):
            raise ValueError(f"secure aggregation: the server sent {len(values)} arrays, this site's model exchanges "
                             f"{len(names)}; run the same fedpd version and model-depth on server and sites")
        return dict(zip(names, values)), dict(fitins.config), True
    return msg.content[keys.ARRAYS].to_torch_state_dict(), dict(msg.content[keys.CONFIG]), False


def _setup(msg: Message, context: Context):
    """Shared by train and evaluate: config, site, device, model with the server's weights (and the BatchNorm
    state this site keeps, from its earlier messages of this run: all of it under fedbn, the running
    statistics under DP and secure aggregation)."""
    cfg = run_config(context)
    site = resolve_site(context.node_config, cfg)
    rt = runtime(cfg.amp)
    deterministic_kernels(rt.device)  # CPU: same seed, same weights (common/device.py)
    model = make_model(cfg)
    arrays, config, legacy = _incoming(msg, model)
    load_state_numpy(model, arrays, keys=exchanged_keys(model, cfg.statistics_shared))
    kept = site_batchnorm_keys(model, cfg.strategy, cfg.statistics_shared)
    if kept and SITE_BATCHNORM in context.state:
        # fedbn: the global model's BatchNorm (the sites' average) is replaced by this site's own; DP and secure
        # aggregation: the statistics, which never travel, are this site's from its last training round. Strict
        # on exactly those keys (load_state_numpy refuses a missing or extra key)
        load_state_numpy(model, context.state[SITE_BATCHNORM].to_torch_state_dict(), keys=kept)
    g = int(config.get(keys.GLOBAL_ROUND, config.get(keys.SERVER_ROUND, 1)))
    return cfg, site, rt, model, g, config, legacy


def _keep_batchnorm(model, context: Context, kept: list[str]) -> None:
    """Keep this site's BatchNorm state ``kept`` (site_batchnorm_keys) for its next message of this run."""
    state = model.state_dict()
    context.state[SITE_BATCHNORM] = ArrayRecord(OrderedDict((k, state[k]) for k in kept))


def _attacker(cfg: RunConfig, site, context: Context) -> bool:
    """Whether this site plays the simulated attacker (run-config ``attack``; refused outside a simulation)."""
    if cfg.attack == "none" or site.name != cfg.attack_site:
        return False
    if keys.NODE_PARTITION_ID not in context.node_config:
        raise ConfigError(f"run-config attack = {cfg.attack!r} is for simulations only; this is a deployed site "
                          f"({site.name}); set attack = 'none'")
    return True


def _attack(model, start: dict, cfg: RunConfig) -> None:
    """Replace the trained parameters by ``start +- attack-factor * (trained - start)``: finite, the right
    shapes, honest counts and statistics, so it passes screening, yet pulls the average away."""
    sign = -1.0 if cfg.attack == "sign-flip" else 1.0
    with torch.no_grad():
        for name, value in model.named_parameters():
            if value.is_floating_point():
                origin = start[name].to(value.device)
                value.copy_(origin + sign * cfg.attack_factor * (value - origin))


def _identity(site) -> dict:
    identity = {keys.SITE_NAME: site.name}
    qc = site.preprocessing_qc()
    if qc is not None:  # counts only: the reasons stay in the site's qc.csv
        identity |= {keys.QC_KEPT: qc["kept"], keys.QC_EXCLUDED: qc["excluded"]}
    return identity


def _reply(msg: Message, site, metrics: dict, arrays: ArrayRecord | None = None, dp: str = "none") -> Message:
    if dp != "none":
        metrics = metrics | {keys.UNIT_WEIGHT: 1}
    content = RecordDict({keys.METRICS: MetricRecord(metrics), keys.SITE: ConfigRecord(_identity(site))})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content, reply_to=msg)


def _secure_reply(msg: Message, site, metrics: dict, arrays: list) -> Message:
    """A SecAgg+ training reply (Flower's legacy FitRes): ``secaggplus_mod`` masks the weights, the metrics
    and the site's identity travel in the clear. Values outside the protocol's clipping range would be cut
    silently by the quantization; they are refused here instead."""
    for name, value in arrays:
        peak = float(np.abs(value).max()) if value.size else 0.0
        if not peak <= keys.SECAGG_CLIPPING_RANGE:
            raise ValueError(f"secure aggregation: {name} holds a value of magnitude {peak:.3g}, outside the SecAgg+ "
                             f"quantization range +-{keys.SECAGG_CLIPPING_RANGE}; lower lr, or run without "
                             "secure-aggregation")
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([v for _, v in arrays]),
                    num_examples=int(metrics[keys.NUM_EXAMPLES]), metrics=metrics | _identity(site))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def train(msg: Message, context: Context, startup: float) -> Message:
    """Fine-tune on this site's ``train`` rows for ``local-epochs``; reply weights + counts + loss.
    ``startup``: the seconds before this handler could start (``startup-seconds``, client/process.py)."""
    entered = time.monotonic()
    cfg, site, rt, model, g, config, legacy = _setup(msg, context)
    rows = site.rows("train")
    seed = cfg.seed + 1000 * site.index + g  # new augmentation/sampler draws every round, reproducible
    torch.manual_seed(seed)  # dropout draws, like the sampler and augmentation, follow (seed, site, round)
    attacker = _attacker(cfg, site, context)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if attacker else None
    loader, counts, weights = train_loader(rows, cfg, site.cache_dir, seed)
    setup = time.monotonic() - entered
    result = train_local(model, loader, epochs=cfg.local_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         rt=rt, class_weights=weights, num_examples=len(rows),
                         proximal_mu=float(config.get(keys.PROXIMAL_MU, 0.0)))
    metrics = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.loss,
        keys.TRAIN_SECONDS: result.seconds,
        keys.SAMPLES_PER_SECOND: result.samples_per_second,
        keys.class_count_key(0): int(counts.get(0, 0)),
        keys.class_count_key(1): int(counts.get(1, 0)),
        keys.STARTUP_SECONDS: startup,
        keys.SETUP_SECONDS: setup,
    }
    # the one console line per site and round (evaluation adds none; its numbers reach the server's log)
    log(INFO, "site %s, round %d: trained on %d scans (%d control, %d PD), loss %.4f, %.1f s", site.name, g,
        result.num_examples, metrics[keys.class_count_key(0)], metrics[keys.class_count_key(1)], result.loss,
        result.seconds)
    kept = site_batchnorm_keys(model, cfg.strategy, cfg.statistics_shared)
    if kept:
        _keep_batchnorm(model, context, kept)
    if attacker:
        _attack(model, start, cfg)
        log(WARNING, "site %s, round %d: SIMULATED ATTACK: sends %s x%g of its update", site.name, g, cfg.attack,
            cfg.attack_factor)
    state = model.state_dict()  # the exchanged keys, in the order the server sent them (the DP mods compare it)
    sent = exchanged_keys(model, cfg.statistics_shared)
    if legacy:
        return _secure_reply(msg, site, metrics, [(k, state[k].detach().cpu().numpy()) for k in sent])
    return _reply(msg, site, metrics, ArrayRecord(OrderedDict((k, state[k]) for k in sent)), dp=cfg.dp)


def evaluate(msg: Message, context: Context, startup: float) -> Message:
    """Aggregate metrics of the global model on this site's ``val`` rows (no per-sample output)."""
    entered = time.monotonic()
    cfg, site, rt, model, *_ = _setup(msg, context)
    rows = site.rows("val")
    setup = time.monotonic() - entered
    timings = {keys.STARTUP_SECONDS: startup, keys.SETUP_SECONDS: setup}
    if rows.empty:
        return _reply(msg, site, {keys.NUM_EXAMPLES: 0, **{keys.eval_key(m): float("nan") for m in keys.EVAL_METRICS},
                                  **timings, keys.EVAL_SECONDS: 0.0}, dp=cfg.dp)
    m = validation_metrics(model, rows, cfg, rt, site.cache_dir)  # a one-class val split: NaN figures
    return _reply(msg, site, {keys.NUM_EXAMPLES: int(m["n"]), **{keys.eval_key(k): float(m[k]) for k in keys.EVAL_METRICS},
                              **timings, keys.EVAL_SECONDS: time.monotonic() - entered - setup}, dp=cfg.dp)


HANDLERS = {"train": train, "evaluate": evaluate}  # by the name the worker protocol uses
