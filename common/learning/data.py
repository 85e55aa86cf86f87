"""From manifest rows to batches: cached dataset, class-balanced loaders.

Cache layout (one folder per site, from the node-config ``cache-dir``)::

    <cache-dir>/<pipeline_fingerprint(input_shape, spacing)>/<item hash><transform-name hash>.pt

- ``<pipeline_fingerprint>`` (:func:`common.learning.transforms.pipeline_fingerprint`) changes with any
  transform class or parameter, the input shape, the spacing, ``PIPELINE_VERSION`` or the library
  versions, so a changed pipeline never reads a stale tensor. Old folders are left alone (never
  deleted by fedpd): remove them by hand when disk runs short.
- ``<item hash>`` is MONAI's ``pickle_hashing`` of ``{"image": <absolute path>, "fingerprint":
  <size:mtime_ns:sha256 of the first and last 64 KiB>}``. An edited or overwritten file at the same
  path has another fingerprint, hence another cache file. Fingerprints are taken when the dataset is
  built (once per :func:`build_dataset` call), so within one dataset object later epochs read no
  NIfTI at all; a file edited mid-run is picked up by the next :func:`build_dataset`.
- ``<transform-name hash>`` is MONAI's ``hash_transform=json_hashing``, which for our transform
  objects falls back to hashing their class names; the parameters are covered by the folder name.

A cache file holds only the preprocessed image (a plain float32 tensor) and the fingerprint: no
label, no image id. Train and eval datasets with the same shape/spacing share cache files; training
applies its random augmentations after reading the cache. MONAI writes each file to a temporary folder
and moves it into place, and writes nothing when a transform fails, so a bad scan leaves no cache
file and the other scans' files are kept.

Items are ``{"image": FloatTensor[1, D, H, W], "label": int64 tensor}``: no paths or ids, so nothing
identifying leaves the site in a batch. Evaluation keeps row order (``shuffle=False``) and maps
predictions back to rows by position inside the site.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from monai.data import DataLoader, PersistentDataset
from monai.data.thread_buffer import ThreadBuffer
from monai.data.utils import json_hashing, pickle_hashing
from torch.utils.data import WeightedRandomSampler

from common.errors import ConfigError, DataError
from common.keys import CLASS_BALANCING, NUM_CLASSES
from common.learning.transforms import build_pipeline, pipeline_fingerprint

__all__ = ["ScanDataset", "PrefetchLoader", "build_dataset", "file_fingerprint", "class_counts", "class_weights",
           "make_loader"]

_EDGE_BYTES = 64 * 1024  # hashed at each end of a file for its fingerprint
_REQUIRED = ("image_id", "path", "label")


def _records(rows) -> list[dict]:
    """Rows as a list of dicts (a pandas DataFrame is converted); checks the required keys."""
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else [dict(r) for r in rows]
    for i, rec in enumerate(records):
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise DataError(f"row {i} ({rec.get('image_id', '?')}): missing {', '.join(missing)}; rows need "
                            f"{', '.join(_REQUIRED)} (read them with common.cohort.manifest.read_manifest)")
    return records


def _label(rec: Mapping[str, Any]) -> int:
    try:
        value = int(rec["label"])
        ok = float(rec["label"]) == value and 0 <= value < NUM_CLASSES
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"image_id {rec['image_id']}: label {rec['label']!r} must be 0 (control) or 1 (PD); "
                        "fix the manifest row")
    return value


def file_fingerprint(path) -> str | None:
    """``"<size>:<mtime_ns>:<sha256 of first+last 64 KiB, 16 hex>"``, or ``None`` if the file is missing.

    The ends cover the NIfTI header and, for ``.nii.gz``, the gzip trailer (CRC32 and length of the
    whole uncompressed image), so a rewrite is caught even when size and mtime are kept.
    """
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            head = fh.read(_EDGE_BYTES)
            if st.st_size > 2 * _EDGE_BYTES:
                fh.seek(-_EDGE_BYTES, os.SEEK_END)
            tail = fh.read(_EDGE_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    digest = hashlib.sha256(head + tail).hexdigest()[:16]
    return f"{st.st_size}:{st.st_mtime_ns}:{digest}"


def _find_data_error(exc: BaseException | None) -> DataError | None:
    """The first DataError in an exception's cause/context chain (MONAI wraps transform errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class ScanDataset(PersistentDataset):
    """A ``PersistentDataset`` over scans that returns ``{"image", "label"}`` and reports bad scans.

    Build it with :func:`build_dataset`. ``data`` holds ``{"image": path, "fingerprint": ...}`` (the
    hashed cache key); labels and image ids are kept beside it, never in the cache.
    """

    def __init__(self, items: list[dict], labels: list[int], image_ids: list[str], transform, cache_dir: Path,
                 seed: int):
        super().__init__(data=items, transform=transform, cache_dir=cache_dir, hash_func=pickle_hashing,
                         hash_transform=json_hashing)
        # hash_transform calls transform.flatten(), whose new Compose re-seeds every random transform from
        # MONAI's global seed: seed them again so a dataset is reproducible for its seed.
        self.transform.set_random_state(seed=int(seed))
        self.labels = list(labels)
        self.image_ids = list(image_ids)

    def _transform(self, index: int) -> dict:
        item = self.data[index]
        if item["fingerprint"] is None:  # missing when built: look again, never cache under "missing"
            fingerprint = file_fingerprint(item["image"])
            if fingerprint is None:
                raise DataError(f"image_id {self.image_ids[index]}: {item['image']}: image file not found; "
                                "restore the file or fix the manifest's path column (or drop the row)")
            self.data[index] = item = {**item, "fingerprint": fingerprint}
        try:
            out = super()._transform(index)
        except Exception as exc:
            err = _find_data_error(exc)
            if err is None:
                raise
            msg = str(err) if item["image"] in str(err) else f"{item['image']}: {err}"
            raise DataError(f"image_id {self.image_ids[index]}: {msg}") from err
        image = out["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return {"image": image.to(torch.float32).contiguous(),
                "label": torch.tensor(self.labels[index], dtype=torch.int64)}


def build_dataset(rows, input_shape: Sequence[int], spacing: Sequence[float], cache_dir, train: bool,
                  seed: int) -> ScanDataset:
    """A cached dataset over manifest rows (see the module docstring for the cache layout).

    Args:
        rows: dicts or a DataFrame with at least ``image_id``, ``path`` (absolute; a relative path is
            taken from the current folder) and ``label`` (0/1).
        input_shape: voxels ``(D, H, W)`` fed to the network.
        spacing: voxel size in mm.
        cache_dir: this site's cache root (node-config ``cache-dir``).
        train: add the random augmentations of :func:`common.learning.transforms.train_augmentations`.
        seed: their seed (run seed + site index).

    Raises:
        DataError: a row without the required keys or with a bad label, or an unwritable cache folder.
            Problems with an image file are raised when that item is first loaded (run
            :func:`common.cohort.scans.preflight_scans` to learn them all up front).
    """
    records = _records(rows)
    labels = [_label(r) for r in records]
    paths = [str(Path(str(r["path"])).expanduser().absolute()) for r in records]
    items = [{"image": p, "fingerprint": file_fingerprint(p)} for p in paths]
    root = Path(cache_dir).expanduser() / pipeline_fingerprint(input_shape, spacing)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {root} ({exc.strerror or exc}); set the node-config "
                        "cache-dir to a writable folder") from exc
    transform = build_pipeline(input_shape, spacing, train=train, seed=seed)
    return ScanDataset(items, labels, [str(r["image_id"]) for r in records], transform, root, seed)


def class_counts(rows, num_classes: int = NUM_CLASSES) -> dict[int, int]:
    """Scans per class, every class present as a key (``{0: n_control, 1: n_pd}``)."""
    counts = Counter(_label(r) for r in _records(rows))
    return {c: int(counts.get(c, 0)) for c in range(num_classes)}


def class_weights(counts: Mapping[int, int]) -> torch.Tensor:
    """Inverse-frequency loss weights, normalised to mean 1 over the classes present.

    A class with no samples gets weight 0 and a warning (it cannot be weighted; the loss never sees it).

    Raises:
        DataError: no samples at all.
    """
    classes = sorted(counts)
    if classes != list(range(len(classes))):
        raise ValueError(f"class counts must have keys 0..K-1, got {classes}")
    present = [c for c in classes if counts[c] > 0]
    if not present:
        raise DataError("no labelled training samples at this site; check the site manifest's train rows")
    for c in classes:
        if counts[c] == 0:
            warnings.warn(f"class {c} has no training samples at this site; its loss weight is 0", stacklevel=2)
    inverse = torch.tensor([1.0 / counts[c] if counts[c] > 0 else 0.0 for c in classes], dtype=torch.float32)
    return inverse * (len(present) / inverse.sum())


class _Raised:
    """An error met in the prefetch thread, carried to the training thread."""

    def __init__(self, error: Exception):
        self.error = error


def _relay(batches):
    try:
        yield from batches
    except Exception as exc:  # noqa: BLE001 - every error goes to the consumer, which raises it
        yield _Raised(exc)


class PrefetchLoader(DataLoader):
    """MONAI's ``DataLoader`` whose next batch is made in a thread (MONAI's ``ThreadBuffer``, one batch ahead)
    while the caller trains on the current one: the same batches in the same order (one thread draws them).

    Unlike MONAI's ``ThreadDataLoader``, an error in the thread (a scan that became unreadable) is raised in
    the caller with its traceback. ``ThreadDataLoader`` prints it and ends the epoch early, so training would
    go on quietly with fewer batches."""

    def __iter__(self):
        for item in ThreadBuffer(_relay(super().__iter__()), buffer_size=1, timeout=0.01):
            if isinstance(item, _Raised):
                raise item.error
            yield item


def make_loader(dataset, labels: Iterable[int], batch_size: int, class_balancing: str, seed: int,
                num_workers: int = 0, shuffle: bool = True, prefetch: bool = False) -> DataLoader:
    """A seeded loader: class-balanced sampling, a plain shuffle, or row order for evaluation.

    Args:
        dataset: e.g. from :func:`build_dataset`.
        labels: one label per item, in dataset order.
        batch_size: scans per batch.
        class_balancing: ``sampler`` (``WeightedRandomSampler`` with 1/class-count weights, with
            replacement, ``len(dataset)`` draws per epoch), ``loss`` or ``none`` (a plain shuffle;
            for ``loss`` pass :func:`class_weights` to the loss).
        seed: seeds the sampler/shuffle and the augmentation seeds of each epoch and worker
            (MONAI's DataLoader re-seeds the dataset's random transforms from it).
        num_workers: loader processes.
        shuffle: ``False`` gives an evaluation loader: row order, no sampler (``class_balancing`` must
            then not be ``sampler``).
        prefetch: with ``num_workers`` 0, a :class:`PrefetchLoader`: the next batch is made in a thread while
            the model trains on this one (the same batches in the same order: one thread draws them).
    """
    if class_balancing not in CLASS_BALANCING:
        raise ConfigError(f"class-balancing {class_balancing!r} must be one of {', '.join(CLASS_BALANCING)}")
    labels = [int(v) for v in labels]
    if len(labels) != len(dataset):
        raise ValueError(f"{len(labels)} labels for {len(dataset)} items")
    if class_balancing == "sampler" and not shuffle:
        raise ValueError("class_balancing='sampler' draws at random; use 'none' for an evaluation loader")
    generator = torch.Generator().manual_seed(int(seed))
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, generator=generator,
                  pin_memory=torch.cuda.is_available())
    loader = PrefetchLoader if (prefetch and num_workers == 0) else DataLoader
    if class_balancing == "sampler":
        counts = Counter(labels)
        weights = torch.tensor([1.0 / counts[v] for v in labels], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                        generator=torch.Generator().manual_seed(int(seed) + 1))
        return loader(dataset, sampler=sampler, **kwargs)
    return loader(dataset, shuffle=shuffle, **kwargs)
