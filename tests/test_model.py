"""Med3D / MedicalNet ResNet: architecture, exact checkpoint loading, and the errors users see.

No MedicalNet file is available offline, so every checkpoint here is written in the official layout
(``{'state_dict': {'module.<key>': tensor}}``) from a randomised backbone by ``ckpt_utils``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from common.errors import CheckpointError
from common.learning.model import DEPTHS, Med3D, build_med3d, check_checkpoint, load_medicalnet_weights

try:
    from ckpt_utils import random_backbone_state, write_official
except ImportError:  # run as a package
    from tests.ckpt_utils import random_backbone_state, write_official

ROOT = Path(__file__).resolve().parents[1]
R10_TENSORS, R10_NUMBERS, R10_BN = 72, 14_361_292, 12  # resnet_10, shortcut B; 12 BatchNorms

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def r10_state():
    return random_backbone_state(10, seed=1)


@pytest.fixture
def r10_file(tmp_path, r10_state):
    return write_official(r10_state, tmp_path / "resnet_10_23dataset.pth")


# ------------------------------------------------------------------------------------------ architecture


def test_resnet10_state_dict_counts():
    sd = build_med3d(10).backbone.state_dict()
    assert len(sd) == R10_TENSORS
    assert sum(v.numel() for v in sd.values()) == R10_NUMBERS
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == R10_TENSORS - R10_BN == 60
    assert list(sd)[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer2.0.downsample.0.weight" in sd and "layer2.0.downsample.1.running_mean" in sd
    assert not any(k.startswith(("conv_seg", "fc")) for k in sd)


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_forward_shapes_total_stride_8(depth):
    model = build_med3d(depth, num_classes=2).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        fmap = model.backbone(x)
        logits = model.head(fmap)
    width = 512 if depth <= 34 else 2048
    assert fmap.shape == (1, width, 8, 8, 8)
    assert logits.shape == (1, 2)


def test_batch_logits_and_grad_through_shortcut_a():
    model = build_med3d(18, num_classes=3, dropout=0.5)  # shortcut A by default
    x = torch.randn(2, 1, 16, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize("depth,blocks,width", [(101, [3, 4, 23, 3], 2048), (152, [3, 8, 36, 3], 2048),
                                                (200, [3, 24, 36, 3], 2048)])
def test_deep_variants_construct(depth, blocks, width):
    with torch.device("meta"):  # structure only: no memory, no forward pass
        model = build_med3d(depth)
    bb = model.backbone
    assert [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == blocks
    assert "layer1.0.conv3.weight" in bb.state_dict()
    assert model.head.fc.in_features == width


@pytest.mark.parametrize("depth", DEPTHS)
def test_default_shortcut(depth):
    with torch.device("meta"):
        bb = build_med3d(depth).backbone
    assert bb.shortcut == ("A" if depth in (18, 34) else "B")


def test_shortcut_a_has_no_downsample_parameters():
    a = build_med3d(10, shortcut="A").backbone
    b = build_med3d(10, shortcut="B").backbone
    assert not [k for k in a.state_dict() if "downsample" in k]
    assert not any(p for m in a.modules() if type(m).__name__ == "ZeroPadShortcut"
                   for p in [*m.parameters(), *m.buffers()])
    assert a.layer2[0].downsample is not None  # the shortcut exists, it just holds nothing
    assert [k for k in b.state_dict() if k.startswith("layer2.0.downsample.")] == [
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
        "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
        "layer2.0.downsample.1.num_batches_tracked"]
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in b.parameters())
    y = a.layer2[0].downsample(torch.ones(1, 64, 4, 4, 4))
    assert y.shape == (1, 128, 2, 2, 2) and y[:, 64:].abs().sum() == 0  # zero-padded channels


@pytest.mark.parametrize("depth", [10, 50])
def test_layer_strides_and_dilations(depth):
    with torch.device("meta"):
        bb = build_med3d(depth).backbone
    assert (bb.conv1.kernel_size, bb.conv1.stride, bb.conv1.padding) == ((7, 7, 7), (2, 2, 2), (3, 3, 3))
    assert bb.conv1.in_channels == 1 and bb.conv1.bias is None
    assert (bb.maxpool.kernel_size, bb.maxpool.stride, bb.maxpool.padding) == (3, 2, 1)
    for name, stride, dilation in [("layer1", 1, 1), ("layer2", 2, 1), ("layer3", 1, 2), ("layer4", 1, 4)]:
        for i, block in enumerate(getattr(bb, name)):
            conv = block.conv2 if depth >= 50 else block.conv1  # the 3x3x3 that strides
            assert conv.stride == ((stride,) * 3 if i == 0 else (1, 1, 1)), (name, i)
            assert conv.dilation == (dilation,) * 3 and conv.padding == (dilation,) * 3, (name, i)
    assert all(m.bias is None for m in bb.modules() if isinstance(m, nn.Conv3d))


def test_bad_depth_and_shortcut_list_choices():
    with pytest.raises(ValueError, match="10, 18, 34, 50, 101, 152, 200"):
        build_med3d(11)
    with pytest.raises(ValueError, match="A, B"):
        build_med3d(10, shortcut="C")


# ------------------------------------------------------------------------------------------ loading


def test_official_resnet10_loads_every_tensor(r10_file, r10_state, caplog):
    with caplog.at_level(logging.INFO, logger="fedpd.model"):
        model = build_med3d(10, pretrained=r10_file)
    assert isinstance(model, Med3D)
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(r10_state) and len(loaded) == R10_TENSORS
    assert all(torch.equal(loaded[k], r10_state[k]) for k in r10_state)
    assert f"loaded {R10_TENSORS} tensors (14,361,292 numbers) from {r10_file}" in caplog.text


def test_file_without_num_batches_tracked_loads(tmp_path, r10_state):
    path = write_official(r10_state, tmp_path / "old.pth", drop_num_batches_tracked=True)
    assert len(torch.load(path, weights_only=True)["state_dict"]) == 60
    bb = build_med3d(10).backbone
    counts = load_medicalnet_weights(bb, path)
    assert counts == {"tensors": 60, "numbers": R10_NUMBERS - R10_BN}
    loaded = bb.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in r10_state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("prefix,wrap,legacy", [("", True, False), ("module.", False, False), ("", False, False),
                                                ("module.", True, True)])
def test_other_layouts_load(tmp_path, r10_state, prefix, wrap, legacy):
    path = write_official(r10_state, tmp_path / "x.pth", prefix=prefix, wrap=wrap, legacy=legacy)
    bb = build_med3d(10).backbone
    assert load_medicalnet_weights(bb, path)["tensors"] == R10_TENSORS
    assert torch.equal(bb.conv1.weight, r10_state["conv1.weight"])


def test_conv_seg_is_ignored_with_a_log_line(tmp_path, r10_state, caplog):
    state = {**r10_state, "conv_seg.0.weight": torch.zeros(32, 512, 3, 3, 3)}
    path = write_official(state, tmp_path / "finetuned.pth")
    with caplog.at_level(logging.INFO, logger="fedpd.model"):
        counts = load_medicalnet_weights(build_med3d(10).backbone, path)
    assert counts["tensors"] == R10_TENSORS
    assert "conv_seg" in caplog.text


def test_module_prefix_is_stripped_only_at_the_start(tmp_path, r10_state):
    state = {**r10_state, "layer1.module.conv1.weight": torch.zeros(1)}
    path = write_official(state, tmp_path / "odd.pth")  # -> module.layer1.module.conv1.weight
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): layer1\.module\.conv1\.weight"):
        build_med3d(10, pretrained=path)


def test_missing_key(tmp_path, r10_state):
    state = {k: v for k, v in r10_state.items() if k != "layer3.0.conv2.weight"}
    path = write_official(state, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as err:
        build_med3d(10, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "missing (1): layer3.0.conv2.weight" in msg and "Fix:" in msg


def test_misshaped_key(tmp_path, r10_state):
    state = {**r10_state, "conv1.weight": torch.zeros(64, 3, 7, 7, 7)}  # an RGB stem
    path = write_official(state, tmp_path / "rgb.pth")
    with pytest.raises(CheckpointError) as err:
        build_med3d(10, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "conv1.weight (file [64, 3, 7, 7, 7], model [64, 1, 7, 7, 7])" in msg
    assert "Fix:" in msg


def test_depth50_file_for_depth10_suggests_50(tmp_path):
    path = write_official(random_backbone_state(50), tmp_path / "resnet_50.pth")
    with pytest.raises(CheckpointError) as err:
        build_med3d(10, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "unexpected (246)" in msg and "and 236 more" in msg  # long lists are cut at 10
    assert "mis-shaped (19): layer1.0.conv1.weight (file [64, 64, 1, 1, 1], model [64, 64, 3, 3, 3])" in msg
    assert "looks like a depth-50 MedicalNet ResNet (Bottleneck blocks): set model-depth=50" in msg


def test_shortcut_mismatch_says_which(tmp_path):
    path = write_official(random_backbone_state(10, shortcut="B"), tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="shortcut='B'"):
        build_med3d(10, shortcut="A", pretrained=path)


def test_monai_resnet10_does_not_load(tmp_path):
    """MONAI's resnet10 has the same conv shapes but strided (not dilated) layer3/4, downsample biases and
    an ``fc`` head; a ``strict=False`` load would accept it silently. Here it must be refused."""
    from monai.networks.nets import resnet10

    path = write_official(resnet10(spatial_dims=3, n_input_channels=1).state_dict(), tmp_path / "monai.pth")
    with pytest.raises(CheckpointError) as err:
        build_med3d(10, pretrained=path)
    msg = str(err.value)
    assert "unexpected" in msg and "fc.weight" in msg and "layer2.0.downsample.0.bias" in msg
    assert "MONAI" in msg


def test_nifti_is_not_a_checkpoint(tmp_path):
    for name in ("t1.nii.gz", "t1.nii"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
        with pytest.raises(CheckpointError) as err:
            build_med3d(10, pretrained=path)
        msg = str(err.value)
        assert str(path) in msg and ("NIfTI" in msg or "nii.gz" in msg) and "Fix:" in msg
        assert "Traceback" not in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tmp_path, r10_state, legacy):
    path = write_official(r10_state, tmp_path / "resnet_10.pth", legacy=legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        build_med3d(10, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg and "re-download" in msg and "Fix:" in msg


def test_missing_path_text_file_and_tensorless_dict(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file\. Fix: point pretrained-path"):
        build_med3d(10, pretrained=tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth: cannot be read"):
        build_med3d(10, pretrained=text)
    empty = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "state_dict": {}}, empty)
    with pytest.raises(CheckpointError, match=r"meta\.pth: holds .* not a state dict of tensors"):
        build_med3d(10, pretrained=empty)
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: weights_only refuses it
    with pytest.raises(CheckpointError, match=r"module\.pth: .*re-save only the weights"):
        build_med3d(10, pretrained=pickled)


def test_nan_and_inf_weights_are_refused_naming_the_tensors(tmp_path, r10_state):
    state = {k: v.clone() for k, v in r10_state.items()}
    state["conv1.weight"].view(-1)[:3] = float("nan")
    state["layer2.0.bn1.running_var"][0] = float("inf")
    state["layer4.0.conv2.weight"].view(-1)[5] = float("-inf")
    path = write_official(state, tmp_path / "resnet_10_23dataset.pth")
    words = (r"resnet_10_23dataset\.pth: 3 tensor\(s\) hold 5 NaN/Inf value\(s\): conv1\.weight \(3\), "
             r"layer2\.0\.bn1\.running_var \(1\), layer4\.0\.conv2\.weight \(1\); the file is corrupt\. "
             r"Fix: re-download the checkpoint")
    with pytest.raises(CheckpointError, match=words):
        build_med3d(10, pretrained=path)  # the strict loader behind pretrained-path
    with pytest.raises(CheckpointError, match=words):
        load_medicalnet_weights(build_med3d(10).backbone, path)
    with pytest.raises(CheckpointError, match=words):
        check_checkpoint(path)
    seg = {**r10_state, "conv_seg.0.weight": torch.full((2, 2), float("nan"))}  # ignored, so not checked
    assert check_checkpoint(write_official(seg, tmp_path / "seg.pth")).endswith("OK: loads exactly into Med3D depth 10")


# ------------------------------------------------------------------------------------------ check / CLI


def test_check_checkpoint_report(r10_file):
    report = check_checkpoint(r10_file)
    assert f"file: {r10_file}" in report
    assert "depth 10 (BasicBlock blocks [1, 1, 1, 1], shortcut B)" in report
    assert "tensors: 72 (14,361,292 numbers)" in report
    assert report.splitlines()[-1] == "OK: loads exactly into Med3D depth 10"
    with pytest.raises(CheckpointError, match="set model-depth=10"):
        check_checkpoint(r10_file, depth=34)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "common.cli", "check-checkpoint", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_check_checkpoint(tmp_path, r10_file):
    ok = _cli(r10_file)
    assert ok.returncode == 0, ok.stderr
    assert "depth 10 (BasicBlock" in ok.stdout and "tensors: 72 (14,361,292 numbers)" in ok.stdout
    assert "OK: loads exactly into Med3D depth 10" in ok.stdout

    bad = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), bad)
    res = _cli(bad)
    assert res.returncode == 2
    assert res.stderr.startswith("fedpd check-checkpoint: error:") and str(bad) in res.stderr
    assert "Traceback" not in res.stderr


def test_make_model_copies_a_model_it_built_without_sharing_or_leaking_weights():
    """A simulation actor builds a model per message: make_model hands out copies of the first one it built
    (same depth, dropout, seed), bit-identical to a fresh build, never the same tensors."""
    from common.config import RunConfig
    from common.learning.model import build_med3d, make_model

    cfg = RunConfig.from_mapping({"seed": 11})
    first = make_model(cfg)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # a site trains its copy
    second, third = make_model(cfg), make_model(cfg)
    a, b = second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].data_ptr() != b[k].data_ptr() for k in a if a[k].numel())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        fresh = build_med3d(depth=cfg.model_depth, num_classes=2, dropout=cfg.dropout).state_dict()
    assert all(torch.equal(fresh[k], a[k]) for k in a)  # what a fresh build gives: first's training did not leak
    head = [k for k in a if k.endswith("weight") and a[k].dim() == 2][0]
    other = make_model(cfg.replace(seed=12)).state_dict()
    assert not torch.equal(other[head], a[head])  # the seed still decides the initialisation
