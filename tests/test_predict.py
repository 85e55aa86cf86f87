"""``fedpd predict`` (``common/inference/predict.py`` and its CLI): probability, threshold provenance, bad inputs.

A real (tiny-input) Med3D is saved the way the server saves it: ``RunDir.save_checkpoint`` for
``checkpoints/round-<k>.pt``, plus ``threshold``/``selected_round``/``source`` for ``model.pt``. The run's
scans are recorded as not preprocessed by fedpd (``preparation`` ``none``: the scan is used as given) unless
a test says otherwise; tests/test_predict_raw.py covers runs on ``fedpd preprocess`` output.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.cli import main
from common.config import RunConfig
from common.errors import CheckpointError, DataError
from common.inference.predict import format_result, predict_scan
from common.learning.model import build_med3d
from common.learning.transforms import deterministic_transforms
from common.runs.rundir import RunDir

SHAPE, SPACING = (24, 24, 24), (2.0, 2.0, 2.0)
MODEL_ARGS = {"depth": 10, "num_classes": 2, "dropout": 0.2}
CFG = RunConfig.from_mapping({"input-shape": "24,24,24", "spacing": "2.0,2.0,2.0", "model-depth": 10, "dropout": 0.2,
                              "out-dir": "/tmp/unused"}).to_dict()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AS_GIVEN = {"method": "none", "folders": ["/data/mni-phantom"]}  # how the test runs' scans were prepared


def head_scan(path: Path, shape=(20, 22, 18), voxel=2.5, seed=0) -> Path:
    """A 2.5 mm 'head': positive noise with a bright ellipsoid, centred near world 0 (resampled to 2 mm)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum(((g - (s - 1) / 2) / (s / 2.6)) ** 2 for g, s in zip(grid, shape)))
    vol = rng.uniform(5, 30, shape).astype(np.float32)
    vol[r <= 1] = 400 + 40 * rng.standard_normal(int((r <= 1).sum()))
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.array(shape) - 1) / 2
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def write_checkpoint(root: Path, model: torch.nn.Module, round_: int = 3, config: dict | None = None,
                     model_args: dict | None = None, preparation: dict | None = AS_GIVEN) -> Path:
    run = RunDir(root).prepare()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return run.save_checkpoint(round_, state, config=config or CFG, metrics={"round": round_},
                               model=model_args or MODEL_ARGS, strategy={"name": "fedavg", "round": round_},
                               preparation=preparation)


def write_model_pt(root: Path, round_ckpt: Path, **extra) -> Path:
    """``<run>/model.pt`` as the server's finalize step writes it: the round checkpoint plus the extra keys."""
    payload = RunDir.load_checkpoint(round_ckpt) | {"selected_round": 3, "source": "phantom", "arm": "fedavg"} | extra
    path = Path(root) / "model.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One model, its round checkpoint, one scan, and the probability computed directly (no fedpd predict code)."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = build_med3d(10, dropout=0.2).eval()
    ckpt = write_checkpoint(root / "run", model)
    scan = head_scan(root / "scan.nii.gz")
    x = deterministic_transforms(SHAPE, SPACING)({"image": str(scan)})["image"][None]
    with torch.no_grad():
        prob = float(torch.softmax(model(x), dim=1)[0, 1])
    return {"root": root, "model": model, "ckpt": ckpt, "scan": scan, "prob": prob}


@pytest.mark.parametrize("offset", [-0.01, 0.01], ids=["PD", "control"])
def test_model_pt_gives_the_models_probability_and_decides_at_the_stored_threshold(setup, tmp_path, offset):
    threshold = min(max(setup["prob"] + offset, 0.0), 1.0)
    model_pt = write_model_pt(tmp_path, setup["ckpt"], threshold=threshold)
    result = predict_scan(model_pt, setup["scan"])

    assert 0.0 <= result["probability"] <= 1.0
    assert result["probability"] == pytest.approx(setup["prob"], abs=1e-6)
    assert result["threshold"] == pytest.approx(threshold) and result["threshold_source"] == "checkpoint"
    assert result["decision"] == ("PD" if result["probability"] >= threshold else "control")
    assert result["decision"] == ("PD" if offset < 0 else "control")
    assert result["selected_round"] == 3 and result["source"] == "phantom"
    assert result["input_shape"] == list(SHAPE) and result["spacing_mm"] == list(SPACING)
    assert any("phantom" in n and "not a clinical tool" in n for n in result["notes"])
    assert not any("No validated threshold" in n for n in result["notes"])
    assert result["saliency"] is None
    json.dumps(result)  # JSON-ready
    text = format_result(result)
    assert f"PD probability: {result['probability']:.4f}" in text and "stored in the checkpoint" in text


def test_round_checkpoint_takes_the_threshold_from_the_runs_report(setup, tmp_path):
    report = setup["ckpt"].parent.parent / "report.json"
    try:
        report.write_text(json.dumps({"threshold": 0.3, "selected_round": 3, "data": {"source": "ppmi"}}))
        result = predict_scan(setup["ckpt"], setup["scan"])
        assert result["threshold"] == 0.3 and result["threshold_source"] == "report" and result["source"] == "ppmi"
        assert result["decision"] == ("PD" if result["probability"] >= 0.3 else "control")
        assert not any("phantom" in n for n in result["notes"]) and not any("round 5" in n for n in result["notes"])
        assert "from the run's report.json" in format_result(result)

        report.write_text(json.dumps({"threshold": 0.3, "selected_round": 5, "data": {"source": "ppmi"}}))
        notes = predict_scan(setup["ckpt"], setup["scan"])["notes"]
        assert any("for round 5, not for this checkpoint's round 3" in n for n in notes)
    finally:
        report.unlink()


def test_round_checkpoint_without_a_report_uses_0_5_and_says_so(setup):
    assert not (setup["ckpt"].parent.parent / "report.json").exists()
    result = predict_scan(setup["ckpt"], setup["scan"])
    assert result["threshold"] == 0.5 and result["threshold_source"] == "default" and result["source"] == "unknown"
    assert result["decision"] == ("PD" if result["probability"] >= 0.5 else "control")
    assert any(n.startswith("No validated threshold was stored") for n in result["notes"])
    assert "DEFAULT, not validated" in format_result(result)


def _bad_scan(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.nii.gz"
    affine = np.eye(4)
    if kind == "missing":
        return path
    if kind == "folder":
        (folder / "series").mkdir()
        return folder / "series"
    if kind == "not-nifti":
        path.write_text("subject,label\n1,PD\n")
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), affine), str(path))
    elif kind == "nan":
        vol = np.ones((8, 8, 8), np.float32)
        vol[2, 3, 4] = np.nan
        nib.save(nib.Nifti1Image(vol, affine), str(path))
    elif kind == "empty":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), affine), str(path))
    elif kind == "2d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), affine), str(path))
    elif kind == "scout":  # a 3-slice localiser
        nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(1, 100, (32, 32, 3)).astype(np.float32), affine),
                 str(path))
    elif kind == "constant":
        nib.save(nib.Nifti1Image(np.full((16, 16, 16), 100.0, np.float32), affine), str(path))
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", "not found"), ("folder", "is a folder"), ("not-nifti", "cannot be read as NIfTI"),
    ("4d", "4D with 2 volumes"), ("nan", "NaN/Inf"), ("empty", "no voxel > 0"), ("2d", "dimensions"),
    ("scout", "only 3 voxel.* scout"), ("constant", "constant image"),
])
def test_bad_scans_raise_data_error_naming_the_file(setup, tmp_path, kind, words):
    scan = _bad_scan(kind, tmp_path)
    with pytest.raises(DataError, match=words) as err:
        predict_scan(setup["ckpt"], scan)
    assert str(scan.name) in str(err.value)


@pytest.mark.parametrize("kind, words", [
    ("missing", "no such checkpoint"), ("nifti", "not a readable fedpd checkpoint"),
    ("depth", "do not fit Med3D"), ("threshold", "not a probability"), ("config", "stored run-config is not valid"),
    ("no-shape", "stored run-config lacks input-shape"),
    ("nan-weights", r"2 weight tensor\(s\) hold NaN/Inf values: backbone\.conv1\.weight \(4\), head\.fc\.bias \(1\); .*"
                    "use another round's checkpoint or re-run the training"),
])
def test_bad_checkpoints_raise_checkpoint_error_naming_the_file(setup, tmp_path, kind, words):
    path = tmp_path / "model.pt"
    if kind == "nifti":  # a scan given where the checkpoint goes
        head_scan(tmp_path / "scan.nii.gz").rename(path)
    elif kind == "depth":  # depth-10 weights, but the stored model args say 18
        torch.save(RunDir.load_checkpoint(setup["ckpt"]) | {"model": MODEL_ARGS | {"depth": 18}}, path)
    elif kind == "threshold":
        write_model_pt(tmp_path, setup["ckpt"], threshold=1.5)
    elif kind == "config":
        torch.save(RunDir.load_checkpoint(setup["ckpt"]) | {"config": CFG | {"input-shape": "24,24"}}, path)
    elif kind == "no-shape":  # must never be filled in from today's defaults
        config = {k: v for k, v in CFG.items() if k != "input-shape"}
        torch.save(RunDir.load_checkpoint(setup["ckpt"]) | {"config": config}, path)
    elif kind == "nan-weights":  # a diverged round: refused before the model runs
        ckpt = RunDir.load_checkpoint(setup["ckpt"])
        sd = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        sd["backbone.conv1.weight"].view(-1)[:4] = float("nan")
        sd["head.fc.bias"][1] = float("inf")
        torch.save(ckpt | {"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=words) as err:
        predict_scan(path, setup["scan"])
    assert str(path) in str(err.value)


@pytest.mark.parametrize("source, background", [("phantom", "template"), ("ppmi", "scan")])
def test_saliency_overlay_explains_the_decision(setup, tmp_path, source, background):
    model_pt = write_model_pt(tmp_path, setup["ckpt"], threshold=0.5, source=source)
    png = tmp_path / "figs" / "saliency.png"
    result = predict_scan(model_pt, setup["scan"], saliency_png=png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and 10_000 < len(data) < 2_000_000
    sal = result["saliency"]
    assert sal["png"] == str(png.absolute()) and sal["explains"] == result["decision"]
    assert sal["background"] == background and sal["method"] == "Grad-CAM"  # auto: template only for phantom
    assert f"saliency:       {png.absolute()}" in format_result(result)


def test_cli_prints_the_probability_and_exits_2_for_a_bad_scan(setup, tmp_path, capsys):
    model_pt = write_model_pt(tmp_path, setup["ckpt"], threshold=0.5)
    assert main(["predict", str(model_pt), str(setup["scan"])]) == 0
    out = capsys.readouterr().out
    assert f"PD probability: {setup['prob']:.4f}" in out and "not a clinical tool" in out

    assert main(["predict", str(model_pt), str(setup["scan"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["probability"] == pytest.approx(setup["prob"], abs=1e-6) and result["threshold"] == 0.5

    bad = _bad_scan("nan", tmp_path)
    assert main(["predict", str(model_pt), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedpd predict: error: ") and str(bad) in captured.err and not captured.out
