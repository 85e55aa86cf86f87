"""Plain torch training and evaluation loops, shared by the ClientApp, the ServerApp's evaluation and
the non-federated baselines, so every arm of a comparison runs the same code.

No Flower types here. Losses are means weighted by sample count; ``num_examples`` is a number of
samples (``len(dataset)``), never a number of batches.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.device import Runtime
from common.learning.data import build_dataset, class_counts, class_weights, make_loader
from common.learning.metrics import MetricUndefinedWarning, binary_metrics

log = logging.getLogger("fedpd.train")

__all__ = ["TrainResult", "EvalResult", "train_local", "predict", "train_loader", "eval_loader", "evaluate_rows",
           "validation_metrics", "recalibrate_batchnorm"]


@dataclass(frozen=True)
class TrainResult:
    """What one local training call produced (aggregates only)."""

    loss: float  # mean cross-entropy per sample over all epochs
    num_examples: int  # training samples in the site's dataset (FedAvg weight)
    samples_seen: int  # samples processed over all epochs (sampler draws count)
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """Per-sample outputs of an evaluation pass. Stays where it was computed (site or server)."""

    y_true: np.ndarray  # int, 1 = PD
    y_score: np.ndarray  # PD probability
    loss: float  # mean cross-entropy per sample


def _batch(batch, rt: Runtime):
    images = rt.inputs(batch["image"])
    labels = torch.as_tensor(batch["label"]).long().to(rt.device, non_blocking=True)
    return images, labels


def train_local(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    rt: Runtime,
    class_weights: torch.Tensor | None = None,
    num_examples: int | None = None,
    progress: bool = False,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` with AdamW.

    Args:
        model: the network; moved to ``rt.device``.
        loader: yields dicts with ``image`` [N,1,D,H,W] and ``label`` [N].
        epochs: passes over the loader.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        rt: device and AMP policy from :func:`common.device.runtime`.
        class_weights: per-class loss weights (``class-balancing=loss``), or ``None``.
        num_examples: the FedAvg weight to report; defaults to ``len(loader.dataset)``.
        progress: show a tqdm bar per epoch.
        proximal_mu: FedProx (Li et al. 2020): adds ``mu/2 * |w - w_start|^2`` over the trained parameters to
            every batch's loss, ``w_start`` being the weights the call started from (the global model).

    Returns:
        The mean training loss per sample and the counts.

    Raises:
        FloatingPointError: the loss became NaN/Inf (the update would poison the federation).
    """
    rt.place(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    scaler = rt.grad_scaler()
    weight = class_weights.to(rt.device) if class_weights is not None else None
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        batches = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch")
        for batch in batches:
            images, labels = _batch(batch, rt)
            optimizer.zero_grad(set_to_none=True)
            with rt.autocast():
                logits = model(images)
            # Loss in float32 even under autocast: small batches of imbalanced labels are sensitive.
            per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
            if weight is None:
                loss = per_sample.mean()
            else:  # class-balancing=loss: the same normalisation as F.cross_entropy(weight=...)
                w = weight[labels]
                loss = (per_sample * w).sum() / w.sum().clamp_min(1e-12)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch + 1}; lower lr or check the inputs")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += per_sample.detach().sum().item()  # reported: plain cross-entropy per sample
            seen += labels.shape[0]
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    if rt.channels_last:  # hand the weights on (state_dict, ArrayRecord, checkpoint) in the standard layout
        model.to(memory_format=torch.contiguous_format)
    n = len(loader.dataset) if num_examples is None else num_examples  # type: ignore[arg-type]
    return TrainResult(loss=total_loss / seen if seen else math.nan, num_examples=int(n), samples_seen=seen, seconds=seconds)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, rt: Runtime) -> EvalResult:
    """PD probabilities (softmax class 1) for every sample of ``loader``, in loader order."""
    rt.place(model).eval()
    scores, labels, total_loss = [], [], 0.0
    for batch in loader:
        images, y = _batch(batch, rt)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        scores.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        labels.append(y.cpu())
    if not scores:
        return EvalResult(np.zeros(0, dtype=np.int64), np.zeros(0), math.nan)
    if rt.channels_last:
        model.to(memory_format=torch.contiguous_format)
    y_true = torch.cat(labels).numpy().astype(np.int64)
    return EvalResult(y_true=y_true, y_score=torch.cat(scores).numpy().astype(np.float64), loss=total_loss / len(y_true))


# --- from manifest rows to loaders and validation figures ------------------------------------------


def _records(rows: pd.DataFrame) -> list[dict]:
    return rows.to_dict("records")


def train_loader(rows: pd.DataFrame, cfg: RunConfig, cache_dir: Path, seed: int, prefetch: bool = True):
    """Loader over training rows with the run's class balancing; also returns the counts and loss weights.
    ``prefetch`` (the ClientApp's path): the next batch is made (cache read, augmentation) in a thread while the
    model trains on this one. Measured step by step against a bare loop on 2 cores, it was faster than making
    the batches in turn in 7 of 9 paired runs (BENCHMARKS.md)."""
    recs = _records(rows)
    ds = build_dataset(recs, cfg.input_shape, cfg.spacing, cache_dir, train=True, seed=seed)
    labels = [int(r["label"]) for r in recs]
    loader = make_loader(ds, labels, cfg.batch_size, cfg.class_balancing, seed=seed, num_workers=cfg.num_workers,
                         prefetch=prefetch)
    counts = class_counts(recs)
    weights = class_weights(counts) if cfg.class_balancing == "loss" else None
    return loader, counts, weights


def eval_loader(rows: pd.DataFrame, cfg: RunConfig, cache_dir: Path):
    """Deterministic loader (no augmentation, no sampler) in row order."""
    recs = _records(rows)
    ds = build_dataset(recs, cfg.input_shape, cfg.spacing, cache_dir, train=False, seed=cfg.seed)
    labels = [int(r["label"]) for r in recs]
    return make_loader(ds, labels, cfg.batch_size, "none", seed=cfg.seed, num_workers=cfg.num_workers, shuffle=False)


def evaluate_rows(model: torch.nn.Module, rows: pd.DataFrame, cfg: RunConfig, rt: Runtime, cache_dir: Path) -> EvalResult:
    """Predict every row (in order)."""
    return predict(model, eval_loader(rows, cfg, cache_dir), rt)


def recalibrate_batchnorm(model: torch.nn.Module, rows: pd.DataFrame, cfg: RunConfig, rt: Runtime,
                          cache_dir: Path) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance from the images of ``rows`` (labels are
    not read) under the model's current weights: reset, then averaged over one pass of the deterministic loader
    (no augmentation), batch by batch (torch's ``swa_utils.update_bn``). Returns the number of scans used.

    The server does this each round when the sites keep their statistics (differential privacy, secure
    aggregation: :func:`common.learning.model.exchanged_keys`), on its validation rows, so that its
    validation, checkpoints, test and exported model normalise as the sites did in training (with batch
    statistics), instead of with the initial statistics the aggregated weights were never trained with."""
    if rows.empty or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    from torch.optim.swa_utils import update_bn

    rt.place(model)
    images = (rt.inputs(batch["image"]) for batch in eval_loader(rows, cfg, cache_dir))
    with rt.autocast():
        update_bn(images, model)
    model.eval()
    if rt.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return len(rows)


def validation_metrics(model: torch.nn.Module, rows: pd.DataFrame, cfg: RunConfig, rt: Runtime,
                       cache_dir: Path) -> dict[str, float]:
    """The threshold-free validation figures of a model on ``rows`` (a round's record, a site's evaluate
    reply): :func:`binary_metrics` plus ``loss``. Undefined figures (a one-class split) are NaN, quietly:
    NaN is what the record keeps.

    A model whose outputs are not finite (diverged, or poisoned by a harmful update that passed screening)
    gets every figure NaN and an infinite loss, with a warning, instead of stopping the run: round selection
    never picks such a round, and the record shows what happened."""
    res = evaluate_rows(model, rows, cfg, rt, cache_dir)
    bad = ~np.isfinite(res.y_score)
    if bad.any():
        log.warning("the model's outputs are not finite on %d of %d validation scan(s) (diverged or poisoned "
                    "weights): its validation figures are NaN, its loss infinite", int(bad.sum()), len(bad))
        return {k: float("nan") for k in ("n", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")} \
            | {"n": len(bad), "loss": float("inf")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        return binary_metrics(res.y_true, res.y_score) | {"loss": res.loss}
