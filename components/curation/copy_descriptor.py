"""A trained copy-detection descriptor in the SSCD style (Pizzi et al. 2022), saved as a backbone folder.

Why it exists: near-duplicate removal needs a descriptor that survives the edits a copy goes through
(crops, rescaling, JPEG, colour changes, small rotations, flips, captions; copy_edits.py). Pixel
descriptors miss crops and flips almost entirely, and a semantic backbone (the DINO teacher) puts
distinct images of one class as close as copies. SSCD, the copy detector the DINOv2 paper dedups
with, learns the invariance directly:

* **instance discrimination**: every pool image of a batch gets two views, each an independent
  :func:`~components.curation.copy_edits.random_copy` (or the unedited image for the first view, the
  pair the dedup actually compares); InfoNCE makes each view pick its partner out of the other
  ``2B - 2`` views of the batch, so the descriptor keeps what identifies *this* image and drops what
  an edit changes;
* a **KoLeo** (entropy) regulariser on the unit descriptors (components/ssl/koleo.py, per view so
  the two views of an image never repel each other) spreads distinct images over the sphere, which
  lowers the cosine of each image's nearest *distinct* neighbour: that cosine, not the average, is
  what sets a dedup threshold.

The model is the project's ViT and the descriptor is exactly what the embed step computes: the
L2-normalised ``x_norm_clstoken`` of images preprocessed by ``embed.preprocess`` (RGB, shorter side
resized, centre crop, ImageNet normalisation). :func:`export_copy_descriptor` writes an ordinary
backbone folder (``config.json`` + ``model.safetensors``), so ``embed.backbone: <folder>`` with
``embed.image_size`` equal to :attr:`CopyDescriptorConfig.image_size` uses it with no new code path.
SSCD's own GeM pooling and projection head are left out for that reason: the CLS token is the descriptor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from components.curation.copy_edits import CopyEditConfig, random_copy
from components.curation.embed import preprocess, torch_threads
from components.models.builders import BackboneConfig, build_backbone
from components.models.export import IMAGENET_MEAN, IMAGENET_STD, save_backbone
from components.models.vit import DinoVisionTransformer
from components.ssl.koleo import koleo_loss_per_crop

# Training copies get crops and flips more often than the benchmark's (0.5 / 0.25): they are what pixel
# descriptors miss. Strengths stay the benchmark's: harder views slowed a minutes-long CPU run down.
TRAINING_PROBABILITIES: dict[str, float] = {"crop": 0.6, "rotate": 0.25, "flip": 0.5, "color": 0.5,
                                            "text": 0.25, "rescale": 0.5, "jpeg": 0.5}
REQUIRED_EDITS = ("crop", "flip")  # a copy descriptor that never saw these learns nothing pixels do not know


def training_edits() -> CopyEditConfig:
    """The copy edits of training: the benchmark's strengths, crops and flips drawn more often."""
    return CopyEditConfig(probabilities=dict(TRAINING_PROBABILITIES))


@dataclass
class CopyDescriptorConfig:
    """What to train: the model, the optimisation and the views (defaults: a 28 px CPU descriptor)."""

    image_size: int = 28  # px side of the model's input; use the same embed.image_size / --image-size
    patch_size: int = 4  # px per ViT patch (image_size must be a multiple): 7x7 tokens at 28 px
    embed_dim: int = 64  # ViT width = descriptor dimension
    depth: int = 4  # ViT blocks
    num_heads: int = 2  # attention heads (embed_dim must be a multiple)
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of embed_dim
    batch_size: int = 128  # pool images per step: 2x views, each view has 2 * batch_size - 2 negatives
    steps: int = 1000  # optimiser steps; the lr schedule runs over them (a time budget can shorten it)
    lr: float = 2e-3  # AdamW peak learning rate, after warm-up
    min_lr: float = 1e-5  # end of the cosine decay
    warmup_steps: int = 30  # linear warm-up from 0
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms and biases)
    grad_clip: float = 3.0  # max global gradient norm (DINOv2's value); 0: no clipping
    temperature: float = 0.05  # InfoNCE softmax temperature on cosines (SSCD: 0.05)
    koleo_weight: float = 1.0  # weight of the summed per-view KoLeo terms (0: InfoNCE only; 10 stalled InfoNCE)
    identity_view_prob: float = 0.8  # chance the first view is the unedited image (the pair dedup compares)
    edits: CopyEditConfig = field(default_factory=training_edits)  # the copy edits of the views
    seed: int = 0  # weights, batch order and edits
    num_threads: int = 1  # torch intra-op threads while training (0: torch's setting)

    def validate(self) -> None:
        if min(self.image_size, self.patch_size, self.embed_dim, self.depth, self.num_heads) < 1:
            raise ValueError("copy descriptor: image_size, patch_size, embed_dim, depth and num_heads must be >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(f"copy descriptor: image_size {self.image_size} must be a multiple of "
                             f"patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"copy descriptor: embed_dim {self.embed_dim} must be a multiple of "
                             f"num_heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError("copy descriptor: mlp_ratio must be > 0")
        if self.batch_size < 2:
            raise ValueError("copy descriptor: batch_size must be >= 2 (the other images are the negatives)")
        if self.steps < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("copy descriptor: need steps >= 1 and 0 <= warmup_steps <= steps")
        if not 0 <= self.min_lr <= self.lr or self.lr <= 0:
            raise ValueError("copy descriptor: need lr > 0 and 0 <= min_lr <= lr")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("copy descriptor: weight_decay and grad_clip must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"copy descriptor: temperature must be > 0, got {self.temperature}")
        if self.koleo_weight < 0:
            raise ValueError(f"copy descriptor: koleo_weight must be >= 0, got {self.koleo_weight}")
        if not 0.0 <= self.identity_view_prob <= 1.0:
            raise ValueError("copy descriptor: identity_view_prob must be in [0, 1]")
        if self.num_threads < 0:
            raise ValueError("copy descriptor: num_threads must be >= 0")
        self.edits.validate()
        missing = [name for name in REQUIRED_EDITS if self.edits.probabilities.get(name, 0.0) <= 0]
        if missing:
            raise ValueError(f"copy descriptor: the training edits must include {missing} (probability > 0): "
                             "crops and flips are what a copy descriptor is for")

    def backbone_config(self) -> BackboneConfig:
        """The ViT as the backbone folder records it: no LayerScale or drop path (a tiny model trained briefly)."""
        return BackboneConfig(arch="vit_pico", patch_size=self.patch_size, img_size=self.image_size,
                              drop_path_rate=0.0, layerscale_init=None, embed_dim=self.embed_dim,
                              depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)


# ------------------------------------------------------------------------------- the objective


def describe(model: DinoVisionTransformer, pixels: Tensor) -> Tensor:
    """Unit descriptors (B, D) of preprocessed images (B, 3, S, S): the embed step's ``embed_batch``, with grad."""
    cls = model.forward_features(pixels)["x_norm_clstoken"]  # (B, D)
    if cls is None:
        raise RuntimeError("the backbone returned no x_norm_clstoken")
    return F.normalize(cls.float(), dim=-1)  # (B, D)


def info_nce_loss(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """InfoNCE over the 2B views: view i's positive is its partner, the other 2B - 2 views are negatives.

    ``first`` and ``second`` are unit descriptors (B, D) of the two views of the same B images (row i
    of each is image i). The loss is the mean over all 2B views of the cross-entropy of picking the
    partner among every other view by cosine / temperature (SimCLR's NT-Xent; SSCD's InfoNCE).
    """
    batch = first.shape[0]
    views = torch.cat([first, second])  # (2B, D)
    logits = views @ views.t() / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=views.device), float("-inf"))
    partner = torch.arange(2 * batch, device=views.device).roll(batch)  # (2B,) i <-> i + B
    return F.cross_entropy(logits, partner)


@dataclass(frozen=True)
class LossParts:
    total: Tensor  # 0-d, what is minimised
    info_nce: float
    koleo: float
    positive_cosine: float  # mean cosine of the two views of an image
    hardest_negative_cosine: float  # mean over views of the highest cosine to another image's view


def copy_descriptor_loss(first: Tensor, second: Tensor, cfg: CopyDescriptorConfig) -> LossParts:
    """InfoNCE + ``koleo_weight`` x KoLeo of each view's descriptors (B, D) (two views never repel)."""
    nce = info_nce_loss(first, second, cfg.temperature)
    koleo = koleo_loss_per_crop(torch.cat([first, second]), n_crops=2, weight=1.0)
    with torch.no_grad():
        batch = first.shape[0]
        views = torch.cat([first, second])  # (2B, D)
        cosines = views @ views.t()  # (2B, 2B)
        same_image = torch.eye(batch, dtype=torch.bool, device=views.device).repeat(2, 2)  # (2B, 2B)
        hardest = cosines.masked_fill(same_image, float("-inf")).amax(dim=1)  # (2B,)
        positive = (first * second).sum(dim=1)  # (B,)
    return LossParts(total=nce + cfg.koleo_weight * koleo, info_nce=nce.item(), koleo=koleo.item(),
                     positive_cosine=float(positive.mean()), hardest_negative_cosine=float(hardest.mean()))


# ------------------------------------------------------------------------------- the views


def view_pixels(image: Image.Image, cfg: CopyDescriptorConfig) -> np.ndarray:
    """(3, S, S): exactly the embed step's preprocessing (its default ImageNet normalisation), so the
    descriptor trained here is the one ``embed.backbone: <folder>`` computes."""
    return preprocess(image, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)


def copy_views(images: Sequence[Image.Image], rng: np.random.Generator,
               cfg: CopyDescriptorConfig) -> tuple[Tensor, Tensor]:
    """Two views (B, 3, S, S) each of ``images``: an independent random copy each, the first view
    being the unedited image with probability ``identity_view_prob``."""
    first, second = [], []
    for image in images:
        keep = rng.random() < cfg.identity_view_prob
        first.append(view_pixels(image if keep else random_copy(image, rng, cfg.edits)[0], cfg))
        second.append(view_pixels(random_copy(image, rng, cfg.edits)[0], cfg))
    return torch.from_numpy(np.stack(first)), torch.from_numpy(np.stack(second))  # (B, 3, S, S) each


# ------------------------------------------------------------------------------- training


def build_descriptor_model(cfg: CopyDescriptorConfig) -> DinoVisionTransformer:
    """The untrained ViT, seeded by ``cfg.seed`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_backbone(cfg.backbone_config())


def make_optimizer(model: torch.nn.Module, cfg: CopyDescriptorConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales, biases, tokens and positions stay free)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p.shape[0] > 1]
    decay_ids = {id(p) for p in decay}
    free = [p for p in model.parameters() if p.requires_grad and id(p) not in decay_ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": free, "weight_decay": 0.0}], lr=cfg.lr)


def learning_rate(progress: float, cfg: CopyDescriptorConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then a half-cosine to ``min_lr`` at progress 1.

    ``progress`` is the share of training done (steps, or the time budget when that runs out first),
    so a run stopped by a wall-clock budget still ends its schedule at ``min_lr``."""
    warmup = cfg.warmup_steps / cfg.steps
    if progress < warmup:
        return cfg.lr * progress / warmup
    rest = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * rest))


def training_step(model: DinoVisionTransformer, optimizer: torch.optim.Optimizer, first: Tensor, second: Tensor,
                  cfg: CopyDescriptorConfig, lr: float) -> LossParts:
    """One optimiser step on the two views (B, 3, S, S) of a batch; returns the loss before the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    parts = copy_descriptor_loss(describe(model, first), describe(model, second), cfg)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return parts


@dataclass
class TrainingRun:
    """A trained descriptor and how its training went."""

    model: DinoVisionTransformer
    config: CopyDescriptorConfig
    history: list[dict[str, float]]  # one row per logged step: step, seconds, lr, loss parts
    steps: int  # optimiser steps taken
    seconds: float  # wall clock of the loop (views + steps)
    images: int  # pool images seen (each as two views)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "images": self.images,
                "images_per_second": round(self.images_per_second, 1), "config": config_dict(self.config),
                "history": self.history}


class BatchOrder:
    """Batches of distinct pool rows, epoch by epoch through fresh permutations (no image twice in a batch)."""

    def __init__(self, n_images: int, batch_size: int, rng: np.random.Generator) -> None:
        self.n_images, self.batch_size, self.rng = n_images, batch_size, rng
        self.order, self.at = rng.permutation(n_images), 0  # (N,), next unused position

    def next(self) -> np.ndarray:
        if self.at + self.batch_size > self.n_images:
            self.order, self.at = self.rng.permutation(self.n_images), 0
        rows = self.order[self.at:self.at + self.batch_size]  # (B,)
        self.at += self.batch_size
        return rows


def train_copy_descriptor(pool: Sequence[Image.Image], cfg: CopyDescriptorConfig, max_seconds: float | None = None,
                          log_every: int = 10, on_log: Callable[[dict[str, float]], None] | None = None,
                          model: DinoVisionTransformer | None = None) -> TrainingRun:
    """Train on ``pool`` for ``cfg.steps`` steps or ``max_seconds`` of wall clock, whichever ends first.

    Each step draws ``batch_size`` distinct pool images, makes their two views, and takes one AdamW
    step on InfoNCE + KoLeo. With a time budget, the lr schedule follows the larger of the step and
    time fractions, so the run still anneals to ``min_lr``; only step-bounded runs are reproducible.
    """
    cfg.validate()
    if len(pool) < cfg.batch_size:
        raise ValueError(f"copy descriptor: the pool has {len(pool)} images, fewer than batch_size {cfg.batch_size}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError("copy descriptor: max_seconds must be > 0")
    rng = np.random.default_rng(cfg.seed)
    net = model if model is not None else build_descriptor_model(cfg)
    optimizer = make_optimizer(net, cfg)
    batches = BatchOrder(len(pool), cfg.batch_size, rng)
    history: list[dict[str, float]] = []
    started, step = time.perf_counter(), 0
    with torch_threads(cfg.num_threads):
        while step < cfg.steps:
            elapsed = time.perf_counter() - started
            progress = max(step / cfg.steps, elapsed / max_seconds if max_seconds else 0.0)
            if progress >= 1.0:
                break
            first, second = copy_views([pool[int(i)] for i in batches.next()], rng, cfg)
            lr = learning_rate(progress, cfg)
            parts = training_step(net, optimizer, first, second, cfg, lr)
            step += 1
            if step % log_every == 0 or step == 1 or step == cfg.steps:
                row = {"step": step, "seconds": round(time.perf_counter() - started, 2), "lr": lr,
                       "loss": parts.total.item(), "info_nce": parts.info_nce, "koleo": parts.koleo,
                       "positive_cosine": parts.positive_cosine,
                       "hardest_negative_cosine": parts.hardest_negative_cosine}
                history.append(row)
                if on_log is not None:
                    on_log(row)
    net.eval()
    return TrainingRun(model=net, config=cfg, history=history, steps=step, seconds=time.perf_counter() - started,
                       images=step * cfg.batch_size)


# ------------------------------------------------------------------------------- export


def config_dict(cfg: CopyDescriptorConfig) -> dict[str, Any]:
    """The config as plain JSON values (the edits included)."""
    return asdict(cfg)


def export_copy_descriptor(run: TrainingRun, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """The trained descriptor as a dinoflow backbone folder (``config.json`` + ``model.safetensors``).

    Load it as any backbone: ``EmbedConfig(backbone=str(folder), image_size=run.config.image_size)``.
    ``config.json``'s metadata says what it is and at which image size it was trained."""
    info = {"kind": "copy_descriptor", "recipe": "sscd-style: InfoNCE over random_copy views + KoLeo",
            "image_size": run.config.image_size, "steps": run.steps, "images_seen": run.images,
            "temperature": run.config.temperature, "koleo_weight": run.config.koleo_weight,
            "seed": run.config.seed, **(metadata or {})}
    return save_backbone(run.model, run.config.backbone_config(), Path(folder), mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, metadata=info)


__all__ = ["CopyDescriptorConfig", "LossParts", "TrainingRun", "copy_descriptor_loss", "copy_views", "describe",
           "export_copy_descriptor", "info_nce_loss", "learning_rate", "train_copy_descriptor", "training_edits",
           "training_step"]
