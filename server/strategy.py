"""FedAvg that also records, per round, which sites were asked, which answered and what they reported.

Aggregation itself is Flower's FedAvg (weighted by ``num-examples``); this subclass only keeps the
per-site scalars that the run log and the report need, and numbers rounds globally across resumes.
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys

__all__ = ["RecordingFedAvg", "nan_aware_mean"]


def _site_of(msg: Message) -> str:
    content = msg.content
    if keys.SITE in content.config_records:
        return str(content.config_records[keys.SITE].get(keys.SITE_NAME, f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def nan_aware_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Sample-weighted mean of each metric over the sites where it is defined.

    A site whose validation rows hold one class only has no AUC (NaN); FedAvg's default average would
    turn the federation's value into NaN. Here such a site is left out of that metric's average.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weighting_key])
        for key, value in metrics.items():
            if key == weighting_key or not isinstance(value, (int, float)) or not math.isfinite(value) or w <= 0:
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sums}
    out[weighting_key] = sum(float(next(iter(r.metric_records.values()))[weighting_key]) for r in records)
    return MetricRecord(out)


class RecordingFedAvg(FedAvg):
    """FedAvg plus bookkeeping. ``round_offset`` turns Flower's 1..R into global rounds after a resume."""

    def __init__(self, *, round_offset: int = 0, **kwargs):
        kwargs.setdefault("evaluate_metrics_aggr_fn", nan_aware_mean)
        super().__init__(**kwargs)
        self.round_offset = round_offset
        self.round_started: dict[int, float] = {}
        self.sampled: dict[int, list[int]] = {}
        self.train_sites: dict[int, dict[str, dict]] = {}
        self.eval_sites: dict[int, dict[str, dict]] = {}
        self.failed: dict[int, list[dict]] = {}
        self.node_sites: dict[int, str] = {}

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        g = self.global_round(server_round)
        self.round_started[g] = time.time()
        config["global-round"] = g
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[g] = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["global-round"] = self.global_round(server_round)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _collect(self, server_round: int, replies: list[Message], into: dict[int, dict[str, dict]]) -> None:
        g = self.global_round(server_round)
        sites, failed = {}, []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append({"node": node, "site": self.node_sites.get(node, f"node-{node}"), "reason": msg.error.reason})
                log(WARNING, "round %d: site %s failed: %s", g, self.node_sites.get(node, node), msg.error.reason)
                continue
            site = _site_of(msg)
            self.node_sites[node] = site
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            sites[site] = {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}
        into[g] = sites
        self.failed.setdefault(g, []).extend(failed)

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        self._collect(server_round, replies, self.train_sites)
        log(INFO, "round %d: %d site update(s) received", self.global_round(server_round), len(self.train_sites[self.global_round(server_round)]))
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies):
        replies = list(replies)
        self._collect(server_round, replies, self.eval_sites)
        return super().aggregate_evaluate(server_round, replies)

    def missing_sites(self, g: int) -> list[str]:
        """Sites sampled in global round ``g`` that sent no usable training update."""
        answered = set(self.train_sites.get(g, {}))
        names = [self.node_sites.get(n, f"node-{n}") for n in self.sampled.get(g, [])]
        return sorted(n for n in names if n not in answered)
