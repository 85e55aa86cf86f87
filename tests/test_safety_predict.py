"""Bad input to ``fedpd predict`` and ``fedpd check-checkpoint``, through the command line (issue 12).

Every refusal: exit code 2, ``fedpd <cmd>: error: <file>: <what is wrong>; <the fix>`` on stderr, no
traceback, nothing on stdout, every input file unchanged (sha256), and no model run when the refusal
could be made up front.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common.cli import main  # noqa: E402
from common.inference import predict as predict_mod  # noqa: E402
from common.inference.predict import is_fedpd_png  # noqa: E402
from common.learning.model import build_med3d  # noqa: E402
from common.learning.saliency import PNG_SOFTWARE  # noqa: E402

try:
    from ckpt_utils import random_backbone_state, write_official
    from test_predict import PNG_MAGIC, _bad_scan, head_scan, write_checkpoint, write_model_pt
except ImportError:  # run as a package
    from tests.ckpt_utils import random_backbone_state, write_official
    from tests.test_predict import PNG_MAGIC, _bad_scan, head_scan, write_checkpoint, write_model_pt

ROOT = Path(__file__).resolve().parents[1]
FIX = "choose another --saliency path"

torch.set_num_threads(2)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained-run model.pt (threshold 0.5, phantom source), one good scan, and their checksums."""
    root = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    ckpt = write_checkpoint(root / "run", build_med3d(10, dropout=0.2).eval())
    model_pt = write_model_pt(root / "run", ckpt, threshold=0.5)
    scan = head_scan(root / "scan.nii.gz")
    return {"root": root, "model_pt": model_pt, "scan": scan}


@pytest.fixture
def no_model_run(monkeypatch):
    """Fail the test if predict gets as far as loading the checkpoint or preprocessing the scan."""
    def boom(*a, **k):
        raise AssertionError("predict did work before refusing its input")
    monkeypatch.setattr(predict_mod, "load_predictor", boom)
    monkeypatch.setattr(predict_mod, "preprocess_scan", boom)


def refused(capsys, argv, *words, command="predict"):
    """Run the CLI in-process; assert a clean exit-2 refusal containing ``words``; return stderr."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith(f"fedpd {command}: error: "), err
    assert "Traceback" not in err and not out
    for w in words:
        assert str(w) in err, (w, err)
    return err


def other_png(path: Path) -> Path:
    """A PNG that fedpd did not write (matplotlib's own Software chunk)."""
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# -------------------------------------------------------------------- 1. --saliency never overwrites inputs


@pytest.mark.parametrize("which", ["scan", "checkpoint", "scan-relative", "checkpoint-symlink", "scan-hardlink"])
def test_saliency_onto_an_input_is_refused_before_any_work(run, tmp_path, capsys, monkeypatch, no_model_run, which):
    sums = {p: sha256(p) for p in (run["scan"], run["model_pt"])}
    monkeypatch.chdir(run["root"])
    if which == "scan":
        out, role = run["scan"], "is the scan"
    elif which == "checkpoint":
        out, role = run["model_pt"], "is the checkpoint"
    elif which == "scan-relative":
        (run["root"] / "sub").mkdir(exist_ok=True)
        out, role = Path("sub/../scan.nii.gz"), "is the scan"
    elif which == "checkpoint-symlink":
        out, role = tmp_path / "fig.png", "is the checkpoint"
        out.symlink_to(run["model_pt"])
    else:
        out, role = tmp_path / "fig.png", "is the scan"
        os.link(run["scan"], out)
    refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out], f"error: {out}: ", role, FIX)
    assert {p: sha256(p) for p in sums} == sums


@pytest.mark.parametrize("kind", ["other-png", "nifti", "csv", "csv-named-png", "folder"])
def test_saliency_onto_an_existing_file_fedpd_did_not_write_is_refused(run, tmp_path, capsys, no_model_run, kind):
    if kind == "other-png":
        out = other_png(tmp_path / "figure.png")
    elif kind == "nifti":
        out = head_scan(tmp_path / "other_scan.nii.gz", seed=3)
    elif kind in ("csv", "csv-named-png"):
        out = tmp_path / ("table.csv" if kind == "csv" else "table.png")
        out.write_text("image_id,label\n1,PD\n")
    else:
        out = tmp_path / "figs.png"
        out.mkdir()
    before = sha256(out) if out.is_file() else None
    words = ["is a folder"] if kind == "folder" else ["already exists and is not a saliency figure fedpd wrote"]
    refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out], f"error: {out}: ", *words, FIX)
    assert (sha256(out) if out.is_file() else None) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left behind


def test_saliency_png_carries_the_fedpd_mark_and_may_be_overwritten(run, tmp_path, capsys):
    sums = {p: sha256(p) for p in (run["scan"], run["model_pt"])}
    out = tmp_path / "new" / "deeper" / "saliency.png"  # missing folders are created
    argv = ["predict", str(run["model_pt"]), str(run["scan"]), "--saliency", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"saliency:       {out}" in printed
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and is_fedpd_png(out)
    assert b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in data
    assert not is_fedpd_png(other_png(tmp_path / "mpl.png")) and not is_fedpd_png(run["scan"])

    os.utime(out, (0, 0))
    assert main(argv) == 0  # an earlier fedpd figure is replaced
    capsys.readouterr()
    assert out.stat().st_mtime > 0 and is_fedpd_png(out)
    assert {p: sha256(p) for p in sums} == sums


# ------------------------------------------------------------ 2. folders: missing, blocked by a file, unwritable


@pytest.mark.parametrize("below", ["out.png", "sub/out.png"])
def test_saliency_under_a_file_is_refused(run, tmp_path, capsys, no_model_run, below):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("notes\n")
    before = sha256(blocker)
    out = blocker / below
    refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out],
            f"error: {out}: {blocker} is a file, not a folder", FIX)
    assert sha256(blocker) == before and blocker.is_file()


def test_saliency_in_an_unwritable_folder_is_refused(run, tmp_path, capsys, no_model_run):
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing; /sys refuses new files even to root
        if not Path("/sys").is_dir():
            pytest.skip("running as root without /sys: no unwritable folder to test with")
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    try:
        for out in (locked / "out.png", locked / "missing" / "out.png"):
            refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out],
                    f"error: {out}: cannot write in {locked}", FIX)
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o755)
    assert not (locked / "missing").exists()


def test_a_failed_write_of_the_figure_is_a_clean_error(run, tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(predict_mod, "overlay_png", full_disk)
    out = tmp_path / "sal.png"
    refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out],
            f"error: {out}: the figure could not be written (No space left on device)", FIX)


def test_saliency_must_be_a_png_name_and_help_says_the_rules(run, tmp_path, capsys, no_model_run):
    out = tmp_path / "sal.nii.gz"
    refused(capsys, ["predict", run["model_pt"], run["scan"], "--saliency", out], f"{out}: ", "ending in .png")
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "missing folders are created" in text and "never overwritten" in text


# --------------------------------------------------------------------- 3. check-checkpoint refuses NaN/Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_check_checkpoint_refuses_nan_inf_weights(tmp_path, capsys, bad):
    state = {k: v.clone() for k, v in random_backbone_state(10, seed=2).items()}
    state["conv1.weight"].view(-1)[:7] = bad
    state["layer3.0.bn2.weight"][2] = -bad
    path = write_official(state, tmp_path / "resnet_10_23dataset.pth")
    before = sha256(path)
    refused(capsys, ["check-checkpoint", path], f"error: {path}: 2 tensor(s) hold 8 NaN/Inf value(s)",
            "conv1.weight (7)", "layer3.0.bn2.weight (1)", "re-download the checkpoint", command="check-checkpoint")
    assert sha256(path) == before

    good = write_official(random_backbone_state(10, seed=2), tmp_path / "good.pth")
    assert main(["check-checkpoint", str(good)]) == 0
    assert "OK: loads exactly into Med3D depth 10" in capsys.readouterr().out


def test_predict_refuses_a_model_with_nan_weights_up_front(run, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(run["model_pt"], map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    ckpt["state_dict"]["backbone.layer1.0.conv1.weight"].view(-1)[:2] = float("nan")
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    monkeypatch.setattr(predict_mod, "preprocess_scan", lambda *a, **k: pytest.fail("the model ran"))
    refused(capsys, ["predict", path, run["scan"]], f"error: {path}: 1 weight tensor(s) hold NaN/Inf values",
            "backbone.layer1.0.conv1.weight (2)", "use another round's checkpoint or re-run the training")


# -------------------------------------------------------------------- 4. scans that are no whole-head T1


@pytest.mark.parametrize("kind, words", [
    ("scout", ["has only 3 voxel(s) along one axis", "scout", "give the whole-head T1 series"]),
    ("constant", ["is a constant image (every voxel = 100)", "re-export the scan"]),
    ("missing", ["scan file not found; check the path"]),
    ("folder", ["is a folder; give one NIfTI file"]),
    ("not-nifti", ["cannot be read as NIfTI", "re-download or re-convert it"]),
    ("nan", ["has 1 NaN/Inf voxels", "replace them"]),
    ("4d", ["is 4D with 2 volumes", "give one 3D volume"]),
    ("empty", ["has no voxel > 0"]),
    ("2d", ["has 2 dimensions"]),
])
def test_predict_refuses_a_bad_scan_before_running_the_model(run, tmp_path, capsys, monkeypatch, kind, words):
    scan = _bad_scan(kind, tmp_path)
    before = sha256(scan) if scan.is_file() else None
    ckpt_sum = sha256(run["model_pt"])
    monkeypatch.setattr(predict_mod, "preprocess_scan", lambda *a, **k: pytest.fail("the model ran"))
    out = tmp_path / "sal.png"
    refused(capsys, ["predict", run["model_pt"], scan, "--saliency", out], f"error: {scan.absolute()}: ", *words)
    assert (sha256(scan) if scan.is_file() else None) == before and sha256(run["model_pt"]) == ckpt_sum
    assert not out.exists()


def test_console_script_refuses_without_traceback(run, tmp_path):
    """The real ``fedpd`` entry point in a fresh process: saliency onto the scan, and a scout."""
    fedpd = ROOT / ".venv" / "bin" / "fedpd"
    cmd = [str(fedpd)] if fedpd.exists() else [sys.executable, "-m", "common.cli"]
    scout = _bad_scan("scout", tmp_path)
    sums = {p: sha256(p) for p in (run["scan"], run["model_pt"], scout)}
    for argv, words in (
        (["predict", run["model_pt"], run["scan"], "--saliency", run["scan"]], ["is the scan", FIX]),
        (["predict", run["model_pt"], scout], ["scout", "give the whole-head T1 series"]),
    ):
        res = subprocess.run(cmd + [str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res
        assert res.stderr.startswith("fedpd predict: error: ") and "Traceback" not in res.stderr and not res.stdout
        assert all(w in res.stderr for w in words), res.stderr
    assert {p: sha256(p) for p in sums} == sums
