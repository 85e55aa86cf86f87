"""Write MedicalNet-format checkpoints for tests (no real MedicalNet file is available offline).

MedicalNet ships ``{'state_dict': {'module.<key>': tensor}}`` (saved from a DataParallel model). These
helpers build a backbone, perturb every tensor so a load is observable, and save it in that layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.learning.model import build_med3d

__all__ = ["random_backbone_state", "write_official"]


def random_backbone_state(depth: int = 10, shortcut: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A MedicalNet backbone state dict of ``depth`` with every tensor randomised (distinct from a fresh init)."""
    gen = torch.Generator().manual_seed(seed)
    state = build_med3d(depth, shortcut=shortcut).backbone.state_dict()
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=gen, dtype=v.dtype)
            out[k] = noise.abs() + 0.1 if k.endswith("running_var") else noise  # variances stay positive
        else:  # num_batches_tracked
            out[k] = torch.randint(1, 1000, v.shape, generator=gen, dtype=v.dtype)
    return out


def write_official(state: dict[str, torch.Tensor], path: Path, prefix: str = "module.",
                   drop_num_batches_tracked: bool = False, wrap: bool = True, legacy: bool = False) -> Path:
    """Save ``state`` as MedicalNet does: ``{'state_dict': {prefix + key: tensor}}``.

    Args:
        state: backbone tensors keyed without prefix.
        path: file to write.
        prefix: key prefix (``"module."`` as in the released files, ``""`` for none).
        drop_num_batches_tracked: omit those entries, as checkpoints from PyTorch < 0.4.1 do.
        wrap: put the tensors under ``'state_dict'``; ``False`` saves the bare dict.
        legacy: write the pre-1.6 (non-zip) torch format, as the 2019 MedicalNet release may use.
    """
    sd = {prefix + k: v.clone() for k, v in state.items()
          if not (drop_num_batches_tracked and k.endswith("num_batches_tracked"))}
    torch.save({"state_dict": sd} if wrap else sd, path, _use_new_zipfile_serialization=not legacy)
    return Path(path)
