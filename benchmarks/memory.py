"""Memory and scaling (issue 16 item 3): one site's training by input size, and a simulation by site count.

``sizes``  One site's training (the ClientApp's path: cached MONAI dataset, augmentation, class-balancing
           sampler, ``train_local``) at each input edge, batch ``--batch-size``, resnet_10: samples/s in round 2
           (round 1 fills the on-disk cache) and the peak resident memory of the training process. Each size
           runs in a fresh process, so a peak is that size's alone. Target: <= 3 GB at 128^3, batch 2.
``sites``  A simulation on the demo-size phantom (120 subjects, 48^3) split iid into K virtual sites, for
           each K: wall seconds per round (round 2: the cache is warm) and the machine's peak memory in use
           above what it used before the run (/proc/meminfo, every 0.5 s: every Flower and Ray process
           together). Target: 8 sites fit in 24 GB on 2 cores.

    .venv/bin/python benchmarks/memory.py sizes --shapes 48 64 96 128 --batch-size 2
    .venv/bin/python benchmarks/memory.py sites --sites 3 8 16

Results and the commands go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _train_child(a: argparse.Namespace) -> None:
    """In a fresh process: one site's two rounds of training at one size; prints a JSON line."""
    import torch

    from common.cohort.manifest import read_manifest
    from common.config import RunConfig
    from common.device import runtime
    from common.learning.model import make_model
    from common.learning.train import train_loader, train_local

    rows = read_manifest(a.rows)
    edge = a.edge
    cfg = RunConfig.from_mapping({"input-shape": f"{edge},{edge},{edge}", "spacing": ",".join([f"{192 / edge:.3f}"] * 3),
                                  "batch-size": a.batch_size})
    rt = runtime(amp=True)
    model = make_model(cfg)
    speeds = []
    for r in range(2):  # round 1 fills the cache
        loader, _, w = train_loader(rows, cfg, Path(a.cache), seed=r)
        res = train_local(model, loader, epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt, class_weights=w)
        speeds.append(res.samples_per_second)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"edge": edge, "samples_per_second": speeds[-1], "peak_mib": peak_mib,
                      "threads": torch.get_num_threads(), "device": rt.describe()}))


def sizes(a: argparse.Namespace) -> None:
    from train_throughput import site_rows  # benchmarks/train_throughput.py: a one-site MNI phantom

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            rows = site_rows(root, a.scans, max(a.shapes))
        rows.to_csv(root / "rows.csv", index=False)
        results = []
        for edge in a.shapes:
            proc = subprocess.run([sys.executable, __file__, "_train", "--rows", str(root / "rows.csv"), "--edge",
                                   str(edge), "--batch-size", str(a.batch_size), "--cache", str(root / f"cache{edge}")],
                                  capture_output=True, text=True, cwd=HERE.parent)
            if proc.returncode != 0:
                sys.exit(f"size {edge}: failed\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"one site's training, resnet_10, batch {a.batch_size}, {len(rows)} scans (phantom {max(a.shapes)}^3), "
          f"{first['device']}, {first['threads']} torch threads; each size in a fresh process:")
    print(f"  {'input':>7} {'voxels':>10} {'samples/s':>10} {'peak RSS MiB':>13}")
    for r in results:
        print(f"  {r['edge']:>5}^3 {r['edge'] ** 3:>10,} {r['samples_per_second']:>10.2f} {r['peak_mib']:>13.0f}")


class MemInUse(threading.Thread):
    """The machine's memory in use (MemTotal - MemAvailable), sampled; ``peak`` in MiB."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.running, self.peak = period, True, 0.0

    @staticmethod
    def now() -> float:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)


def sites(a: argparse.Namespace) -> None:
    from common.cohort.ingest import ingest
    from common.cohort.splits import partition_manifest, split_manifest
    from simulation.phantom import generate_phantom
    from simulation.simulate import simulate

    root = a.out or Path(tempfile.mkdtemp(prefix="fedpd-memory-"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        generate_phantom(root / "download", subjects=a.subjects, sites=3, shape=a.shape, effect=1.0, seed=0,
                         space="mni")
        ingest(root / "download", csv=root / "download" / "idaSearch.csv",
               sites_csv=root / "download" / "centres.csv", out=root / "manifest.csv")
        split_manifest(root / "manifest.csv", val=0.2, test=0.25, seed=0)
    edge = a.shape
    rc = f"input-shape='{edge},{edge},{edge}' spacing='{','.join([f'{192 / edge:.1f}'] * 3)}' batch-size=4"
    rows = []
    for k in a.sites:
        partition = root / f"partition-{k}"
        partition_manifest(root / "manifest.csv", scheme="iid", out=partition, sites=k, seed=0)
        before = MemInUse.now()
        sampler = MemInUse()
        sampler.start()
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                simulate(partition, a.rounds, root / f"run-{k}", run_config=rc, echo=False)
        finally:
            sampler.running = False
            sampler.join()
        total = time.monotonic() - started
        recs = [json.loads(x) for x in (root / f"run-{k}" / "rounds.jsonl").read_text().splitlines() if x.strip()]
        rows.append((k, [r["wall_seconds"] for r in recs], sampler.peak - before, total))
    print(f"simulation, demo-size phantom ({a.subjects} subjects, {a.shape}^3 input, batch 4, resnet_10), iid "
          f"virtual sites, {a.rounds} round(s), one ClientApp at a time with every core:")
    print(f"  {'sites':>5} {'round walls s':>20} {'peak memory above idle MiB':>27} {'run s':>7}")
    for k, walls, peak, total in rows:
        print(f"  {k:>5} {' / '.join(f'{w:.1f}' for w in walls):>20} {peak:>27.0f} {total:>7.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("sizes")
    q.add_argument("--shapes", type=int, nargs="+", default=[48, 64, 96, 128])
    q.add_argument("--batch-size", type=int, default=2)
    q.add_argument("--scans", type=int, default=8)
    q = sub.add_parser("sites")
    q.add_argument("--sites", type=int, nargs="+", default=[3, 8, 16])
    q.add_argument("--subjects", type=int, default=120)
    q.add_argument("--shape", type=int, default=48)
    q.add_argument("--rounds", type=int, default=2)
    q.add_argument("--out", type=Path, default=None)
    q = sub.add_parser("_train")  # internal: one size, in a fresh process
    q.add_argument("--rows", required=True)
    q.add_argument("--edge", type=int, required=True)
    q.add_argument("--batch-size", type=int, required=True)
    q.add_argument("--cache", required=True)
    a = p.parse_args()
    {"sizes": sizes, "sites": sites, "_train": _train_child}[a.what](a)


if __name__ == "__main__":
    main()
