"""Dense linear probes on frozen patch tokens: semantic segmentation (mIoU) and monocular depth.

Segmentation ("lin." of DINOv2 Sec. 7): a 1x1 linear layer maps each last-block patch token to class
logits; the (h, w) logit map is bilinearly upsampled to the mask size and trained with cross-entropy
(ignore index 255). The tokens are standardised with train-set statistics first, the role of the
frozen BatchNorm in the official BNHead. mIoU sums intersections and unions over the whole split and
averages IoU over the classes present there (union > 0), as mmsegmentation does.

Depth (DINOv2 "lin. 1"): each patch token concatenated with the CLS token goes through one linear
layer to a depth value, bilinearly upsampled to the depth map size; loss L1 or SILog over valid
pixels. The paper's head classifies 256 depth bins and combines them linearly; here the head
regresses depth directly (documented in docs/evaluation-protocols.md). RMSE and delta<1.25 pool every
valid pixel of the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.data import fashion_mnist
from components.evaluate import dense_data
from components.evaluate.features import array_fingerprint, cached_features, model_fingerprint

DepthLoss = Literal["l1", "silog"]
MIN_DEPTH = 1e-3  # metres: predictions are clamped here so log and ratios stay finite
SILOG_VARIANCE_FOCUS = 0.85  # lambda of the SILog loss (Eigen et al. 2014; BTS / AdaBins value)


@dataclass
class DenseConfig:
    """Linear segmentation and depth probes; empty dataset folders mean the demo data."""

    enabled: bool = True
    image_size: int = 28  # images are resized to this before the backbone; targets keep their size
    segmentation: bool = True
    depth: bool = True
    segmentation_dir: str = ""  # a dense_data folder; empty: the demo, built under demo_dir
    depth_dir: str = ""
    demo_dir: str = ".dinoflow/cache/dense-demo"  # the stage passes <state>/cache/dense-demo
    demo_size: int = 28  # side of demo images and targets
    demo_train_images: int = 96
    demo_val_images: int = 32
    demo_depth_tile: int = 80  # source pixels per depth tile (stereo_motorcycle is 500 x 741)
    source_dir: str = str(fashion_mnist.INSTALLED_DATA_DIR)  # Fashion-MNIST for the segmentation demo
    data_cache_dir: str = ".dinoflow/cache/fashion-mnist"
    allow_fetch: bool = True
    epochs: int = 40
    probe_batch_size: int = 32
    lr: float = 1e-2  # AdamW
    weight_decay: float = 1e-4
    depth_loss: DepthLoss = "silog"
    depth_use_cls: bool = True  # "lin. 1": CLS concatenated to every patch token
    seed: int = 0

    def validate(self) -> None:
        if self.image_size < 1 or self.demo_size < 1 or self.demo_depth_tile < 1:
            raise ValueError("image_size, demo_size and demo_depth_tile must be >= 1")
        if self.demo_train_images < 1 or self.demo_val_images < 1:
            raise ValueError("demo_train_images and demo_val_images must be >= 1")
        if self.epochs < 1 or self.probe_batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs and probe_batch_size must be >= 1, lr > 0, weight_decay >= 0")
        if self.depth_loss not in ("l1", "silog"):
            raise ValueError(f"depth_loss must be 'l1' or 'silog', got {self.depth_loss!r}")


# ---------------------------------------------------------------- metric math


def confusion_counts(
    pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int = dense_data.IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union (C,) over all pixels whose target is not ``ignore_index``."""
    pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ")
    keep = target != ignore_index
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    if len(target) and (target.max() >= n_classes or target.min() < 0 or pred.min() < 0 or pred.max() >= n_classes):
        raise ValueError(f"class ids must be in [0, {n_classes}) (or {ignore_index} in the target)")
    intersection = np.bincount(target[pred == target], minlength=n_classes)
    union = np.bincount(pred, minlength=n_classes) + np.bincount(target, minlength=n_classes) - intersection
    return intersection, union


def miou(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int = dense_data.IGNORE_INDEX) -> float:
    """Mean IoU over classes present (in prediction or target, union > 0); arrays of any equal shape."""
    intersection, union = confusion_counts(pred, target, n_classes, ignore_index)
    present = union > 0
    if not present.any():
        raise ValueError("no valid pixel: mIoU is undefined")
    return float((intersection[present] / union[present]).mean())


def depth_metrics(pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """RMSE (metres) and delta1 = fraction with max(p/t, t/p) < 1.25, pooled over valid pixels.

    Predictions are clamped to MIN_DEPTH so the ratio is defined for any prediction."""
    valid = np.asarray(valid, dtype=bool)
    p = np.maximum(np.asarray(pred, dtype=np.float64)[valid], MIN_DEPTH)
    t = np.asarray(target, dtype=np.float64)[valid]
    if not len(t) or (t <= 0).any():
        raise ValueError("need at least one valid pixel, and valid targets must be > 0")
    rmse = float(np.sqrt(np.mean((p - t) ** 2)))
    delta1 = float(np.mean(np.maximum(p / t, t / p) < 1.25))
    return {"rmse": rmse, "delta1": delta1}


def silog_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(d^2) - lambda mean(d)^2), d = log pred - log target over valid pixels."""
    d = torch.log(pred[valid].clamp_min(MIN_DEPTH)) - torch.log(target[valid])  # (V,)
    return torch.sqrt((d.pow(2).mean() - SILOG_VARIANCE_FOCUS * d.mean().pow(2)).clamp_min(1e-12))


# ---------------------------------------------------------------- features


@dataclass(frozen=True)
class DenseFeatures:
    patches: torch.Tensor  # (N, h, w, D) last-block patch tokens, normed
    cls: torch.Tensor  # (N, D)


def dense_features(
    model: nn.Module, images: torch.Tensor, batch_size: int, cache_dir: Path | None = None, protocol: str = "dense"
) -> DenseFeatures:
    """Patch tokens on their (H/p, W/p) grid and CLS from ``model.forward_features`` on normalised images
    (N, 3, H, W); cached by (model fingerprint, input bytes, protocol) when ``cache_dir`` is given."""
    patch = _patch_size(model)
    grid = (images.shape[2] // patch, images.shape[3] // patch)

    def compute() -> np.ndarray:
        return _cls_and_patches(model, images, batch_size)

    if cache_dir is None:
        packed = compute()
    else:
        key = {"protocol": protocol, "what": "cls+patches", "model": model_fingerprint(model),
               "inputs": array_fingerprint(images.numpy())}
        packed = cached_features(cache_dir, key, compute)
    tokens = torch.from_numpy(np.array(packed, dtype=np.float32))  # (N, 1 + h*w, D)
    return DenseFeatures(tokens[:, 1:].reshape(len(tokens), *grid, -1), tokens[:, 0])


def _patch_size(model: nn.Module) -> int:
    patch = getattr(model, "patch_size", None)
    if not isinstance(patch, int) or patch < 1:
        raise TypeError(f"{type(model).__name__} has no integer patch_size: not a ViT backbone")
    return patch


FeatureDict = dict[str, torch.Tensor]


def _cls_and_patches(model: nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """One pass through ``model.forward_features`` (the DinoVisionTransformer dict contract)."""
    forward: Callable[[torch.Tensor], FeatureDict] | None = getattr(model, "forward_features", None)
    if forward is None:
        raise TypeError(f"{type(model).__name__} has no forward_features: not a DINOv2-style backbone")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                out = forward(batch.to(device))
                cls = out["x_norm_clstoken"][:, None]  # (b, 1, D)
                chunks.append(torch.cat([cls, out["x_norm_patchtokens"]], dim=1).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks)  # (N, 1 + P, D)


def standardiser(train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """(x - mean) / std per channel with train statistics: a frozen BatchNorm before the linear layer."""
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6)
    return lambda x: (x - mean) / std


# ---------------------------------------------------------------- probes


def _train(head: nn.Module, inputs: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           cfg: DenseConfig) -> None:
    """Minibatch AdamW over ``inputs`` (N, ...) for cfg.epochs; ``loss_of(batch_inputs, batch_index)``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(inputs) // cfg.probe_batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    head.train()
    for _ in range(cfg.epochs):
        for index in torch.randperm(len(inputs), generator=generator).split(cfg.probe_batch_size):
            loss = loss_of(inputs[index], index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()


def segmentation_logits(head: nn.Linear, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, D) tokens -> (B, C, H, W) logits: 1x1 linear, then bilinear upsampling."""
    logits = head(tokens).permute(0, 3, 1, 2)  # (B, C, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, C, H, W)


def segmentation_probe(
    train: torch.Tensor, train_masks: np.ndarray, val: torch.Tensor, val_masks: np.ndarray, n_classes: int,
    cfg: DenseConfig,
) -> np.ndarray:
    """Fit the linear head on train tokens (N, h, w, D) / masks (N, H, W); predicted val masks (M, H, W)."""
    torch.manual_seed(cfg.seed)
    norm = standardiser(train)
    x_train, x_val = norm(train), norm(val)
    targets = torch.from_numpy(np.array(train_masks, dtype=np.int64))  # (N, H, W)
    size = (int(train_masks.shape[1]), int(train_masks.shape[2]))
    head = nn.Linear(train.shape[-1], n_classes)

    def loss_of(batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(segmentation_logits(head, batch, size), targets[index],
                               ignore_index=dense_data.IGNORE_INDEX)

    _train(head, x_train, loss_of, cfg)
    with torch.no_grad():
        val_size = (int(val_masks.shape[1]), int(val_masks.shape[2]))
        return segmentation_logits(head, x_val, val_size).argmax(dim=1).numpy()  # (M, H, W)


def depth_inputs(features: DenseFeatures, use_cls: bool) -> torch.Tensor:
    """(N, h, w, D) patch tokens, with the CLS broadcast and concatenated: (N, h, w, 2D)."""
    if not use_cls:
        return features.patches
    cls = features.cls[:, None, None].expand(-1, *features.patches.shape[1:3], -1)  # (N, h, w, D)
    return torch.cat([features.patches, cls], dim=-1)


def depth_prediction(head: nn.Linear, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, D') -> depth (B, H, W), bilinearly upsampled, clamped to MIN_DEPTH."""
    depth = head(tokens).permute(0, 3, 1, 2)  # (B, 1, h, w)
    return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(MIN_DEPTH)


def depth_probe(
    train: torch.Tensor, train_depth: np.ndarray, val: torch.Tensor, val_depth: np.ndarray, cfg: DenseConfig
) -> np.ndarray:
    """Fit the linear depth head on train inputs (N, h, w, D') / depth (N, H, W) metres (0 invalid);
    predicted val depth (M, H, W)."""
    torch.manual_seed(cfg.seed)
    norm = standardiser(train)
    x_train, x_val = norm(train), norm(val)
    targets = torch.from_numpy(np.array(train_depth, dtype=np.float32))  # (N, H, W)
    valid = targets > 0
    if not valid.any():
        raise ValueError("the depth train split has no valid pixel")
    size = (int(train_depth.shape[1]), int(train_depth.shape[2]))
    head = nn.Linear(train.shape[-1], 1)
    with torch.no_grad():
        nn.init.zeros_(head.weight)
        head.bias.fill_(float(targets[valid].mean()))  # start from the mean depth, not from ~0 m

    def loss_of(batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        pred, target, mask = depth_prediction(head, batch, size), targets[index], valid[index]
        if not mask.any():
            return pred.sum() * 0.0  # a batch of invalid pixels only: no signal, keep the graph
        if cfg.depth_loss == "silog":
            return silog_loss(pred, target, mask)
        return (pred[mask] - target[mask]).abs().mean()

    _train(head, x_train, loss_of, cfg)
    with torch.no_grad():
        return depth_prediction(head, x_val, (int(val_depth.shape[1]), int(val_depth.shape[2]))).numpy()


# ---------------------------------------------------------------- protocol


def segmentation_demo_dir(cfg: DenseConfig) -> Path:
    """The demo folder for these demo settings, built once (its dataset.json is written last)."""
    root = Path(cfg.demo_dir) / (f"segmentation-s{cfg.demo_size}-n{cfg.demo_train_images}-"
                                 f"{cfg.demo_val_images}-seed{cfg.seed}")
    if not (root / dense_data.DATASET_FILE).is_file():
        folder = fashion_mnist.locate(Path(cfg.source_dir), Path(cfg.data_cache_dir), allow_fetch=cfg.allow_fetch)
        test = fashion_mnist.load_split(folder, "test")
        picks = fashion_mnist.balanced_subset(test.labels, 20, cfg.seed)
        order = np.random.default_rng(cfg.seed).permutation(picks)  # mix classes across the two halves
        dense_data.build_segmentation_demo(root, test.images[order], test.labels[order], cfg.demo_train_images,
                                           cfg.demo_val_images, cfg.demo_size, cfg.seed)
    return root


def depth_demo_dir(cfg: DenseConfig) -> Path:
    root = Path(cfg.demo_dir) / f"depth-s{cfg.demo_size}-t{cfg.demo_depth_tile}-seed{cfg.seed}"
    if not (root / dense_data.DATASET_FILE).is_file():
        dense_data.build_depth_demo(root, tile=cfg.demo_depth_tile, size=cfg.demo_size, seed=cfg.seed)
    return root


def _split_features(
    model: nn.Module, root: Path, split: str, cfg: DenseConfig, mean: Sequence[float], std: Sequence[float],
    batch_size: int, cache_dir: Path | None,
) -> tuple[DenseFeatures, np.ndarray]:
    data = dense_data.read_split(root, split)
    images = dense_data.rgb_tensor(data.images, cfg.image_size, mean, std)
    return dense_features(model, images, batch_size, cache_dir, f"dense-{split}"), data.targets


def evaluate_segmentation(
    model: nn.Module, cfg: DenseConfig, mean: Sequence[float], std: Sequence[float], batch_size: int = 256,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    root = Path(cfg.segmentation_dir) if cfg.segmentation_dir else segmentation_demo_dir(cfg)
    n_classes = len(dense_data.segmentation_classes(root))
    train, train_masks = _split_features(model, root, "train", cfg, mean, std, batch_size, cache_dir)
    val, val_masks = _split_features(model, root, "val", cfg, mean, std, batch_size, cache_dir)
    pred = segmentation_probe(train.patches, train_masks, val.patches, val_masks, n_classes, cfg)
    return {"seg_miou": miou(pred, val_masks, n_classes)}


def evaluate_depth(
    model: nn.Module, cfg: DenseConfig, mean: Sequence[float], std: Sequence[float], batch_size: int = 256,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    root = Path(cfg.depth_dir) if cfg.depth_dir else depth_demo_dir(cfg)
    train, train_depth = _split_features(model, root, "train", cfg, mean, std, batch_size, cache_dir)
    val, val_depth = _split_features(model, root, "val", cfg, mean, std, batch_size, cache_dir)
    pred = depth_probe(depth_inputs(train, cfg.depth_use_cls), train_depth,
                       depth_inputs(val, cfg.depth_use_cls), val_depth, cfg)
    scores = depth_metrics(pred, val_depth, val_depth > 0)
    return {"depth_rmse": scores["rmse"], "depth_delta1": scores["delta1"]}


def evaluate_dense(
    model: nn.Module,
    cfg: DenseConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    batch_size: int = 256,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """``seg_miou`` and / or ``depth_rmse``, ``depth_delta1`` (as enabled) of the linear dense probes."""
    cfg.validate()
    model = model.to(device)
    metrics: dict[str, float] = {}
    if cfg.segmentation:
        metrics.update(evaluate_segmentation(model, cfg, mean, std, batch_size, cache_dir))
    if cfg.depth:
        metrics.update(evaluate_depth(model, cfg, mean, std, batch_size, cache_dir))
    return metrics
