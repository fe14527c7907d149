"""The pretraining loop: data stream, schedules, objective step, EMA, checkpoints, tracking.

Readable on purpose (nanoGPT-style): one function builds the pieces, one loop runs them. What makes
a resumed run equal to an uninterrupted one:

- the data stream is a global, seeded sequence; a step consumes exactly ``global_batch`` positions,
  so step ``s`` always starts at position ``s * global_batch`` (also on another world size);
- each sample's augmentation is seeded by its stream position (epoch-tagged index), not by the
  worker or the rank that loads it;
- iBOT masks are drawn in the main process, keyed by (seed, step, slot in the global batch): they differ
  across ranks and do not depend on the world size;
- model, teacher, heads, loss centers, optimizer, step and every rank's own CPU and CUDA generators
  (drop path) are in every checkpoint (a rank added on resume seeds its own from (seed, rank, step));
  a checkpoint is written only after a finite step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from components.config import to_mapping
from components.config.project import configured_store_locator
from components.data.batched_multicrop import BatchAugmenter, BatchedCrops, raw_sample
from components.data.collate import cast_batch, crops_of, stack_crop_major
from components.data.manifest_dataset import (
    CollatedWithSkips,
    ManifestImageDataset,
    build_pretrain_loader,
    skip_corrupt,
)
from components.data.masking import MaskingGenerator
from components.data.multicrop import DataAugmentationDINO, MultiCropConfig
from components.data.sampler import InfiniteShardedSampler
from components.data.step_masks import N_GLOBAL_CROPS, rank_offsets, step_masks
from components.models.pretrained import load_pretrained_backbone
from components.ssl.meta_arch import SSLMetaArch
from components.ssl.monitoring import UniformTargetsWatch
from components.ssl.param_groups import apply_schedules
from components.ssl.schedules import TrainingSchedules, build_schedules, scaled_lr
from components.storage import ObjectStore, StoreLocator
from components.train.checkpointer import Checkpointer
from components.train.config import PretrainConfig
from components.train.determinism import deterministic_algorithms
from components.train.distributed import DistEnv, all_reduce_gradients, any_rank, broadcast_module
from components.train.parallel import param_dtype_for, resolve_strategy, shard_meta_arch
from components.train.run_identity import run_identity
from components.train.tracking import NullTracker, StepTracker, flops_per_image, peak_flops

log = logging.getLogger(__name__)


MAX_UNREADABLE_BATCHES = 20


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; training stopped and the last good checkpoint was kept."""


@dataclass
class PretrainResult:
    start_step: int
    end_step: int  # the first step not done
    total_steps: int
    checkpoint: Path | None
    skipped_images: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)
    # Seconds the loop waited for its next batch (loader + collate to the device) and spent in steps in
    # all; their ratio is the data-loading share of training time, whatever else the machine was doing.
    data_wait_seconds: float = 0.0
    loop_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.end_step >= self.total_steps

    def summary(self) -> dict[str, object]:
        """JSON-ready: the steps done, the newest checkpoint, skipped images and the last losses."""
        return {"start_step": self.start_step, "end_step": self.end_step, "total_steps": self.total_steps,
                "skipped_images": self.skipped_images,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "losses": self.last_losses}


def schedules_for(cfg: PretrainConfig, global_batch: int) -> TrainingSchedules:
    o, t = cfg.objective.optim, cfg.objective.teacher
    return build_schedules(
        total_iters=o.iterations, lr=scaled_lr(o.base_lr, global_batch, o.scaling_rule), min_lr=o.min_lr,
        warmup_iters=o.warmup_iters, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher, final_momentum_teacher=t.final_momentum_teacher,
        teacher_temp=t.teacher_temp, warmup_teacher_temp=t.warmup_teacher_temp,
        warmup_teacher_temp_iters=t.warmup_teacher_temp_iters, freeze_last_layer_iters=o.freeze_last_layer_iters,
    )


def crops_for_step(cfg: PretrainConfig, step: int) -> MultiCropConfig:
    """The crop config of ``step``: the high-resolution phase uses larger crops for its last iterations."""
    h = cfg.highres
    if h.enabled and step >= cfg.objective.optim.iterations - h.iterations:
        return dataclasses.replace(cfg.crops, global_crops_size=h.global_crops_size,
                                   local_crops_size=h.local_crops_size)
    return cfg.crops


def transform_for(crops: MultiCropConfig) -> Callable[[Any, int], Any]:
    augment = DataAugmentationDINO(crops)
    return augment.__call__


def loader_functions(cfg: PretrainConfig, crops: MultiCropConfig
                     ) -> tuple[Callable[[Any, int], Any], Callable[[list[Any]], Any]]:
    """(per-item transform, collate) of the configured augmentation path.

    ``per_sample``: the official path, every image augmented alone, crops stacked in the main process.
    ``batched``: items are only decoded; the collate (in the loader worker) crops the whole batch at once.
    """
    if cfg.data.augmentation == "batched":
        return raw_sample, BatchAugmenter(crops)
    return transform_for(crops), list


class DataStream:
    """Per-rank lists of augmented samples for each step, restartable at any step and crop phase."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv, root: Path, store: ObjectStore | None = None) -> None:
        self.cfg, self.env = cfg, env
        # A manifest's keys resolve against the stage's store, else the configured store of the project at root.
        self.locator = StoreLocator.for_store(store) if store is not None else configured_store_locator(root)
        manifest = Path(cfg.data.manifest)
        self.manifest = manifest if manifest.is_absolute() else root / manifest
        import polars as pl

        frame = pl.read_parquet(self.manifest)
        if cfg.data.splits:
            frame = frame.filter(pl.col("split").is_in(cfg.data.splits))
        if frame.height == 0:
            raise ValueError(f"{self.manifest}: no images (after keeping splits {cfg.data.splits})")
        self.frame = frame
        self._iterator: Iterator[CollatedWithSkips | None] | None = None
        self._crops: MultiCropConfig | None = None
        # Global stream position of the first sample of step ``_anchor_step``; a checkpoint stores the
        # position, so a resume with another world size (another global batch) continues the stream.
        self._anchor_step, self._anchor_position = 0, 0

    def seek(self, step: int, position: int) -> None:
        self._anchor_step, self._anchor_position = step, position
        self._iterator = None

    def position(self, step: int) -> int:
        """Global stream position of the first sample of ``step``."""
        return self._anchor_position + (step - self._anchor_step) * self.global_batch

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size_per_rank * self.env.world_size

    def batches(self, step: int) -> CollatedWithSkips | None:
        crops = crops_for_step(self.cfg, step)
        if self._iterator is None or crops != self._crops:
            self._iterator = iter(self._loader(crops, start=self.position(step)))
            self._crops = crops
        return next(self._iterator)

    def _loader(self, crops: MultiCropConfig, start: int) -> torch.utils.data.DataLoader[Any]:
        d = self.cfg.data
        transform, collate = loader_functions(self.cfg, crops)
        dataset = ManifestImageDataset(self.frame, transform, seed=d.seed, store=self.locator)
        sampler = InfiniteShardedSampler(len(dataset), rank=self.env.rank, world_size=self.env.world_size,
                                         seed=d.seed, start=start, tag_epoch=True)
        return build_pretrain_loader(dataset, sampler, d.batch_size_per_rank, skip_corrupt(collate),
                                     num_workers=d.num_workers, seed=d.seed, rank=self.env.rank)


def collate_step(cfg: PretrainConfig, samples: list[Any] | BatchedCrops, step: int, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
    """Stack the crops (per-sample path; the batched path arrives stacked) and draw this step's iBOT masks:
    keyed by (seed, step, slot in the global batch), so ranks differ and a resume on any world size draws the
    same masks for the same samples (components/data/step_masks.py)."""
    crops = crops_for_step(cfg, step)
    grid = crops.global_crops_size // cfg.backbone.patch_size
    ibot = cfg.objective.ibot
    if isinstance(samples, BatchedCrops):
        global_crops, local_crops = samples.global_crops, samples.local_crops
    else:
        items = [crops_of(sample) for sample in samples]
        global_crops = stack_crop_major(items, "global_crops")  # (2B, 3, G, G)
        local_crops = stack_crop_major(items, "local_crops")  # (n_local * B, 3, L, L)
    n_samples = len(global_crops) // N_GLOBAL_CROPS
    masks, upperbound = step_masks(
        rank_offsets(rank, world_size, n_samples), cfg.data.batch_size_per_rank * world_size, grid * grid,
        ibot.mask_ratio_min_max, ibot.mask_sample_probability,
        MaskingGenerator(grid, max_num_patches=0.5 * grid * grid), cfg.data.seed, step)
    batch = cast_batch(global_crops, local_crops, masks, upperbound, grid * grid)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}


def check_finite(losses: dict[str, Tensor], step: int, device: torch.device) -> None:
    """Stop every rank together when any rank has a NaN/inf term (a lone rank stopping would hang the rest)."""
    bad = {name: float(value) for name, value in losses.items() if not math.isfinite(float(value))}
    if any_rank(bool(bad), device):
        where = ", ".join(f"loss term '{name}' is {value}" for name, value in bad.items()) or "another rank"
        raise NonFiniteLossError(
            f"step {step}: {where}; stopped without saving this step, the last good checkpoint is kept. "
            "Lower the lr, check the data, or resume from it."
        )


def initialise_backbones(model: SSLMetaArch, source: str, env: DistEnv) -> None:
    """Continued pretraining: student and teacher backbones from ``source`` (a resume then overrides
    them with the checkpoint, so this only matters for a fresh run)."""
    student = model.backbone("student")
    notes = load_pretrained_backbone(student, source)
    model.backbone("teacher").load_state_dict(student.state_dict())
    if env.is_main:
        log.info("backbones initialised from %s%s", source, f" ({'; '.join(notes)})" if notes else "")


def build_model(cfg: PretrainConfig, env: DistEnv, recipe: ModelRecipe | None = None
                ) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    """Model with the same initial weights on every rank (sharded under FSDP), then its optimizer, which
    must be built after sharding so that it holds the sharded parameters."""
    model = (recipe or ModelRecipe()).build(cfg).to(env.device).train()
    if cfg.init.backbone:
        initialise_backbones(model, cfg.init.backbone, env)
    broadcast_module(model)
    if resolve_strategy(cfg.parallel.strategy, env) == "fsdp":
        shard_meta_arch(model, param_dtype_for(cfg.parallel.fsdp_param_dtype), torch.float32)
    o = cfg.objective.optim
    optimizer = torch.optim.AdamW(model.param_groups(), betas=(o.adamw_beta1, o.adamw_beta2))
    return model, optimizer


def architecture_fingerprint(cfg: PretrainConfig) -> str:
    """The params a checkpoint's tensors depend on; resuming with others would load wrong shapes or heads."""
    o = cfg.objective
    return json.dumps({"backbone": to_mapping(cfg.backbone), "dino_head": to_mapping(o.dino.head),
                       "ibot_head": to_mapping(o.ibot.head), "separate_head": o.ibot.separate_head},
                      sort_keys=True)


def pretraining_meta_arch(cfg: PretrainConfig) -> SSLMetaArch:
    return SSLMetaArch(cfg.backbone, cfg.objective)


@dataclass(frozen=True)
class ModelRecipe:
    """What the loop trains: the meta-architecture (an :class:`SSLMetaArch`, or a subclass such as the
    distillation one, built on the CPU) and the fingerprint its checkpoints must match to be resumed.
    The default is pretraining; components/distill plugs in its own."""

    build: Callable[[PretrainConfig], SSLMetaArch] = pretraining_meta_arch
    fingerprint: Callable[[PretrainConfig], str] = architecture_fingerprint


StepHook = Callable[[int, SSLMetaArch], bool]


def run_pretraining(cfg: PretrainConfig, env: DistEnv, root: Path, tracker: StepTracker | None = None,
                    store: ObjectStore | None = None, recipe: ModelRecipe | None = None,
                    after_step: StepHook | None = None) -> tuple[PretrainResult, SSLMetaArch]:
    """Train (or continue training) until ``objective.optim.iterations`` or ``run.max_steps`` more steps.

    With ``run.deterministic`` the whole run uses torch's deterministic kernels (components/train/determinism.py).
    """
    with deterministic_algorithms(cfg.run.deterministic):
        return training_loop(cfg, env, root, tracker, store, recipe, after_step)


def training_loop(cfg: PretrainConfig, env: DistEnv, root: Path, tracker: StepTracker | None = None,
                  store: ObjectStore | None = None, recipe: ModelRecipe | None = None,
                  after_step: StepHook | None = None) -> tuple[PretrainResult, SSLMetaArch]:
    """The loop of :func:`run_pretraining` (call that one): it reads load -> while -> step -> save.

    :class:`Checkpointer` owns what a checkpoint holds, when
    one is written and where (``store`` with ``checkpoint.store_prefix`` mirrors them to the object store).
    ``recipe`` swaps the model and its checkpoint fingerprint (distillation); default: pretraining.
    ``after_step(steps_done, model)`` runs after every completed step (benchmarks evaluate the teacher
    there); returning True ends training after that step, with a checkpoint, as if it were the last.
    """
    recipe = recipe or ModelRecipe()
    tracker = tracker or NullTracker()
    torch.manual_seed(cfg.data.seed)  # the same initial weights on every rank (and broadcast in build_model)
    model, optimizer = build_model(cfg, env, recipe)
    fsdp = resolve_strategy(cfg.parallel.strategy, env) == "fsdp"
    torch.manual_seed(cfg.data.seed + env.rank)  # drop path draws differ per rank; restored on resume
    stream = DataStream(cfg, env, root, store)
    fingerprint = recipe.fingerprint(cfg)
    checkpointer = Checkpointer(model, optimizer, env, root / cfg.run.output_dir / "checkpoints", cfg.checkpoint,
                                fingerprint, cfg.data.seed, store, run_identity(cfg, fingerprint, stream.frame))
    start, position = checkpointer.load()
    total = cfg.objective.optim.iterations
    stream.seek(start, position)
    schedules = schedules_for(cfg, stream.global_batch)
    end = total if cfg.run.max_steps <= 0 else min(total, start + cfg.run.max_steps)
    uniform_watch = UniformTargetsWatch(cfg.objective.dino.head.n_prototypes,
                                        after_step=min(cfg.objective.teacher.warmup_teacher_temp_iters, total))
    # Under FSDP the counting forward all-gathers parameters, a collective: every rank must run it.
    image_flops = flops_per_image(model, cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                                  cfg.crops.local_crops_number, env.device) if env.is_main or fsdp else 0.0
    peak = peak_flops(env.device)
    result = PretrainResult(start_step=start, end_step=start, total_steps=total, checkpoint=None)
    unreadable_in_a_row = 0
    tick, steps_since_tick = time.perf_counter(), 0
    wait_since_tick = 0.0
    for step in range(start, end):
        step_started = time.perf_counter()
        loaded = stream.batches(step)
        # All ranks skip together when any rank's whole batch was unreadable: the step's collectives need all.
        skip_everywhere = any_rank(loaded is None, env.device)
        if loaded is None or skip_everywhere:  # counted, step skipped
            result.skipped_images += loaded.n_skipped if loaded is not None else cfg.data.batch_size_per_rank
            result.end_step = step + 1
            unreadable_in_a_row += 1
            if unreadable_in_a_row >= MAX_UNREADABLE_BATCHES:
                raise RuntimeError(f"{unreadable_in_a_row} batches in a row had no readable image (step {step}): "
                                   f"check the manifest {stream.manifest} and the object store credentials")
            continue
        unreadable_in_a_row = 0
        result.skipped_images += loaded.n_skipped
        batch = collate_step(cfg, loaded.batch, step, env.device, env.rank, env.world_size)
        waited = time.perf_counter() - step_started
        result.data_wait_seconds += waited
        wait_since_tick += waited
        values = schedules.at(step)
        apply_schedules(optimizer.param_groups, values["lr"], values["wd"], values["last_layer_lr"],
                        backbone_frozen=step < cfg.init.head_warmup_iters)
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, teacher_temp=values["teacher_temp"])
        check_finite(losses, step, env.device)
        if not fsdp:  # FSDP has already reduce-scattered the gradients in backward
            all_reduce_gradients((p for p in model.student.parameters() if p.requires_grad), env.world_size)
        grad_norms = model.clip_gradients(cfg.objective.optim.clip_grad) if cfg.objective.optim.clip_grad > 0 else {}
        optimizer.step()
        model.update_teacher(values["momentum"])
        result.end_step = step + 1
        result.last_losses = {k: float(v) for k, v in losses.items()}
        result.loop_seconds += time.perf_counter() - step_started
        steps_since_tick += 1
        if (step + 1) % cfg.run.log_every == 0 or step == end - 1:
            now = time.perf_counter()
            images_per_second = steps_since_tick * stream.global_batch / max(now - tick, 1e-9)
            data_wait_share = wait_since_tick / max(now - tick, 1e-9)
            tick, steps_since_tick, wait_since_tick = now, 0, 0.0
            monitors = model.last_step_monitors()
            dead_head = uniform_watch.check(step + 1, monitors.get("teacher_entropy"))
            if dead_head:
                log.warning(dead_head)
            metrics = {**result.last_losses, **values, **monitors,
                       "images_per_second": images_per_second, "data_wait_share": data_wait_share,
                       "skipped_images": float(result.skipped_images),
                       **{f"grad_norm_{k}": v for k, v in grad_norms.items()}}
            if peak:
                metrics["mfu"] = images_per_second * image_flops / (peak * env.world_size)
            tracker.log_step(step, metrics)
        stop = after_step is not None and after_step(step + 1, model)
        saved = checkpointer.save(step + 1, stream.position(step + 1), last=step + 1 == end or stop)
        result.checkpoint = saved or result.checkpoint
        if stop:
            break
    if result.end_step > checkpointer.last_saved:  # skipped tail steps: persist the position anyway
        result.checkpoint = checkpointer.save(result.end_step, stream.position(result.end_step), last=True)
    tracker.close()
    return result, model
