"""The data pipeline: NIfTI -> cached, z-scored tensors -> class-balanced loaders, and its errors.

Synthetic volumes (24^3, 1.5 mm voxels, an ellipsoid "brain" of positive values in a zero background)
are written with nibabel under tmp_path; nothing else is read.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from common.cohort.scans import preflight_scans
from common.errors import DataError
from common.learning.data import build_dataset, class_counts, class_weights, make_loader
from common.learning.transforms import deterministic_transforms, pipeline_fingerprint

SHAPE = (16, 16, 16)
SPACING = (2.0, 2.0, 2.0)
N = 24
AFFINE = np.array([[1.5, 0, 0, -18.0], [0, 1.5, 0, -20.0], [0, 0, 1.5, -15.0], [0, 0, 0, 1]])


def brain(seed: int = 0, n: int = N) -> np.ndarray:
    """An off-centre ellipsoid of values 80..120 in zeros."""
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:n, :n, :n]
    inside = (x - n / 2) ** 2 + (y - n / 2 + 1) ** 2 / 1.4 + (z - n / 2) ** 2 / 0.8 < (n / 3) ** 2
    return (inside * (80 + 40 * rng.random((n, n, n)))).astype(np.float32)


def write(path: Path, data: np.ndarray, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def rows_for(tmp_path: Path, labels, seed: int = 0) -> list[dict]:
    return [{"image_id": f"I{i:03d}", "path": write(tmp_path / f"s{i}.nii.gz", brain(seed + i)), "label": lab}
            for i, lab in enumerate(labels)]


def cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pt"))


def test_output_shape_dtype_and_zscore(tmp_path):
    rows = rows_for(tmp_path, [1])
    item = build_dataset(rows, SHAPE, SPACING, tmp_path / "cache", train=False, seed=0)[0]
    assert set(item) == {"image", "label"}
    image = item["image"]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (1, *SHAPE)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    # Invariant: the output is zero exactly where the resampled, cropped/padded image was <= 0, and over
    # the other voxels (those > 0 before normalisation) it has mean 0 and population std 1.
    steps = deterministic_transforms(SHAPE, SPACING)
    before = steps({"image": rows[0]["path"]}, end=len(steps.transforms) - 2)["image"]
    fg = torch.as_tensor(before) > 0
    assert torch.equal(image != 0, fg)
    assert abs(float(image[fg].mean())) < 1e-4
    assert abs(float(image[fg].std(unbiased=False)) - 1.0) < 1e-4


def test_label_and_other_keys_pass_through_untouched(tmp_path):
    path = write(tmp_path / "a.nii.gz", brain())
    out = deterministic_transforms(SHAPE, SPACING)({"image": path, "label": 7, "note": "x"})
    assert out["label"] == 7 and out["note"] == "x"


def test_lps_file_gives_the_same_tensor_as_ras(tmp_path):
    data = brain(3)
    ras = write(tmp_path / "ras.nii.gz", data)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = N - 1  # voxel i -> N-1-i along x and y: same world position
    lps_affine = AFFINE @ flip
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    lps = write(tmp_path / "lps.nii.gz", np.ascontiguousarray(data[::-1, ::-1, :]), lps_affine)
    steps = deterministic_transforms(SHAPE, SPACING)
    a, b = steps({"image": ras})["image"], steps({"image": lps})["image"]
    assert torch.allclose(a, b, atol=1e-5)


def test_second_epoch_reads_no_nifti_and_cache_holds_the_deterministic_part(tmp_path, monkeypatch):
    rows = rows_for(tmp_path, [0, 1, 0])
    cache = tmp_path / "cache"
    train = build_dataset(rows, SHAPE, SPACING, cache, train=True, seed=1)
    evals = build_dataset(rows, SHAPE, SPACING, cache, train=False, seed=1)
    first = [evals[i]["image"] for i in range(3)]
    _ = [train[i] for i in range(3)]
    files = cache_files(cache)
    assert len(files) == 3 and all(f.parent.name == pipeline_fingerprint(SHAPE, SPACING) for f in files)
    # the cache holds the augmentation-free tensor (train and eval share it), and nothing identifying
    cached = [torch.load(f, weights_only=True) for f in files]
    assert all(set(c) == {"image", "fingerprint"} for c in cached)
    assert all(sum(torch.equal(c["image"], t) for t in first) == 1 for c in cached)

    for r in rows:  # the source files are gone and nibabel is watched: epoch 2 must still work
        os.rename(r["path"], r["path"] + ".moved")
    calls = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    for i in range(3):
        assert torch.equal(evals[i]["image"], first[i])
        assert train[i]["image"].shape == (1, *SHAPE)
    assert calls == [] and len(cache_files(cache)) == 3


def test_changed_shape_or_spacing_uses_another_cache_folder(tmp_path):
    rows = rows_for(tmp_path, [1])
    cache = tmp_path / "cache"
    names = {pipeline_fingerprint(SHAPE, SPACING), pipeline_fingerprint((12, 16, 16), SPACING),
             pipeline_fingerprint(SHAPE, (2.0, 2.0, 1.5))}
    assert len(names) == 3 and pipeline_fingerprint(SHAPE, SPACING) == pipeline_fingerprint([16, 16, 16], [2, 2, 2])
    assert build_dataset(rows, SHAPE, SPACING, cache, False, 0)[0]["image"].shape == (1, 16, 16, 16)
    assert build_dataset(rows, (12, 16, 16), SPACING, cache, False, 0)[0]["image"].shape == (1, 12, 16, 16)
    other = build_dataset(rows, SHAPE, (3.0, 3.0, 3.0), cache, False, 0)[0]["image"]
    assert other.shape == (1, 16, 16, 16)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        pipeline_fingerprint(*a) for a in [(SHAPE, SPACING), ((12, 16, 16), SPACING), (SHAPE, (3, 3, 3))])
    assert all(len(cache_files(p)) == 1 for p in cache.iterdir())


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_changed_file_at_the_same_path_is_recomputed(tmp_path, suffix):
    path = tmp_path / f"scan{suffix}"
    write(path, brain(0))
    rows = [{"image_id": "I1", "path": str(path), "label": 0}]
    cache = tmp_path / "cache"
    old = build_dataset(rows, SHAPE, SPACING, cache, False, 0)[0]["image"]
    stat = os.stat(path)
    write(path, brain(1))  # same shape, so the same size; keep the old mtime too
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size or suffix == ".nii.gz"
    new = build_dataset(rows, SHAPE, SPACING, cache, False, 0)[0]["image"]
    expected = deterministic_transforms(SHAPE, SPACING)({"image": str(path)})["image"]
    assert not torch.equal(new, old) and torch.allclose(new, expected)
    assert len(cache_files(cache)) == 2


def test_cached_affine_grid_changes_no_augmented_voxel():
    """The training pipeline gives the affine augmentation the input shape, so MONAI reuses one sampling grid
    (a speed-up, BENCHMARKS.md): every augmented image is the same, voxel for voxel, as without it."""
    from common.learning.transforms import train_augmentations

    x = torch.rand(1, *SHAPE)
    for seed in range(3):
        plain, cached = train_augmentations(seed), train_augmentations(seed, spatial_size=SHAPE)
        affine = [t for t in cached.transforms if type(t).__name__ == "RandAffined"][0].rand_affine
        assert affine.cache_grid and affine._cached_grid is not None  # the grid is made once, up front
        for _ in range(6):
            assert torch.equal(plain({"image": x.clone()})["image"], cached({"image": x.clone()})["image"])


def test_augmentation_random_per_epoch_deterministic_per_seed(tmp_path):
    rows = rows_for(tmp_path, [1])
    cache = tmp_path / "cache"

    def epochs(seed, train=True, n=3):
        ds = build_dataset(rows, SHAPE, SPACING, cache, train=train, seed=seed)
        return [ds[0]["image"] for _ in range(n)]

    a, b, c = epochs(5), epochs(5), epochs(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same sequence
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[1], a[2])  # differs across epochs
    assert any(not torch.equal(x, y) for x, y in zip(a, c))  # another seed, another sequence
    e = epochs(5, train=False)
    assert torch.equal(e[0], e[1]) and torch.equal(e[1], e[2])

    def loader_epochs(seed, prefetch=False):
        ds = build_dataset(rows * 4, SHAPE, SPACING, cache, train=True, seed=0)
        loader = make_loader(ds, [1] * 4, batch_size=2, class_balancing="none", seed=seed, prefetch=prefetch)
        return [torch.cat([b["image"] for b in loader]) for _ in range(2)]

    x, y = loader_epochs(3), loader_epochs(3)
    assert all(torch.equal(p, q) for p, q in zip(x, y)) and not torch.equal(x[0], x[1])
    # the training loader makes the next batch in a thread: the very same batches, epoch after epoch
    z = loader_epochs(3, prefetch=True)
    assert all(torch.equal(p, q) for p, q in zip(x, z))


class _Labels(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": torch.zeros(1), "label": torch.tensor(self.labels[i])}


def test_balanced_sampler_draws_about_half_and_half():
    labels = [0] * 90 + [1] * 10
    ds = _Labels(labels)
    loader = make_loader(ds, labels, batch_size=10, class_balancing="sampler", seed=0)
    drawn = torch.cat([b["label"] for _ in range(5) for b in loader])
    assert len(drawn) == 500 and 0.42 < float(drawn.float().mean()) < 0.58
    loader = make_loader(ds, labels, 10, "sampler", seed=0)
    again = torch.cat([b["label"] for _ in range(5) for b in loader])
    assert torch.equal(drawn, again)
    plain = torch.cat([b["label"] for b in make_loader(ds, labels, 10, "none", seed=0)])
    assert int(plain.sum()) == 10 and not torch.equal(plain, torch.tensor(labels))  # shuffled, unbalanced
    ordered = torch.cat([b["label"] for b in make_loader(ds, labels, 10, "none", seed=0, shuffle=False)])
    assert torch.equal(ordered, torch.tensor(labels))
    with pytest.raises(ValueError):
        make_loader(ds, labels, 10, "sampler", seed=0, shuffle=False)


def test_class_counts_and_weights():
    rows = [{"image_id": str(i), "path": "x", "label": int(i >= 90)} for i in range(100)]
    assert class_counts(rows) == class_counts(pd.DataFrame(rows)) == {0: 90, 1: 10}
    assert class_weights({0: 90, 1: 10}).tolist() == pytest.approx([0.2, 1.8])
    assert class_weights({0: 5, 1: 5}).tolist() == pytest.approx([1.0, 1.0])
    with pytest.warns(UserWarning, match="class 1 has no training samples"):
        assert class_weights({0: 7, 1: 0}).tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(DataError):
        class_weights({0: 0, 1: 0})


def _truncated(path: Path) -> str:
    write(path, brain())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return str(path)


def _nonfinite(value):
    def make(path: Path) -> str:
        data = brain()
        data[12, 12, 12] = value
        return write(path, data)
    return make


BAD = {
    "missing": (lambda p: str(p), "image file not found"),
    "truncated": (_truncated, "cannot be read as NIfTI"),
    "not-nifti": (lambda p: (p.write_bytes(b"not an image " * 50), str(p))[1], "cannot be read as NIfTI"),
    "4d": (lambda p: write(p, np.stack([brain(), brain(1)], axis=-1)), "give one 3D volume"),
    "all-zero": (lambda p: write(p, np.zeros((N, N, N), np.float32)), "no voxel > 0"),
    "nan": (_nonfinite(np.nan), "NaN/Inf voxels"),
    "inf": (_nonfinite(np.inf), "NaN/Inf voxels"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_data_error_and_keeps_the_cache_clean(tmp_path, kind):
    make, fix = BAD[kind]
    good = rows_for(tmp_path, [0, 1])
    bad_path = make(tmp_path / f"bad-{kind}.nii.gz")
    rows = good + [{"image_id": "BAD7", "path": bad_path, "label": 1}]
    cache = tmp_path / "cache"
    ds = build_dataset(rows, SHAPE, SPACING, cache, train=True, seed=0)
    ds[0], ds[1]
    with pytest.raises(DataError, match=fix) as info:
        ds[2]
    assert "image_id BAD7" in str(info.value) and bad_path in str(info.value)
    assert len(cache_files(cache)) == 2  # the good scans' files kept, nothing for the bad one
    with pytest.raises(DataError, match=fix):  # a DataLoader surfaces the same error
        list(make_loader(ds, [0, 1, 1], batch_size=3, class_balancing="none", seed=0))
    with pytest.raises(DataError, match=fix):  # and so does training's loader, which makes batches in a thread
        list(make_loader(ds, [0, 1, 1], batch_size=1, class_balancing="none", seed=0, shuffle=False, prefetch=True))
    assert len(cache_files(cache)) == 2


def test_prefetch_thread_error_is_raised_not_taken_for_the_end_of_the_epoch(tmp_path):
    """A scan that fails in the prefetch thread stops training with its error. MONAI's own ThreadDataLoader
    (which fedpd does not use for this reason) prints the error and ends the epoch early, with no error."""
    from monai.data import ThreadDataLoader

    from common.learning.data import PrefetchLoader

    rows = rows_for(tmp_path, [0, 1]) + [{"image_id": "GONE", "path": str(tmp_path / "gone.nii.gz"), "label": 1}]
    ds = build_dataset(rows, SHAPE, SPACING, tmp_path / "cache", train=True, seed=0)
    ours = make_loader(ds, [0, 1, 1], batch_size=1, class_balancing="none", seed=0, shuffle=False, prefetch=True)
    assert isinstance(ours, PrefetchLoader)
    seen = []
    with pytest.raises(DataError, match="image_id GONE.*image file not found"):
        for batch in ours:
            seen.append(batch)
    assert len(seen) == 2  # the two good scans came first, in order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = list(ThreadDataLoader(ds, batch_size=1, shuffle=False))  # the error is only printed
    assert len(theirs) == 2


def test_single_volume_4d_is_accepted(tmp_path):
    path = write(tmp_path / "one.nii.gz", brain()[..., None])
    rows = [{"image_id": "I1", "path": path, "label": 0}]
    assert build_dataset(rows, SHAPE, SPACING, tmp_path / "c", False, 0)[0]["image"].shape == (1, *SHAPE)


def test_preflight_lists_every_bad_row_at_once(tmp_path):
    good = rows_for(tmp_path, [0, 1])
    assert preflight_scans(good) == 2  # no complaint
    short = tmp_path / "short.nii"
    write(short, brain())
    short.write_bytes(short.read_bytes()[:5000])
    bad = [{"image_id": "M1", "path": str(tmp_path / "gone.nii.gz"), "label": 0},
           {"image_id": "G1", "path": BAD["not-nifti"][0](tmp_path / "junk.nii.gz"), "label": 1},
           {"image_id": "F1", "path": BAD["4d"][0](tmp_path / "four.nii.gz"), "label": 1},
           {"image_id": "T1", "path": str(short), "label": 0}]
    with pytest.raises(DataError) as info:
        preflight_scans(good + bad)
    msg = str(info.value)
    assert msg.startswith("4 of 6 scan(s)")
    for row, what in zip(bad, ["not found", "cannot be read as NIfTI", "one 3D volume", "truncated"]):
        line = next(ln for ln in msg.splitlines() if f"image_id {row['image_id']}:" in ln)
        assert row["path"] in line and what in line
    assert "I000" not in msg and "I001" not in msg


def test_rows_need_ids_paths_and_valid_labels(tmp_path):
    with pytest.raises(DataError, match="missing path"):
        build_dataset([{"image_id": "A", "label": 0}], SHAPE, SPACING, tmp_path, False, 0)
    with pytest.raises(DataError, match="image_id A: label 2"):
        build_dataset([{"image_id": "A", "path": "x", "label": 2}], SHAPE, SPACING, tmp_path, False, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_dataset(rows_for(tmp_path, [0]), SHAPE, SPACING, tmp_path / "c", False, 0)) == 1
