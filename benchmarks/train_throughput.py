"""Local-training throughput of a fedpd site versus a bare torch loop, measured side by side.

fedpd: the ClientApp's own path (``common.learning.train.train_loader`` -> cached MONAI dataset with
augmentation and the class-balancing sampler -> ``common.learning.train.train_local``), timed from round 2 on,
i.e. with the deterministic preprocessing already cached on disk (round 1 fills the cache), in two variants:
``prefetch``, the next batch made in a thread while the model trains (``PrefetchLoader``, the ClientApp's
loader since 2026-12-05), and ``serial``, batches made in turn (its loader before).
torch: the same Med3D, input size, batch size and optimiser on tensors already in memory (no data pipeline).

``--design interleaved`` (default) pairs them step by step: the loader is wrapped so that after each of the
ClientApp's training steps one bare-loop step (same model, same batch size, in-memory tensors, its own AdamW)
runs and is timed apart. ``train_local``'s wall time minus the bare steps' time is the ClientApp path's time.
The bare step runs before the next batch is asked for, so a prefetch thread's work overlaps the ClientApp's
step, as in training, and not the bare one. The two see the same machine state within a second of each other,
so a drift in this shared machine's speed (the bare loop alone varied 25 % between epochs) cancels out of the
ratio instead of deciding it. Each repeat is one epoch per variant; the variants alternate which goes first.

``--design sequential`` (the design before 2026-12-05) times whole epochs instead, in a rotated order: repeat r
starts at variant r mod 3 of (prefetch, bare loop, serial), and also times the data path alone.

    .venv/bin/python benchmarks/train_throughput.py --shape 48 --batch-size 8 --scans 48 --repeats 4
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


class BareSteps:
    """The bare torch loop, one step at a time: batches sliced from tensors already in memory."""

    def __init__(self, model, images, labels, batch_size, lr, rt):
        self.model, self.rt, self.batch_size = model, rt, batch_size
        rt.place(model).train()
        self.images, self.labels = rt.inputs(images), labels.to(rt.device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        self.scaler = rt.grad_scaler()
        self.at, self.seconds, self.samples = 0, 0.0, 0

    def step(self) -> None:
        start = time.perf_counter()
        i = self.at
        self.at = (i + self.batch_size) % len(self.labels)
        x, y = self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]
        self.opt.zero_grad(set_to_none=True)
        with self.rt.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        loss.item()  # train_local reads its loss every step too
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        self.seconds += time.perf_counter() - start
        self.samples += len(y)


def torch_loop(model, images, labels, batch_size, lr, rt) -> float:
    """One epoch of the bare loop alone (``--design sequential``): samples/s."""
    bare = BareSteps(model, images, labels, batch_size, lr, rt)
    for _ in range(0, len(labels), batch_size):
        bare.step()
    return bare.samples / bare.seconds


class Interleaved:
    """The ClientApp's loader with one bare step run (and timed apart) after each batch it hands out has been
    trained on."""

    def __init__(self, loader, bare: BareSteps):
        self.loader, self.bare, self.dataset = loader, bare, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # The bare step runs after the ClientApp's step and before the next batch is asked for. With a prefetch
        # thread, taking a batch starts the making of the next one, which then overlaps the ClientApp's step (as in
        # training), not the bare one; the first batch is asked for before any bare step.
        for batch in self.loader:
            yield batch
            self.bare.step()


def interleaved(rows, cfg, cache, model, images, labels, rt, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per variant (``serial``: batches made in turn; ``prefetch``: the next batch made in a thread, the ClientApp's
    loader since 2026-12-05), the
    (fedpd samples/s, bare loop samples/s) of each repeat, measured step by step in turn. The variants alternate
    which goes first."""
    out: dict[str, list[tuple[float, float]]] = {"serial": [], "prefetch": []}
    for r in range(repeats):
        for variant in (("serial", "prefetch") if r % 2 == 0 else ("prefetch", "serial")):
            loader, _, w = train_loader(rows, cfg, cache, seed=2 + r, prefetch=variant == "prefetch")
            bare = BareSteps(model, images, labels, cfg.batch_size, cfg.lr, rt)
            start = time.perf_counter()
            res = train_local(model, Interleaved(loader, bare), epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              rt=rt, class_weights=w)
            ours = time.perf_counter() - start - bare.seconds
            out[variant].append((res.samples_seen / ours, bare.samples / bare.seconds))
    return out


def report_interleaved(results: dict[str, list[tuple[float, float]]], rt, a, scans: int) -> None:
    print(f"device {rt.describe()}, torch threads {torch.get_num_threads()}, Med3D resnet_10, input {a.shape}^3, "
          f"batch {a.batch_size}, {scans} scans, num-workers {a.num_workers}, class-balancing {a.class_balancing}, "
          "design interleaved (a bare step after each of the ClientApp's steps)")
    for variant, pairs in results.items():
        name = "batches made in turn" if variant == "serial" else "the next batch made in a thread: the ClientApp's"
        print(f"{variant} ({name}):")
        print("  fedpd site (round >= 2) samples/s: " + ", ".join(f"{o:.2f}" for o, _ in pairs))
        print("  bare torch loop beside it samples/s: " + ", ".join(f"{b:.2f}" for _, b in pairs))
        print("  ratio fedpd / torch per repeat: " + ", ".join(f"{o / b:.3f}" for o, b in pairs))
        ours, bare = sum(1 / o for o, _ in pairs), sum(1 / b for _, b in pairs)  # seconds per sample, summed
        print(f"  ratio fedpd / torch (all repeats): {bare / ours:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scans", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--class-balancing", default="sampler")
    p.add_argument("--design", choices=("interleaved", "sequential"), default="interleaved",
                   help="step-by-step pairs (default) or whole epochs in rotated order (see above)")
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
        if a.design == "interleaved":
            report_interleaved(interleaved(rows, cfg, cache, model, images, labels, rt, a.repeats), rt, a, len(rows))
            return
        threaded, ours, bare, pipe = [], [], [], []

        def fedpd_path(seed: int, prefetch: bool) -> float:
            loader, _, w = train_loader(rows, cfg, cache, seed=seed, prefetch=prefetch)  # a new loader each round
            res = train_local(model, loader, epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt, class_weights=w)
            return res.samples_per_second

        for r in range(a.repeats):
            variants = [lambda: threaded.append(fedpd_path(2 + r, True)),  # next batch in a thread
                        lambda: bare.append(torch_loop(model, images, labels, a.batch_size, cfg.lr, rt)),
                        lambda: ours.append(fedpd_path(2 + r, False))]
            for i in range(len(variants)):
                variants[(r + i) % len(variants)]()
            loader, _, _ = train_loader(rows, cfg, cache, seed=100 + r, prefetch=False)  # the data path alone
            t = time.perf_counter()
            n = sum(len(batch["label"]) for batch in loader)
            pipe.append(n / (time.perf_counter() - t))
    mo, mb = statistics.median(ours), statistics.median(bare)
    paired = [o / b for o, b in zip(ours, bare)]
    print(f"device {rt.describe()}, torch threads {torch.get_num_threads()}, Med3D resnet_10, input {a.shape}^3, "
          f"batch {a.batch_size}, {len(rows)} scans, num-workers {a.num_workers}, class-balancing {a.class_balancing}")
    print("fedpd, batches in turn samples/s: " + ", ".join(f"{x:.2f}" for x in ours) + f"  median {mo:.2f}")
    mt = statistics.median(threaded)
    print("  next batch in a thread (the ClientApp's) samples/s: " + ", ".join(f"{x:.2f}" for x in threaded) + f"  median {mt:.2f}"
          f"  (ratio {mt / mb:.3f})")
    print("bare torch loop     samples/s: " + ", ".join(f"{x:.2f}" for x in bare) + f"  median {mb:.2f}")
    mp = statistics.median(pipe)
    print("data pipeline alone samples/s: " + ", ".join(f"{x:.1f}" for x in pipe) + f"  median {mp:.1f}")
    print("ratio fedpd / torch per repeat: " + ", ".join(f"{x:.3f}" for x in paired))
    print(f"ratio fedpd / torch (medians): {mo / mb:.3f}; serial model 1/(1/torch + 1/pipeline) predicts "
          f"{1 / (1 / mb + 1 / mp) / mb:.3f}")


if __name__ == "__main__":
    main()
