"""The one place that picks the compute device and the mixed-precision setting.

CUDA when present, else CPU in float32. The environment variable ``FEDPD_DEVICE`` (``cpu``, ``cuda``,
``cuda:1``) forces a choice, e.g. for tests.

On CUDA (issue 16's GPU path): AMP in bfloat16 where the GPU supports it (Ampere and later; no gradient
scaler needed, bfloat16 has float32's exponent range), else float16 with a ``GradScaler``; the model and the
input batches in ``channels_last_3d`` (cuDNN's fast layout for 3D convolutions); ``cudnn.benchmark`` (the
input shape is fixed, so the autotuned kernels are found once); the loaders pin memory and the batches are
copied with ``non_blocking=True`` (common/learning/data.py, train.py). Only the CPU path is exercised by
``make test``; benchmarks/gpu.py measures the CUDA path where a GPU exists.

Reproducibility: on CPU, with the per-round seeds of the ClientApp, a site's local training is bitwise
repeatable for a given machine, thread count and ``num-workers`` (each of those may change the numbers,
never their repeatability). :func:`deterministic_kernels` asks torch to keep it that way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

__all__ = ["Runtime", "select_device", "runtime", "amp_dtype_for", "deterministic_kernels"]


def select_device(requested: str | None = None) -> torch.device:
    """Return the device to compute on.

    Args:
        requested: ``"auto"``/``None`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda[:i]"``.
            Falls back to ``$FEDPD_DEVICE`` when ``None``.

    Raises:
        RuntimeError: CUDA was requested explicitly but is not available.
    """
    choice = (requested or os.environ.get("FEDPD_DEVICE") or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested (FEDPD_DEVICE or argument) but CUDA is not available; use 'cpu' or 'auto'")
    return device


@dataclass(frozen=True)
class Runtime:
    """Device plus mixed-precision policy, shared by training, evaluation and benchmarks."""

    device: torch.device
    amp: bool
    amp_dtype: torch.dtype = torch.float16  # the autocast dtype when ``amp``: bfloat16 or float16
    channels_last: bool = False  # model and batches in channels_last_3d (set on CUDA)

    def autocast(self):
        """Context manager for the forward pass: autocast in ``amp_dtype`` when AMP is on, else a no-op."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active only with float16 AMP (a disabled scaler passes values through): float16
        gradients underflow without one; bfloat16's do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, in the runtime's memory format (in place; returned for chaining)."""
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch [N, C, D, H, W] on the device, in the runtime's memory format (asynchronous from pinned memory)."""
        return images.to(self.device, memory_format=self.memory_format, non_blocking=True)

    @property
    def policy(self) -> str:
        """Precision and layout, e.g. ``AMP bfloat16, channels_last_3d`` or ``float32``."""
        precision = f"AMP {str(self.amp_dtype).removeprefix('torch.')}" if self.amp else "float32"
        return precision + (", channels_last_3d" if self.channels_last else "")

    def describe(self) -> str:
        """One line for logs, e.g. ``cuda:0 (NVIDIA H100, AMP bfloat16, channels_last_3d)`` or ``cpu (float32)``."""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {self.policy})"
        return f"{self.device} ({self.policy})"


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 where the CUDA device supports it, else float16 (which needs a gradient scaler)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def runtime(amp: bool = True, requested: str | None = None) -> Runtime:
    """Select the device and its policy: AMP only when requested *and* the device is CUDA (bfloat16 where
    supported, else float16), channels_last_3d and cuDNN autotuning on CUDA, plain float32 on CPU."""
    device = select_device(requested)
    if device.type != "cuda":
        return Runtime(device=device, amp=False)
    torch.backends.cudnn.benchmark = True  # fixed input shape: autotune each convolution once
    return Runtime(device=device, amp=bool(amp), amp_dtype=amp_dtype_for(device), channels_last=True)


def deterministic_kernels(device: torch.device) -> bool:
    """On CPU, make torch use deterministic kernels (warn-only: ``torch.set_deterministic_debug_mode("warn")``).

    The CPU kernels our model and loaders use are deterministic already; this guards the future: an op
    that has only a nondeterministic CPU kernel then warns instead of silently varying from run to run.
    CUDA is left as it is: deterministic cuDNN/cuBLAS kernels need ``CUBLAS_WORKSPACE_CONFIG`` set before
    CUDA starts, are slower, and several 3D backward kernels (pooling, interpolation) have no
    deterministic CUDA version, so GPU runs are reproducible only up to float rounding.

    The same eager-mode switch as ``torch.use_deterministic_algorithms(True, warn_only=True)``, which also
    imports ``torch._inductor`` to set a torch.compile option fedpd never uses: 1.2 s idle and 3.4 s on a
    busy machine in every ClientApp process, i.e. every site message (measured; BENCHMARKS.md).

    Returns:
        Whether the setting was applied (``True`` on CPU).
    """
    if device.type != "cpu":
        return False
    torch.set_deterministic_debug_mode("warn")
    return True
