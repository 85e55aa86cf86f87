"""The plain torch loops in ``common/learning/train.py``: counts in samples, sample-weighted losses, NaN guard,
prediction order and strict loading of FedAvg-averaged state.

Tiny models (a linear layer over a 2x2x2 volume) keep every test well under a second; one test runs a
real Med3D (depth 10) at 16^3 for two steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from common.device import Runtime
from common.learning.model import build_med3d, load_state_numpy, state_dict_numpy
from common.learning.train import EvalResult, TrainResult, predict, train_local

torch.set_num_threads(2)

CPU = Runtime(device=torch.device("cpu"), amp=False)


class DictDataset(Dataset):
    """Items shaped like the data pipeline's: ``{"image": [1, D, H, W], "label": int}``."""

    def __init__(self, images: torch.Tensor, labels: list[int]):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class TinyNet(nn.Module):
    """Linear classifier over a flattened [N, 1, 2, 2, 2] volume."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


class TinyBNNet(nn.Module):
    """Has a BatchNorm, hence an int64 ``num_batches_tracked`` buffer (as Med3D does)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.bn(x.flatten(1)))


def make_data(n: int = 5, seed: int = 0, scale: float = 3.0) -> DictDataset:
    """Spread-out inputs so that per-sample losses differ a lot (batch-mean vs sample-mean is visible)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 2, 2, 2, generator=gen) * scale
    labels = [i % 2 for i in range(n)]
    return DictDataset(images, labels)


def direct_ce(model: nn.Module, ds: DictDataset, reduction: str = "mean") -> torch.Tensor:
    with torch.no_grad():
        logits = model(ds.images)
        return F.cross_entropy(logits, torch.tensor(ds.labels), reduction=reduction)


# --- train_local -------------------------------------------------------------------------------


def test_num_examples_defaults_to_len_dataset_not_batches():
    ds = make_data(5)
    loader = DataLoader(ds, batch_size=2)  # 3 batches: 2, 2, 1
    res = train_local(TinyNet(), loader, epochs=1, lr=1e-3, weight_decay=0.0, rt=CPU)
    assert isinstance(res, TrainResult)
    assert res.num_examples == 5 == len(ds)
    assert res.num_examples != len(loader)  # 3 batches
    assert res.samples_seen == 5
    assert res.seconds > 0 and res.samples_per_second > 0


def test_num_examples_given_is_reported_as_is():
    ds = make_data(5)
    res = train_local(TinyNet(), DataLoader(ds, batch_size=2), epochs=1, lr=1e-3, weight_decay=0.0, rt=CPU,
                      num_examples=42)
    assert res.num_examples == 42
    assert isinstance(res.num_examples, int)


@pytest.mark.parametrize("epochs", [1, 3])
def test_samples_seen_counts_sampler_draws_over_epochs(epochs):
    """A class-balancing sampler draws ``num_samples`` per epoch (with replacement); the FedAvg weight
    stays the dataset size."""
    ds = make_data(5)
    sampler = WeightedRandomSampler(torch.ones(5, dtype=torch.double), num_samples=7, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=3, sampler=sampler)  # batches 3, 3, 1 per epoch
    res = train_local(TinyNet(), loader, epochs=epochs, lr=1e-3, weight_decay=0.0, rt=CPU)
    assert res.samples_seen == epochs * 7
    assert res.num_examples == 5


def test_loss_is_sample_weighted_mean_with_uneven_last_batch():
    """lr = 0 and weight_decay = 0 keep the weights fixed, so the reported loss must equal the plain
    cross-entropy over all samples (not the mean of the per-batch means)."""
    ds = make_data(5, seed=3)
    model = TinyNet(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = direct_ce(model, ds).item()
    per_sample = direct_ce(model, ds, reduction="none")
    batch_means = [per_sample[0:2].mean().item(), per_sample[2:4].mean().item(), per_sample[4:5].mean().item()]
    mean_of_batch_means = sum(batch_means) / 3
    assert abs(mean_of_batch_means - expected) > 1e-3, "fixture too uniform to tell the two means apart"

    res = train_local(model, DataLoader(ds, batch_size=2, shuffle=False), epochs=2, lr=0.0, weight_decay=0.0, rt=CPU)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert res.loss == pytest.approx(expected, rel=1e-6)
    assert res.samples_seen == 10 and res.num_examples == 5


def test_loss_is_finite_and_weights_change_with_positive_lr():
    ds = make_data(6)
    model = TinyNet()
    before = model.fc.weight.detach().clone()
    res = train_local(model, DataLoader(ds, batch_size=4), epochs=2, lr=1e-2, weight_decay=0.0, rt=CPU)
    assert math.isfinite(res.loss)
    assert not torch.equal(before, model.fc.weight.detach())


def test_nan_input_raises_floating_point_error_before_the_update():
    ds = make_data(4)
    ds.images[2, 0, 0, 0, 0] = float("nan")
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train_local(model, DataLoader(ds, batch_size=4), epochs=1, lr=1e-2, weight_decay=0.0, rt=CPU)
    for k, v in model.state_dict().items():  # the NaN batch never reached the optimizer
        assert torch.equal(v, before[k])


def test_empty_loader_gives_nan_loss_and_zero_counts():
    ds = DictDataset(torch.zeros(0, 1, 2, 2, 2), [])
    res = train_local(TinyNet(), DataLoader(ds, batch_size=2), epochs=1, lr=1e-3, weight_decay=0.0, rt=CPU)
    assert math.isnan(res.loss)
    assert res.num_examples == 0 and res.samples_seen == 0


def test_med3d_depth10_two_steps_at_16_cubed():
    """The real network, tiny volume: batch 2 + uneven last batch 1."""
    gen = torch.Generator().manual_seed(0)
    ds = DictDataset(torch.randn(3, 1, 16, 16, 16, generator=gen), [0, 1, 1])
    torch.manual_seed(0)
    model = build_med3d(depth=10)
    res = train_local(model, DataLoader(ds, batch_size=2), epochs=1, lr=1e-4, weight_decay=1e-4, rt=CPU,
                      class_weights=torch.tensor([1.5, 0.75]))
    assert math.isfinite(res.loss) and res.loss > 0
    assert res.num_examples == 3 and res.samples_seen == 3


# --- predict -----------------------------------------------------------------------------------


def test_predict_scores_in_loader_order_and_mean_ce():
    ds = make_data(5, seed=7)
    model = TinyNet(seed=2)
    with torch.no_grad():
        logits = model(ds.images)
    expected_scores = torch.softmax(logits, dim=1)[:, 1].numpy()
    expected_loss = F.cross_entropy(logits, torch.tensor(ds.labels)).item()

    res = predict(model, DataLoader(ds, batch_size=2, shuffle=False), CPU)
    assert isinstance(res, EvalResult)
    np.testing.assert_array_equal(res.y_true, np.array(ds.labels))
    assert res.y_true.dtype == np.int64 and res.y_score.dtype == np.float64
    np.testing.assert_allclose(res.y_score, expected_scores, rtol=1e-6)
    assert np.all((res.y_score >= 0) & (res.y_score <= 1))
    assert res.loss == pytest.approx(expected_loss, rel=1e-6)
    assert not model.training  # evaluation mode


def test_predict_order_follows_loader_not_dataset_when_reordered():
    ds = make_data(4, seed=11)
    model = TinyNet(seed=3)
    order = [3, 1, 0, 2]
    loader = DataLoader(ds, batch_size=3, sampler=order)
    res = predict(model, loader, CPU)
    full = predict(model, DataLoader(ds, batch_size=4), CPU)
    np.testing.assert_allclose(res.y_score, full.y_score[order], rtol=1e-6)
    np.testing.assert_array_equal(res.y_true, full.y_true[order])


def test_predict_empty_loader():
    ds = DictDataset(torch.zeros(0, 1, 2, 2, 2), [])
    res = predict(TinyNet(), DataLoader(ds, batch_size=2), CPU)
    assert res.y_true.shape == (0,) and res.y_score.shape == (0,)
    assert math.isnan(res.loss)


# --- state_dict_numpy / load_state_numpy -------------------------------------------------------


def test_load_state_numpy_casts_fedavg_float_counters_back_to_int64():
    src = TinyBNNet()
    src.train()
    src(torch.randn(4, 1, 2, 2, 2))  # num_batches_tracked = 1, running stats move
    arrays = state_dict_numpy(src)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    # FedAvg: a weighted mean turns the int64 counter into float64 (FLOWER.md §1)
    arrays["bn.num_batches_tracked"] = np.asarray(3.75, dtype=np.float64)

    dst = TinyBNNet()
    load_state_numpy(dst, arrays)
    nbt = dst.state_dict()["bn.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and int(nbt) == 3
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(dst.state_dict()[k], v)


def test_load_state_numpy_casts_float64_weights_to_model_dtype():
    src = TinyNet(seed=4)
    arrays = {k: v.astype(np.float64) for k, v in state_dict_numpy(src).items()}
    dst = TinyNet(seed=5)
    load_state_numpy(dst, arrays)
    assert dst.fc.weight.dtype == torch.float32
    torch.testing.assert_close(dst.fc.weight, src.fc.weight)


def test_load_state_numpy_accepts_torch_tensors_from_arrayrecord():
    """The ClientApp passes ``ArrayRecord.to_torch_state_dict()`` (tensors, not arrays)."""
    from flwr.app import ArrayRecord

    src = TinyBNNet()
    record = ArrayRecord(src.state_dict())
    dst = TinyBNNet()
    load_state_numpy(dst, record.to_torch_state_dict())
    torch.testing.assert_close(dst.fc.weight, src.fc.weight)


def test_load_state_numpy_is_strict_about_missing_keys():
    arrays = state_dict_numpy(TinyBNNet())
    del arrays["bn.running_mean"]
    with pytest.raises(RuntimeError, match="running_mean"):
        load_state_numpy(TinyBNNet(), arrays)


def test_load_state_numpy_is_strict_about_unexpected_keys():
    arrays = state_dict_numpy(TinyNet())
    arrays["extra.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_state_numpy(TinyNet(), arrays)


def test_load_state_numpy_rejects_wrong_shape():
    arrays = state_dict_numpy(TinyNet())
    arrays["fc.weight"] = np.zeros((3, 8), dtype=np.float32)
    with pytest.raises(RuntimeError, match="fc.weight"):
        load_state_numpy(TinyNet(), arrays)


def test_deterministic_kernels_sets_warn_only_mode_without_importing_inductor():
    """The CPU switch every ClientApp process sets: deterministic, warn-only, and no torch._inductor import
    (torch.use_deterministic_algorithms imports it: seconds per site message). In a fresh interpreter."""
    import subprocess
    import sys
    code = ("import sys, torch; from common.device import deterministic_kernels; "
            "assert deterministic_kernels(torch.device('cpu')); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor' in sys.modules, deterministic_kernels(torch.device('meta')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False", "False"]


# --- the GPU path's policy (common/device.py), run on CPU: bfloat16 autocast and channels_last_3d ------------


def test_bfloat16_channels_last_runtime_trains_and_hands_back_standard_layout():
    """The CUDA policy (bfloat16 autocast, no gradient scaler, channels_last_3d model and batches), exercised
    on CPU, where torch has the same bfloat16 autocast and memory formats: training and prediction run, the
    loss is finite, and the weights come back in the standard layout (state_dict, ArrayRecord, checkpoint)."""
    from common.device import amp_dtype_for, runtime

    bf16 = Runtime(device=torch.device("cpu"), amp=True, amp_dtype=torch.bfloat16, channels_last=True)
    assert not bf16.grad_scaler().is_enabled()  # bfloat16 needs no loss scaling
    assert Runtime(device=torch.device("cpu"), amp=True, amp_dtype=torch.float16).grad_scaler().is_enabled()  # float16 does
    assert bf16.inputs(torch.randn(2, 3, 4, 4, 4)).is_contiguous(memory_format=torch.channels_last_3d)
    assert bf16.memory_format == torch.channels_last_3d and "AMP bfloat16, channels_last_3d" in bf16.describe()
    assert amp_dtype_for(torch.device("cpu")) == torch.float16  # bfloat16 only on a CUDA device that supports it
    plain = runtime(requested="cpu")  # the CPU policy: float32, standard layout
    assert (plain.amp, plain.channels_last, plain.describe()) == (False, False, "cpu (float32)")

    torch.manual_seed(0)
    model = build_med3d(depth=10, num_classes=2)
    gen = torch.Generator().manual_seed(0)
    ds = DictDataset(torch.randn(4, 1, 16, 16, 16, generator=gen), [0, 1, 0, 1])
    loader = DataLoader(ds, batch_size=2)
    seen = []
    hook = model.backbone.layer1[0].conv1.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last_3d)))
    res = train_local(model, loader, epochs=1, lr=1e-3, weight_decay=0.0, rt=bf16)
    hook.remove()
    assert seen == [True, True]  # the 64-channel weights were channels_last_3d while training (and the batches:
    # Runtime.inputs; on CPU, unlike cuDNN, torch may hand activations on in the standard layout)
    assert math.isfinite(res.loss) and res.samples_seen == 4
    assert model.backbone.layer1[0].conv1.weight.is_contiguous()  # back to the standard layout after training
    out = predict(model, loader, bf16)
    assert np.isfinite(out.y_score).all() and len(out.y_score) == 4
    assert model.backbone.layer1[0].conv1.weight.is_contiguous()
    assert all(a.flags["C_CONTIGUOUS"] for a in state_dict_numpy(model).values())


def test_gpu_benchmark_script_runs_on_cpu_and_refuses_without_cuda_by_default():
    """benchmarks/gpu.py (the CUDA figures for BENCHMARKS.md) keeps working: a 16^3 smoke run on CPU prints its
    table; without CUDA and without --device cpu it says the GPU path is unverified and exits 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "16", "--depths", "10",
                          "--warmup", "1", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| resnet_10 |")]
    assert len(rows) == 2 and float(rows[0].split("|")[3]) > 0, run.stdout
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "unverified" in refused.stderr
