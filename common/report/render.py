"""The human-readable run report: ``<run>/report.html`` and ``<run>/figures/*.png`` from a run folder.

Reads what a finished run leaves on disk (``report.json``, ``rounds.jsonl``, ``predictions.csv``,
``model.pt``) and writes one self-contained HTML page (inline CSS, every figure embedded as a base64 PNG
data URI, nothing fetched from anywhere) plus each figure as a PNG under ``figures/``. The page's first
line says whether the data were phantom (synthetic) or real, as DESIGN.md "Outputs" requires.

Every section is rendered on its own: if one fails (a missing file, a scan that is gone, a metric that
cannot be computed) it shows an error note and the rest of the report is still written. Undefined
metrics (``null``/NaN in ``report.json``, e.g. AUC on a one-class site) are shown as "n/a".

Figures are drawn with matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so the
global backend of the calling process is never changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import gc
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from common import keys
from common.errors import DataError
from common.files import atomic_write_bytes, atomic_write_text
from common.keys import CLASS_NAMES
from common.report.html import esc, fmt, fmt_ci, metric, note, num, page, table, value_ci
from common.report.plots import CI_BOOT, figure, roc_band
from common.runs.records import RoundRecord, RunReport, load_report
from common.runs.rundir import RunDir

__all__ = ["render_report", "SECTION_IDS", "REPORT_HTML", "FIGURES_DIR", "baseline_hint"]

log = logging.getLogger("fedpd.report")

REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
SEARCH_DEPTH = 3  # how deep report.json files are looked for under baselines/ and --compare folders
# (key, label, what it means) in the order of the test-metrics table
METRICS = (
    ("auc", "ROC AUC", "threshold-free ranking of PD above control"),
    ("balanced_accuracy", "Balanced accuracy", "mean of sensitivity and specificity"),
    ("sensitivity", "Sensitivity (recall PD)", "PD scans predicted PD"),
    ("specificity", "Specificity", "control scans predicted control"),
    ("precision", "Precision (PPV)", "predicted PD that are PD"),
    ("npv", "NPV", "predicted control that are control"),
    ("f1", "F1 (PD)", "harmonic mean of precision and sensitivity"),
    ("accuracy", "Accuracy", "share of scans correct; misleading when classes are imbalanced"),
    ("auprc", "Average precision", "area under the precision-recall curve, PD positive"),
    ("brier", "Brier score", "mean squared error of the PD probability (lower is better)"),
    ("ece", "ECE", "expected calibration error, 10 equal-width bins (lower is better)"),
)


def baseline_hint(run_root: Path) -> str:
    """The command that adds comparison arms to a run's report."""
    return (f"fedpd baseline --mode centralized|local|scratch --partition DIR --out {Path(run_root)}/baselines/<mode>")


# --------------------------------------------------------------------------------------------------
# Context: what a run folder holds


@dataclass
class _Run:
    root: Path
    report: RunReport
    rounds: list[RoundRecord]
    preds: pd.DataFrame | None
    compare: tuple[Path, ...]
    saliency_scans: int
    figures: Path
    problems: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.report.source

    @property
    def phantom(self) -> bool:
        return "phantom" in self.source

    @property
    def test(self) -> pd.DataFrame | None:
        if self.preds is None or "split" not in self.preds.columns:
            return None
        rows = self.preds[self.preds["split"] == "test"]
        return rows if len(rows) else None

    @property
    def seed(self) -> int:
        return self.report.seed

    @property
    def threshold(self) -> float | None:
        return num(self.report.threshold)


def _read_predictions(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"image_id": str, "subject_id": str, "site": str})
    missing = {"split", "label", "score"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: lacks column(s) {', '.join(sorted(missing))}")
    return df


def _save(ctx: _Run, fig, name: str, alt: str) -> str:
    """Write ``figures/<name>`` and return an ``<img>`` with the same PNG as a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return _embed(ctx, buf.getvalue(), name, alt)


def _embed(ctx: _Run, png: bytes, name: str, alt: str) -> str:
    atomic_write_bytes(ctx.figures / name, png)
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------------------------------
# Sections. Each returns an HTML fragment; an exception becomes an error note in that section.


def _banner_text(ctx: _Run) -> str:
    source = ctx.source
    if source.startswith("mixed"):
        return (f"MIXED DATA ({source}) - phantom and real scans together: not a clinical result; check the manifest's "
                "source column.")
    if ctx.phantom:
        return ("PHANTOM DATA (synthetic scans) - not a clinical result: these figures test the software, "
                "they say nothing about Parkinson's disease.")
    if source == "ppmi":
        return "REAL DATA (PPMI T1 MRI) - research result, not a medical device and not validated for clinical use."
    if source == "bids":
        return ("REAL DATA (a BIDS dataset of T1 MRI) - research result, not a medical device and not validated for "
                "clinical use.")
    return f"DATA SOURCE: {source} - neither phantom nor PPMI as far as report.json says; check the manifest."


def _section_banner(ctx: _Run) -> str:
    cls = "phantom" if ctx.phantom else ("real" if ctx.source in ("ppmi", "bids") else "unknown")
    out = [f'<h1 class="banner {cls}">{esc(_banner_text(ctx))}</h1>']
    if ctx.report.unsafe_scan_split:
        out.append('<div id="unsafe-split-warning" class="alarm">WARNING: this run was split by SCAN, not by '
                   "subject (unsafe-scan-split). Scans of one subject are in both training and test, so the model "
                   "is tested on people it has already seen: every figure below is INFLATED. This run is a "
                   "leakage demonstration only; never report its numbers.</div>")
    holdout = ctx.report.held_out_site
    if holdout:
        out.append(f'<div id="holdout-note" class="holdout">Leave-one-site-out run: site {esc(holdout)} took no part '
                   f"in training, and the test metrics are on site {esc(holdout)}'s scans only.</div>")
    return "".join(out)


def _section_summary(ctx: _Run) -> str:
    r = ctx.report
    test, counts = r.test, r.test_counts
    rows = [
        ("Run folder", str(ctx.root)),
        ("Arm", r.arm),
        ("Data source", ctx.source),
        ("Test ROC AUC [95 % CI]", value_ci(test, "auc")),
        ("Test balanced accuracy [95 % CI]", value_ci(test, "balanced_accuracy")),
        ("Test set", f"{counts.get('scans', 'n/a')} scans of {counts.get('subjects', 'n/a')} subjects"),
        ("Selected round", f"{r.selected_round if r.selected_round is not None else 'n/a'} of "
                           f"{r.rounds or len(ctx.rounds) or 'n/a'} ({r.selection or 'selection rule not recorded'})"),
        ("Decision threshold", f"{fmt(r.threshold, 4)} ({r.threshold_rule or 'rule not recorded'})"),
    ]
    if r.privacy:
        rows.append(("Differential privacy (site-level)", _privacy_text(r.privacy)))
    return table(None, [(f"<b>{esc(k)}</b>", esc(v)) for k, v in rows], raw=True)


def _privacy_text(privacy: dict) -> str:
    """The privacy spent and how loud the noise was against the update (``noise_to_update``, when recorded)."""
    p = privacy
    delta = num(p.get("delta"))
    text = (f"epsilon {fmt(p.get('epsilon'), 2)} at delta {'n/a' if delta is None else f'{delta:g}'} after "
            f"{p.get('releases', 'n/a')} released round(s); noise multiplier {fmt(p.get('noise_multiplier'), 3)}, "
            f"clipping norm {fmt(p.get('clipping_norm'), 3)}")
    ratio = num(p.get("noise_to_update"))
    if ratio is not None:
        text += (f"; expected noise norm {ratio:.3g}x the largest averaged update"
                 + (" (louder than any single update)" if ratio > 1 else ""))
    return text


def _cohort_counts(ctx: _Run) -> tuple[list[str], dict[tuple[str, int], dict[str, tuple[int, int | None]]]]:
    """(column names, {(site, label): {column: (scans, subjects or None)}})."""
    cells: dict[tuple[str, int], dict[str, tuple[int, int | None]]] = {}
    columns: list[str] = []

    def put(site, label, column, scans, subjects):
        if column not in columns:
            columns.append(column)
        cells.setdefault((str(site), int(label)), {})[column] = (int(scans), None if subjects is None else int(subjects))

    sites = ctx.report.partition_sites
    for kind, column in (("train", "site train"), ("val", "site val")):
        for site, info in sites.items():
            scans, subjects = info.get(f"{kind}_scans") or {}, info.get(f"{kind}_subjects") or {}
            for label in (0, 1):
                if str(label) in scans:
                    put(site, label, column, scans[str(label)], subjects.get(str(label)))
    if not sites:  # no partition summary: the training counts the sites reported
        for site, info in ctx.report.site_train_counts.items():
            put(site, 0, "site train", info.get("control", 0), None)
            put(site, 1, "site train", info.get("pd", 0), None)
    strata = ctx.report.split_audit.get("strata") or []
    if strata:
        for s in strata:
            if int(s.get("scans", 0)) > 0:
                put(s["site"], s["label"], f"server {s['split']}", s["scans"], s.get("subjects"))
    elif ctx.preds is not None and {"site", "subject_id"} <= set(ctx.preds.columns):
        for (split, site, label), g in ctx.preds.groupby(["split", "site", "label"]):
            put(site, label, f"{split} (predictions.csv)", len(g), g["subject_id"].nunique())
    return columns, cells


def _site_key(site: str):
    return (0, int(site), "") if str(site).isdigit() else (1, 0, str(site))


def _section_cohort(ctx: _Run) -> str:
    columns, cells = _cohort_counts(ctx)
    if not cells:
        return note("report.json has no per-site counts and there is no predictions.csv: cohort unknown.")
    rows, classes = [], []
    totals = {c: [0, 0, True] for c in columns}
    for (site, label) in sorted(cells, key=lambda k: (_site_key(k[0]), k[1])):
        row = [site, CLASS_NAMES[label]]
        for c in columns:
            scans, subjects = cells[(site, label)].get(c, (0, 0))
            row.append(f"{scans} / {subjects if subjects is not None else '?'}")
            totals[c][0] += scans
            if subjects is None:
                totals[c][2] = False
            else:
                totals[c][1] += subjects
        rows.append(row)
        classes.append("")
    rows.append(["all", "both"] + [f"{t[0]} / {t[1] if t[2] else '?'}" for t in totals.values()])
    classes.append("total")
    out = [table(["site", "class"] + columns, rows, classes),
           note("Each cell: scans / subjects. 'site train' and 'site val' stay at the sites (they train and "
                 "validate locally); 'server val' chose the round and the threshold; 'server test' was evaluated "
                 "once, on the selected model. '?' = subject count not recorded.")]
    qc = ctx.report.preprocessing_qc
    if qc:
        qrows = [[site, str(c.get("kept", "?")), str(c.get("excluded", "?"))]
                 for site, c in sorted(qc.items(), key=lambda kv: _site_key(kv[0]))]
        out += [table(["site", "scans kept by preprocessing QC", "scans excluded"], qrows, [""] * len(qrows)),
                note("Site-local preprocessing (fedpd preprocess: N4, affine registration to MNI152, brain mask) "
                      "and its QC, as each site reported it: counts only, over all of the site's scans before the "
                      "split; the reasons stay in the site's qc.csv / qc.html.")]
    ho = ctx.report.held_out_site
    if ho:
        out.append(note(f"Held-out site {ho}: not used for training; the test rows are its scans."))
    return "".join(out)


def _section_split_audit(ctx: _Run) -> str:
    data, audit = ctx.report.data, ctx.report.split_audit
    out = []
    if audit:
        shared = audit.get("subjects_shared_across_splits")
        ok = shared == 0
        cls = "good" if ok else "alarm"
        out.append(f'<p class="{cls}">Subjects shared across splits: <b>{esc(shared if shared is not None else "n/a")}'
                   f"</b>{' (no subject is in more than one split)' if ok else ' - the split leaks subjects'}</p>")
        rows = []
        for split, s in (audit.get("splits") or {}).items():
            labels = s.get("labels") or {}
            c, p = labels.get("0") or {}, labels.get("1") or {}
            rows.append([split, s.get("subjects", "n/a"), s.get("scans", "n/a"),
                         f"{c.get('scans', 'n/a')} / {c.get('subjects', 'n/a')}",
                         f"{p.get('scans', 'n/a')} / {p.get('subjects', 'n/a')}"])
        total = audit.get("total") or {}
        rows.append(["total", total.get("subjects", "n/a"), total.get("scans", "n/a"), "", ""])
        out.append(table(["split (server manifest)", "subjects", "scans", "control scans / subjects",
                           "PD scans / subjects"], rows))
    for key in sorted(data):
        if "audit" in key and key != "server_split_audit" and not isinstance(data[key], (dict, list)):
            out.append(note(f"{key}: {data[key]}"))
    if ctx.report.unsafe_scan_split:
        out.append(note("unsafe-scan-split was on: the split was by scan, so subjects are shared on purpose.",
                         "alarm"))
    if ctx.preds is not None and {"subject_id", "split"} <= set(ctx.preds.columns):
        val = set(ctx.preds.loc[ctx.preds["split"] == "val", "subject_id"])
        test = set(ctx.preds.loc[ctx.preds["split"] == "test", "subject_id"])
        both = sorted(val & test)
        cls = "good" if not both else "alarm"
        out.append(f'<p class="{cls}">Re-checked from predictions.csv: {len(both)} subject(s) in both server val and '
                   f"test{(': ' + esc(', '.join(both[:20]))) if both else ''}.</p>")
    if not out:
        return note("report.json records no split audit and there is no predictions.csv to check.")
    return "".join(out)


def _series(ctx: _Run, get: Callable[[RoundRecord], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in ctx.rounds:
        v = num(get(r))
        if v is not None:
            xs.append(r.round)
            ys.append(v)
    return xs, ys


def _section_curves(ctx: _Run) -> str:
    if not ctx.rounds:
        return note("rounds.jsonl is missing or empty: no per-round curves.")
    selected = ctx.report.selected_round
    fig = figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    sites = sorted({s for r in ctx.rounds for s in r.sites}, key=_site_key)
    for site in sites:
        xs, ys = _series(ctx, lambda r, s=site: r.sites.get(s, {}).get(keys.TRAIN_LOSS))
        if xs:
            ax1.plot(xs, ys, lw=0.8, alpha=0.5, marker=".", label=f"site {site} train")
    for label, get, style in (("train loss (weighted mean)", lambda r: r.train_loss, "o-"),
                              ("server val loss", lambda r: r.val["loss"], "s--")):
        xs, ys = _series(ctx, get)
        if xs:
            ax1.plot(xs, ys, style, lw=1.8, label=label)
    for label, key, style in (("server val AUC", "auc", "o-"), ("server val balanced acc.", "balanced_accuracy", "s--")):
        xs, ys = _series(ctx, lambda r, k=key: r.val[k])
        if xs:
            ax2.plot(xs, ys, style, lw=1.8, label=label)
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax2.set_ylim(-0.02, 1.02)
    for ax, title in ((ax1, "Loss"), (ax2, "Validation (server val rows)")):
        if selected is not None:
            ax.axvline(int(selected), color="crimson", lw=1.2, ls="-.", label=f"selected round {selected}")
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    img = _save(ctx, fig, "curves.png", "training loss and validation AUC per round")
    rows = []
    for r in ctx.rounds:
        rows.append([r.round, fmt(r.train_loss), fmt(r.val["loss"]), fmt(r.val["auc"]), fmt(r.val["balanced_accuracy"]),
                     r.num_examples, fmt(r.wall_seconds, 1)])
    numbers = table(["round", "train loss", "val loss", "val AUC", "val bal. acc.", "train scans", "wall s"], rows,
                   ["selected" if r.round == selected else "" for r in ctx.rounds])
    return (f"<figure>{img}<figcaption>Training loss (mean over sites weighted by their scans, and per site) and the "
            f"server validation metrics per round; the dash-dot line marks the selected round.</figcaption></figure>"
            f"<details><summary>Per-round numbers</summary>{numbers}</details>")


def _section_test_metrics(ctx: _Run) -> str:
    r = ctx.report
    test = r.test
    if not test:
        return note("report.json has no test metrics.")
    rows = []
    for key, label, what in METRICS:
        value, ci = metric(test, key)
        n_valid = (test.get(key) or {}).get("n_boot_valid") if isinstance(test.get(key), dict) else None
        rows.append([label, fmt(value), fmt_ci(ci), n_valid if n_valid is not None else "n/a", what])
    out = [table(["metric", "value", "95 % CI", "valid resamples", "meaning"], rows)]
    counts = {k: metric(test, k)[0] for k in ("n", "tp", "fn", "tn", "fp")}
    out.append(note(f"Threshold {fmt(r.threshold, 4)}: a scan is predicted PD when its PD probability is >= "
                     f"the threshold. Chosen by: {r.threshold_rule or 'not recorded'}; the test rows were never "
                     "used to choose it. Intervals: subject-level bootstrap (1000 resamples of subjects, all scans of "
                     "a drawn subject), percentile 95 %."))
    n, tp, fn = (num(counts[k]) for k in ("n", "tp", "fn"))
    if n and tp is not None and fn is not None:
        share = (tp + fn) / n
        out.append(note(
            f"Accuracy alone misleads on an imbalanced test set: {share:.1%} of the {int(n)} test scans are PD, so "
            f"calling every scan PD scores accuracy {share:.3f} (all-control: {1 - share:.3f}) with no model at "
            "all. Read balanced accuracy, sensitivity and specificity together, and AUC for the ranking.", "caution"))
    return "".join(out)


def _test_arrays(ctx: _Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    test = ctx.test
    if test is None:
        raise ValueError("no test rows in predictions.csv (the file is written by finalize_run)")
    groups = test["subject_id"].astype(str).to_numpy() if "subject_id" in test.columns else np.arange(len(test)).astype(str)
    return test["label"].astype(int).to_numpy(), test["score"].astype(float).to_numpy(), groups


def _section_roc(ctx: _Run) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p, groups = _test_arrays(ctx)
    if y.min() == y.max():
        return note(f"The test set holds only {CLASS_NAMES[int(y[0])]} scans: the ROC curve and AUC are undefined (n/a).")
    fpr, tpr, _ = roc_curve(y, p)
    value, ci = metric(ctx.report.test, "auc")
    auc = num(value) if num(value) is not None else float(roc_auc_score(y, p))
    grid = np.linspace(0, 1, 101)
    band, valid = roc_band(y, p, groups, ctx.seed, grid)
    fig = figure(5.2, 5)
    ax = fig.subplots()
    if band is not None:
        ax.fill_between(grid, band[0], band[1], color="tab:blue", alpha=0.2, step=None,
                        label=f"95 % band (subject bootstrap, {valid} resamples)")
    ax.step(fpr, tpr, where="post", color="tab:blue", lw=2, label=f"ROC, AUC {auc:.3f} {fmt_ci(ci)}")
    t = ctx.threshold
    if t is not None:
        pred = p >= t
        sens = pred[y == 1].mean()
        spec = 1 - pred[y == 0].mean()
        ax.plot([1 - spec], [sens], "o", color="crimson", label=f"threshold {t:.3f}: sens {sens:.2f}, spec {spec:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=f"Test ROC ({len(y)} scans, {len(set(groups))} subjects)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    img = _save(ctx, fig, "roc.png", "ROC curve of the test predictions with a 95 % band")
    caveat = "" if band is not None else note(f"Too few resamples hold both classes ({valid}/{CI_BOOT}): no band drawn.")
    return (f"<figure>{img}<figcaption>ROC of the selected model on the test scans. The band is the pointwise 95 % "
            f"percentile interval of the true-positive rate over {CI_BOOT} subject-level bootstrap resamples "
            f"(seed {ctx.seed}).</figcaption></figure>{caveat}")


def _section_confusion(ctx: _Run) -> str:
    test = ctx.report.test
    counts = {k: num(metric(test, k)[0]) for k in ("tp", "fn", "tn", "fp")}
    if any(v is None for v in counts.values()):
        y, p, _ = _test_arrays(ctx)
        t = ctx.threshold if ctx.threshold is not None else 0.5
        pred = p >= t
        counts = {"tp": float((pred & (y == 1)).sum()), "fn": float((~pred & (y == 1)).sum()),
                  "tn": float((~pred & (y == 0)).sum()), "fp": float((pred & (y == 0)).sum())}
    m = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=float)
    fig = figure(4.6, 4)
    ax = fig.subplots()
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            pct = f"{share[i, j]:.0%}" if rows[i, 0] > 0 else "n/a"
            ax.text(j, i, f"{int(m[i, j])}\n({pct} of row)", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=11)
    ax.set_xticks([0, 1], [f"predicted {c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASS_NAMES])
    ax.set_title(f"Test confusion matrix at threshold {fmt(ctx.threshold, 3)}")
    img = _save(ctx, fig, "confusion.png", "confusion matrix of the test scans")
    return (f"<figure>{img}<figcaption>Counts of test scans (true class by row); colour is the share of the row, so "
            f"the diagonal reads as specificity (control) and sensitivity (PD).</figcaption></figure>")


def _section_calibration(ctx: _Run) -> str:
    from sklearn.calibration import calibration_curve

    y, p, _ = _test_arrays(ctx)
    test = ctx.report.test
    fig = figure(5.2, 6)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform", pos_label=1)
    sizes = np.bincount(np.minimum((p * 10).astype(int), 9), minlength=10)
    ax.plot(mean, frac, "o-", color="tab:blue", label="test scans (10 equal-width bins)")
    for x, f, n in zip(mean, frac, sizes[sizes > 0]):  # calibration_curve drops empty bins, in bin order
        ax.annotate(str(int(n)), (x, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(ylabel="observed share PD", xlim=(-0.01, 1.01), ylim=(-0.02, 1.02),
           title=f"Reliability: Brier {value_ci(test, 'brier')}, ECE {value_ci(test, 'ece')}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    for label, colour in ((0, "tab:green"), (1, "tab:red")):
        hist.hist(p[y == label], bins=np.linspace(0, 1, 21), alpha=0.6, color=colour, label=CLASS_NAMES[label])
    if ctx.threshold is not None:
        hist.axvline(ctx.threshold, color="crimson", ls="-.", lw=1, label="threshold")
    hist.set(xlabel="predicted PD probability", ylabel="scans")
    hist.legend(fontsize=7)
    img = _save(ctx, fig, "calibration.png", "reliability diagram of the test predictions")
    return (f"<figure>{img}<figcaption>Reliability diagram (sklearn calibration_curve, 10 equal-width bins; numbers = "
            f"scans per bin) and the score distribution by true class. Brier {esc(value_ci(test, 'brier'))}; "
            f"ECE {esc(value_ci(test, 'ece'))} (95 % CI).</figcaption></figure>")


def _section_per_site(ctx: _Run) -> str:
    per_site = ctx.report.test_per_site
    if not per_site:
        return note("report.json has no per-site test metrics.")
    keys = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy")
    rows = []
    for site in sorted(per_site, key=_site_key):
        block = per_site[site]
        tp, fn, tn, fp = (num(metric(block, k)[0]) for k in ("tp", "fn", "tn", "fp"))
        n_pd = int(tp + fn) if tp is not None and fn is not None else "n/a"
        n_ctl = int(tn + fp) if tn is not None and fp is not None else "n/a"
        rows.append([site, fmt(metric(block, "n")[0]), n_pd, n_ctl] + [value_ci(block, k) for k in keys])
    return (table(["site", "test scans", "PD", "control", "AUC [CI]", "balanced acc. [CI]", "sensitivity [CI]",
                    "specificity [CI]", "F1 [CI]", "accuracy [CI]"], rows)
            + note("Same model and threshold at every site. n/a: undefined on that site's scans (e.g. AUC and "
                    "specificity when a site's test scans are all PD); intervals over few subjects are wide."))


def _section_participation(ctx: _Run) -> str:
    part = ctx.report.participation
    kinds = ("trained", "missing", "not_sampled", "rejected", "failed")
    rows = []
    if isinstance(part, dict) and part:
        for rnd in sorted(part, key=lambda k: int(k) if str(k).isdigit() else 0):
            entry = part[rnd] or {}
            rows.append([rnd] + [", ".join(map(str, entry.get(k) or [])) or "-" for k in kinds])
        source = "report.json participation"
    elif ctx.rounds:
        for r in ctx.rounds:
            rej = [x.get("site", "?") for x in r.rejected]
            fail = [x.get("site", "?") for x in r.failures]
            rows.append([r.round, ", ".join(sorted(r.sites, key=_site_key)) or "-",
                         ", ".join(map(str, r.missing_sites)) or "-", "-",
                         ", ".join(map(str, rej)) or "-", ", ".join(map(str, fail)) or "-"])
        source = "rounds.jsonl"
    else:
        return note("No participation recorded (not a federated run, or no rounds).")
    problems = sum(1 for row in rows if any(c != "-" for c in row[2:]))
    return (table(["round", "trained", "missing", "not sampled", "rejected (update screening)", "failed"], rows,
                   ["problem" if any(c != "-" for c in row[2:]) else "" for row in rows])
            + note(f"From {source}. {problems} of {len(rows)} round(s) had a site missing, rejected or failed."))


# --- comparison arms


def _find_reports(folder: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    found = []
    for level in range(depth + 1):
        pattern = "/".join(["*"] * level + ["report.json"])
        found += [p for p in folder.glob(pattern) if p.is_file()]
    return sorted(set(found))


def _train_data(rep: RunReport) -> str:
    """What an arm trained on, e.g. "federated: sites 10, 20, 30 (33 scans); MedicalNet init"."""
    arm, counts = rep.arm, rep.site_train_counts
    n = sum(int((c or {}).get("num_examples", 0) or 0) for c in counts.values()) if counts else None
    if n is None:  # no counts the sites reported: the partition's train scans
        part = rep.partition_sites
        n = sum(sum((v.get("train_scans") or {}).values()) for v in part.values()) or None
    size = f" ({n} scans)" if n else ""
    if arm.startswith("local:"):
        where = f"site {arm.split(':', 1)[1]} alone{size}"
    elif arm == "centralized" or rep.data.get("baseline") == "centralized":
        where = f"all sites pooled centrally{size}"
    elif counts:
        where = f"federated: sites {', '.join(sorted(counts, key=_site_key))}{size}"
    else:
        where = f"n/a{size}"
    holdout = rep.held_out_site
    if holdout:
        where += f"; site {holdout} held out"
    return f"{where}; {'MedicalNet init' if rep.config.get('pretrained-path') else 'random init'}"


def _test_ids(report_path: Path) -> set[str] | None:
    path = report_path.parent / "predictions.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"image_id": str})
    if "image_id" not in df.columns:
        return None
    return set(df.loc[df["split"] == "test", "image_id"])


def _run_costs(rep: RunReport | None, report_path: Path) -> list[str]:
    """The selected round, the mean round wall time and the mean bytes the server received from the sites per
    round (from the arm's rounds.jsonl; baseline arms send nothing), and the privacy spent."""
    if rep is None:
        return ["n/a"] * 4
    records = []
    try:
        records = RunDir(report_path.parent).read_rounds()
    except (DataError, OSError):
        pass
    walls = [r.wall_seconds for r in records if r.wall_seconds]
    received = [r.received_bytes for r in records if r.received_bytes is not None]
    privacy = rep.privacy or {}
    eps = (f"{privacy['epsilon']:.2f} (delta {privacy['delta']:g})" if privacy.get("epsilon") is not None else "no DP")
    return [str(rep.selected_round if rep.selected_round is not None else "n/a"),
            f"{sum(walls) / len(walls):.0f} s" if walls else "n/a",
            f"{sum(received) / len(received) / 1e6:.1f} MB" if received else "n/a", eps]


def _section_comparison(ctx: _Run) -> str:
    own = (ctx.root / "report.json").resolve()
    candidates = _find_reports(ctx.root / "baselines")
    for folder in ctx.compare:
        candidates += _find_reports(Path(folder))
    others, seen = [], {own}
    for path in candidates:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            others.append(path)
    own_ids = set(ctx.test["image_id"].astype(str)) if ctx.test is not None and "image_id" in ctx.test.columns else None
    own_counts = ctx.report.test_counts
    arms: list[tuple[RunReport | None, Path, str, str]] = [(ctx.report, own, "this run", "")]
    for path in others:
        try:
            rep = load_report(path)
        except DataError as exc:
            arms.append((None, path, f"unreadable: {exc}", "differs"))
            continue
        ids = _test_ids(path)
        counts = rep.test_counts
        if own_ids is not None and ids is not None:
            same = ids == own_ids
            status = "same test scans" if same else f"DIFFERENT test set ({len(ids ^ own_ids)} scans differ)"
        else:
            same = bool(counts) and counts == {k: own_counts.get(k) for k in counts}
            status = ("same test size (image ids not checked)" if same else "DIFFERENT test set (counts differ)")
        arms.append((rep, path, status, "" if same else "differs"))
    rows, classes = [], []
    for rep, path, status, cls in arms:
        test, counts = (rep.test, rep.test_counts) if rep is not None else ({}, {})
        name = rep.arm if rep is not None else path.parent.name
        try:
            where = str(path.parent.relative_to(ctx.root)) or "."
        except ValueError:
            where = str(path.parent)
        arm = f"<b>{esc(name)}</b><br><small>{esc(where if status != 'this run' else 'this run')}</small>"
        flag = f'<span class="{"bad" if cls else "ok"}">{esc(status)}</span>'
        rows.append([arm, esc(_train_data(rep) if rep is not None else "n/a")]
                    + [esc(value_ci(test, k)) for k in ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1")]
                    + [esc(f"{counts.get('scans', 'n/a')} / {counts.get('subjects', 'n/a')}")]
                    + [esc(v) for v in _run_costs(rep, path)] + [flag])
        classes.append(cls)
    out = [table(["arm", "train data", "AUC [CI]", "balanced acc. [CI]", "sensitivity [CI]", "specificity [CI]",
                   "F1 [CI]", "test scans / subjects", "round", "round wall", "received / round", "privacy: epsilon",
                   "test set"],
                 rows, classes, raw=True)]
    if any(classes):
        out.append(note("Rows marked DIFFERENT were evaluated on another test set: their numbers cannot be compared "
                         "with this run's. A comparison is only valid on the same test split.", "alarm"))
    if not others:
        out.append(f'<p class="note">No other arms found under {esc(ctx.root / "baselines")}'
                   f"{' or the --compare folders' if ctx.compare else ''}. Add them with:</p>"
                   f"<pre>{esc(baseline_hint(ctx.root))}</pre>"
                   f"<p class=\"note\">then re-render with <code>fedpd report {esc(ctx.root)}</code>.</p>")
    return "".join(out)


# --- saliency


def _pick_scans(test: pd.DataFrame, threshold: float, k: int) -> list[tuple[pd.Series, str]]:
    """Deterministic picks: most PD-like PD, most control-like control, most PD-like control, least PD-like PD, ..."""
    keys = ["score", "image_id"] if "image_id" in test.columns else ["score"]
    rows = test.sort_values(keys, ascending=[False, True][:len(keys)], kind="stable")
    pd_rows, ctl_rows = rows[rows["label"] == 1], rows[rows["label"] == 0]
    order = []
    if len(pd_rows):
        order.append((pd_rows.iloc[0], "highest-scoring PD scan"))
    if len(ctl_rows):
        order.append((ctl_rows.iloc[-1], "lowest-scoring control scan"))
    if len(ctl_rows):
        order.append((ctl_rows.iloc[0], "highest-scoring control scan"))
    if len(pd_rows):
        order.append((pd_rows.iloc[-1], "lowest-scoring PD scan"))
    rest = rows.assign(margin=(rows["score"] - threshold).abs()).sort_values("margin", ascending=False, kind="stable")
    order += [(r, "next most confident scan") for _, r in rest.iterrows()]
    picked, seen = [], set()
    for row, why in order:
        key = row.get("image_id", row.name)
        if key not in seen:
            seen.add(key)
            picked.append((row, why))
        if len(picked) >= k:
            break
    return picked


def _load_model(ctx: _Run):
    from common.config import RunConfig
    from common.learning.model import model_from_checkpoint

    ckpt = RunDir.load_checkpoint(ctx.root / "model.pt")
    cfg = RunConfig.from_mapping(ckpt["config"])
    return model_from_checkpoint(ckpt, ctx.root / "model.pt").eval(), cfg, ckpt


def _section_saliency(ctx: _Run) -> str:
    if ctx.saliency_scans <= 0:
        return note("Saliency overlays were not requested (saliency_scans = 0).")
    test = ctx.test
    if test is None:
        return note("No test rows in predictions.csv: no scans to explain.")
    if not (ctx.root / "model.pt").is_file():
        return note(f"{ctx.root / 'model.pt'} is missing: saliency needs the selected model.")
    from common.device import runtime

    model, cfg, ckpt = _load_model(ctx)
    threshold = num(ckpt.get("threshold"))
    threshold = threshold if threshold is not None else (ctx.threshold if ctx.threshold is not None else 0.5)
    rt = runtime(amp=False)
    model = model.to(rt.device)
    background = "template" if ctx.phantom else "scan"
    # the run's record of how its scans were prepared (common.preprocessing.provenance): registered to MNI152?
    registered = (ckpt.get("preparation") or {}).get("method") == "fedpd-preprocess"
    out = []
    # nilearn calls gc.collect() for every image it reads (about 20 per overlay); with torch, MONAI and
    # nilearn loaded each takes ~0.3 s. Freezing the objects alive now makes those collections cheap;
    # unfreeze() below hands them back to the collector, so nothing is kept alive longer.
    gc.freeze()
    try:
        for row, why in _pick_scans(test, threshold, ctx.saliency_scans):
            out.append(_saliency_figure(ctx, model, cfg, rt, row, why, threshold, background, registered))
    finally:
        gc.unfreeze()
    if registered:
        bg_note = ("MNI152 template background (the scans were registered to it by fedpd preprocess)"
                   if background == "template" else
                   "background: the scan itself, registered to the MNI152 template by fedpd preprocess")
    else:
        bg_note = ("MNI152 template background (phantom scans are generated in MNI space; aligned by world "
                   "coordinates only)" if background == "template" else
                   "background: the scan itself, as the model saw it (not registered to a template by fedpd)")
    out.append(note(f"Grad-CAM (common/learning/saliency.py) of the selected model for {len(out)} test scan(s), chosen "
                     f"deterministically from predictions.csv; {bg_note}. A saliency map shows where the model looked, "
                     "not that the region is pathological."))
    return "".join(out)


def _saliency_figure(ctx: _Run, model, cfg, rt, row: pd.Series, why: str, threshold: float, background: str,
                     registered: bool = False) -> str:
    """One overlay with its caption, or a note saying why there is none (missing scan, failed map)."""
    from common.learning.saliency import FEATURE_STRIDE, TARGET_LAYER, overlay_png, preprocess_scan, saliency_map

    image_id = str(row.get("image_id", row.name))
    label = CLASS_NAMES[int(row["label"])]
    score = float(row["score"])
    decision = CLASS_NAMES[int(score >= threshold)]
    caption = (f"{image_id} (subject {row.get('subject_id', '?')}, site {row.get('site', '?')}; {why}): true "
               f"{label}, P(PD) = {score:.3f}, decision {decision} at threshold {threshold:.3f}"
               f"{'' if label == decision else ' - MISCLASSIFIED'}.")
    raw_path = row.get("path", "")
    path = Path(str(raw_path)) if isinstance(raw_path, str) and raw_path else None
    if path is None or not path.is_file():
        return f'<div class="scan">{note(f"{caption} Scan file not found ({path}): no overlay.", "caution")}</div>'
    try:
        image = preprocess_scan(path, cfg.input_shape, cfg.spacing)
        sal = saliency_map(model, image.as_tensor()[None], rt, class_idx=int(decision == "PD"))
        name = f"saliency-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in image_id)}.png"
        png = overlay_png(image, sal, ctx.figures / name, title=f"{image_id}: true {label}, P(PD) {score:.3f}, "
                          f"decision {decision}", background=background, registered=registered,
                          caption=f"Grad-CAM on {TARGET_LAYER} (1/{FEATURE_STRIDE} resolution), evidence for {decision}.")
        img = _embed(ctx, Path(png).read_bytes(), name, f"saliency overlay of {image_id}")
        return (f'<figure class="scan">{img}<figcaption>{esc(caption)} Map: evidence for {decision}.'
                f"</figcaption></figure>")
    except Exception as exc:  # one bad scan must not lose the others
        log.warning("saliency for %s failed: %s", image_id, exc)
        return f'<div class="scan">{note(f"{caption} Overlay failed: {type(exc).__name__}: {exc}", "error")}</div>'


def _section_provenance(ctx: _Run) -> str:
    r = ctx.report
    rows = [("device", r.device if r.device is not None else "n/a"), ("git commit", r.git_commit),
            ("rounds run", r.rounds)] + [(k, v) for k, v in r.config.items()]
    return table(("key", "value"), [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in rows])


# (id, title, renderer); the banner has no title (its first line is the page's first line)
SECTIONS: tuple[tuple[str, str, Callable[[_Run], str]], ...] = (
    ("data-source", "", _section_banner),
    ("summary", "Summary", _section_summary),
    ("cohort", "Cohort per site and class", _section_cohort),
    ("split-audit", "Split audit", _section_split_audit),
    ("curves", "Training curves per round", _section_curves),
    ("test-metrics", "Test metrics (selected model, 95 % CI)", _section_test_metrics),
    ("roc", "ROC curve", _section_roc),
    ("confusion", "Confusion matrix", _section_confusion),
    ("calibration", "Calibration", _section_calibration),
    ("per-site", "Test metrics per site", _section_per_site),
    ("participation", "Site participation per round", _section_participation),
    ("comparison", "Comparison with other arms", _section_comparison),
    ("saliency", "Saliency overlays (test scans)", _section_saliency),
    ("provenance", "Run configuration and provenance", _section_provenance),
)
SECTION_IDS = tuple(s[0] for s in SECTIONS)




def render_report(run_root: Path, compare: Sequence[Path] = (), saliency_scans: int = 3) -> Path:
    """Write ``<run>/report.html`` and ``<run>/figures/*.png`` from a finished run folder.

    Args:
        run_root: the run folder (holds ``report.json``; ``rounds.jsonl``, ``predictions.csv`` and
            ``model.pt`` are used when present).
        compare: further folders whose ``report.json`` files (the folder's own, or in sub-folders up to
            3 levels deep) become rows of the comparison table, besides ``<run>/baselines/``.
        saliency_scans: how many test scans get a Grad-CAM overlay (0 for none).

    Returns:
        The path of ``report.html``.

    Raises:
        DataError: ``report.json`` is missing or not a JSON object (nothing to render).
        Any other failure is confined to its section, which then shows an error note.
    """
    start = time.perf_counter()
    root = Path(run_root)
    report_path = root / "report.json"
    report = load_report(report_path)
    ctx = _Run(root=root, report=report, rounds=[], preds=None, compare=tuple(Path(c) for c in compare),
               saliency_scans=int(saliency_scans), figures=root / FIGURES_DIR)
    try:
        ctx.rounds = RunDir(root).read_rounds()
    except (OSError, DataError) as exc:
        ctx.problems.append(f"rounds.jsonl unreadable: {exc}")
    try:
        ctx.preds = _read_predictions(root / "predictions.csv")
    except Exception as exc:  # a malformed CSV: every section that needs it says so
        ctx.problems.append(f"predictions.csv unreadable: {exc}")
    ctx.figures.mkdir(parents=True, exist_ok=True)

    parts = []
    grid = ("roc", "confusion", "calibration")  # side by side on a wide screen
    for sid, title, render in SECTIONS:
        try:
            body = render(ctx)
        except Exception as exc:  # confine any failure to its own section
            log.warning("report section %s failed: %s: %s", sid, type(exc).__name__, exc)
            body = note(f"This section could not be rendered: {type(exc).__name__}: {exc}", "error")
        heading = f"<h2>{esc(title)}</h2>" if title else ""
        section = f'<section id="{sid}">{heading}{body}</section>'
        if sid in grid:
            section = ('<div class="grid">' if sid == grid[0] else "") + section + ("</div>" if sid == grid[-1] else "")
        parts.append(section)
    problems = "".join(note(p, "error") for p in ctx.problems)
    name = report.arm
    doc = page(f"fedpd report: {root.name} ({name}, {ctx.source} data)", parts[0] + problems + "".join(parts[1:]),
               f"Rendered by fedpd common/report/render.py on {dt.datetime.now().isoformat(timespec='seconds')} from "
               f"{esc(report_path)}. Re-render: <code>fedpd report {esc(root)}</code>.")
    out = root / REPORT_HTML
    atomic_write_text(out, doc)
    log.info("report.html written to %s (%.1fs)", out, time.perf_counter() - start)
    return out
