"""Med3D: the MedicalNet 3D ResNet backbone with a small classification head.

The backbone follows the MedicalNet implementation (``models/resnet.py`` of
https://github.com/Tencent/MedicalNet) module for module, so its ``state_dict`` keys are those of the
released checkpoints without their ``module.`` prefix. Reference:

    Chen, Ma, Zheng. "Med3D: Transfer Learning for 3D Medical Image Analysis." arXiv:1904.00625, 2019.

MedicalNet's ResNet keeps resolution after layer2: layer3 and layer4 use stride 1 with dilation 2 and 4
(total stride 8), unlike MONAI's and torchvision's ResNets, which stride to 32. Weights are loaded with
every key and every shape checked; anything that does not fit exactly raises :class:`CheckpointError`.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import RunConfig
from common.errors import CheckpointError
from common.keys import MODEL_DEPTHS, NUM_CLASSES

__all__ = ["Med3D", "MedicalNetResNet", "build_med3d", "load_medicalnet_weights", "check_checkpoint", "DEPTHS",
           "SHORTCUTS", "state_dict_numpy", "load_state_numpy", "batchnorm_keys", "statistics_keys", "exchanged_keys", "make_model", "model_args", "model_from_checkpoint"]

log = logging.getLogger("fedpd.model")

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions (MedicalNet ``BasicBlock``, expansion 1)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1x1 reduce, 3x3x3, 1x1x1 expand (MedicalNet ``Bottleneck``, expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ZeroPadShortcut(nn.Module):
    """Shortcut type A: strided identity, extra channels zero-filled. Holds no parameters or buffers."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        out = F.avg_pool3d(x, kernel_size=1, stride=self.stride)  # kernel 1 = pick every stride-th voxel
        # F.pad lists dims last-first: (W, H, D, C) pairs; pad only the end of the channel dim.
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.planes - out.shape[1]))


# depth -> (block type, blocks in layer1..layer4, default shortcut). The defaults are those of the
# released MedicalNet files: type A for resnet_18/34, type B (1x1x1 conv + BN) for the others.
_VARIANTS = {
    10: (BasicBlock, (1, 1, 1, 1), "B"),
    18: (BasicBlock, (2, 2, 2, 2), "A"),
    34: (BasicBlock, (3, 4, 6, 3), "A"),
    50: (Bottleneck, (3, 4, 6, 3), "B"),
    101: (Bottleneck, (3, 4, 23, 3), "B"),
    152: (Bottleneck, (3, 8, 36, 3), "B"),
    200: (Bottleneck, (3, 24, 36, 3), "B"),
}
DEPTHS = MODEL_DEPTHS  # the run-config's choices (common/keys.py); each has its variant above
if tuple(_VARIANTS) != DEPTHS:
    raise RuntimeError("common/learning/model.py: _VARIANTS and keys.MODEL_DEPTHS differ")
_DEPTH_LIST = ", ".join(map(str, DEPTHS))


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet without its segmentation head (``conv_seg``); returns the layer4 map."""

    def __init__(self, depth: int, shortcut: str):
        super().__init__()
        block, layers, _ = _VARIANTS[depth]
        self.depth, self.shortcut, self.out_channels = depth, shortcut, 512 * block.expansion
        self.inplanes = 64  # channels entering the next layer, updated by _make_layer
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], shortcut)
        self.layer2 = self._make_layer(block, 128, layers[1], shortcut, stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], shortcut, dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], shortcut, dilation=4)
        for m in self.modules():  # MedicalNet's init
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _make_layer(self, block, planes, blocks, shortcut, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if shortcut == "A":
                downsample = ZeroPadShortcut(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride,
                                                     bias=False), nn.BatchNorm3d(planes * block.expansion))
        # As in MedicalNet, every block of a dilated layer is dilated; only the first one strides.
        layers = [block(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


class Med3D(nn.Module):
    """MedicalNet backbone + global average pool, dropout and a linear classifier.

    Attributes:
        backbone: the :class:`MedicalNetResNet`; ``backbone(x)`` is the layer4 feature map.
        head: ``pool -> flatten -> dropout -> fc``; ``Med3D(x)`` returns logits ``[N, num_classes]``.
    """

    def __init__(self, backbone: MedicalNetResNet, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool3d(1), flatten=nn.Flatten(1),
                                              dropout=nn.Dropout(dropout),
                                              fc=nn.Linear(backbone.out_channels, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_med3d(depth: int = 10, num_classes: int = 2, pretrained: str | Path | None = None,
                shortcut: str | None = None, dropout: float = 0.0) -> Med3D:
    """Build a Med3D classifier (Chen et al. 2019, arXiv:1904.00625; github.com/Tencent/MedicalNet).

    Args:
        depth: ResNet depth, one of 10, 18, 34, 50, 101, 152, 200. 10/18/34 use BasicBlocks,
            50 and deeper use Bottlenecks (final feature width 512 and 2048).
        num_classes: outputs of the linear head (2 for control vs Parkinson's disease).
        pretrained: path of a MedicalNet checkpoint (e.g. ``resnet_10_23dataset.pth``) to load into the
            backbone; ``None`` keeps MedicalNet's random initialisation. The head is never pretrained.
        shortcut: residual shortcut type: ``"A"`` (parameter-free zero padding) or ``"B"`` (1x1x1 conv +
            BN). ``None`` picks MedicalNet's choice for ``depth``: A for 18/34, B otherwise.
        dropout: dropout probability before the linear head.

    Input: ``[N, 1, D, H, W]`` volumes, z-scored over voxels > 0 as MedicalNet was trained.

    Raises:
        ValueError: unknown ``depth`` or ``shortcut``.
        CheckpointError: ``pretrained`` does not load exactly into the backbone.
    """
    if depth not in _VARIANTS:
        raise ValueError(f"depth={depth!r} is not a MedicalNet ResNet depth; choose one of {_DEPTH_LIST}")
    shortcut = _VARIANTS[depth][2] if shortcut is None else shortcut
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut={shortcut!r} is not a shortcut type; choose one of A, B (or None)")
    backbone = MedicalNetResNet(depth, shortcut)
    if pretrained is not None:
        load_medicalnet_weights(backbone, pretrained)
    return Med3D(backbone, num_classes, dropout)


# ---------------------------------------------------------------------------------------- checkpoints

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def _short(items, n: int = 10) -> str:
    items = list(items)
    more = f", and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed, in the user's terms, judged from the file's first bytes."""
    with path.open("rb") as f:
        head = f.read(352)
    if head[:2] == b"\x1f\x8b":
        return "it is gzip-compressed (a .nii.gz image?), not a PyTorch checkpoint"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "it is a NIfTI image, not a PyTorch checkpoint"
    if head[:4] == b"PK\x03\x04" and isinstance(exc, pickle.UnpicklingError):
        return ("it holds pickled Python objects besides tensors, which weights_only loading refuses; "
                "re-save only the weights: torch.save({'state_dict': model.state_dict()}, path)")
    reason = re.sub(r"\x1b\[\d*m", "", (str(exc).strip().splitlines() or [""])[0]).split(". ")[0][:120]
    return f"it is not a PyTorch checkpoint, or it is truncated or corrupt ({type(exc).__name__}: {reason})"


def _read_state_dict(path: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Load a checkpoint's tensors with keys as the backbone names them (no ``module.``, no ``conv_seg``)."""
    path = Path(path)
    fix = ("Fix: point pretrained-path at a MedicalNet file "
           "(e.g. resnet_10_23dataset.pth from github.com/Tencent/MedicalNet)")
    if not path.is_file():
        raise CheckpointError(f"{path}: {'is not a file' if path.exists() else 'no such file'}. {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a usable checkpoint"
        raise CheckpointError(f"{path}: cannot be read: {_unreadable(path, exc)}. "
                              f"{fix}, re-downloading it if it was cut short") from None
    # Official layout {'state_dict': {'module.<key>': tensor}}; a bare {key: tensor} dict is accepted too.
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        what = f"a dict with keys {_short(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a state dict of tensors; expected "
                              f"{{'state_dict': {{'module.conv1.weight': tensor, ...}}}} as MedicalNet ships. {fix}")
    # DataParallel's prefix, stripped only at the start of a key.
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    seg = [k for k in sd if k.startswith("conv_seg.")]
    if seg:
        log.info("%s: ignoring %d segmentation-head tensors (conv_seg.*)", path, len(seg))
    sd = {k: v for k, v in sd.items() if not k.startswith("conv_seg.")}
    bad = nonfinite_tensors(sd)
    if bad:
        total = sum(bad.values())
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) hold {total:,} NaN/Inf value(s): "
                              f"{_short(f'{k} ({n:,})' for k, n in bad.items())}; the file is corrupt. "
                              f"Fix: re-download the checkpoint (MedicalNet files from github.com/Tencent/MedicalNet)")
    return path, sd


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{key: number of NaN/Inf values}`` for every floating-point tensor of ``state`` that holds any."""
    bad = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad[k] = n
    return bad


class _Arch(NamedTuple):
    """What a checkpoint's keys say about the network that wrote it."""

    block: str  # "BasicBlock" or "Bottleneck"
    counts: list[int]  # blocks in layer1..layer4
    depth: int | None  # the MedicalNet depth with that block and counts, None if none
    shortcut: str  # "B" if any downsample conv is stored, else "A"


def _guess_arch(keys) -> _Arch | None:
    """Read the architecture off checkpoint keys; ``None`` when there are no ``layerN.i.`` keys at all."""
    counts = [0, 0, 0, 0]
    for k in keys:
        if m := _BLOCK_KEY.match(k):
            layer, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[layer] = max(counts[layer], idx + 1)  # block count = highest block index + 1
    if not any(counts):
        return None
    block = Bottleneck if "layer1.0.conv3.weight" in keys else BasicBlock  # only Bottlenecks have conv3
    depth = next((d for d, (b, n, _) in _VARIANTS.items() if b is block and list(n) == counts), None)
    return _Arch(block.__name__, counts, depth, "B" if any(".downsample.0.weight" in k for k in keys) else "A")


def _describe(guess: _Arch | None) -> str:
    if guess is None:
        return "no layer1..layer4 keys, so not a MedicalNet ResNet"
    name = f"depth {guess.depth}" if guess.depth else "no MedicalNet depth"
    return f"{name} ({guess.block} blocks {guess.counts}, shortcut {guess.shortcut})"


def _match(backbone: MedicalNetResNet, sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Check keys and shapes against ``backbone``; return the full state dict to load strictly."""
    own = backbone.state_dict()
    # num_batches_tracked is absent from checkpoints saved by PyTorch < 0.4.1; keep the model's own.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} (file {list(sd[k].shape)}, model {list(own[k].shape)})"
                 for k in sd if k in own and sd[k].shape != own[k].shape]
    if not (missing or unexpected or misshaped):
        return {**own, **sd}
    guess = _guess_arch(sd)
    want = f"Med3D depth {backbone.depth} (shortcut {backbone.shortcut})"
    lines = [f"{path}: does not load exactly into {want}; the file looks like {_describe(guess)}"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {_short(keys)}")
    if guess and guess.depth and guess.depth != backbone.depth:
        lines.append(f"Fix: this checkpoint looks like a depth-{guess.depth} MedicalNet ResNet ({guess.block} blocks): "
                     f"set model-depth={guess.depth}")
    elif guess and guess.depth == backbone.depth and guess.shortcut != backbone.shortcut:
        lines.append(f"Fix: this checkpoint uses shortcut {guess.shortcut}: "
                     f"build_med3d(depth={guess.depth}, shortcut='{guess.shortcut}')")
    elif any(k == "fc.weight" or k.endswith("downsample.0.bias") for k in unexpected):
        lines.append("Fix: the fc head / downsample biases mark a MONAI or torchvision ResNet (strided layer3/4, "
                     "not dilated), not MedicalNet; use a MedicalNet file from github.com/Tencent/MedicalNet")
    else:
        lines.append(f"Fix: use the unmodified MedicalNet resnet_{backbone.depth} file, or set model-depth to the "
                     f"file's depth (see `fedpd check-checkpoint {path}`)")
    raise CheckpointError("\n".join(lines))


def load_medicalnet_weights(backbone: MedicalNetResNet, path: str | Path) -> dict[str, int]:
    """Load a MedicalNet checkpoint into ``backbone`` exactly (every key and shape checked, strict load).

    Args:
        backbone: a ``Med3D.backbone`` (MedicalNet ResNet).
        path: checkpoint file, ``{'state_dict': {'module.<key>': tensor}}`` as MedicalNet ships it; a bare
            dict of tensors and keys without ``module.`` are accepted, ``conv_seg.*`` is ignored.

    Returns:
        ``{"tensors": n, "numbers": m}``: how many tensors and scalar values came from the file.

    Raises:
        CheckpointError: unreadable file, or missing, unexpected or mis-shaped keys.
    """
    path, sd = _read_state_dict(path)
    backbone.load_state_dict(_match(backbone, sd, path), strict=True)
    counts = {"tensors": len(sd), "numbers": sum(v.numel() for v in sd.values())}
    log.info("loaded %d tensors (%s numbers) from %s", counts["tensors"], f"{counts['numbers']:,}", path)
    return counts


def check_checkpoint(path: str | Path, depth: int | None = None) -> str:
    """Check that a checkpoint loads exactly into Med3D and describe it (``fedpd check-checkpoint``).

    Args:
        path: checkpoint file.
        depth: the depth it must fit; ``None`` uses the depth guessed from its keys.

    Returns:
        A multi-line report: file, depth guess, tensor and number counts, and an ``OK:`` line.

    Raises:
        CheckpointError: the file cannot be read, its depth cannot be guessed, or it does not load.
    """
    path, sd = _read_state_dict(path)
    guess = _guess_arch(sd)
    if depth is None:
        if guess is None or guess.depth is None:
            raise CheckpointError(f"{path}: cannot guess a MedicalNet depth: {_describe(guess)}. "
                                  f"Fix: pass --depth (one of {_DEPTH_LIST}) to see which keys differ")
        depth = guess.depth
    if depth not in _VARIANTS:
        raise CheckpointError(f"{path}: depth {depth} is not a MedicalNet depth; choose one of {_DEPTH_LIST}")
    backbone = MedicalNetResNet(depth, _VARIANTS[depth][2])
    backbone.load_state_dict(_match(backbone, sd, path), strict=True)
    return "\n".join([
        f"file: {path}",
        f"depth guess: {_describe(guess)}",
        f"tensors: {len(sd)} ({sum(v.numel() for v in sd.values()):,} numbers)",
        f"OK: loads exactly into Med3D depth {depth}",
    ])


# --- weights in and out of a model (numpy, as Flower's ArrayRecord carries them) ----------------------


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as CPU numpy arrays (the form that travels in Flower messages and checkpoints)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_state_numpy(model: nn.Module, arrays: dict[str, np.ndarray], keys: list[str] | None = None) -> None:
    """Load numpy arrays into ``model``, casting each to the dtype of the model's tensor.

    Strict: ``arrays`` must hold exactly the model's state keys, or exactly ``keys`` when given (a partial
    exchange, :func:`exchanged_keys`; the other tensors keep their values). FedAvg turns the int64
    ``num_batches_tracked`` buffers into floats; casting back keeps the dtype.
    """
    own = model.state_dict()
    if keys is not None and set(arrays) != set(keys):
        missing, extra = sorted(set(keys) - set(arrays)), sorted(set(arrays) - set(keys))
        raise RuntimeError(f"state keys differ from the exchanged keys: missing {missing[:5]}, unexpected {extra[:5]}")
    state = {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype) if k in own else torch.as_tensor(np.asarray(v))
             for k, v in arrays.items()}
    if keys is not None:
        state = {k: own[k] for k in own if k not in state} | state
    model.load_state_dict(state, strict=True)


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state keys of every BatchNorm layer: affine weight and bias, running mean and variance, batch count
    (what FedBN keeps at the site)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out += [f"{name}.{k}" if name else k for k in module.state_dict()]
    return out


def statistics_keys(model: nn.Module) -> list[str]:
    """The state keys that are not trained by gradient: BatchNorm running statistics and batch counts."""
    return [name for name, _ in model.named_buffers()]


def exchanged_keys(model: nn.Module, statistics: bool = True) -> list[str]:
    """The state keys that travel between server and sites, in state-dict order.

    Everything when ``statistics`` (RunConfig.statistics_shared). Otherwise, under differential privacy or
    secure aggregation, only the trained parameters: a site's update must be clipped and noised as a whole,
    or quantized into a fixed range, and BatchNorm running statistics (data-dependent, not trained by gradient)
    and batch counts (which grow by the number of batches) cannot be. There each site trains with batch
    statistics and keeps its running statistics for itself (:func:`site_batchnorm_keys`), and the server
    re-estimates its own from its validation images every round
    (:func:`common.learning.train.recalibrate_batchnorm`).
    """
    stats = set() if statistics else set(statistics_keys(model))
    return [k for k in model.state_dict() if k not in stats]


def site_batchnorm_keys(model: nn.Module, strategy: str, statistics: bool = True) -> list[str]:
    """The BatchNorm state a site keeps for itself between the messages of a run (the ClientApp's
    ``context.state``) and uses instead of what the server sent: every BatchNorm tensor under ``fedbn``; the
    running statistics and batch counts when they are not exchanged (``statistics`` false: differential privacy,
    secure aggregation); otherwise nothing."""
    if strategy == "fedbn":
        return batchnorm_keys(model)
    return [] if statistics else statistics_keys(model)


# --- from a run-config or a checkpoint to a model ---------------------------------------------------


# randomly initialised models already built in this process, by (depth, dropout, seed): make_model copies one
# instead of initialising 14 million weights again (0.2 s for resnet_10; a simulation's ClientApp actor builds a
# model for every message). A few entries at most: one run uses one.
_BUILT: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_BUILT_MAX = 2


def make_model(cfg: RunConfig, pretrained: bool = False) -> torch.nn.Module:
    """The Med3D of this run-config; MedicalNet weights only when ``pretrained`` (server init).

    The random initialisation follows ``cfg.seed``; a fresh copy of a model this process already built with
    the same depth, dropout and seed is returned instead of building it again (bit-identical weights)."""
    path = cfg.pretrained_path if (pretrained and cfg.pretrained_path) else None
    key = (cfg.model_depth, cfg.dropout, cfg.seed)
    if path is None and key in _BUILT:
        _BUILT.move_to_end(key)
        return copy.deepcopy(_BUILT[key])
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without resetting the caller's RNG
        torch.manual_seed(cfg.seed)  # random init (from scratch, and the head) follows the run's seed
        model = build_med3d(depth=cfg.model_depth, num_classes=2, pretrained=path, dropout=cfg.dropout)
    if path is None:
        _BUILT[key] = copy.deepcopy(model)
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    return model


def model_args(cfg: RunConfig) -> dict:
    """What builds this run's Med3D, as stored in every checkpoint's ``model`` entry."""
    return {"depth": cfg.model_depth, "num_classes": NUM_CLASSES, "dropout": cfg.dropout}


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> torch.nn.Module:
    """The Med3D a fedpd checkpoint describes, with its weights: the one way from a checkpoint to a model.

    The architecture comes from the checkpoint itself (its ``model`` entry, else its stored run-config), never
    from the caller's run-config, so a model is always rebuilt as it was trained. The caller's RNG is left
    as it was (the weights replace the random initialisation anyway).

    Raises:
        CheckpointError: the weights do not fit the model the checkpoint names (the message names ``path``).
    """
    args = dict(ckpt.get("model") or {})
    config = ckpt.get("config") or {}
    try:
        depth = int(args.get("depth", config.get("model-depth", 10)))
        classes = int(args.get("num_classes", NUM_CLASSES))
        dropout = float(args.get("dropout", config.get("dropout", 0.0)))
        with torch.random.fork_rng(devices=[]):
            model = build_med3d(depth=depth, num_classes=classes, dropout=dropout)
        load_state_numpy(model, {k: v.numpy() for k, v in ckpt["state_dict"].items()})
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit Med3D {args or {'depth': config.get('model-depth')}}: "
                              f"{str(exc).splitlines()[0][:300]}") from exc
    return model
