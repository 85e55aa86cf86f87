"""Binary PD-vs-control metrics, subject-level bootstrap intervals and the decision threshold.

Label 1 is PD and label 0 is control; a score is the model's PD probability, and a scan is predicted
PD when ``score >= threshold``. Everything is built on scikit-learn (``confusion_matrix``,
``roc_auc_score``, ``average_precision_score``, ``brier_score_loss``, ``roc_curve``); the only
hand-written formulas are the rates of a confusion matrix (so that a published table can be
reproduced from its counts), the expected calibration error (scikit-learn has none) and the
vectorised bootstrap, which the tests check against scikit-learn.

Every returned value is a plain Python ``int`` or ``float`` (JSON-serialisable). A metric that is
undefined on the given data (e.g. AUC when only one class is present) is ``float("nan")`` and one
:class:`MetricUndefinedWarning` says which metrics and why; scikit-learn's own warnings never leak.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning as _SklearnUndefinedMetricWarning
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from common.errors import DataError

__all__ = [
    "METRIC_KEYS", "COUNT_KEYS", "THRESHOLD_METRIC_KEYS", "ECE_BINS", "THRESHOLD_CRITERIA",
    "MetricUndefinedWarning", "binary_metrics", "metrics_from_confusion", "bootstrap_ci", "best_threshold",
    "subject_bootstrap", "resampled_scans",
]

METRIC_KEYS = ("n", "tp", "fn", "tn", "fp", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
               "precision", "npv", "f1", "auc", "auprc", "brier", "ece")
COUNT_KEYS = METRIC_KEYS[:5]  # ints; no bootstrap interval
THRESHOLD_METRIC_KEYS = METRIC_KEYS[5:12]  # what metrics_from_confusion returns
ECE_BINS = 10  # equal-width bins of the PD probability for the expected calibration error
THRESHOLD_CRITERIA = ("youden", "balanced_accuracy")

# Why a metric can be undefined (its value is then nan)
_WHY = {
    "balanced_accuracy": "needs both PD and control scans",
    "sensitivity": "no PD scans",
    "specificity": "no control scans",
    "precision": "no scan predicted PD",
    "npv": "no scan predicted control",
    "f1": "no PD scans and none predicted PD",
    "auc": "needs both PD and control scans",
    "auprc": "no PD scans",
}


class MetricUndefinedWarning(RuntimeWarning):
    """Some metrics are undefined on the given data and were reported as nan.

    Distinct from scikit-learn's ``UndefinedMetricWarning``, which this module suppresses.
    """


# --------------------------------------------------------------------------------------------------
# Input checks


def _validate(y_true: Any, y_score: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels as int64, scores as float64)`` or raise ``DataError`` naming the problem."""
    y, p = np.asarray(y_true), np.asarray(y_score)
    if y.ndim != 1 or p.ndim != 1:
        raise DataError(f"{where}: y_true and y_score must be 1-D (one value per scan), got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise DataError(f"{where}: y_true has {len(y)} values but y_score has {len(p)}; pass one score per scan")
    if len(y) == 0:
        raise DataError(f"{where}: no scans (y_true and y_score are empty); metrics need at least one prediction")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: y_true must hold 0 (control) or 1 (PD), got values of type {y.dtype}") from None
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        idx = np.flatnonzero(bad)
        raise DataError(f"{where}: y_true must be 0 (control) or 1 (PD); found {np.unique(y[bad])[:5].tolist()} "
                        f"at index {idx[:5].tolist()}{' ...' if len(idx) > 5 else ''}")
    try:
        pf = p.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: y_score must hold PD probabilities, got values of type {p.dtype}") from None
    for bad, what in ((~np.isfinite(pf), "is NaN or infinite"), (np.isfinite(pf) & ((pf < 0) | (pf > 1)), "is outside [0, 1]")):
        if bad.any():
            idx = np.flatnonzero(bad)
            raise DataError(f"{where}: y_score {what} at index {idx[:5].tolist()}{' ...' if len(idx) > 5 else ''} "
                            f"(values {pf[idx[:5]].tolist()}); pass PD probabilities (softmax/sigmoid), not logits")
    return yf.astype(np.int64), pf


def _check_threshold(threshold: Any, where: str) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise DataError(f"{where}: threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise DataError(f"{where}: threshold must be in [0, 1], got {threshold!r}")
    return t


# --------------------------------------------------------------------------------------------------
# Point estimates


def _ratio(num: Any, den: Any) -> np.ndarray:
    """``num / den`` elementwise, nan where ``den == 0``."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _rates(tp: Any, fn: Any, tn: Any, fp: Any) -> dict[str, np.ndarray]:
    """The threshold metrics from confusion counts (scalars or arrays of resamples)."""
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + fn + tn + fp),
        "balanced_accuracy": (sens + spec) / 2,  # nan unless both classes are present
        "sensitivity": sens,
        "specificity": spec,
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),  # = harmonic mean of precision and sensitivity
    }


def _warn_undefined(where: str, values: dict[str, Any], tp: int, fn: int, tn: int, fp: int, threshold: float | None) -> None:
    names = [k for k in _WHY if k in values and math.isnan(values[k])]
    if names:
        at = f" at threshold {threshold:g}" if threshold is not None else ""
        warnings.warn(f"{where}: undefined, reported as nan: {', '.join(f'{k} ({_WHY[k]})' for k in names)}; "
                      f"data: {tp + fn} PD, {tn + fp} control, {tp + fp} predicted PD{at}",
                      MetricUndefinedWarning, stacklevel=3)


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    """Expected calibration error of the PD probability over ``ECE_BINS`` equal-width bins."""
    b = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)  # bin k = [k/10, (k+1)/10), 1.0 in the last
    gap = np.bincount(b, weights=y, minlength=ECE_BINS) - np.bincount(b, weights=p, minlength=ECE_BINS)
    return float(np.abs(gap).sum() / len(p))  # = sum_k n_k/n * |mean(y)_k - mean(p)_k|


def metrics_from_confusion(tp: int, fn: int, tn: int, fp: int) -> dict[str, float]:
    """Threshold metrics from a confusion matrix (e.g. to reproduce a published table).

    Args:
        tp: PD scans predicted PD.
        fn: PD scans predicted control.
        tn: control scans predicted control.
        fp: control scans predicted PD.

    Returns:
        ``{key: float}`` for the keys of ``THRESHOLD_METRIC_KEYS`` (accuracy, balanced_accuracy,
        sensitivity, specificity, precision, npv, f1), as fractions in [0, 1]. Undefined ones are nan,
        with a :class:`MetricUndefinedWarning`.

    Raises:
        DataError: a count is not a non-negative integer, or all counts are zero.
    """
    counts = {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    for name, v in counts.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"metrics_from_confusion: {name} must be a non-negative integer, got {v!r}")
    if tp + fn + tn + fp == 0:
        raise DataError("metrics_from_confusion: all counts are zero; metrics need at least one scan")
    tp, fn, tn, fp = (int(counts[k]) for k in ("tp", "fn", "tn", "fp"))
    out = {k: float(v) for k, v in _rates(tp, fn, tn, fp).items()}
    _warn_undefined("metrics_from_confusion", out, tp, fn, tn, fp, None)
    return out


def binary_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> dict[str, int | float]:
    """All PD-vs-control metrics of one set of predictions.

    ``auc`` is the ROC AUC, ``auprc`` the average precision (scikit-learn's step-wise area under the
    precision-recall curve, PD positive), ``brier`` the mean squared error of the PD probability, and
    ``ece`` the expected calibration error: scores are put into ``ECE_BINS`` = 10 equal-width bins
    ``[0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]`` and ``ece = sum_k (n_k / n) * |fraction PD in bin k -
    mean score in bin k|`` over non-empty bins (the calibration of the PD probability itself, not of
    the top-label confidence).

    Args:
        y_true: one label per scan, 1 = PD, 0 = control.
        y_score: PD probability per scan, in [0, 1].
        threshold: a scan is predicted PD when ``score >= threshold``; in [0, 1].

    Returns:
        ``{key: value}`` with exactly the keys of ``METRIC_KEYS`` in that order: counts ``n, tp, fn,
        tn, fp`` as ``int``, everything else as ``float``, rates as fractions in [0, 1]. Metrics that
        are undefined on this data (e.g. ``auc`` and ``specificity`` when there is no control) are
        nan, and a single :class:`MetricUndefinedWarning` lists them with the reason.

    Raises:
        DataError (a ``ValueError``): empty input, different lengths, labels other than 0/1, scores
            that are NaN or outside [0, 1], or a threshold outside [0, 1].
    """
    y, p = _validate(y_true, y_score, "binary_metrics")
    t = _check_threshold(threshold, "binary_metrics")
    pred = (p >= t).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    out: dict[str, int | float] = {"n": len(y), "tp": tp, "fn": fn, "tn": tn, "fp": fp}
    out.update({k: float(v) for k, v in _rates(tp, fn, tn, fp).items()})
    has_pos, has_neg = tp + fn > 0, tn + fp > 0
    with warnings.catch_warnings():  # the undefined cases are skipped; this only guards against surprises
        warnings.simplefilter("ignore", _SklearnUndefinedMetricWarning)
        out["auc"] = float(roc_auc_score(y, p)) if has_pos and has_neg else math.nan
        out["auprc"] = float(average_precision_score(y, p, pos_label=1)) if has_pos else math.nan
        out["brier"] = float(brier_score_loss(y, p, pos_label=1, labels=[0, 1]))
    out["ece"] = _ece(y, p)
    _warn_undefined("binary_metrics", out, tp, fn, tn, fp, t)
    return {k: out[k] for k in METRIC_KEYS}


# --------------------------------------------------------------------------------------------------
# Subject-level bootstrap


def _factorize(groups: Any, n: int) -> np.ndarray:
    """Subject index (0..S-1) of every scan, in order of first appearance."""
    g = np.asarray(groups, dtype=object)
    if g.ndim != 1 or len(g) != n:
        raise DataError(f"bootstrap_ci: groups must give one subject id per scan ({n} scans), got shape {g.shape}")
    missing = [i for i, v in enumerate(g.tolist()) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise DataError(f"bootstrap_ci: groups has missing subject ids at index {missing[:5]}; every scan needs its subject")
    index: dict[Any, int] = {}
    return np.fromiter((index.setdefault(v, len(index)) for v in g.tolist()), dtype=np.intp, count=n)


def subject_bootstrap(groups: Any, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject-level bootstrap every interval of fedpd uses (the metric CIs and the report's ROC band).

    Returns ``(subject, draws)``: the subject index (0..S-1, in order of first appearance) of every scan, and
    ``draws[b]`` the ``S`` subjects drawn with replacement in resample ``b`` (shape ``(n_boot, S)``), from
    ``numpy.random.default_rng(seed)``: same seed, same resamples. A resample takes all scans of every drawn
    subject, once per draw (:func:`resampled_scans`).
    """
    subject = _factorize(groups, len(groups))
    n_subj = int(subject.max()) + 1 if len(subject) else 0
    draws = np.random.default_rng(seed).integers(0, max(n_subj, 1), size=(n_boot, n_subj))
    return subject, draws


def resampled_scans(subject: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Indices of the scans of one resample: all scans of each drawn subject, repeated as often as it was drawn."""
    members = np.argsort(subject, kind="stable")
    starts = np.searchsorted(subject[members], np.arange(int(subject.max()) + 2))
    return np.concatenate([members[starts[i]:starts[i + 1]] for i in drawn]) if len(drawn) else np.empty(0, np.intp)


def _weighted_metrics(w: np.ndarray, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Every non-count metric for a batch of resamples given as scan multiplicities ``w`` (B, n).

    Equivalent to ``binary_metrics`` on the data with scan i repeated ``w[b, i]`` times (tested).
    """
    pos = y.astype(np.float64)
    neg = 1.0 - pos
    tp, fn, tn, fp = w @ (pos * pred), w @ (pos * (1 - pred)), w @ (neg * (1 - pred)), w @ (neg * pred)
    out = _rates(tp, fn, tn, fp)
    n = w.sum(axis=1)
    out["brier"] = (w @ (p - pos) ** 2) / n
    onehot = np.eye(ECE_BINS)[np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)]  # (n, bins)
    out["ece"] = np.abs(w @ (onehot * (pos - p)[:, None])).sum(axis=1) / n
    # AUC (Mann-Whitney, ties count 1/2) and average precision over distinct scores, highest first
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    wo = w[:, order]
    pu = np.add.reduceat(wo * pos[order], starts, axis=1)  # weighted PD count at each distinct score
    nu = np.add.reduceat(wo * neg[order], starts, axis=1)
    n_pos, n_neg = pu.sum(axis=1), nu.sum(axis=1)
    neg_below = n_neg[:, None] - np.cumsum(nu, axis=1)
    out["auc"] = _ratio((pu * (neg_below + 0.5 * nu)).sum(axis=1), n_pos * n_neg)
    tp_k, fp_k = np.cumsum(pu, axis=1), np.cumsum(nu, axis=1)
    prec_k = np.nan_to_num(_ratio(tp_k, tp_k + fp_k))  # nan only where pu is 0 too
    out["auprc"] = _ratio((pu * prec_k).sum(axis=1), n_pos)
    return out


def bootstrap_ci(y_true: Any, y_score: Any, groups: Any, threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Point metrics with subject-level bootstrap percentile intervals.

    Each resample draws as many subjects as there are, with replacement, and takes all scans of each
    drawn subject (a subject drawn twice counts twice), so scans of one subject never split between
    "in" and "out" and the interval reflects the number of subjects, not of scans. The threshold is
    fixed (it was chosen on validation data). A resample where a metric is undefined (e.g. AUC when it
    holds one class only) is skipped for that metric.

    Args:
        y_true: one label per scan, 1 = PD, 0 = control.
        y_score: PD probability per scan, in [0, 1].
        groups: subject id per scan (any hashable: str, int); the resampling unit.
        threshold: a scan is predicted PD when ``score >= threshold``.
        n_boot: number of resamples (>= 1).
        seed: seed of the ``numpy.random.Generator`` that draws the subjects; same seed, same intervals.
        alpha: the interval is the ``[alpha/2, 1 - alpha/2]`` percentile interval of the resampled values.

    Returns:
        For every key of ``METRIC_KEYS`` (same order) a dict ``{"value": v, "ci95": [lo, hi],
        "n_boot_valid": k}``: ``value`` is ``binary_metrics`` on all scans, ``k`` is the number of
        resamples where the metric was defined. The interval key is named after the level, so it is
        ``"ci95"`` for the default ``alpha=0.05`` (``"ci90"`` for 0.1). Counts (``n, tp, fn, tn, fp``)
        get ``"ci95": None`` and ``"n_boot_valid": None``. When fewer than half of the resamples are
        valid the interval is ``[nan, nan]``, with a :class:`MetricUndefinedWarning` if the point
        value itself is defined.

    Raises:
        DataError (a ``ValueError``): the inputs fail ``binary_metrics``'s checks, ``groups`` has the
            wrong length or a missing id, ``n_boot < 1`` or ``alpha`` is not in (0, 1).
    """
    y, p = _validate(y_true, y_score, "bootstrap_ci")
    t = _check_threshold(threshold, "bootstrap_ci")
    _factorize(groups, len(y))  # checks groups before the other arguments, naming bootstrap_ci
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise DataError(f"bootstrap_ci: n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise DataError(f"bootstrap_ci: alpha must be in (0, 1) (0.05 for a 95 % interval), got {alpha!r}")
    ci_key = f"ci{100 * (1 - float(alpha)):g}"
    point = binary_metrics(y, p, threshold=t)

    subject, draws = subject_bootstrap(groups, n_boot, seed)  # drawn subject ids, one row per resample
    n_subj = draws.shape[1]
    pred = (p >= t).astype(np.float64)
    keys = METRIC_KEYS[len(COUNT_KEYS):]
    boot = {k: np.empty(n_boot) for k in keys}
    block = max(1, 2_000_000 // max(len(y), n_subj))  # bound the (block, scans) weight matrix
    for start in range(0, n_boot, block):
        d = draws[start:start + block]
        b = len(d)
        times_drawn = np.bincount((d + n_subj * np.arange(b)[:, None]).ravel(), minlength=b * n_subj).reshape(b, n_subj)
        for k, v in _weighted_metrics(times_drawn[:, subject].astype(np.float64), y, p, pred).items():
            boot[k][start:start + b] = v

    out: dict[str, dict[str, Any]] = {k: {"value": point[k], ci_key: None, "n_boot_valid": None} for k in COUNT_KEYS}
    too_few = []
    for k in keys:
        valid = boot[k][np.isfinite(boot[k])]
        if len(valid) > 0 and 2 * len(valid) >= n_boot:
            lo, hi = np.percentile(valid, [50 * alpha, 100 - 50 * alpha])
            ci = [float(lo), float(hi)]
        else:
            ci = [math.nan, math.nan]
            if not math.isnan(point[k]):
                too_few.append(f"{k} ({len(valid)}/{n_boot})")
        out[k] = {"value": point[k], ci_key: ci, "n_boot_valid": int(len(valid))}
    if too_few:
        warnings.warn(f"bootstrap_ci: fewer than half of the resamples are valid, interval set to [nan, nan]: "
                      f"{', '.join(too_few)}; {n_subj} subjects is too few for these metrics",
                      MetricUndefinedWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------------
# Decision threshold


def best_threshold(y_true: Any, y_score: Any, criterion: str = "youden") -> float:
    """Decision threshold that maximises Youden's J on validation data.

    J = sensitivity + specificity - 1 is evaluated at every threshold of scikit-learn's ``roc_curve``
    (each distinct score; prediction is ``score >= threshold``, as in ``binary_metrics``). Among equal
    maxima the threshold closest to 0.5 wins (the higher one if two are equally close). The result is
    clipped to [0, 1]. ``criterion="balanced_accuracy"`` gives the same threshold, since balanced
    accuracy = (J + 1) / 2.

    Args:
        y_true: one label per scan, 1 = PD, 0 = control.
        y_score: PD probability per scan, in [0, 1].
        criterion: one of ``THRESHOLD_CRITERIA``.

    Returns:
        The threshold as a float in [0, 1]; 0.5 with a :class:`MetricUndefinedWarning` when only one
        class is present (J is undefined then).

    Raises:
        DataError (a ``ValueError``): unknown criterion, or the inputs fail ``binary_metrics``'s checks.
    """
    if criterion not in THRESHOLD_CRITERIA:
        raise DataError(f"best_threshold: unknown criterion {criterion!r}; choose one of {list(THRESHOLD_CRITERIA)}")
    y, p = _validate(y_true, y_score, "best_threshold")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        warnings.warn(f"best_threshold: only one class present ({n_pos} PD, {len(y) - n_pos} control); "
                      "Youden's J is undefined, returning 0.5", MetricUndefinedWarning, stacklevel=2)
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p, pos_label=1, drop_intermediate=False)
    j = tpr - fpr
    candidates = np.clip(thresholds[np.isclose(j, j.max(), rtol=0.0, atol=1e-12)], 0.0, 1.0)  # highest first
    return float(candidates[np.argmin(np.abs(candidates - 0.5))])
