"""Grad-CAM saliency and its overlay (``common/learning/saliency.py``): geometry, faithfulness, the PNG.

Real MONAI, torch, nibabel and nilearn on tiny volumes (24^3-48^3); nothing is mocked or downloaded.
"""

from __future__ import annotations

from collections import OrderedDict

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from monai.data import MetaTensor
from torch import nn

from common.device import runtime
from common.learning.model import build_med3d
from common.learning.saliency import head_mask, overlay_png, preprocess_scan, saliency_map
from common.learning.transforms import deterministic_transforms

RT = runtime(amp=False, requested="cpu")


def head_volume(shape=(32, 32, 32), radius=10.0, seed=0) -> np.ndarray:
    """Positive noise (an MR background) with a bright ball holding a dark, enclosed 'ventricle'."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum((g - (s - 1) / 2) ** 2 for g, s in zip(grid, shape)))
    vol = rng.uniform(0.05, 0.3, shape).astype(np.float32)
    vol[r <= radius] = 1.0 + 0.1 * rng.standard_normal(int((r <= radius).sum()))
    vol[r <= radius / 3] = 0.25
    return vol


class LocalNet(nn.Module):
    """A classifier shaped like Med3D (``backbone.layer4`` at stride 8, centres on 8k, pooled linear head) whose
    receptive field is only 19 voxels, with positive weights and no biases: a zero region adds nothing, so
    the PD log-odds depends only on where the input is non-zero."""

    def __init__(self, channels: int = 2):
        super().__init__()

        def conv(cin, k, s, p):
            c = nn.Conv3d(cin, channels, k, stride=s, padding=p, bias=False)
            nn.init.constant_(c.weight, 1.0 / (cin * k ** 3))
            return c

        self.backbone = nn.Sequential(OrderedDict(
            stem=nn.Sequential(conv(1, 7, 2, 3), nn.ReLU(), conv(channels, 3, 2, 1), nn.ReLU()),
            layer4=nn.Sequential(conv(channels, 3, 2, 1), nn.ReLU())))
        fc = nn.Linear(channels, 2)
        with torch.no_grad():
            fc.weight.copy_(torch.stack([torch.zeros(channels), torch.ones(channels)]))  # PD logit = pooled sum
            fc.bias.zero_()
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1), fc)

    def forward(self, x):
        return self.head(self.backbone(x))


def pd_log_odds(model, x) -> float:
    with torch.no_grad():
        logits = model(x)
    return float(logits[0, 1] - logits[0, 0])


def test_saliency_peaks_where_occlusion_changes_the_logit():
    model = LocalNet().eval()
    x = torch.zeros(1, 1, 32, 32, 32)
    x[0, 0, 6:11, 14:19, 22:27] = 1.0  # patch A, centred on input voxel (8, 16, 24) = layer4 voxel (1, 2, 3)
    x[0, 0, 22:27, 6:11, 6:11] = 0.4  # patch B, weaker, centred on (24, 8, 8) = layer4 voxel (3, 1, 1)
    sal = saliency_map(model, x, RT, class_idx=1, mask_background=False)
    assert sal.shape == (32, 32, 32) and sal.dtype == np.float32 and np.isfinite(sal).all()
    assert sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    # Grad-CAM peaks on A's layer4 centre: an axis swap, a flip or MONAI's default (align_corners=False)
    # upsampling, which shifts the map by 3.5 voxels, would all move it.
    assert tuple(int(i) for i in np.unravel_index(sal.argmax(), sal.shape)) == (8, 16, 24)

    # Occlusion computed directly: zero the 8^3 cell around each layer4 centre, see how far the PD log-odds moves.
    base = pd_log_odds(model, x)
    effect, cell_mean = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    for i, j, k in np.ndindex(4, 4, 4):
        cell = tuple(slice(max(8 * n - 4, 0), 8 * n + 4) for n in (i, j, k))
        occluded = x.clone()
        occluded[0, 0][cell] = 0.0
        effect[i, j, k] = abs(base - pd_log_odds(model, occluded))
        cell_mean[i, j, k] = sal[cell].mean()
    a, b = (1, 2, 3), (3, 1, 1)
    assert set(zip(*np.nonzero(effect))) == {a, b} and effect[a] > effect[b]  # the logit depends on A and B only
    assert cell_mean[a] == cell_mean.max() and cell_mean[a] > cell_mean[b] > cell_mean[effect == 0].mean()


def test_med3d_saliency_is_the_class_activation_map_and_leaves_the_model_alone():
    """With Med3D's pooled linear head, Grad-CAM of the PD log-odds is relu(sum_c (w_PD - w_control)_c A_c)
    (Zhou et al.'s CAM); layer4 voxel k sits on input voxel 8k, so the map must equal it there."""
    torch.manual_seed(0)
    model = build_med3d(10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.as_tensor(head_volume((24, 24, 24), radius=8))[None, None]
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        feats = model.eval().backbone(x)[0]
        w = model.head.fc.weight
        z = torch.einsum("c,cdhw->dhw", w[1] - w[0], feats).numpy()
    model.train()
    maps = {}
    for class_idx, score in ((1, z), (0, -z)):
        sal = saliency_map(model, x, RT, class_idx=class_idx, mask_background=False)
        expected = np.maximum(score, 0)
        expected = expected / expected.max() if expected.max() > 0 else expected
        assert sal.shape == (24, 24, 24) and np.isfinite(sal).all() and 0 <= sal.min() <= sal.max() <= 1
        np.testing.assert_allclose(sal[::8, ::8, ::8], expected, atol=1e-4)
        maps[class_idx] = sal
    favoured = max(maps, key=lambda c: np.unique(maps[c]).size)
    assert np.unique(maps[favoured]).size > 10  # not constant

    masked = saliency_map(model, x, RT, class_idx=favoured)  # default: masked to the head, scaled inside it
    assert not masked[~head_mask(x[0, 0].numpy())].any() and masked.max() == pytest.approx(1.0)
    # the hooks went on a copy: no hooks left, same weights, same training flag
    assert model.training and not model.backbone.layer4._forward_hooks and not model.backbone.layer4._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_saliency_rejects_bad_inputs():
    model = build_med3d(10)
    with pytest.raises(ValueError, match=r"\[1, 1, D, H, W\]"):
        saliency_map(model, torch.zeros(1, 16, 16, 16), RT)
    with pytest.raises(ValueError, match="layer5"):
        saliency_map(model, torch.zeros(1, 1, 16, 16, 16), RT, target_layer="backbone.layer5")


def test_head_mask_keeps_the_head_with_its_ventricle_and_drops_the_noise():
    vol = head_volume((32, 32, 32), radius=10)
    grid = np.indices(vol.shape)
    r = np.sqrt(sum((g - 15.5) ** 2 for g in grid))
    mask = head_mask(vol)
    truth = r <= 10
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97
    assert mask[r <= 3].all()  # the dark enclosed centre is filled in
    assert not head_mask(np.zeros((8, 8, 8))).any()


def write_scan(path, vol, affine) -> str:
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(path))
    return str(path)


def test_preprocess_scan_equals_the_pipeline_and_keeps_world_coordinates(tmp_path):
    # LPS-like 1.5 mm file: the pipeline reorients to RAS, resamples to 2 mm, crops and pads.
    affine = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 25.0], [0, 0, 1.5, -18.0], [0, 0, 0, 1]])
    vol = head_volume((28, 30, 26), radius=9)
    vol[4:7, 8:11, 15:18] = 6.0  # a bright marker off the centre
    path = write_scan(tmp_path / "scan.nii.gz", vol, affine)
    shape, spacing = (24, 24, 24), (2.0, 2.0, 2.0)

    img = preprocess_scan(path, shape, spacing)
    assert isinstance(img, MetaTensor) and tuple(img.shape) == (1, *shape)
    reference = deterministic_transforms(shape, spacing)({"image": path})["image"]
    assert torch.equal(img.as_tensor(), reference)

    def marker_world(v, a):
        idx = np.argwhere(v >= v.max() * 0.5).mean(axis=0)
        return (np.asarray(a, dtype=np.float64) @ np.array([*idx, 1.0]))[:3]

    out = img[0].numpy()
    np.testing.assert_allclose(marker_world(out, img.affine), marker_world(vol, affine), atol=1.5)


def warm_pixels(png) -> int:
    """Pixels of the 'hot' colour map's red-orange range inside the slice panels (not the colour bar)."""
    rgb = imread(str(png))[..., :3]
    panel = rgb[: int(rgb.shape[0] * 0.8), : int(rgb.shape[1] * 0.85)]
    return int(((panel[..., 0] > 0.7) & (panel[..., 1] < 0.6) & (panel[..., 2] < 0.3)).sum())


@pytest.mark.parametrize("background", ["template", "scan"])
def test_overlay_png_draws_the_map_in_world_space(tmp_path, background):
    affine = np.array([[2.0, 0, 0, -31.0], [0, 2.0, 0, -31.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])  # around MNI 0
    path = write_scan(tmp_path / "scan.nii.gz", head_volume((32, 32, 32), radius=12), affine)
    img = preprocess_scan(path, (32, 32, 32), (2.0, 2.0, 2.0))
    sal = np.zeros((32, 32, 32), np.float32)
    sal[12:20, 12:20, 12:20] = np.linspace(0.3, 1.0, 8)[None, None, :]

    out = overlay_png(img, sal, tmp_path / "figs" / "sal.png", title="test overlay", background=background)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 2_000_000
    assert imread(str(out)).shape[:2] == (400, 900)
    assert warm_pixels(out) > 50  # the map is drawn over the background

    if background == "scan":  # the warm pixels above are the map's, not the background's or the text's
        empty = overlay_png(img, np.zeros_like(sal), tmp_path / "empty.png", background=background)
        assert warm_pixels(empty) == 0


def test_overlay_png_rejects_shape_mismatch_missing_affine_and_unknown_background(tmp_path):
    vol = head_volume((16, 16, 16), radius=5)
    with pytest.raises(ValueError, match="shape"):
        overlay_png(vol, np.zeros((8, 8, 8)), tmp_path / "a.png", affine=np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        overlay_png(vol, np.zeros((16, 16, 16)), tmp_path / "a.png")
    with pytest.raises(ValueError, match="background"):
        overlay_png(vol, np.zeros((16, 16, 16)), tmp_path / "a.png", affine=np.eye(4), background="atlas")
    assert not (tmp_path / "a.png").exists()
