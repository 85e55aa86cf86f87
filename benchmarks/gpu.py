"""The GPU path of site training: float32 versus AMP, throughput and peak memory (issue 16).

For each depth, trains Med3D on random tensors already on the device (no data pipeline: this measures the
model's path) under two policies of ``common.device``:

- float32: standard layout, no autocast, cuDNN autotuning on;
- AMP: what ``runtime()`` picks on this GPU, i.e. bfloat16 autocast where supported (else float16 with a
  GradScaler), model and batches in channels_last_3d, cuDNN autotuning on.

Each policy: ``--warmup`` steps (autotuning, allocator), then ``--steps`` timed steps; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps. Prints one table (markdown) for BENCHMARKS.md.

    .venv/bin/python benchmarks/gpu.py                       # 128^3, batch 2, resnet_10 and resnet_50
    .venv/bin/python benchmarks/gpu.py --shape 64 --depths 10 --device cpu   # a smoke run without a GPU

Without CUDA it refuses (exit 2) unless ``--device cpu`` is given; on CPU the AMP row is the same policy as
float32 (``runtime()`` never autocasts on CPU), so the CPU run only checks that the script works.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.device import Runtime, runtime  # noqa: E402
from common.learning.model import build_med3d  # noqa: E402


def measure(depth: int, rt: Runtime, shape: int, batch: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = rt.place(build_med3d(depth=depth, num_classes=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = rt.grad_scaler()
    x = rt.inputs(torch.randn(batch, 1, shape, shape, shape))
    y = torch.randint(0, 2, (batch,), device=rt.device)
    cuda = rt.device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(rt.device)
        torch.cuda.reset_peak_memory_stats(rt.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(rt.device) / 2**30 if cuda else float("nan")
    return {"samples_per_s": steps * batch / seconds, "peak_gib": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--depths", type=int, nargs="*", default=[10, 50])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto", help="auto (CUDA) or cpu for a smoke run")
    a = p.parse_args()
    if a.device == "auto" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; the GPU path is unverified on this machine "
              "(run with --device cpu for a smoke run of the script)", file=sys.stderr)
        return 2
    amp = runtime(amp=True, requested=None if a.device == "auto" else a.device)
    fp32 = replace(amp, amp=False, channels_last=False)
    print(f"device {amp.describe()}, torch {torch.__version__}, input {a.shape}^3, batch {a.batch_size}, "
          f"{a.warmup} warm-up + {a.steps} timed steps, cudnn.benchmark {torch.backends.cudnn.benchmark}")
    print("| model | policy | samples/s | peak memory | AMP / float32 |")
    print("|---|---|---|---|---|")
    for depth in a.depths:
        base = measure(depth, fp32, a.shape, a.batch_size, a.warmup, a.steps)
        mixed = measure(depth, amp, a.shape, a.batch_size, a.warmup, a.steps)
        for name, rt, r in ((fp32.policy, fp32, base), (amp.policy, amp, mixed)):
            ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x speed, {r['peak_gib'] / base['peak_gib']:.2f}x memory" \
                if rt is amp and base["peak_gib"] == base["peak_gib"] else ""
            print(f"| resnet_{depth} | {name} | {r['samples_per_s']:.2f} | {r['peak_gib']:.2f} GiB | {ratio} |")
        if amp.device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
