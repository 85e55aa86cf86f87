"""ServerApp: FedAvg over the sites, server-side validation every round, checkpoints, resume, report.

The handler converts Flower objects to plain calls; the loops and the report are in ``common/``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common import keys
from common.config import RunConfig
from common.device import runtime
from common.errors import RunFailedError
from common.learning.model import exchanged_keys, load_state_numpy, statistics_keys
from common.learning.train import recalibrate_batchnorm
from common.report.render import render_report
from common.runs.finalize import finalize_run
from common.runs.records import RoundRecord
from common.runs.rounds import close_round
from server.grid import PollingGrid
from server.secure import run_secure_rounds
from server.setup import ServerSetup, prepare
from server.strategies import (arm_name, build_strategy, noise_to_update, privacy_spent, restore_strategy_state,
                               strategy_state)
from server.strategy import RecordingStrategy

app = ServerApp()


def _round_record(setup: ServerSetup, strategy: RecordingStrategy, g: int, arrays: ArrayRecord) -> MetricRecord:
    """Global round ``g``'s server side (common.runs.rounds.close_round, as for every baseline arm): validate the
    aggregate on the server's val rows, record the round with what the strategy saw of the sites, checkpoint.

    Under DP and secure aggregation the sites keep their BatchNorm statistics, so the aggregate comes without
    any: the server re-estimates them on its validation images first (labels unread; test scans never), and
    they go into the checkpoint with the weights."""
    model = setup.model
    load_state_numpy(model, arrays.to_torch_state_dict(), keys=exchanged_keys(model, setup.cfg.statistics_shared))
    if not setup.cfg.statistics_shared:
        used = recalibrate_batchnorm(model, setup.val_rows, setup.cfg, setup.rt, setup.cache_dir)
        if g == setup.start_round + 1:
            log(INFO, "round %d: under %s the sites keep their BatchNorm statistics; the server re-estimates its own "
                "on its %d validation scans every round", g, "secure aggregation" if setup.cfg.secure_aggregation else "DP",
                used)
    privacy = privacy_spent(strategy, _noised_parameters(setup.model, setup.cfg))
    record = close_round(
        setup.run, model, g, cfg=setup.cfg, rt=setup.rt, val_rows=setup.val_rows, cache_dir=setup.cache_dir,
        started=strategy.round_started.get(g, time.time()), strategy=setup.cfg.strategy,
        sites=strategy.train_sites.get(g, {}), site_eval=strategy.eval_sites.get(g, {}),
        missing_sites=strategy.missing_sites(g),
        # a site that fails before it ever answered is known by node id only; name it once a later reply did
        failures=[f | {"site": strategy.node_sites.get(f.get("node"), f["site"])} for f in strategy.failed.get(g, [])],
        rejected=strategy.rejected.get(g, []), site_qc=strategy.site_qc.get(g), privacy=privacy,
        strategy_state=strategy_state(strategy), received_bytes=strategy.received.get(g), preparation=setup.preparation)
    metrics = record.val
    log(INFO, "round %d: val AUC %.3f, val loss %.4f, checkpoint %s", g, metrics["auc"], metrics["loss"],
        setup.run.checkpoint_path(g))
    if privacy is not None:
        log(INFO, "round %d: privacy spent epsilon %.3f at delta %g (%d release(s), noise multiplier %.3g, clipping "
            "norm %.3g)", g, privacy["epsilon"], privacy["delta"], privacy["releases"], privacy["noise_multiplier"],
            privacy["clipping_norm"])
    return MetricRecord({keys.VAL_AUC: float(metrics["auc"]), keys.VAL_LOSS: float(metrics["loss"])})


def _noised_parameters(model, cfg: RunConfig) -> int:
    """How many numbers a site sends (and DP noises): the exchanged state's, without BatchNorm statistics under
    DP and secure aggregation."""
    state = model.state_dict()
    return int(sum(state[k].numel() for k in exchanged_keys(model, cfg.statistics_shared)))


def _warn_dp_noise(strategy, model, cfg: RunConfig) -> None:
    """Say before round 1 how loud this DP setting's noise is (:func:`server.strategies.noise_to_update`), per
    number against the model's own weights too: what decides whether the model can still learn."""
    parameters = _noised_parameters(model, cfg)
    ratio = noise_to_update(strategy, parameters)
    if ratio is None:
        return
    dp, state = strategy.inner, model.state_dict()
    std = float(dp.noise_multiplier) * float(dp.clipping_norm) / int(dp.num_sampled_clients)
    squares = sum(float(state[k].double().pow(2).sum()) for k in exchanged_keys(model, cfg.statistics_shared))
    rms = math.sqrt(squares / parameters)
    text = (f"dp: every round adds Gaussian noise of std {std:.3g} to each of the {parameters:,} numbers a site sends "
            f"(noise multiplier x clipping norm / sites = {dp.noise_multiplier:.3g} x {dp.clipping_norm:.3g} / "
            f"{dp.num_sampled_clients}; the model's weights: RMS {rms:.3g}), an expected norm {ratio:.3g}x the largest "
            "averaged update the sites can send")
    if ratio > 1:
        log(WARNING, "%s: the noise is louder than any round's update, so the model learns only if the updates add "
            "up over the rounds faster than the noise does, which needs the noise per number well below the weights "
            "(EXPERIMENTS.md \"What DP costs\": on the phantom at 3 sites a noise std of 0.08 times the weights' RMS "
            "learned at 3 of 3 seeds, 0.77 times at 1 of 3, 7.7 times at none). The noise falls only with more "
            "sites per round or a smaller noise-multiplier (which spends more epsilon); README \"Differential "
            "privacy\" says what site-level DP needs", text)
    else:
        log(INFO, "%s", text)


def _site_counts(records: list[RoundRecord]) -> dict[str, dict]:
    """Per site, the training class counts and num-examples it last reported (counts only, never rows)."""
    counts: dict[str, dict] = {}
    for rec in records:
        for site, m in rec.sites.items():
            counts[site] = {"control": int(m.get(keys.class_count_key(0), 0)), "pd": int(m.get(keys.class_count_key(1), 0)),
                            "num_examples": int(m.get(keys.NUM_EXAMPLES, 0)), "round": rec.round}
    return counts


def _preprocessing_qc(records: list[RoundRecord]) -> dict:
    """``{"preprocessing_qc": {site: {"kept": n, "excluded": m}}}`` as the sites last reported it (counts
    only; each site's qc.csv keeps the reasons), or ``{}`` when no site's scans came from fedpd preprocess."""
    qc: dict[str, dict] = {}
    for rec in records:
        qc.update(rec.site_qc)
    return {"preprocessing_qc": dict(sorted(qc.items()))} if qc else {}


def _participation(records: list[RoundRecord]) -> dict[str, dict]:
    """Per round: sites aggregated, sites asked that sent no usable update (timed out, failed or rejected),
    sites seen in this run but not asked (disconnected, or not drawn), and the rejections with reasons."""
    seen = set()
    for rec in records:
        seen |= set(rec.sites) | set(rec.missing_sites)
    out = {}
    for rec in records:
        trained, missing = sorted(rec.sites), sorted(rec.missing_sites)
        out[str(rec.round)] = {
            "trained": trained, "missing": missing, "not_sampled": sorted(seen - set(trained) - set(missing)),
            "rejected": [{"site": r["site"], "phase": r["phase"], "reason": r["reason"]} for r in rec.rejected],
            "failed": [{"site": f["site"], "phase": f.get("phase"), "reason": f["reason"]} for f in rec.failures],
        }
    return out


def _privacy(records: list[RoundRecord]) -> dict:
    """``{"privacy": ...}`` for a DP run's report: what the last round spent (every released round counts,
    whichever round's model is selected), or ``{}``."""
    spent = [rec.privacy for rec in records if rec.privacy]
    return {"privacy": dict(spent[-1]) | {"rounds": len(records)}} if spent else {}


FAILURE_FILE = "failure.json"


def _reason_text(reason) -> str:
    """The site's own words from a Flower error reason ("Exception ClientAppException occurred. Message: ...")."""
    text = str(reason or "?").strip()
    if "Message: " in text:
        text = text.split("Message: ", 1)[1]
    return text.rstrip("'>").strip().splitlines()[-1] if text.strip() else "?"


def _require_training(setup: ServerSetup, records: list[RoundRecord]) -> None:
    """Stop before any test metric when no round aggregated a site update: the model is the untrained one.

    Writes ``failure.json`` (per round: the sites asked and why each sent nothing usable) beside the
    checkpoints, so ``fedpd simulate`` can show the sites' reasons, and raises :class:`RunFailedError`.
    """
    if any(rec.sites for rec in records):
        if any(isinstance(rec.val.get("loss"), (int, float)) and math.isfinite(rec.val["loss"]) for rec in records):
            return
        message = (f"every one of the {len(records)} round(s) gave a model whose validation outputs are not finite "
                   "(its weights diverged, or were poisoned by an update that passed screening): no model to test. "
                   "See the sites' training losses in rounds.jsonl; lower lr, or use a robust strategy "
                   "(fedmedian, fedtrimmedavg, krum) if a site may be faulty, and start a new run.")
        setup.run.write_json(FAILURE_FILE, {"error": "no usable round", "rounds": len(records), "reasons": [],
                                            "message": message})
        log(ERROR, "fedpd: %s", message)
        raise RunFailedError(message)
    reasons = []
    for rec in records:
        for f in rec.failures:
            reasons.append({"round": rec.round, "site": f.get("site"), "phase": f.get("phase", "train"), "reason": f.get("reason")})
        for r in rec.rejected:
            reasons.append({"round": rec.round, "site": r.get("site"), "phase": r.get("phase"), "reason": "rejected: " + str(r.get("reason"))})
        for site in rec.missing_sites:
            if not any(x["site"] == site and x["round"] == rec.round for x in reasons):
                reasons.append({"round": rec.round, "site": site, "phase": "train", "reason": "no reply before round-timeout"})
    lines = [f"  round {x['round']}, site {x['site']} ({x['phase']}): {_reason_text(x['reason'])}" for x in reasons[:30]]
    message = (f"no site update was aggregated in any of the {len(records)} round(s): the global model is the untrained "
               "initial model, so no test metric is reported. The sites' reasons:\n" + ("\n".join(lines) or "  (none recorded)")
               + "\nFix the cause (e.g. a lower lr when the loss went NaN) and start a new run.")
    setup.run.write_json(FAILURE_FILE, {"error": "no site update aggregated", "rounds": len(records), "reasons": reasons,
                                        "message": message})
    log(ERROR, "fedpd: %s", message)
    raise RunFailedError(message)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds that are left, then select, test once and write the report."""
    cfg = RunConfig.from_mapping(context.run_config, defaults={})  # Flower merged the defaults
    grid = PollingGrid(grid, cfg.poll_interval)
    setup = prepare(cfg, runtime(cfg.amp))
    remaining = cfg.num_server_rounds - setup.start_round
    log(INFO, "fedpd server: %d round(s) to run (from round %d), device %s, out %s",
        remaining, setup.start_round + 1, setup.rt.describe(), setup.run.root)
    if remaining > 0:
        strategy = build_strategy(cfg, round_offset=setup.start_round, statistics_keys=statistics_keys(setup.model))
        restore_strategy_state(strategy, setup.strategy_state)
        _warn_dp_noise(strategy, setup.model, cfg)

        def evaluate_fn(server_round: int, arrays: ArrayRecord):
            if server_round == 0:
                return None  # the initial model is not a candidate; skip a validation pass
            return _round_record(setup, strategy, strategy.global_round(server_round), arrays)

        state = setup.model.state_dict()
        initial = ArrayRecord(OrderedDict((k, state[k]) for k in exchanged_keys(setup.model, cfg.statistics_shared)))
        try:
            if cfg.secure_aggregation:
                run_secure_rounds(grid, context, cfg, strategy, initial, remaining, evaluate_fn)
            else:
                strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=cfg.round_timeout,
                               train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
        except PrivacyBudgetExhausted as exc:  # raised before a round is sent: every finished round is kept
            log(WARNING, "fedpd: training stopped before round %d: %s (dp-max-epsilon = %g); the report covers the "
                "rounds so far", len(setup.run.read_rounds()) + 1, exc, cfg.dp_max_epsilon)
    records = setup.run.read_rounds()
    _require_training(setup, records)
    report = finalize_run(setup.run, cfg, setup.rt, setup.val_rows, setup.test_rows, setup.cache_dir,
                          extra={"data": setup.data_info | {"site_train_counts": _site_counts(records)}
                                 | _preprocessing_qc(records),
                                 "participation": _participation(records),
                                 **({"holdout_site": setup.data_info["holdout_site"]} if "holdout_site" in setup.data_info else {}),
                                 **_privacy(records)},
                          arm=arm_name(cfg), render=render_report, preparation=setup.preparation)
    auc = report.test["auc"]
    ci = auc.get("ci95") or (float("nan"), float("nan"))
    log(INFO, "fedpd report: %s | test AUC %.3f (95%% CI %.3f-%.3f)", setup.run.report_file, auc["value"], *ci)
