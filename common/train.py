"""Plain torch training and evaluation loops, shared by the ClientApp, the ServerApp's evaluation and
the non-federated baselines, so every arm of a comparison runs the same code.

No Flower types here. Losses are means weighted by sample count; ``num_examples`` is a number of
samples (``len(dataset)``), never a number of batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.device import Runtime

__all__ = ["TrainResult", "EvalResult", "train_local", "predict", "state_dict_numpy", "load_state_numpy"]


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


def _batch(batch, device):
    images = batch["image"].to(device, non_blocking=True)
    labels = torch.as_tensor(batch["label"]).long().to(device, non_blocking=True)
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

    Returns:
        The mean training loss per sample and the counts.

    Raises:
        FloatingPointError: the loss became NaN/Inf (the update would poison the federation).
    """
    model.to(rt.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
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
            images, labels = _batch(batch, rt.device)
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
    n = len(loader.dataset) if num_examples is None else num_examples  # type: ignore[arg-type]
    return TrainResult(loss=total_loss / seen if seen else math.nan, num_examples=int(n), samples_seen=seen, seconds=seconds)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, rt: Runtime) -> EvalResult:
    """PD probabilities (softmax class 1) for every sample of ``loader``, in loader order."""
    model.to(rt.device).eval()
    scores, labels, total_loss = [], [], 0.0
    for batch in loader:
        images, y = _batch(batch, rt.device)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        scores.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        labels.append(y.cpu())
    if not scores:
        return EvalResult(np.zeros(0, dtype=np.int64), np.zeros(0), math.nan)
    y_true = torch.cat(labels).numpy().astype(np.int64)
    return EvalResult(y_true=y_true, y_score=torch.cat(scores).numpy().astype(np.float64), loss=total_loss / len(y_true))


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as CPU numpy arrays (the form that travels in Flower messages and checkpoints)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_state_numpy(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load numpy arrays into ``model`` strictly, casting each to the dtype of the model's tensor.

    FedAvg turns the int64 ``num_batches_tracked`` buffers into floats; casting back keeps the dtype.
    """
    own = model.state_dict()
    state = {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype) if k in own else torch.as_tensor(np.asarray(v))
             for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
