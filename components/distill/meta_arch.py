"""Student/teacher architecture of distillation (DINOv2 §5) on top of the pretraining one.

What changes from :class:`SSLMetaArch` (same loop, same losses, same checkpoints):

- the targets come from a *frozen* teacher (:class:`FrozenTeacher`), computed once per step on the
  two global crops, under ``no_grad``;
- ``self.teacher`` is still the EMA of the student, updated by the loop as in pretraining. Here it is
  the student's EMA, the model that gets exported (the paper keeps the EMA as the final model);
- no masking: the student sees every patch; iBOT is applied on all patch tokens of the two global
  crops (the teacher's patch targets, resized to the student's grid when the patch sizes differ);
- ``mode="heads"``: the student has its own DINO/iBOT heads with the teacher's prototype count, the
  teacher's heads give the targets (Sinkhorn-Knopp or centering, teacher temperature schedule);
- ``mode="features"`` (teachers without heads): the student's heads are replaced by two linear
  projections (student dim -> teacher dim), pulled to the teacher's normalised CLS and patch tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from components.config import to_mapping
from components.distill.config import FeatureLossConfig
from components.distill.feature_loss import feature_distance
from components.distill.teacher import FrozenTeacher
from components.models import BackboneConfig
from components.ssl.config import ObjectiveConfig
from components.ssl.meta_arch import N_GLOBAL_CROPS, SSLMetaArch, autocast_context, feature
from components.train.config import PretrainConfig
from components.train.engine import ModelRecipe, architecture_fingerprint

Mode = Literal["heads", "features"]


def every_patch_unmasked(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The batch with no student masking and every global-crop patch in the iBOT term.

    ``collated_masks`` is what the student's backbone masks (nothing); ``mask_indices_list`` and
    ``masks_weight`` are the tokens the iBOT loss covers (all of them, each image weighing 1).
    """
    masks = batch["collated_masks"]  # (2B, N)
    n_images, n_tokens = masks.shape
    total = n_images * n_tokens
    device = masks.device
    return {**batch, "collated_masks": torch.zeros_like(masks, dtype=torch.bool),
            "mask_indices_list": torch.arange(total, device=device),  # (2B*N,)
            "masks_weight": torch.full((total,), 1.0 / n_tokens, device=device),  # (2B*N,)
            "n_masked_patches": torch.tensor([total], device=device)}


def objective_for_teacher(objective: ObjectiveConfig, teacher: FrozenTeacher, mode: Mode) -> ObjectiveConfig:
    """Heads mode: the student's heads get the teacher's prototype counts and head layout (its own widths)."""
    if mode != "heads" or teacher.heads is None:
        return objective
    heads = teacher.heads
    dino = dataclasses.replace(objective.dino, head=dataclasses.replace(
        objective.dino.head, n_prototypes=heads.dino_config.n_prototypes))
    ibot = dataclasses.replace(objective.ibot, separate_head=heads.separate, head=dataclasses.replace(
        objective.ibot.head, n_prototypes=heads.ibot_config.n_prototypes))
    return dataclasses.replace(objective, dino=dino, ibot=ibot)


class DistillMetaArch(SSLMetaArch):
    """Student (+ heads or projections), its EMA (``teacher``; exported) and a frozen teacher (not a sub-module)."""

    def __init__(self, student: BackboneConfig, objective: ObjectiveConfig, teacher: FrozenTeacher, mode: Mode,
                 feature_loss: FeatureLossConfig | None = None) -> None:
        if student.drop_path_rate != 0.0:
            raise ValueError("the distillation student is trained without stochastic depth (drop_path_rate 0)")
        if mode == "heads" and objective_for_teacher(objective, teacher, mode) != objective:
            raise ValueError("heads mode: the student's prototype counts must be the teacher's "
                             "(use objective_for_teacher)")
        super().__init__(student, objective)
        # No masking in distillation: the mask token is never used. Frozen, so that the optimizer holds no
        # state for a parameter without gradients (a resume would otherwise expect state that was never saved).
        for side in ("student", "teacher"):
            self.backbone(side).mask_token.requires_grad_(False)
        self.frozen_teacher = teacher  # a plain attribute: not in state_dict, parameters() or FSDP
        self.mode: Mode = mode
        self.feature_loss = feature_loss or FeatureLossConfig()
        if mode == "features":
            self._replace_heads_by_projections(teacher.embed_dim)

    def _replace_heads_by_projections(self, teacher_dim: int) -> None:
        backbone = self.student["backbone"]
        dim = int(self.backbone("student").embed_dim)
        self.student = nn.ModuleDict({"backbone": backbone, "cls_projection": nn.Linear(dim, teacher_dim),
                                      "patch_projection": nn.Linear(dim, teacher_dim)})
        self.teacher = copy.deepcopy(self.student)  # the EMA starts as the student, as in pretraining
        self.teacher.requires_grad_(False)

    def projection(self, which: str, name: str) -> nn.Linear:
        module = (self.student if which == "student" else self.teacher)[name]
        assert isinstance(module, nn.Linear)
        return module

    @staticmethod
    def student_grid(images: Tensor, patch_size: int) -> tuple[int, int]:
        return images.shape[-2] // patch_size, images.shape[-1] // patch_size

    # ---- heads mode ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """The frozen teacher's DINO targets (2, B, K), crops swapped, and iBOT targets for every patch (2B*N, K)."""
        global_crops = batch["collated_global_crops"]  # (2B, C, H, W)
        grid = self.student_grid(global_crops, self.backbone("student").patch_size)
        tokens = self.frozen_teacher.encode(global_crops, grid)  # cls (2B, Dt), patches (2B, N, Dt)
        cls = tokens.cls.chunk(N_GLOBAL_CROPS)  # 2 x (B, Dt)
        cls_out = self.frozen_teacher.head_logits(torch.cat((cls[1], cls[0])), "dino")  # (2B, K)
        patch_out = self.frozen_teacher.head_logits(tokens.patches.flatten(0, 1), "ibot")  # (2B*N, K)
        if self.objective.teacher.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_out, teacher_temp)
            self.dino_loss.update_center(cls_out)
            ibot_targets = self.ibot_patch_loss.softmax_center_teacher(patch_out, teacher_temp)
            self.ibot_patch_loss.update_center(patch_out)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_out, teacher_temp)
            ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                patch_out, teacher_temp, n_masked_patches_tensor=batch["n_masked_patches"])
        self._last_teacher_probs = dino_targets.detach()
        return dino_targets.view(N_GLOBAL_CROPS, -1, dino_targets.shape[-1]), ibot_targets

    # ---- both modes ----------------------------------------------------------------------------
    def forward_backward(self, batch: dict[str, Tensor], teacher_temp: float, backward: bool = True
                         ) -> dict[str, Tensor]:
        """One step's objective: the pretraining terms through the heads, or the feature terms."""
        if self.mode == "heads":
            return super().forward_backward(every_patch_unmasked(batch), teacher_temp, backward)
        return self.feature_forward_backward(batch, backward)

    # ---- features mode -------------------------------------------------------------------------
    def feature_forward_backward(self, batch: dict[str, Tensor], backward: bool = True) -> dict[str, Tensor]:
        """Projected student CLS (every crop) and patch tokens (global crops) towards the teacher's.

        A global crop's CLS is compared with the teacher's CLS of the same crop, a local crop's with the
        teacher's CLS of both global crops of its image (the multi-crop correspondence of the DINO term).
        Returns ``feature_cls_loss`` (mean over all student crops), ``feature_local_cls_loss`` (the local
        part, for monitoring), ``feature_patch_loss``, ``koleo_loss`` and ``total_loss``, detached.
        """
        o, f = self.objective, self.feature_loss
        global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
        device = global_crops.device
        n_images = global_crops.shape[0] // N_GLOBAL_CROPS
        backbone = self.backbone("student")
        target = self.frozen_teacher.encode(global_crops, self.student_grid(global_crops, backbone.patch_size))
        has_locals = local_crops.shape[0] > 0
        out_local: Mapping[str, Tensor | None] | None = None
        with autocast_context(device, o.precision):
            if has_locals and o.packed_forward:
                out_global, out_local = backbone.forward_features_list([global_crops, local_crops], [None, None])
            else:
                out_global = backbone.forward_features(global_crops)
                out_local = backbone.forward_features(local_crops) if has_locals else None
            global_cls = feature(out_global, "x_norm_clstoken")  # (2B, Ds)
            cls_pred = self.projection("student", "cls_projection")(global_cls)  # (2B, Dt)
            patch_pred = self.projection("student", "patch_projection")(
                feature(out_global, "x_norm_patchtokens"))  # (2B, N, Dt)
            local_pred = (self.projection("student", "cls_projection")(feature(out_local, "x_norm_clstoken"))
                          if out_local is not None else None)  # (nL*B, Dt)
        self._last_global_cls = global_cls.detach().float()

        losses: dict[str, Tensor] = {}
        global_term = feature_distance(cls_pred, target.cls, f.distance, f.smooth_l1_beta)
        cls_term = global_term
        if local_pred is not None:
            n_local = local_pred.shape[0] // n_images
            local_views = local_pred.view(n_local, n_images, -1)  # (nL, B, Dt)
            teacher_views = target.cls.view(N_GLOBAL_CROPS, n_images, -1)  # (2, B, Dt)
            local_term = torch.stack([
                feature_distance(local_views, view.unsqueeze(0).expand_as(local_views), f.distance, f.smooth_l1_beta)
                for view in teacher_views]).mean()
            losses["feature_local_cls_loss"] = local_term
            cls_term = (N_GLOBAL_CROPS * global_term + n_local * local_term) / (N_GLOBAL_CROPS + n_local)
        patch_term = feature_distance(patch_pred, target.patches, f.distance, f.smooth_l1_beta)
        losses["feature_cls_loss"], losses["feature_patch_loss"] = cls_term, patch_term
        total = f.cls_weight * cls_term + f.patch_weight * patch_term
        if o.dino.koleo_loss_weight > 0:
            koleo = sum(self.koleo_loss(c.float()) for c in global_cls.chunk(N_GLOBAL_CROPS))
            assert isinstance(koleo, Tensor)
            total = total + o.dino.koleo_loss_weight * koleo
            losses["koleo_loss"] = o.dino.koleo_loss_weight * koleo / N_GLOBAL_CROPS
        if backward:
            total.backward()
        losses["total_loss"] = total
        return {k: v.detach() for k, v in losses.items()}


def distill_fingerprint(cfg: PretrainConfig, mode: Mode, teacher_digest: str) -> str:
    """What a distillation checkpoint depends on: the student and its heads/projections, the mode, the
    teacher's exact weights (resuming against another teacher would be another run)."""
    record = json.loads(architecture_fingerprint(cfg))
    if mode == "features":
        record = {"backbone": to_mapping(cfg.backbone)}
    return json.dumps({**record, "distill_mode": mode, "teacher": teacher_digest}, sort_keys=True)


def distill_recipe(teacher: FrozenTeacher, mode: Mode, feature_loss: FeatureLossConfig) -> ModelRecipe:
    """The engine's model recipe for distillation (the teacher is loaded once, outside the loop)."""
    digest = teacher.fingerprint()

    def build(cfg: PretrainConfig) -> SSLMetaArch:
        # The teacher sees the global crops only (of either phase).
        global_sizes = {key: size for key, size in cfg.crop_sizes().items() if "global" in key}
        cfg.check_patch_size(teacher.config.patch_size, "the teacher's patch size", global_sizes)
        return DistillMetaArch(cfg.backbone, cfg.objective, teacher, mode, feature_loss)

    def fingerprint(cfg: PretrainConfig) -> str:
        return distill_fingerprint(cfg, mode, digest)

    return ModelRecipe(build=build, fingerprint=fingerprint)
