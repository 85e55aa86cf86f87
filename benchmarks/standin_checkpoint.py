"""Export a fedpd run's backbone as a MedicalNet-format file: a STAND-IN for the pretrained weights.

No MedicalNet checkpoint exists on this machine, so EXPERIMENTS.md's "pretrained vs scratch" pair uses a
stand-in: Med3D trained by fedpd on a *different* phantom cohort (another seed, disjoint subjects),
saved the way MedicalNet ships its files -- ``{'state_dict': {'module.<backbone key>': tensor}}`` without
any head -- so that ``pretrained-path`` loads it through the same strict loader as the real file.
It shows how the scratch arm and ``pretrained-path`` work; it says nothing about what MedicalNet's
weights (trained on 23 segmentation datasets) give on PPMI.

    python benchmarks/standin_checkpoint.py RUN/model.pt OUT.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.learning.model import build_med3d  # noqa: E402
from common.runs.rundir import RunDir  # noqa: E402


def export(checkpoint: Path, out: Path) -> int:
    payload = RunDir.load_checkpoint(checkpoint)
    depth = int(payload.get("model", {}).get("depth", payload["config"].get("model-depth", 10)))
    backbone = {k[len("backbone."):]: v for k, v in payload["state_dict"].items() if k.startswith("backbone.")}
    torch.save({"state_dict": {f"module.{k}": v.clone() for k, v in backbone.items()}}, out)
    build_med3d(depth, pretrained=out)  # the strict MedicalNet loader must accept it
    return len(backbone)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a fedpd model.pt or checkpoints/round-<k>.pt")
    p.add_argument("out", type=Path, help="MedicalNet-format .pth to write")
    a = p.parse_args()
    n = export(a.checkpoint, a.out)
    print(f"{a.out}: {n} backbone tensors in MedicalNet format (stand-in, not MedicalNet's weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
