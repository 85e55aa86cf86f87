"""Local-training throughput of a fedpd site versus a bare torch loop, measured side by side.

fedpd: the ClientApp's own path (``common.learning.train.train_loader`` -> cached MONAI dataset with
augmentation and the class-balancing sampler -> ``common.learning.train.train_local``), timed in round 2, i.e.
with the deterministic preprocessing already cached on disk (round 1 fills the cache); also the same with the
next batch made in a thread while the model trains (``prefetch``, MONAI's ThreadDataLoader). The three run
in a rotated order: repeat r starts at variant r mod 3 of (prefetch, bare loop, ClientApp's path), so over
3 repeats each variant runs once first, once second and once last, and neither the warm-up nor a drift in the
machine's speed favours one of them.
torch: the same Med3D, input size, batch size, optimiser and number of samples, on tensors already in
memory (no data pipeline at all). Both run in this one process, alternately, ``--repeats`` times.

    .venv/bin/python benchmarks/train_throughput.py --shape 48 --batch-size 8 --scans 48
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from common.cohort.ingest import ingest
from common.cohort.manifest import read_manifest
from common.config import RunConfig
from common.device import runtime
from common.learning.model import make_model
from common.learning.train import train_loader, train_local
from simulation.phantom import generate_phantom


def site_rows(root: Path, scans: int, shape: int) -> pd.DataFrame:
    subjects = max(12, int(scans / 1.6))
    generate_phantom(root / "dl", subjects=subjects, sites=1, shape=shape, effect=1.0, seed=0)
    ingest(root / "dl", csv=root / "dl" / "idaSearch.csv", sites_csv=root / "dl" / "centres.csv", out=root / "m.csv")
    return read_manifest(root / "m.csv").head(scans).reset_index(drop=True)


def torch_loop(model, images, labels, batch_size, lr, rt) -> float:
    rt.place(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scaler = rt.grad_scaler()
    images, labels = rt.inputs(images), labels.to(rt.device)
    start = time.perf_counter()
    for i in range(0, len(labels), batch_size):
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = model(images[i:i + batch_size])
        loss = F.cross_entropy(logits.float(), labels[i:i + batch_size])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return len(labels) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scans", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--class-balancing", default="sampler")
    a = p.parse_args()
    rt = runtime(amp=True)
    spacing = 192.0 / a.shape  # the phantom field of view is 192 mm
    cfg = RunConfig.from_mapping({"input-shape": f"{a.shape},{a.shape},{a.shape}", "spacing": f"{spacing},{spacing},{spacing}",
                                  "batch-size": a.batch_size, "num-workers": a.num_workers,
                                  "class-balancing": a.class_balancing})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = site_rows(root, a.scans, a.shape)
        cache = root / "cache"
        model = make_model(cfg)
        # round 1: fills the on-disk cache (not measured)
        loader, _, w = train_loader(rows, cfg, cache, seed=1)
        train_local(model, loader, epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt, class_weights=w)
        images = torch.randn(len(rows), 1, *cfg.input_shape)
        labels = torch.as_tensor(rows["label"].to_numpy(), dtype=torch.long)
        threaded, ours, bare, pipe = [], [], [], []

        def fedpd_path(seed: int, prefetch: bool) -> float:
            loader, _, w = train_loader(rows, cfg, cache, seed=seed, prefetch=prefetch)  # as the ClientApp each round
            res = train_local(model, loader, epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt, class_weights=w)
            return res.samples_per_second

        for r in range(a.repeats):
            variants = [lambda: threaded.append(fedpd_path(2 + r, True)),  # next batch in a thread
                        lambda: bare.append(torch_loop(model, images, labels, a.batch_size, cfg.lr, rt)),
                        lambda: ours.append(fedpd_path(2 + r, False))]
            for i in range(len(variants)):
                variants[(r + i) % len(variants)]()
            loader, _, _ = train_loader(rows, cfg, cache, seed=100 + r)  # the data path alone, no model
            t = time.perf_counter()
            n = sum(len(batch["label"]) for batch in loader)
            pipe.append(n / (time.perf_counter() - t))
    mo, mb = statistics.median(ours), statistics.median(bare)
    paired = [o / b for o, b in zip(ours, bare)]
    print(f"device {rt.describe()}, torch threads {torch.get_num_threads()}, Med3D resnet_10, input {a.shape}^3, "
          f"batch {a.batch_size}, {len(rows)} scans, num-workers {a.num_workers}, class-balancing {a.class_balancing}")
    print("fedpd site (round >= 2) samples/s: " + ", ".join(f"{x:.2f}" for x in ours) + f"  median {mo:.2f}")
    mt = statistics.median(threaded)
    print("  with a prefetch thread samples/s: " + ", ".join(f"{x:.2f}" for x in threaded) + f"  median {mt:.2f}"
          f"  (ratio {mt / mb:.3f})")
    print("bare torch loop     samples/s: " + ", ".join(f"{x:.2f}" for x in bare) + f"  median {mb:.2f}")
    mp = statistics.median(pipe)
    print("data pipeline alone samples/s: " + ", ".join(f"{x:.1f}" for x in pipe) + f"  median {mp:.1f}")
    print("ratio fedpd / torch per repeat: " + ", ".join(f"{x:.3f}" for x in paired))
    print(f"ratio fedpd / torch (medians): {mo / mb:.3f}; serial model 1/(1/torch + 1/pipeline) predicts "
          f"{1 / (1 / mb + 1 / mp) / mb:.3f}")


if __name__ == "__main__":
    main()
