"""Screening and bookkeeping around Flower's strategies: every site reply is screened before it is
aggregated, and, per round, who took part is recorded.

Aggregation itself is Flower's (FedAvg weighted by ``num-examples``, or the run's strategy, see
``server/strategies.py``). :class:`RecordingStrategy` adds:

- bookkeeping: per-site scalars, which sites were asked and which answered, failures, and global round
  numbers across resumes (``round_offset``);
- screening: a reply that could corrupt the global model or crash the aggregation is *rejected* (logged
  with site and round, kept in ``rejected``) and the others are aggregated. See :func:`check_train_reply`
  for the rules and why they are what they are;
- a fixed order: replies are sorted by site name, then node id, before anything is summed, so the global
  model is bitwise the same whatever order Ray or the SuperLink delivered them in (a float sum depends on
  its order);
- meaningful aggregated metrics: counts are summed, never averaged (:func:`train_metrics_summary`,
  :func:`nan_aware_mean`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common import keys
from common.transport import content_bytes, decode_update, to_wire

__all__ = ["RecordingStrategy", "RecordingFedAvg", "check_train_metrics", "check_aggregate", "nan_aware_mean", "train_metrics_summary", "check_train_reply", "check_evaluate_reply",
           "MAX_NUM_EXAMPLES", "EVALUATE_METRIC_KEYS"]

# Largest number of training samples one site may claim. A site's FedAvg weight is its num-examples, so
# an inflated count lets one site outweigh all others. 100,000 scans is well above any single centre
# (all of PPMI holds a few thousand T1 scans) and still stops absurd weights such as 10^12.
MAX_NUM_EXAMPLES = 100_000

EVALUATE_METRIC_KEYS = (keys.NUM_EXAMPLES, *(keys.eval_key(m) for m in keys.EVAL_METRICS), keys.STARTUP_SECONDS,
                        keys.SETUP_SECONDS, keys.EVAL_SECONDS)
_EVAL_COUNT = keys.eval_key("n")  # a site's number of val scans: summed over sites, not averaged


def _site_of(msg: Message, node: int) -> str:
    content = msg.content
    if keys.SITE in content.config_records:
        return str(content.config_records[keys.SITE].get(keys.SITE_NAME, f"node-{node}"))
    return f"node-{node}"


def _site_qc(msg: Message) -> dict[str, int] | None:
    """The preprocessing QC counts in a reply's site record (``None`` if absent or not two counts >= 0)."""
    record = msg.content.config_records.get(keys.SITE)
    if record is None:
        return None
    values = [record.get(k) for k in (keys.QC_KEPT, keys.QC_EXCLUDED)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    return {"kept": values[0], "excluded": values[1]}


def _reason_line(reason) -> str:
    """One line of a site's error reason for the log: the site's own words after Flower's "Message: ", else
    the last non-empty line (a reason may hold a whole remote traceback; ``failed`` keeps all of it)."""
    text = str(reason or "")
    if "Message: " in text:
        words = text.rsplit("Message: ", 1)[1].strip().splitlines()
        return (words[0].rstrip("'>").strip() if words else "") or "?"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "?"


def _short(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    return repr(names[:limit])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > limit else "]")


def _check_records(content: RecordDict, arrays: bool) -> str | None:
    """The reply holds exactly our records: ``arrays`` (train only), ``metrics`` and optionally ``site``."""
    want_arrays = {keys.ARRAYS} if arrays else set()
    if (set(content.array_records) == want_arrays and set(content.metric_records) == {keys.METRICS}
            and set(content.config_records) <= {keys.SITE}):
        return None
    found = {name: type(record).__name__ for name, record in content.items()}
    return (f"records {found}: expected " + ("ArrayRecord 'arrays', " if arrays else "")
            + "MetricRecord 'metrics' and optionally ConfigRecord 'site'")


def _check_metric_keys(metrics: MetricRecord, expected: Iterable[str]) -> str | None:
    expected = set(expected)
    if set(metrics) == expected:
        return None
    missing, extra = expected - set(metrics), set(metrics) - expected
    return "metric keys: " + ", ".join(part for part in (
        f"missing {_short(missing)}" if missing else "", f"unexpected {_short(extra)}" if extra else "") if part)


def _check_count(name: str, value, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} = {value!r} is not an integer"
    if value < low:
        return f"{name} = {value} is below {low}"
    if value > high:
        return f"{name} = {value} exceeds the bound {high} (max_num_examples)"
    return None


def _check_structure(content: RecordDict, metric_keys, *, arrays: bool, finite: bool) -> str | None:
    """Records, metric keys and single-number metric values (finite ones when ``finite``) of a reply."""
    reason = _check_records(content, arrays=arrays) or _check_metric_keys(content.metric_records[keys.METRICS], metric_keys)
    if reason:
        return reason
    for name, value in content.metric_records[keys.METRICS].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name!r} = {value!r} is not a single number"
        if finite and not math.isfinite(value):
            return f"metric {name!r} = {value} is not finite"
    return None


def check_train_reply(content: RecordDict, reference: dict[str, tuple[int, ...]] | None, *,
                      metric_keys: Iterable[str] = keys.TRAIN_METRIC_KEYS,
                      max_num_examples: int = MAX_NUM_EXAMPLES) -> str | None:
    """Why a site's training reply must not be aggregated, or ``None`` when it may be.

    Rules, in the order they are checked (the first failure is the reason):

    1. Records: exactly the ArrayRecord ``arrays``, the MetricRecord ``metrics`` and at most the
       ConfigRecord ``site``. Flower's FedAvg raises ``InconsistentMessageReplies`` on extra or missing
       records, which would stop the whole run because of one site.
    2. Metric keys: exactly ``metric_keys`` (the ClientApp's ``keys.TRAIN_METRIC_KEYS``), each a finite
       number (a NaN loss is averaged into the round's loss, and signals diverged training).
    3. ``num-examples``, the FedAvg weight, is plausible: an integer (it counts samples), at least 1 (a
       zero weight contributes nothing and a negative one flips the update), at most
       ``max_num_examples`` (see :data:`MAX_NUM_EXAMPLES`), and equal to the sum of the site's own
       ``class-count-*`` metrics, which count the same training rows. This bounds the weight by what the
       site itself reports about its data, so a site cannot claim more samples than it has labels for
       without also lying in its class counts, which the report shows per site. Class counts are
       integers >= 0.
    4. Arrays: the same keys as the global model's ArrayRecord (``reference``, key -> shape); each
       decodes as a numeric NumPy array of the reference shape (the decoded shape, not only the
       declared one); every floating value is finite (no NaN/Inf); BatchNorm variances (``*running_var``) are
       >= 0 (a negative one turns every output into NaN). Integer arrays (BatchNorm's
       ``num_batches_tracked``) may come back as int or float, as Flower averages them to float.

    Args:
        content: the reply's RecordDict.
        reference: key -> shape of the global ArrayRecord sent this round; ``None`` skips the key and shape
            comparison (the strategy was driven without ``configure_train``), the other checks still run.
        metric_keys: the exact metric keys a train reply carries.
        max_num_examples: upper bound of ``num-examples``.
    """
    reason = _check_structure(content, metric_keys, arrays=True, finite=True)
    if reason:
        return reason
    return (_check_train_counts(content.metric_records[keys.METRICS], max_num_examples)
            or _check_arrays(content.array_records[keys.ARRAYS], reference))


def _check_train_counts(metrics, max_num_examples: int) -> str | None:
    """Rule 3 of :func:`check_train_reply`: num-examples and the class counts."""
    n = metrics[keys.NUM_EXAMPLES]
    reason = _check_count(keys.NUM_EXAMPLES, n, 1, max_num_examples)
    if reason:
        return reason
    counts = {k: v for k, v in metrics.items() if k.startswith(keys.CLASS_COUNT_PREFIX)}
    for name, value in counts.items():
        reason = _check_count(name, value, 0, max_num_examples)
        if reason:
            return reason
    if counts and sum(counts.values()) != n:
        return f"num-examples = {n} but the site's class counts sum to {sum(counts.values())} ({dict(sorted(counts.items()))})"
    return None


def check_train_metrics(metrics: dict, *, metric_keys: Iterable[str] = keys.TRAIN_METRIC_KEYS,
                        max_num_examples: int = MAX_NUM_EXAMPLES) -> str | None:
    """Rules 2 and 3 of :func:`check_train_reply` on a site's train metrics alone: what a secure-aggregation
    round can still screen per site (its weights are masked; see server/secure.py)."""
    reason = _check_metric_keys(MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float))}), metric_keys)
    if reason:
        return reason
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name!r} = {value!r} is not a single number"
        if not math.isfinite(value):
            return f"metric {name!r} = {value} is not finite"
    return _check_train_counts(metrics, max_num_examples)


def check_aggregate(arrays: dict[str, np.ndarray], reference: dict[str, tuple[int, ...]] | None) -> str | None:
    """Rule 4 of :func:`check_train_reply` on plain arrays (a secure-aggregation sum): keys, shapes, finite values."""
    return _check_arrays(ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in arrays.items())), reference)


def _check_arrays(arrays: ArrayRecord, reference: dict[str, tuple[int, ...]] | None) -> str | None:
    if reference is not None and set(arrays) != set(reference):
        missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
        return "array keys differ from the global model: " + ", ".join(part for part in (
            f"missing {_short(missing)}" if missing else "", f"unexpected {_short(extra)}" if extra else "") if part)
    for name, array in arrays.items():
        try:
            value = array.numpy()
        except (TypeError, ValueError, OSError, EOFError) as err:
            return f"array {name!r} cannot be decoded ({err})"
        expected = reference[name] if reference is not None else tuple(array.shape)
        if tuple(value.shape) != tuple(expected) or tuple(array.shape) != tuple(expected):
            return f"array {name!r} has shape {tuple(value.shape)} (declared {tuple(array.shape)}), the global model's is {tuple(expected)}"
        if value.dtype.kind not in "biuf":
            return f"array {name!r} has non-numeric dtype {value.dtype}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            return f"array {name!r} holds {bad} non-finite value(s) (NaN/Inf) out of {value.size}"
        if name.endswith("running_var") and (value < 0).any():
            return f"array {name!r} (a BatchNorm variance) holds {int((value < 0).sum())} negative value(s)"
    return None


def check_evaluate_reply(content: RecordDict, *, metric_keys: Iterable[str] = EVALUATE_METRIC_KEYS,
                         max_num_examples: int = MAX_NUM_EXAMPLES) -> str | None:
    """Why a site's evaluation reply must not be averaged, or ``None``.

    The structure rules of :func:`check_train_reply` (no arrays here), and ``num-examples`` an integer in
    ``[0, max_num_examples]`` (0 = the site has no validation rows). Metric values may be NaN: a
    one-class validation split has undefined metrics, which :func:`nan_aware_mean` leaves out.
    """
    reason = _check_structure(content, metric_keys, arrays=False, finite=False)
    if reason:
        return reason
    return _check_count(keys.NUM_EXAMPLES, content.metric_records[keys.METRICS][keys.NUM_EXAMPLES], 0, max_num_examples)


def _metrics_of(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def nan_aware_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Sample-weighted mean of each metric over the sites where it is defined; counts summed.

    A site whose validation rows hold one class only has no AUC (NaN); FedAvg's default average would
    turn the federation's value into NaN. Here such a site is left out of that metric's average. The
    weighting key and ``val-n`` are counts of scans: they are summed (a mean of counts means nothing).
    The sites' timings stay per site (``rounds.jsonl``), out of the round's figures.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    counts: dict[str, float] = {}
    for record in records:
        metrics = _metrics_of(record)
        w = float(metrics[weighting_key])
        for key, value in metrics.items():
            if (key == weighting_key or key in keys.TIMING_KEYS or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue
            if key == _EVAL_COUNT:
                counts[key] = counts.get(key, 0.0) + float(value)
            elif w > 0:
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sums} | counts
    out[weighting_key] = sum(float(_metrics_of(r)[weighting_key]) for r in records)
    return MetricRecord(out)


def train_metrics_summary(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The round's training metrics over the accepted sites: the sample-weighted mean ``train-loss`` and
    the summed ``class-count-*`` (scans per class in the federation's training rows).

    Flower's default would average every key weighted by ``num-examples``, which turns class counts into
    meaningless fractional numbers ("class-count-0: 1.61") and mixes per-site timings; the per-site
    values, timings included, are in ``rounds.jsonl``. The weighting key itself is left out, as Flower
    does (it equals the sum of the class counts).
    """
    total = sum(float(_metrics_of(r)[weighting_key]) for r in records)
    out: dict[str, float | int] = {}
    if total > 0:
        out[keys.TRAIN_LOSS] = sum(float(_metrics_of(r)[weighting_key]) * float(_metrics_of(r)[keys.TRAIN_LOSS])
                                   for r in records) / total
    for record in records:
        for key, value in _metrics_of(record).items():
            if key.startswith(keys.CLASS_COUNT_PREFIX):
                out[key] = int(out.get(key, 0)) + int(value)
    return MetricRecord(out)


class RecordingStrategy(Strategy):
    """Screening and bookkeeping around any Flower strategy (``inner``: FedAvg, FedProx, FedAdam, FedMedian,
    Krum, ... or one of Flower's DP wrappers around one of them).

    Every call reaches ``inner`` with the *global* round number (``round_offset`` + Flower's 1..R), so a
    server optimizer's bias correction and the privacy ledger continue across a resume. Replies are sorted
    and screened (:func:`check_train_reply`) before ``inner`` sees them, so a DP wrapper clips and noises
    only updates that passed. ``max_num_examples`` bounds a site's claimed sample count;
    ``extra_train_metrics``/``extra_evaluate_metrics`` are metric keys that every reply of a DP run carries
    (``unit-weight``; Flower's adaptive-clipping mod adds ``norm_bit``). ``transport_dtype`` float16
    (common/transport.py): the weights go out in float16, and each training reply's float16 update is added
    to this round's float32 weights before screening, so ``inner`` and the checks see whole float32 weights.
    Other attributes are read from ``inner``.
    """

    def __init__(self, inner: Strategy, *, round_offset: int = 0, max_num_examples: int = MAX_NUM_EXAMPLES,
                 extra_train_metrics: Iterable[str] = (), extra_evaluate_metrics: Iterable[str] = (),
                 transport_dtype: str = "float32"):
        super().__init__()
        self.inner = inner
        self.transport_dtype = transport_dtype
        self._sent: dict[str, np.ndarray] = {}  # float16 transport: this round's float32 weights, by key
        self.round_offset = round_offset
        self.max_num_examples = max_num_examples
        self.train_metric_keys = (*keys.TRAIN_METRIC_KEYS, *extra_train_metrics)
        self.evaluate_metric_keys = (*EVALUATE_METRIC_KEYS, *extra_evaluate_metrics)
        self.round_started: dict[int, float] = {}
        self.sampled: dict[int, list[int]] = {}
        self.train_sites: dict[int, dict[str, dict]] = {}
        self.eval_sites: dict[int, dict[str, dict]] = {}
        self.failed: dict[int, list[dict]] = {}
        self.rejected: dict[int, list[dict]] = {}
        self.site_qc: dict[int, dict[str, dict[str, int]]] = {}  # global round -> site -> preprocessing QC counts
        self.node_sites: dict[int, str] = {}
        self.received: dict[int, int] = {}  # global round -> bytes of the site replies received (content_bytes)
        self.reference: dict[int, dict[str, tuple[int, ...]]] = {}  # global round -> key -> shape sent
        self._outbox: list[Message] = []  # this phase's instructions; Flower sets their message ids when pushing

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (during __init__ or unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        log(INFO, "\t├── fedpd screening of every reply, then %s", type(self.inner).__name__)
        self.inner.summary()

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        g = self.global_round(server_round)
        self.round_started[g] = time.time()
        self.reference[g] = {name: tuple(array.shape) for name, array in arrays.items()}
        config[keys.GLOBAL_ROUND] = g
        self._outbox = self._to_wire(list(self.inner.configure_train(g, arrays, config, grid)), remember=True)
        self.sampled[g] = [m.metadata.dst_node_id for m in self._outbox]
        return self._outbox

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[keys.GLOBAL_ROUND] = self.global_round(server_round)
        self._outbox = self._to_wire(list(self.inner.configure_evaluate(self.global_round(server_round), arrays,
                                                                        config, grid)))
        return self._outbox

    def _to_wire(self, messages: list[Message], remember: bool = False) -> list[Message]:
        """float16 transport: the instructions' weights rounded to float16 (the ArrayRecord ``inner`` made,
        converted once and shared); with ``remember``, this round's float32 weights are kept to rebuild the
        sites' weights from their updates."""
        if self.transport_dtype == "float32":
            return messages
        # id of a record ``inner`` made -> its float16 copy; both stay referenced here, so no id is reused
        wire: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}
        for msg in messages:
            if keys.ARRAYS not in msg.content.array_records:
                continue
            record = msg.content[keys.ARRAYS]
            if id(record) not in wire:  # FedAvg shares one record (even one RecordDict) among its messages
                weights = {k: v.numpy() for k, v in record.items()}
                if remember:
                    self._sent = weights
                rounded = ArrayRecord(OrderedDict((k, Array(v)) for k, v in to_wire(weights).items()))
                wire[id(record)] = wire[id(rounded)] = (record, rounded)  # a shared RecordDict's second message
            msg.content[keys.ARRAYS] = wire[id(record)][1]                # already holds the float16 copy
        return messages

    def _from_wire(self, msg: Message) -> str | None:
        """float16 transport: replace a training reply's float16 update by the site's float32 weights (this
        round's weights + update); the reason when it is not such an update."""
        if self.transport_dtype == "float32" or keys.ARRAYS not in msg.content.array_records:
            return None
        try:
            update = {k: v.numpy() for k, v in msg.content[keys.ARRAYS].items()}
        except (TypeError, ValueError, OSError, EOFError) as err:
            return f"the arrays cannot be decoded ({err})"
        weights = decode_update(update, self._sent)
        if isinstance(weights, str):
            return weights
        msg.content[keys.ARRAYS] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in weights.items()))
        return None

    def _node_of(self, reply: Message) -> int:
        """The node a reply is about. Errors made by the SuperLink itself (e.g. "node unavailable" after
        missed heartbeats) come from the SuperLink's node id; their ``reply_to_message_id`` names the
        instruction, whose destination is the node."""
        for ins in self._outbox:
            if ins.metadata.message_id and ins.metadata.message_id == reply.metadata.reply_to_message_id:
                return ins.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        """The replies sorted by site name, then node id: FedAvg's float sums then do not depend on the
        order in which Ray or the SuperLink delivered them. An error reply sorts by the name its node had
        before (or ``node-<id>``)."""
        def key(msg: Message) -> tuple[str, int]:
            node = self._node_of(msg)
            if msg.has_error():
                return self.node_sites.get(node, f"node-{node}"), node
            return _site_of(msg, node), node
        return sorted(replies, key=key)

    def record_error(self, g: int, node: int, msg: Message, phase: str) -> None:
        """An error reply about ``node``: a failure of its site in global round ``g`` (named once any reply named
        it), logged with the site's own words."""
        self.failed.setdefault(g, []).append({"node": node, "site": self.node_sites.get(node, f"node-{node}"),
                                              "phase": phase, "reason": msg.error.reason})
        log(WARNING, "round %d: site %s failed in %s: %s", g, self.node_sites.get(node, node), phase,
            _reason_line(msg.error.reason))

    def count_received(self, g: int, replies: Iterable[Message]) -> None:
        """Add the content bytes of ``replies`` (error replies carry none) to global round ``g``'s total."""
        total = sum(content_bytes(m.content) for m in replies if not m.has_error())
        self.received[g] = self.received.get(g, 0) + total

    def _screen(self, server_round: int, replies: list[Message], phase: str) -> list[Message]:
        """Replies that may be aggregated (error replies pass through: FedAvg skips them, ``_collect`` logs them)."""
        g = self.global_round(server_round)
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            if phase == "train":
                reason = self._from_wire(msg) or check_train_reply(
                    msg.content, self.reference.get(g), metric_keys=self.train_metric_keys,
                    max_num_examples=self.max_num_examples)
            else:
                reason = check_evaluate_reply(msg.content, metric_keys=self.evaluate_metric_keys,
                                              max_num_examples=self.max_num_examples)
            if reason is None:
                kept.append(msg)
                continue
            node = self._node_of(msg)
            site = _site_of(msg, node) if keys.SITE in msg.content.config_records else self.node_sites.get(node, f"node-{node}")
            self.node_sites[node] = site
            self.rejected.setdefault(g, []).append({"site": site, "node": node, "round": g, "phase": phase, "reason": reason})
            log(WARNING, "round %d: rejected the %s reply of site %s (node %d): %s", g, phase, site, node, reason)
        return kept

    def _collect(self, server_round: int, replies: list[Message], into: dict[int, dict[str, dict]], phase: str) -> None:
        g = self.global_round(server_round)
        sites = {}
        for msg in replies:
            node = self._node_of(msg)
            if msg.has_error():
                self.record_error(g, node, msg, phase)
                continue
            site = _site_of(msg, node)
            self.node_sites[node] = site
            qc = _site_qc(msg)
            if qc is not None:
                self.site_qc.setdefault(g, {})[site] = qc
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            sites[site] = {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}
        into[g] = sites
        self.failed.setdefault(g, [])

    def aggregate_train(self, server_round: int, replies):
        replies = self._ordered(replies)
        self.count_received(self.global_round(server_round), replies)  # as sent: before float16 updates are widened
        replies = self._screen(server_round, replies, "train")
        self._collect(server_round, replies, self.train_sites, "train")
        self._outbox = []
        g = self.global_round(server_round)
        log(INFO, "round %d: %d site update(s) accepted", g, len(self.train_sites[g]))
        return self.inner.aggregate_train(g, replies)

    def aggregate_evaluate(self, server_round: int, replies):
        replies = self._ordered(replies)
        self.count_received(self.global_round(server_round), replies)
        replies = self._screen(server_round, replies, "evaluate")
        self._collect(server_round, replies, self.eval_sites, "evaluate")
        self._outbox = []
        return self.inner.aggregate_evaluate(self.global_round(server_round), replies)

    def missing_sites(self, g: int) -> list[str]:
        """Sites sampled in global round ``g`` that sent no usable training update (no reply before the
        round timeout, an error reply, or a rejected update)."""
        answered = set(self.train_sites.get(g, {}))
        names = [self.node_sites.get(n, f"node-{n}") for n in self.sampled.get(g, [])]
        return sorted(n for n in names if n not in answered)


def RecordingFedAvg(*, round_offset: int = 0, max_num_examples: int = MAX_NUM_EXAMPLES, **fedavg_kwargs) -> RecordingStrategy:
    """Flower's FedAvg (with fedpd's metric summaries unless given) inside :class:`RecordingStrategy`."""
    fedavg_kwargs.setdefault("train_metrics_aggr_fn", train_metrics_summary)
    fedavg_kwargs.setdefault("evaluate_metrics_aggr_fn", nan_aware_mean)
    return RecordingStrategy(FedAvg(**fedavg_kwargs), round_offset=round_offset, max_num_examples=max_num_examples)
