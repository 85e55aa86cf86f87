"""Benchmark: generate the demo phantom cohort (``fedpd phantom`` defaults) in a temporary folder.

Run: ``.venv/bin/python benchmarks/phantom_generation.py [--subjects 120 --sites 3 --shape 64]``.
Prints wall seconds, scans per second and the size on disk. The target is "well under a minute".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.phantom import generate_phantom  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=120)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--shape", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpd-phantom-bench-") as tmp:
        out = Path(tmp) / "phantom"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = generate_phantom(out, subjects=a.subjects, sites=a.sites, shape=a.shape, seed=a.seed)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        files = sum(1 for f in out.rglob("*") if f.is_file())
    print(f"phantom generation: {a.subjects} subjects, {a.sites} sites, {a.shape}^3, seed {a.seed}: "
          f"{summary['scans']} scans ({summary['dicom']} DICOM series) in {seconds:.1f} s = "
          f"{summary['scans'] / seconds:.1f} scans/s; {size / 2**20:.0f} MiB in {files} files")


if __name__ == "__main__":
    main()
