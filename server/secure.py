"""Secure aggregation: the training half of a round runs Flower's SecAgg+ protocol; the rest of the round
(site evaluation, the server's validation, the round record and checkpoint) is the same as every other run.

Flower 1.42 has SecAgg+ only in its legacy API (``SecAggPlusWorkflow`` with a ``LegacyContext``, legacy
``FitIns``/``FitRes`` records; ``secaggplus_mod`` at the sites, see client/app.py), so the training step of
each round is driven here with that workflow, under the same SuperLink and ``flwr run``.

What the server sees, and therefore screens, changes (README "Secure aggregation"):

- it never sees a site's weights, only their sample-weighted sum, unmasked once the round closes. The
  per-site array checks (keys, shapes, finite values) apply to that sum: a bad sum is discarded whole;
- each site's metrics (num-examples, class counts, loss, timings) and its name still travel in the clear
  and are screened as before (:func:`server.strategy.check_train_metrics`). A site whose metrics fail cannot
  be taken out of the sum, so the whole round's sum is discarded and the model stays as it was;
- dropouts: a site that fails or disconnects during the round is left out of the sum, its masks removed
  with the other sites' key shares (Flower's SecAgg+: each site shares with every other, half of the shares
  reconstruct), as long as at least half of the round's sites are left.

Every error reply of every SecAgg+ stage is recorded as that site's failure, with the site's own reason
(:class:`_WatchedGrid`): the workflow itself hands its failures on only when the round gets as far as the
sum, so a round that too many sites failed would otherwise read "no reply before round-timeout".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from logging import INFO, WARNING
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig
from server.strategy import RecordingStrategy, check_aggregate, check_train_metrics

__all__ = ["run_secure_rounds", "SHARES", "THRESHOLD"]

SHARES = 1.0  # every site shares its keys with every other site of the round
THRESHOLD = 0.5  # half of the shares reconstruct a key: up to half of the round's sites may drop out


class _WatchedGrid:
    """The Grid as SecAggPlusWorkflow uses it, with the replies of each stage recorded into the
    :class:`RecordingStrategy` for global round ``round``: their bytes (``received_bytes``) and every error
    reply as a failure of its site, named and with its reason."""

    def __init__(self, grid: Grid, recording: RecordingStrategy):
        self._grid, self._recording, self.round = grid, recording, 0

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        rec, g = self._recording, self.round
        rec.count_received(g, replies)
        # an error the SuperLink made for a node (e.g. unavailable) comes from the SuperLink: name the instruction's node
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        for msg in replies:
            if msg.has_error():
                rec.record_error(g, sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id), msg, "train")
        return replies


class _SecureRound(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow calls: samples like fedpd's FedAvg, records what the sites said
    in the clear into the :class:`RecordingStrategy`, and accepts the unmasked sum only when every site's
    metrics pass screening and the sum itself does."""

    def __init__(self, recording: RecordingStrategy, cfg: RunConfig, names: list[str], **kwargs):
        super().__init__(**kwargs)
        self.recording = recording
        self.cfg = cfg
        self.names = names

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.recording.sampled[server_round] = [proxy.node_id for proxy, _ in instructions]
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        g, rec = server_round, self.recording
        sites, rejected = {}, []
        for proxy, fitres in results:
            metrics = dict(fitres.metrics)
            site = str(metrics.pop(keys.SITE_NAME, f"node-{proxy.node_id}"))
            qc = {name: metrics.pop(k) for name, k in (("kept", keys.QC_KEPT), ("excluded", keys.QC_EXCLUDED)) if k in metrics}
            rec.node_sites[proxy.node_id] = site
            if len(qc) == 2:
                rec.site_qc.setdefault(g, {})[site] = qc
            reason = check_train_metrics(metrics, metric_keys=rec.train_metric_keys, max_num_examples=rec.max_num_examples)
            if reason is None and metrics[keys.NUM_EXAMPLES] != fitres.num_examples:
                reason = f"num-examples = {metrics[keys.NUM_EXAMPLES]} but the weight given to the protocol is {fitres.num_examples}"
            if reason:
                rejected.append({"site": site, "node": proxy.node_id, "round": g, "phase": "train", "reason": reason})
                log(WARNING, "round %d: rejected the train reply of site %s (node %d): %s", g, site, proxy.node_id, reason)
            else:
                sites[site] = metrics
        for f in failures:  # recorded with their sites by _WatchedGrid as they arrived
            log(WARNING, "round %d: a site dropped out of the secure round: %s", g, str(f).splitlines()[0][:200])
        if rejected:
            rec.rejected.setdefault(g, []).extend(rejected)
            rec.train_sites[g] = {}
            log(WARNING, "round %d: the secure sum includes a rejected site and cannot be split: discarded, the "
                "model stays as it was", g)
            return None, {}
        if not results:
            rec.train_sites[g] = {}
            return None, {}
        summed = parameters_to_ndarrays(results[0][1].parameters)  # the workflow put the unmasked sum in every result
        reason = check_aggregate(OrderedDict(zip(self.names, summed)), rec.reference.get(g))
        if reason:
            rec.rejected.setdefault(g, []).append({"site": "(secure sum)", "node": None, "round": g, "phase": "train",
                                                   "reason": reason})
            rec.train_sites[g] = {}
            log(WARNING, "round %d: the secure sum was discarded: %s", g, reason)
            return None, {}
        rec.train_sites[g] = dict(sorted(sites.items()))
        log(INFO, "round %d: securely aggregated %d site update(s)", g, len(sites))
        return results[0][1].parameters, {}


def run_secure_rounds(grid: Grid, context: Context, cfg: RunConfig, recording: RecordingStrategy,
                      initial: ArrayRecord, num_rounds: int,
                      evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> None:
    """``num_rounds`` rounds: SecAgg+ training, then the same site evaluation and server-side round closing
    (``evaluate_fn``) as :meth:`flwr.serverapp.strategy.Strategy.start`."""
    names = list(initial.keys())

    def fit_config(server_round: int) -> dict:
        config = {keys.GLOBAL_ROUND: server_round}
        if cfg.strategy == "fedprox":
            config[keys.PROXIMAL_MU] = cfg.proximal_mu
        return config

    legacy = _SecureRound(recording, cfg, names, fraction_fit=cfg.fraction_train, fraction_evaluate=0.0,
                          min_fit_clients=cfg.min_nodes, min_available_clients=cfg.min_nodes,
                          on_fit_config_fn=fit_config, accept_failures=True)
    lctx = LegacyContext(context, config=ServerConfig(num_rounds=num_rounds, round_timeout=cfg.round_timeout),
                         strategy=legacy)
    workflow = SecAggPlusWorkflow(num_shares=SHARES, reconstruction_threshold=THRESHOLD, timeout=cfg.round_timeout)
    thread, stop, registered = start_update_client_manager_thread(grid, lctx.client_manager)
    registered.wait()
    watched = _WatchedGrid(grid, recording)
    arrays = initial
    try:
        for r in range(1, num_rounds + 1):
            g = recording.global_round(r)
            log(INFO, "")
            log(INFO, "[ROUND %d/%d] secure aggregation (SecAgg+)", r, num_rounds)
            recording.round_started[g] = time.time()
            watched.round = g
            recording.reference[g] = {k: tuple(a.shape) for k, a in arrays.items()}
            lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: g})
            params = ndarrays_to_parameters([a.numpy() for a in arrays.values()])
            lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
            workflow(watched, lctx)
            recording.train_sites.setdefault(g, {})
            if recording.train_sites[g]:
                summed = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
                    lctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
                arrays = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in zip(names, summed)))
            replies = grid.send_and_receive(list(recording.configure_evaluate(r, arrays, ConfigRecord(), grid)),
                                            timeout=cfg.round_timeout)
            recording.aggregate_evaluate(r, replies)
            evaluate_fn(r, arrays)
    finally:
        stop.set()
        thread.join()
