"""The one place that picks the compute device and the mixed-precision setting.

CUDA when present (with AMP in float16 and a gradient scaler), else CPU in float32. The environment
variable ``FEDPD_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) forces a choice, e.g. for tests.

Reproducibility: on CPU, with the per-round seeds of the ClientApp, a site's local training is bitwise
repeatable for a given machine, thread count and ``num-workers`` (each of those may change the numbers,
never their repeatability). :func:`deterministic_kernels` asks torch to keep it that way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

__all__ = ["Runtime", "select_device", "runtime", "deterministic_kernels"]


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

    def autocast(self):
        """Context manager for the forward pass: float16 autocast on CUDA when AMP is on, else a no-op."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler that is active only with AMP (a disabled scaler passes values through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp)

    def describe(self) -> str:
        """One line for logs, e.g. ``cuda:0 (NVIDIA H100, AMP float16)`` or ``cpu (float32)``."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{self.device} ({name}, {'AMP float16' if self.amp else 'float32'})"
        return f"{self.device} (float32)"


def runtime(amp: bool = True, requested: str | None = None) -> Runtime:
    """Select the device and decide AMP: on only when requested *and* the device is CUDA."""
    device = select_device(requested)
    return Runtime(device=device, amp=bool(amp) and device.type == "cuda")


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
