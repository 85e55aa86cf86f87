"""Figures of the run report, drawn on matplotlib's Agg canvas directly (the global backend stays as it is),
and the ROC band over the same subject-level bootstrap as the metric intervals."""

from __future__ import annotations

import numpy as np

from common.learning.metrics import resampled_scans, subject_bootstrap

__all__ = ["figure", "roc_band", "CI_BOOT"]

CI_BOOT = 1000  # resamples of the ROC band (subject level, as the metric intervals)


def figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (the global backend stays as it is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def roc_band(y: np.ndarray, p: np.ndarray, groups: np.ndarray, seed: int, grid: np.ndarray):
    """Percentile 95 % band of the ROC curve over subject-level bootstrap resamples (None if too few valid)."""
    from sklearn.metrics import roc_curve

    subject, draws = subject_bootstrap(groups, CI_BOOT, seed)
    curves = []
    for drawn in draws:
        idx = resampled_scans(subject, drawn)
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, p[idx])
        curves.append(np.interp(grid, fpr, tpr))
    if 2 * len(curves) < CI_BOOT:
        return None, len(curves)
    arr = np.vstack(curves)
    return (np.percentile(arr, 2.5, axis=0), np.percentile(arr, 97.5, axis=0)), len(curves)
