"""The HTML run report (``common/report/render.py``), rendered by ``finalize_run`` on a real, tiny run folder.

No Flower: the run folder is built the way the server builds it (``RunDir.save_checkpoint`` of a Med3D,
``RunDir.append_round``) on 16^3 NIfTI scans, and ``finalize_run`` runs for real (it evaluates the scans,
writes report.json / predictions.csv / model.pt and renders report.html). Two runs: a phantom one, and a
"real" (ppmi) one flagged as split by scan and leave-one-site-out.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from common.cli import main
from common.config import RunConfig
from common.device import runtime
from common.learning.model import make_model
from common.report.render import SECTION_IDS, render_report
from common.runs.finalize import finalize_run
from common.runs.records import RoundRecord
from common.runs.rundir import RunDir
from tests.data_factory import write_nifti

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL_ARGS = {"depth": 10, "num_classes": 2, "dropout": 0.0}


def _cfg(out: Path) -> RunConfig:
    return RunConfig.from_mapping({"input-shape": "16,16,16", "spacing": "1.0,1.0,1.0", "model-depth": 10,
                                   "dropout": 0.0, "out-dir": str(out), "num-workers": 0, "batch-size": 8,
                                   "amp": False})


def _rows(folder: Path, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Server val and test rows over three sites; site 30's test scans are all PD (its AUC is undefined)."""
    spec = [  # (split, subject, site, label, scans)
        ("val", "v1", "10", 0, 2), ("val", "v2", "10", 1, 1), ("val", "v3", "20", 0, 1), ("val", "v4", "20", 1, 2),
        ("test", "t1", "10", 0, 1), ("test", "t2", "10", 1, 2), ("test", "t3", "20", 0, 2), ("test", "t4", "20", 1, 1),
        ("test", "t5", "30", 1, 1), ("test", "t6", "30", 1, 1),
    ]
    rows, seed = [], 0
    for split, subject, site, label, scans in spec:
        for k in range(scans):
            seed += 1
            image_id = f"I{seed:03d}"
            path = write_nifti(folder / f"{image_id}.nii.gz", shape=(16, 16, 16), seed=seed)
            rows.append({"image_id": image_id, "subject_id": subject, "site": site, "label": label,
                         "path": str(path), "split": split, "source": source})
    df = pd.DataFrame(rows)
    return (df[df["split"] == "val"].reset_index(drop=True), df[df["split"] == "test"].reset_index(drop=True))


def _audit(val: pd.DataFrame, test: pd.DataFrame) -> dict:
    strata = [{"split": split, "label": int(label), "site": str(site), "subjects": int(g["subject_id"].nunique()),
               "scans": len(g)} for (split, label, site), g in pd.concat([val, test]).groupby(["split", "label", "site"])]
    splits = {name: {"subjects": int(r["subject_id"].nunique()), "scans": len(r),
                     "labels": {str(c): {"subjects": int(r.loc[r["label"] == c, "subject_id"].nunique()),
                                         "scans": int((r["label"] == c).sum())} for c in (0, 1)}}
              for name, r in (("val", val), ("test", test))}
    return {"total": {"subjects": 10, "scans": len(val) + len(test)}, "splits": splits, "strata": strata,
            "subjects_shared_across_splits": 0}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _build_run(root: Path, source: str, data_extra: dict, extra: dict, block_figures: bool = False):
    """Checkpoints, rounds.jsonl and finalize_run for real; returns (run folder, report, log messages)."""
    run = RunDir(root / "run").prepare()
    cfg = _cfg(run.root)
    val, test = _rows(root / "scans", source)
    for r, auc in ((1, 0.6), (2, 0.8)):
        model = make_model(cfg.replace(seed=r))
        run.save_checkpoint(r, {k: v.numpy() for k, v in model.state_dict().items()}, config=cfg.to_dict(),
                            metrics={"round": r}, model=MODEL_ARGS)
        run.append_round(RoundRecord.from_dict({"round": r, "train_loss": 0.7 - 0.1 * r, "num_examples": 20,
                          "sites": {s: {"num-examples": 10, "train-loss": 0.7 - 0.05 * r * i,
                                        "class-count-0": 4, "class-count-1": 6} for i, s in enumerate(("10", "20"), 1)},
                          "missing_sites": [], "failures": [], "rejected": [],
                          "val": {"auc": auc, "balanced_accuracy": 0.5 + r / 10, "loss": 0.7 - r / 20},
                          "wall_seconds": 1.0 + r, "received_bytes": 1_000_000 * (50 + r)}))
    if block_figures:  # a file where figures/ should go: render_report fails, finalize_run must not
        (run.root / "figures").write_text("not a folder")
    data = {"server_split_audit": _audit(val, test),
            "site_train_counts": {"10": {"control": 4, "pd": 6, "num_examples": 10, "round": 2},
                                  "20": {"control": 4, "pd": 6, "num_examples": 10, "round": 2}}} | data_extra
    handler = _Records()
    logging.getLogger("fedpd.finalize").addHandler(handler)
    try:
        report = finalize_run(run, cfg, runtime(amp=False), val, test, run.root / "cache",
                              extra={"data": data} | extra, arm="fedavg", render=render_report)
    finally:
        logging.getLogger("fedpd.finalize").removeHandler(handler)
    return run.root, report, handler.messages


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root, report, _ = _build_run(tmp_path_factory.mktemp("phantom"), "phantom", {}, {
        "participation": {"1": {"trained": ["10", "20"], "missing": [], "not_sampled": [], "rejected": [], "failed": []},
                          "2": {"trained": ["10"], "missing": ["20"], "not_sampled": [], "rejected": [], "failed": []}}})
    return root, report


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A 'real' run flagged unsafe + holdout, whose first render fails (figures/ is a file); then re-rendered."""
    root, report, messages = _build_run(tmp_path_factory.mktemp("real"), "ppmi", {"unsafe_scan_split": True},
                                        {"holdout_site": "30"}, block_figures=True)
    failed_html = (root / "report.html").exists()
    (root / "figures").unlink()
    rc = main(["report", str(root), "--saliency-scans", "1"])  # re-render from the command line
    return root, report, messages, failed_html, rc


class _Visible(HTMLParser):
    """Visible text of a page (not head, title, style or script)."""

    def __init__(self):
        super().__init__()
        self.skip, self.text = 0, []

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("head", "title", "style", "script")

    def handle_endtag(self, tag):
        self.skip -= tag in ("head", "title", "style", "script")

    def handle_data(self, data):
        if not self.skip and data.strip():
            self.text.append(data.strip())


def _first_line(page: str) -> str:
    parser = _Visible()
    parser.feed(page)
    return parser.text[0]


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z-]+)">(.*?)</section>', page, flags=re.S))


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


def test_finalize_run_renders_every_section_without_errors(phantom):
    root, _ = phantom
    page = (root / "report.html").read_text()
    sections = _sections(page)
    assert list(sections) == list(SECTION_IDS)
    for sid, body in sections.items():
        assert _text(body), f"section {sid} is empty"
        assert 'class="error"' not in body, f"section {sid} failed: {_text(body)[:300]}"
    assert "2 of 2" in _text(sections["summary"])  # round 2 has the higher validation AUC
    assert 'class="selected"' in sections["curves"] and "selected round" in _text(sections["curves"]).lower()
    metrics = _text(sections["test-metrics"])
    assert "ROC AUC" in metrics and "95 % CI" in metrics and "Youden" in metrics
    share = 5 / 8  # PD share of the 8 test scans: the all-PD baseline accuracy
    assert f"{share:.3f}" in metrics and "misleads" in metrics
    assert "Subjects shared across splits: 0" in _text(sections["split-audit"])
    assert "missing" in _text(sections["participation"]) and "1 of 2 round(s)" in _text(sections["participation"])


@pytest.mark.parametrize("which", ["phantom", "real"])
def test_first_visible_line_names_the_data_source(which, phantom, real):
    root = (phantom if which == "phantom" else real)[0]
    first = _first_line((root / "report.html").read_text())
    if which == "phantom":
        assert "PHANTOM" in first and "not a clinical result" in first and "PPMI" not in first
    else:
        assert "REAL DATA" in first and "PPMI" in first and "phantom" not in first.lower()


def test_figures_are_embedded_and_saved_as_png(phantom):
    root, _ = phantom
    page = (root / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 5
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r'(href|src)="(https?:|file:|/)', page) and "<link" not in page and "@import" not in page
    names = {p.name for p in (root / "figures").glob("*.png")}
    assert {"roc.png", "confusion.png", "calibration.png", "curves.png"} <= names
    assert len([n for n in names if n.startswith("saliency-")]) == 3
    for png in (root / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    saliency = _text(_sections(page)["saliency"])
    assert "true PD" in saliency and "true control" in saliency and "P(PD)" in saliency and "decision" in saliency


def test_nan_metrics_render_as_na(phantom):
    root, report = phantom
    assert report.test_per_site["30"]["auc"]["value"] != report.test_per_site["30"]["auc"]["value"]  # NaN
    page = (root / "report.html").read_text()
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", _sections(page)["per-site"], flags=re.S)
    site30 = [_text(r) for r in rows if _text(r).startswith("30 ")]
    assert site30 and "n/a" in site30[0] and "nan" not in site30[0].lower()
    assert not re.search(r"\bnan\b", _text(page), flags=re.I)


def test_unsafe_split_and_holdout_are_flagged_and_a_failed_render_keeps_report_json(real):
    root, report, messages, failed_html, rc = real
    # the first render failed (figures/ was a file): report.json is complete, the failure is a warning
    assert not failed_html
    assert json.loads((root / "report.json").read_text())["test"]["n"]["value"] == report.test["n"]["value"] == 8
    assert any("report.html not rendered" in m and "fedpd report" in m for m in messages)
    assert rc == 0  # fedpd report re-rendered it
    page = (root / "report.html").read_text()
    banner = _sections(page)["data-source"]
    assert 'id="unsafe-split-warning"' in banner and "INFLATED" in banner and "by SCAN" in banner
    assert "Leave-one-site-out" in _text(banner) and "site 30" in _text(banner)
    assert "alarm" in _sections(page)["split-audit"]


def test_no_unsafe_warning_when_not_flagged(phantom):
    page = (phantom[0] / "report.html").read_text()
    assert "unsafe-split-warning" not in page and "holdout-note" not in page


def _arm(run: Path, folder: Path, arm: str, test_ids: list[str] | None, counts: dict | None = None, auc=0.9) -> None:
    report = json.loads((run / "report.json").read_text()) | {"arm": arm}
    report["test"] = dict(report["test"]) | {"auc": {"value": auc, "ci95": [auc - 0.1, min(1.0, auc + 0.1)]}}
    if counts:
        report["test_counts"] = counts
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report))
    if test_ids is not None:
        pd.DataFrame({"split": "test", "image_id": test_ids, "label": 1, "score": 0.5}).to_csv(
            folder / "predictions.csv", index=False)


def test_comparison_lists_arms_and_flags_a_different_test_set(phantom, tmp_path, capsys):
    root, _ = phantom
    page = (root / "report.html").read_text()
    alone = _text(_sections(page)["comparison"])
    assert "fedavg" in alone and "fedpd baseline --mode centralized|local|scratch" in alone
    ids = pd.read_csv(root / "predictions.csv", dtype={"image_id": str}).query("split == 'test'")["image_id"].tolist()
    try:
        _arm(root, root / "baselines" / "centralized", "centralized", ids, auc=0.91)
        _arm(root, root / "baselines" / "local" / "10", "local:10", ids[:-1] + ["I999"], auc=0.77)
        _arm(root, tmp_path / "other" / "scratch", "scratch", None, counts={"scans": 3, "subjects": 3}, auc=0.66)
        assert main(["report", str(root), "--compare", str(tmp_path / "other"), "--saliency-scans", "0"]) == 0
        assert capsys.readouterr().out.strip().endswith("report.html")
        comp = _sections((root / "report.html").read_text())["comparison"]
        rows = {(_text(r).split(" ")[0]): (r, _text(r)) for r in re.findall(r"<tr[^>]*>.*?</tr>", comp, flags=re.S)}
        assert {"fedavg", "centralized", "local:10", "scratch"} <= set(rows)
        assert "0.910" in rows["centralized"][1] and "same test scans" in rows["centralized"][1]
        # this run's mean bytes received per round (51 and 52 MB in rounds.jsonl); the copied arms have no rounds
        assert "51.5 MB" in rows["fedavg"][1] and "MB" not in rows["centralized"][1]
        assert 'class="differs"' not in rows["centralized"][0]
        for arm in ("local:10", "scratch"):
            assert 'class="differs"' in rows[arm][0] and "DIFFERENT test set" in rows[arm][1]
        assert "only valid on the same test split" in _text(comp)
        assert "fedpd baseline --mode" not in _text(comp)
    finally:
        shutil.rmtree(root / "baselines", ignore_errors=True)


def test_missing_scan_and_broken_inputs_show_notes_not_failures(phantom, tmp_path):
    root, _ = phantom
    run = tmp_path / "run"
    run.mkdir()
    for name in ("report.json", "rounds.jsonl", "model.pt"):
        shutil.copy(root / name, run / name)
    preds = pd.read_csv(root / "predictions.csv", dtype={"image_id": str, "subject_id": str, "site": str})
    preds.loc[preds["split"] == "test", "path"] = str(tmp_path / "gone.nii.gz")
    preds.to_csv(run / "predictions.csv", index=False)
    html = render_report(run, saliency_scans=2)
    sections = _sections(html.read_text())
    assert "Scan file not found" in _text(sections["saliency"])
    assert 'class="error"' not in html.read_text()
    (run / "predictions.csv").write_text("garbage without the columns\n1\n")
    (run / "model.pt").unlink()
    sections = _sections(render_report(run).read_text())
    assert list(sections) == list(SECTION_IDS)
    assert 'class="error"' in sections["roc"] and 'class="error"' in sections["calibration"]
    assert "PHANTOM" in _text(sections["data-source"]) and "0.800" in _text(sections["curves"])
    assert "predictions.csv" in _text(sections["saliency"])


def test_cli_report_without_report_json_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "report.json" in capsys.readouterr().err
