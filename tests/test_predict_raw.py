"""``fedpd predict`` on a raw scan of a run trained on ``fedpd preprocess`` output (issue item 5).

A run records how its scans were prepared (``preparation``, :mod:`common.preprocessing.provenance`), and
predict gives a raw scan that same preparation: N4, affine registration to MNI152, brain mask and QC at the
run's settings. Checked on a native-space (scanner-space) phantom scan at 3 mm, preprocessed at 4 mm by the
real ``fedpd preprocess`` command (SimpleITK, nilearn's template; nothing mocked): predict on the raw scan
gives the probability that ``predict --preprocessed`` gives on the preprocess output. A noise volume fails
the QC and is refused with exit code 2; a checkpoint without the record refuses raw scans.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from common.cli import main
from common.cohort.manifest import read_manifest
from common.config import RunConfig
from common.errors import DataError
from common.inference.predict import format_result, predict_scan
from common.learning.model import build_med3d
from common.preprocessing.provenance import PREPROCESS_JSON, scan_preparation

try:
    from test_predict import PNG_MAGIC, write_checkpoint, write_model_pt
except ImportError:  # run as a package
    from tests.test_predict import PNG_MAGIC, write_checkpoint, write_model_pt

TEMPLATE_MM = 4
# the 4 mm template grid is 45 x 54 x 45 voxels (180 x 216 x 180 mm): at 8 mm about 23 x 27 x 23
CFG = RunConfig.from_mapping({"input-shape": "24,28,24", "spacing": "8.0,8.0,8.0", "model-depth": 10,
                              "dropout": 0.2, "out-dir": "/tmp/unused"}).to_dict()

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A native-space phantom scan, its ``fedpd preprocess`` output (4 mm), and a model.pt whose record says so."""
    from simulation.phantom import generate_phantom

    root = tmp_path_factory.mktemp("raw-predict")
    with contextlib.redirect_stderr(io.StringIO()):
        generate_phantom(root / "download", subjects=4, sites=1, shape=64, seed=2, dicom_fraction=0.1, space="native")
    scan = sorted((root / "download").rglob("*.nii.gz"))[0]  # 3 x 3 x 3.6 mm, scanner pose, skull and neck
    pd.DataFrame([{"image_id": "I1", "subject_id": "S1", "visit": "BL", "label": 1, "site": "A",
                   "path": str(scan)}]).to_csv(root / "raw.csv", index=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["preprocess", str(root / "raw.csv"), "--out", str(root / "mni"), "--template-mm",
                     str(TEMPLATE_MM), "--workers", "1"]) == 0
    rows = read_manifest(root / "mni" / "manifest.csv")
    record = scan_preparation(rows["path"])  # what the server and the baselines record for these scans
    torch.manual_seed(0)
    ckpt = write_checkpoint(root / "run", build_med3d(10, dropout=0.2).eval(), config=CFG, preparation=record)
    model_pt = write_model_pt(root / "run", ckpt, threshold=0.5)
    return {"root": root, "raw": scan, "mni": Path(rows["path"].iloc[0]), "record": record, "model_pt": model_pt,
            "ckpt": ckpt}


def test_the_record_says_how_the_scans_were_preprocessed(prepared):
    record = prepared["record"]
    settings = json.loads((prepared["root"] / "mni" / PREPROCESS_JSON).read_text())["settings"]
    assert record["method"] == "fedpd-preprocess" and record["folders"] == [str(prepared["root"] / "mni")]
    assert record["settings"]["template_mm"] == TEMPLATE_MM and record["settings"]["n4"] is True
    assert record["settings"]["qc_threshold"] == settings["qc_threshold"]
    assert record["settings"]["pipeline_version"] == settings["pipeline_version"]
    assert "workers" not in record["settings"] and "simpleitk" in record["versions"]
    assert torch.load(prepared["model_pt"], weights_only=True)["preparation"] == record


def test_raw_scan_gives_the_probability_of_its_preprocessed_output(prepared, capsys):
    png = prepared["root"] / "figs" / "raw.png"
    assert main(["predict", str(prepared["model_pt"]), str(prepared["raw"]), "--json", "--saliency", str(png)]) == 0
    raw = json.loads(capsys.readouterr().out)
    given = predict_scan(prepared["model_pt"], prepared["mni"], preprocessed=True)

    assert raw["probability"] == pytest.approx(given["probability"], abs=1e-4)
    prep = raw["preparation"]
    assert prep["applied"] == "fedpd preprocess" and prep["settings"]["template_mm"] == TEMPLATE_MM
    assert prep["qc"]["correlation"] >= prep["settings"]["qc_threshold"]
    assert any("prepared as the run's scans were" in n for n in raw["notes"])
    assert given["preparation"]["applied"] == "given"
    assert any("lies on the template grid" in n for n in given["notes"])
    assert "N4, registered to MNI152, brain mask, QC passed" in format_result(raw)
    # the figure lies on the registered scan: auto puts the map on it (both are in template space)
    assert png.read_bytes()[:8] == PNG_MAGIC and raw["saliency"]["background"] == "scan"


def test_raw_scan_as_given_is_not_what_the_model_was_trained_on(prepared):
    """Without the preparation the raw head goes in unregistered: --preprocessed on it warns loudly."""
    result = predict_scan(prepared["model_pt"], prepared["raw"], preprocessed=True)
    assert any("does NOT lie on the run's template grid" in n for n in result["notes"])


def test_a_scan_failing_the_runs_qc_is_refused(prepared, capsys):
    noise = prepared["root"] / "noise.nii.gz"
    rng = np.random.default_rng(7)
    nib.save(nib.Nifti1Image(rng.normal(100, 30, (48, 48, 40)).astype(np.float32), np.diag([4.0, 4, 4, 1])),
             str(noise))
    assert main(["predict", str(prepared["model_pt"]), str(noise)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedpd predict: error: ") and str(noise) in captured.err and not captured.out
    assert "fails the run's preprocessing QC" in captured.err and "< qc_threshold" in captured.err


def test_a_checkpoint_without_the_record_refuses_raw_scans(prepared, tmp_path, capsys):
    old = dict(torch.load(prepared["model_pt"], weights_only=True))
    del old["preparation"]  # as fedpd wrote it before runs recorded their preparation
    torch.save(old, tmp_path / "model.pt")
    assert main(["predict", str(tmp_path / "model.pt"), str(prepared["raw"])]) == 2
    err = capsys.readouterr().err
    assert "records no scan preparation" in err and "--preprocessed" in err

    result = predict_scan(tmp_path / "model.pt", prepared["mni"], preprocessed=True)
    assert result["preparation"]["applied"] == "given"
    assert any("records no scan preparation" in n for n in result["notes"])
    given = predict_scan(prepared["model_pt"], prepared["mni"], preprocessed=True)
    assert result["probability"] == pytest.approx(given["probability"], abs=1e-6)


# --- the record from the scans' folders --------------------------------------------------------------------

def test_scans_without_preprocess_json_are_recorded_as_none(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    record = scan_preparation([tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "y.nii.gz", tmp_path / "a" / "z.nii.gz"])
    assert record == {"method": "none", "folders": [str(tmp_path / "a"), str(tmp_path / "b")]}


def test_scans_prepared_two_ways_are_refused(prepared, tmp_path):
    mni = prepared["root"] / "mni"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DataError, match="1 folder.* that fedpd preprocess wrote .* and 1 that it did not"):
        scan_preparation([prepared["mni"], other / "x.nii.gz"])
    info = json.loads((mni / PREPROCESS_JSON).read_text())
    shutil.copy(mni / PREPROCESS_JSON, other / PREPROCESS_JSON)
    same = scan_preparation([prepared["mni"], other / "x.nii.gz"])  # same settings: one record, both folders
    assert same["settings"] == prepared["record"]["settings"] and len(same["folders"]) == 2
    info["settings"]["n4"] = False
    (other / PREPROCESS_JSON).write_text(json.dumps(info))
    with pytest.raises(DataError, match="different settings .*n4"):
        scan_preparation([prepared["mni"], other / "x.nii.gz"])
