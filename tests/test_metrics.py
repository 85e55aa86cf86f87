"""common.learning.metrics: reference table, scikit-learn agreement, degenerate inputs, bootstrap, threshold."""

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning as SklearnUndefinedMetricWarning
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, brier_score_loss,
                             f1_score, precision_score, recall_score, roc_auc_score)

from common.learning import metrics as M
from common.learning.metrics import (COUNT_KEYS, METRIC_KEYS, THRESHOLD_METRIC_KEYS, MetricUndefinedWarning, best_threshold,
                            binary_metrics, bootstrap_ci, metrics_from_confusion)

REFERENCE = {"accuracy": 0.9403, "sensitivity": 1.0, "specificity": 0.6, "precision": 0.9344, "f1": 0.9661}


def _reference_arrays():
    """57 PD all predicted PD, 10 controls of which 4 predicted PD (TP 57, FN 0, TN 6, FP 4)."""
    y = np.r_[np.ones(57, int), np.zeros(10, int)]
    p = np.r_[np.full(57, 0.9), np.full(6, 0.1), np.full(4, 0.8)]
    return y, p


def _toy(n=100, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, p


# --------------------------------------------------------------------------------------------------
# Reference table


def test_reference_table_from_confusion():
    m = metrics_from_confusion(tp=57, fn=0, tn=6, fp=4)
    assert tuple(m) == THRESHOLD_METRIC_KEYS
    for key, expected in REFERENCE.items():
        assert round(m[key], 4) == expected, key


def test_reference_table_from_predictions():
    y, p = _reference_arrays()
    m = binary_metrics(y, p)
    assert (m["n"], m["tp"], m["fn"], m["tn"], m["fp"]) == (67, 57, 0, 6, 4)
    for key, expected in REFERENCE.items():
        assert round(m[key], 4) == expected, key
    assert m == {**m, **metrics_from_confusion(57, 0, 6, 4)}


def test_all_pd_predictor_shows_why_accuracy_misleads():
    y, _ = _reference_arrays()
    with pytest.warns(MetricUndefinedWarning, match="npv"):
        m = binary_metrics(y, np.ones(len(y)))
    assert math.isnan(m["npv"])
    assert round(m["accuracy"], 4) == 0.8507
    assert m["specificity"] == 0.0
    assert m["balanced_accuracy"] == 0.5
    assert m["sensitivity"] == 1.0


# --------------------------------------------------------------------------------------------------
# Agreement with scikit-learn and hand computation


def test_keys_types_and_json():
    y, p = _toy()
    m = binary_metrics(y, p)
    assert tuple(m) == METRIC_KEYS
    for k, v in m.items():
        assert type(v) is (int if k in COUNT_KEYS else float), k
        if k not in COUNT_KEYS and k not in ("brier", "ece"):
            assert 0.0 <= v <= 1.0, k
    json.dumps(m)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_threshold_metrics_match_sklearn(threshold):
    y, p = _toy()
    pred = (p >= threshold).astype(int)
    m = binary_metrics(y, p, threshold=threshold)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_score_metrics_small_example():
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(0.75) == roc_auc_score(y, p)
    assert m["auprc"] == pytest.approx(0.8333333333) == average_precision_score(y, p)
    assert m["brier"] == pytest.approx((0.1**2 + 0.4**2 + 0.65**2 + 0.2**2) / 4) == brier_score_loss(y, p)
    # one scan per bin: ece = mean |y - p|
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)


def test_ece_matches_calibration_curve():
    y, p = _toy(500, seed=3)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.histogram(p, bins=np.linspace(0, 1, 11))[0]
    weights = counts[counts > 0] / len(p)
    assert binary_metrics(y, p)["ece"] == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))


def test_ece_perfectly_calibrated_bins_is_zero():
    # bin [0.2, 0.3): 4 scans at 0.25, one PD; bin [0.7, 0.8): 4 scans at 0.75, three PD
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25] * 4 + [0.75] * 4
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("y, p, match", [
    ([], [], "empty"),
    ([0, 1, 1], [0.1, 0.2], "3 values but y_score has 2"),
    ([0, 1, 2], [0.1, 0.2, 0.3], r"0 \(control\) or 1 \(PD\); found \[2\]"),
    ([0, 1, 1], [0.1, 1.5, 0.3], r"outside \[0, 1\] at index \[1\]"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], r"NaN or infinite at index \[1\]"),
    ([0, float("nan"), 1], [0.1, 0.2, 0.3], "0 \\(control\\) or 1"),
    (["PD", "HC"], [0.1, 0.2], "0 \\(control\\) or 1"),
    ([[0, 1]], [[0.1, 0.2]], "1-D"),
])
def test_bad_inputs_raise(y, p, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, p)


@pytest.mark.parametrize("threshold", [-0.1, 1.1, float("nan"), "high"])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold"):
        binary_metrics([0, 1], [0.2, 0.8], threshold=threshold)


@pytest.mark.parametrize("label, undefined, defined", [
    (1, {"specificity", "balanced_accuracy", "auc", "npv"}, {"sensitivity", "precision", "f1", "auprc"}),
    (0, {"sensitivity", "balanced_accuracy", "auc", "auprc", "precision", "f1"}, {"specificity", "npv"}),
])
def test_one_class_gives_nan_and_one_warning(label, undefined, defined):
    y = [label] * 5
    p = [0.9] * 5 if label == 1 else [0.1] * 5  # all correct, so only class-dependent metrics are undefined
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", SklearnUndefinedMetricWarning)
        m = binary_metrics(y, p)
    ours = [w for w in caught if issubclass(w.category, MetricUndefinedWarning)]
    assert len(caught) == len(ours) == 1
    assert {k for k in m if isinstance(m[k], float) and math.isnan(m[k])} == undefined
    assert all(f"{k} (" in str(ours[0].message) for k in undefined)
    assert all(not math.isnan(m[k]) for k in defined | {"accuracy", "brier", "ece"})


def test_one_class_pytest_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SklearnUndefinedMetricWarning)
        with pytest.warns(MetricUndefinedWarning, match="auc"):
            m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(m["auc"]) and m["sensitivity"] == pytest.approx(2 / 3)


def test_no_predicted_positive_precision_nan():
    with pytest.warns(MetricUndefinedWarning, match="precision"):
        m = binary_metrics([0, 1, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["precision"]) and m["f1"] == 0.0 and m["sensitivity"] == 0.0


@pytest.mark.parametrize("counts", [(-1, 0, 1, 1), (1.5, 0, 1, 1), (0, 0, 0, 0), (True, 0, 1, 1)])
def test_metrics_from_confusion_rejects_bad_counts(counts):
    with pytest.raises(ValueError):
        metrics_from_confusion(*counts)


# --------------------------------------------------------------------------------------------------
# Bootstrap


def test_weighted_metrics_equal_binary_metrics_on_repeated_scans():
    """The vectorised bootstrap kernel == binary_metrics (sklearn) on the data with scans repeated."""
    rng = np.random.default_rng(7)
    y, p = _toy(40, seed=5)
    p = np.round(p, 1)  # ties in scores, and scores on ECE bin edges
    w = rng.integers(0, 3, size=(20, 40)).astype(float)
    w[0] = 1.0
    pred = (p >= 0.5).astype(float)
    batch = M._weighted_metrics(w, y, p, pred)
    for b in range(len(w)):
        idx = np.repeat(np.arange(40), w[b].astype(int))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricUndefinedWarning)
            ref = binary_metrics(y[idx], p[idx])
        for k, v in batch.items():
            assert v[b] == pytest.approx(ref[k], nan_ok=True, abs=1e-12), (b, k)


def test_bootstrap_structure_and_reproducible():
    y, p = _toy()
    groups = [f"sub-{i // 2:03d}" for i in range(len(y))]
    a = bootstrap_ci(y, p, groups, n_boot=200, seed=3)
    b = bootstrap_ci(y, p, groups, n_boot=200, seed=3)
    c = bootstrap_ci(y, p, groups, n_boot=200, seed=4)
    assert a == b and a != c
    assert tuple(a) == METRIC_KEYS
    point = binary_metrics(y, p)
    for k, v in a.items():
        assert set(v) == {"value", "ci95", "n_boot_valid"}
        assert v["value"] == point[k]
        if k in COUNT_KEYS:
            assert v["ci95"] is None and v["n_boot_valid"] is None
        else:
            lo, hi = v["ci95"]
            assert lo <= v["value"] <= hi, k
            assert v["n_boot_valid"] == 200
    json.dumps(a)


def test_bootstrap_alpha_names_the_interval():
    y, p = _toy()
    r = bootstrap_ci(y, p, np.arange(len(y)), n_boot=100, alpha=0.1)
    assert "ci90" in r["auc"]
    wide = bootstrap_ci(y, p, np.arange(len(y)), n_boot=100, alpha=0.01)["auc"]["ci99"]
    assert wide[0] <= r["auc"]["ci90"][0] and r["auc"]["ci90"][1] <= wide[1]


def test_subject_bootstrap_wider_than_scan_bootstrap():
    """Three identical scans per subject: resampling scans pretends there are 3x as many subjects."""
    y_subj, p_subj = _toy(40, seed=11)
    y, p = np.repeat(y_subj, 3), np.repeat(p_subj, 3)
    subjects = np.repeat(np.arange(40), 3)
    by_subject = bootstrap_ci(y, p, subjects, n_boot=1000, seed=0)
    by_scan = bootstrap_ci(y, p, np.arange(len(y)), n_boot=1000, seed=0)
    for k in ("accuracy", "auc", "brier"):
        w_subj = np.diff(by_subject[k]["ci95"])[0]
        w_scan = np.diff(by_scan[k]["ci95"])[0]
        assert w_subj > 1.3 * w_scan, (k, w_subj, w_scan)
    # and it equals the bootstrap of the 40 subjects with one scan each
    single = bootstrap_ci(y_subj, p_subj, np.arange(40), n_boot=1000, seed=0)
    for k in ("accuracy", "auc", "brier", "ece"):
        assert by_subject[k]["ci95"] == pytest.approx(single[k]["ci95"])


def test_bootstrap_skips_undefined_resamples():
    # 1 PD subject among 12: some resamples have no PD, so auc/sensitivity are skipped there
    y = np.r_[1, 1, np.zeros(11)]
    p = np.r_[0.8, 0.7, np.linspace(0.1, 0.6, 11)]
    groups = np.r_[0, 0, np.arange(1, 12)]
    r = bootstrap_ci(y, p, groups, n_boot=500, seed=0)
    assert 250 <= r["auc"]["n_boot_valid"] < 500
    assert r["auc"]["n_boot_valid"] == r["sensitivity"]["n_boot_valid"]
    assert r["specificity"]["n_boot_valid"] == 500
    assert not math.isnan(r["auc"]["ci95"][0])


def test_bootstrap_too_few_valid_gives_nan_interval_and_warning():
    # two subjects, one PD and one control: a single resample is valid for auc with probability 1/2
    y, p, groups = [1, 0], [0.8, 0.3], ["a", "b"]
    outcomes = set()
    for seed in range(20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = bootstrap_ci(y, p, groups, n_boot=1, seed=seed)
        if r["auc"]["n_boot_valid"] == 0:
            assert all(math.isnan(v) for v in r["auc"]["ci95"])
            assert any(issubclass(w.category, MetricUndefinedWarning) and "auc (0/1)" in str(w.message) for w in caught)
        else:
            assert r["auc"]["ci95"] == [1.0, 1.0] and not caught
        outcomes.add(r["auc"]["n_boot_valid"])
    assert outcomes == {0, 1}


def test_bootstrap_point_undefined_warns_once_not_twice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = bootstrap_ci([1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6], ["a", "a", "b", "c"], n_boot=50)
    assert len(caught) == 1 and "binary_metrics" in str(caught[0].message)
    assert math.isnan(r["auc"]["value"]) and r["auc"]["n_boot_valid"] == 0
    assert r["sensitivity"]["ci95"] == [1.0, 1.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"groups": [0, 1]}, "one subject id per scan"),
    ({"groups": [0, None, 1, 2]}, "missing subject ids"),
    ({"n_boot": 0}, "n_boot"),
    ({"alpha": 1.5}, "alpha"),
])
def test_bootstrap_bad_arguments(kwargs, match):
    args = {"y_true": [0, 1, 0, 1], "y_score": [0.1, 0.9, 0.2, 0.8], "groups": [0, 1, 2, 3], **kwargs}
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**args)


# The bootstrap's speed is not asserted in a unit test (wall time depends on the machine and its load);
# 1000 resamples are exercised functionally above. Timing belongs in benchmarks/.


# --------------------------------------------------------------------------------------------------
# Threshold


def test_best_threshold_separates_toy_set():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.05, 0.2, 0.3, 0.7, 0.8, 0.95]
    t = best_threshold(y, p)
    assert 0.3 < t <= 0.7
    m = binary_metrics(y, p, threshold=t)
    assert m["accuracy"] == 1.0
    assert best_threshold(y, p, criterion="balanced_accuracy") == t


def test_best_threshold_low_scores_and_tie_break():
    # a well-ranking but miscalibrated model: every PD score is below 0.5
    assert best_threshold([0, 0, 1, 1], [0.01, 0.02, 0.1, 0.2]) == pytest.approx(0.1)
    # J = 0.5 at both 0.9 and 0.3: 0.3 is closer to 0.5
    y = [0, 1, 0, 1]
    p = [0.1, 0.3, 0.6, 0.9]
    assert best_threshold(y, p) == pytest.approx(0.3)
    # J = 0 at 1.0, 0.75 and 0.25; 0.75 and 0.25 are exactly equally close to 0.5: the higher one wins
    assert best_threshold([1, 0, 1, 0], [0.25, 0.5, 0.75, 0.9]) == 0.75


def test_best_threshold_errors_and_one_class():
    with pytest.raises(ValueError, match=r"unknown criterion 'f2'.*youden"):
        best_threshold([0, 1], [0.2, 0.8], criterion="f2")
    with pytest.raises(ValueError, match="empty"):
        best_threshold([], [])
    with pytest.warns(MetricUndefinedWarning, match="one class"):
        assert best_threshold([1, 1], [0.2, 0.8]) == 0.5
