"""Student/teacher meta-architecture of DINOv2 (paper §4; the official ``SSLMetaArch``).

The student (backbone + DINO head [+ separate iBOT head]) sees every crop; the teacher, an EMA of
the student kept in eval mode, sees only the two global crops. One call of :meth:`forward_backward`
computes the DINO loss over all cross-view (student crop, teacher crop) pairs, the iBOT loss on the
masked patches of the global crops, and KoLeo on the student's global CLS features, back-propagates
their weighted sum and returns every term by name.

Differences from the official code, on purpose:
- no xformers requirement: the backbone's packed forward groups equal-length crops for attention
  (see docs/models.md); head inputs are concatenated along the token axis, which is what the
  official BlockDiagonalMask.from_tensor_list does for an MLP head;
- no FSDP inside the module: the engine shards it (issue: pretraining engine);
- the teacher-side buffers are sized to the real number of masked tokens rather than an upper bound
  (the upper bound exists for static shapes in the official fused kernels; results are identical).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn

from components.models import BackboneConfig, DinoVisionTransformer, build_backbone
from components.ssl.config import FP16_REFUSAL, HeadConfig, ObjectiveConfig
from components.ssl.dino_head import DINOHead
from components.ssl.dino_loss import DINOLoss, dino_n_loss_terms
from components.ssl.ema import update_teacher
from components.ssl.ibot_loss import iBOTPatchLoss
from components.ssl.koleo import KoLeoLoss
from components.ssl.monitoring import mean_entropy, normalized_feature_std
from components.ssl.param_groups import build_param_groups

N_GLOBAL_CROPS = 2


def make_head(in_dim: int, cfg: HeadConfig) -> DINOHead:
    return DINOHead(in_dim=in_dim, out_dim=cfg.n_prototypes, hidden_dim=cfg.hidden_dim,
                    bottleneck_dim=cfg.bottleneck_dim, nlayers=cfg.nlayers, norm_last_layer=cfg.norm_last_layer)


def feature(out: Mapping[str, Tensor | None], key: str) -> Tensor:
    """One entry of a backbone's feature dict, which must be present."""
    value = out[key]
    if value is None:
        raise KeyError(f"backbone output has no {key!r}")
    return value


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where bf16 autocast pays: measured 1.4-1.5x
    on a 192-wide ViT step here (docs/pretraining.md). Without them oneDNN emulates bf16 and it is slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, else fp32; other values pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(FP16_REFUSAL if precision == "fp16" else f"unknown precision {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class SSLMetaArch(nn.Module):
    """Student, EMA teacher, heads and losses; :meth:`forward_backward` is one training step's objective."""

    def __init__(self, backbone: BackboneConfig, objective: ObjectiveConfig) -> None:
        super().__init__()
        self.objective = objective
        student_backbone = build_backbone(backbone)
        embed_dim = int(student_backbone.embed_dim)
        student: dict[str, nn.Module] = {
            "backbone": student_backbone,
            "dino_head": make_head(embed_dim, objective.dino.head),
        }
        if objective.ibot.separate_head:
            student["ibot_head"] = make_head(embed_dim, objective.ibot.head)
        self.student = nn.ModuleDict(student)
        # The teacher starts as an exact copy of the student and only ever moves by EMA.
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

        t = objective.teacher
        self.dino_loss = DINOLoss(objective.dino.head.n_prototypes, student_temp=t.student_temp,
                                  center_momentum=t.center_momentum)
        ibot_prototypes = (objective.ibot.head.n_prototypes if objective.ibot.separate_head
                           else objective.dino.head.n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes, student_temp=t.student_temp,
                                             center_momentum=t.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.num_layers = len(student_backbone.blocks)
        # Detached outputs of the last step, for the collapse monitors (no extra forward needed).
        self._last_teacher_probs: Tensor | None = None
        self._last_global_cls: Tensor | None = None

    def last_step_monitors(self) -> dict[str, float]:
        """Teacher target entropy and std of the student's normalised global CLS features, last step."""
        out: dict[str, float] = {}
        if self._last_teacher_probs is not None:
            out["teacher_entropy"] = mean_entropy(self._last_teacher_probs)
        if self._last_global_cls is not None:
            out["student_cls_std"] = normalized_feature_std(self._last_global_cls)
        return out

    # ---- typed access to the sub-modules (ModuleDict indexing is untyped) -----------------------
    def backbone(self, which: str = "student") -> DinoVisionTransformer:
        return cast(DinoVisionTransformer, self._part(which, "backbone"))

    def head(self, which: str, name: str = "dino_head") -> DINOHead:
        return cast(DINOHead, self._part(which, name))

    def _part(self, which: str, name: str) -> nn.Module:
        side = self.student if which == "student" else self.teacher
        return side[name]

    # ---- mode and parameters -------------------------------------------------------------------
    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # as the official code: no drop path or dropout in the teacher
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        o = self.objective.optim
        return build_param_groups(dict(self.student.items()), num_layers=self.num_layers,
                                  layerwise_decay=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_teacher(self.student, self.teacher, momentum)

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each student module separately (the official per-module clipping); returns norms."""
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[name] = float(nn.utils.clip_grad_norm_(params, max_norm))
        return norms

    def cancel_last_layer_gradients(self) -> None:
        """Zero the prototype layers' gradients (used while the last layer is frozen)."""
        for module in self.student.values():
            last = getattr(module, "last_layer", None)
            if last is not None:
                for p in last.parameters():
                    p.grad = None

    # ---- the objective -------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities for the DINO term (2, B, K), swapped so crop A faces crop B, and for
        the masked patches of the iBOT term (M, K). With no masked token here (M = 0; possible on one rank
        of many) the iBOT targets are (0, K) and their collectives (Sinkhorn-Knopp sums, the center's
        all-reduce) still run, so every rank issues the same collectives."""
        global_crops = batch["collated_global_crops"]  # (2B, C, H, W)
        mask_indices = batch["mask_indices_list"]  # (M,)
        out = self.backbone("teacher").forward_features(global_crops)
        cls = feature(out, "x_norm_clstoken").chunk(N_GLOBAL_CROPS)  # 2 x (B, D)
        cls_swapped = torch.cat((cls[1], cls[0]))  # (2B, D): no same-view pairs in the global term
        patches = feature(out, "x_norm_patchtokens").flatten(0, 1).index_select(0, mask_indices)  # (M, D)
        if self.objective.ibot.separate_head:
            cls_out = self.head("teacher")(cls_swapped)  # (2B, K)
            patch_out = self.head("teacher", "ibot_head")(patches)  # (M, K)
        else:
            both = self.head("teacher")(torch.cat((cls_swapped, patches)))  # (2B + M, K)
            cls_out, patch_out = both[: cls_swapped.shape[0]], both[cls_swapped.shape[0]:]
        cls_out, patch_out = cls_out.float(), patch_out.float()

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

    def student_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Student head outputs: local CLS (nL*B, K), global CLS (2B, K), masked patches (M, K), and
        the backbone's global CLS features (2B, D) for KoLeo."""
        global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
        masks, mask_indices = batch["collated_masks"], batch["mask_indices_list"]
        backbone = self.backbone("student")
        has_locals = local_crops.shape[0] > 0
        out_local: Mapping[str, Tensor | None] | None = None
        if has_locals and self.objective.packed_forward:
            out_global, out_local = backbone.forward_features_list([global_crops, local_crops], [masks, None])
        else:
            out_global = backbone.forward_features(global_crops, masks=masks)
            out_local = backbone.forward_features(local_crops) if has_locals else None
        global_cls = feature(out_global, "x_norm_clstoken")  # (2B, D)
        local_cls = feature(out_local, "x_norm_clstoken") if out_local is not None else global_cls[:0]  # (nL*B, D)
        patches = feature(out_global, "x_norm_patchtokens").flatten(0, 1).index_select(0, mask_indices)  # (M, D)

        # One head call over all token groups, as the official packs them (an MLP head is per token).
        head_inputs = [local_cls, global_cls]
        if not self.objective.ibot.separate_head:
            head_inputs.append(patches)
        head_out = self.head("student")(torch.cat(head_inputs))
        sizes = [t.shape[0] for t in head_inputs]
        pieces = head_out.split(sizes)
        masked_out = self.head("student", "ibot_head")(patches) if self.objective.ibot.separate_head else pieces[2]
        return {"local_cls": pieces[0], "global_cls": pieces[1], "masked_patches": masked_out,
                "global_cls_features": global_cls}

    def forward_backward(self, batch: dict[str, Tensor], teacher_temp: float, backward: bool = True
                         ) -> dict[str, Tensor]:
        """Compute every loss term for a collated batch, back-propagate their weighted sum.

        Returns ``{"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss",
        "total_loss"}`` (detached), normalised as the official code logs them.
        """
        o = self.objective
        device = batch["collated_global_crops"].device
        n_local_crops = batch["collated_local_crops"].shape[0] // max(
            batch["collated_global_crops"].shape[0] // N_GLOBAL_CROPS, 1)
        n_terms = dino_n_loss_terms(N_GLOBAL_CROPS, n_local_crops)
        with autocast_context(device, o.precision):
            dino_targets, ibot_targets = self.teacher_targets(batch, teacher_temp)
            student = self.student_outputs(batch)
        student = {k: v.float() for k, v in student.items()}
        self._last_global_cls = student["global_cls_features"].detach()

        losses: dict[str, Tensor] = {}
        total = torch.zeros((), device=device)
        if n_local_crops > 0:
            local = self.dino_loss(list(student["local_cls"].chunk(n_local_crops)), list(dino_targets)) / n_terms
            losses["dino_local_crops_loss"] = local
            total = total + o.dino.loss_weight * local
        # The global crops go through the loss together: x2 restores the sum over the two pairs.
        global_term = self.dino_loss([student["global_cls"]], [dino_targets.flatten(0, 1)]) * 2 / n_terms
        losses["dino_global_crops_loss"] = global_term
        total = total + o.dino.loss_weight * global_term
        if o.dino.koleo_loss_weight > 0:
            koleo = sum(self.koleo_loss(c) for c in student["global_cls_features"].chunk(N_GLOBAL_CROPS))
            assert isinstance(koleo, Tensor)
            total = total + o.dino.koleo_loss_weight * koleo
            losses["koleo_loss"] = o.dino.koleo_loss_weight * koleo / N_GLOBAL_CROPS
        if ibot_targets is not None and o.ibot.loss_weight > 0:
            ibot = self.ibot_patch_loss.forward_masked(
                student["masked_patches"], ibot_targets, student_masks_flat=batch["collated_masks"],
                n_masked_patches=int(batch["mask_indices_list"].shape[0]), masks_weight=batch["masks_weight"],
            ) * 2 / N_GLOBAL_CROPS  # official: x loss_scales(2) x 1/n_global_crops
            losses["ibot_loss"] = ibot / 2
            total = total + o.ibot.loss_weight * ibot
        if backward:
            total.backward()
        losses["total_loss"] = total
        return {k: v.detach() for k, v in losses.items()}
