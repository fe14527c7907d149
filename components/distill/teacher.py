"""The frozen teacher of a distillation run: loaded once, never trained, never checkpointed.

Sources (local; a registry URI is resolved to a folder by the stage first):

- a pretraining checkpoint (``.../checkpoints/step_NNNNNNNNN`` or the ``checkpoints`` folder, newest
  complete one): rebuilt as an :class:`SSLMetaArch` from the architecture record in the checkpoint, and
  the EMA teacher's backbone *and heads* kept, so the student can be distilled through the heads;
- a dinoflow backbone folder (``config.json`` + ``model.safetensors``): backbone only;
- an official DINOv2 state_dict (``.pth``/``.safetensors`` file or ``hub:NAME``): backbone only, its
  architecture from ``teacher.backbone`` in the params (for ``hub:NAME``, the released model's own settings).

The teacher is frozen (``requires_grad`` False), in eval mode, runs under ``no_grad`` and, on CUDA, under
bf16 autocast. It is deliberately not a sub-module of the training model: its weights stay out of
every checkpoint (they never change) and out of DDP/FSDP (it is replicated, not sharded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from components.config import from_mapping
from components.distill.feature_loss import resize_patch_grid
from components.models import BackboneConfig, DinoVisionTransformer, build_backbone
from components.models.export import CONFIG_FILE, load_backbone
from components.models.hub import load as load_local_backbone
from components.models.pretrained import load_pretrained_backbone
from components.registry.uri import parse_source
from components.ssl.config import DinoObjectiveConfig, HeadConfig, IbotObjectiveConfig, ObjectiveConfig
from components.ssl.dino_head import DINOHead
from components.ssl.meta_arch import SSLMetaArch, feature
from components.train import checkpoint as ckpt

TeacherKind = Literal["checkpoint", "backbone", "state_dict"]
TeacherPrecision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class TeacherHeads:
    dino: DINOHead
    ibot: DINOHead | None  # None: iBOT shares the DINO head
    dino_config: HeadConfig
    ibot_config: HeadConfig

    @property
    def separate(self) -> bool:
        return self.ibot is not None


@dataclass(frozen=True)
class TeacherTokens:
    cls: Tensor  # (B, Dt) float32, normalised CLS
    patches: Tensor  # (B, H*W, Dt) float32, normalised patch tokens on the student's grid


class FrozenTeacher:
    """Backbone (+ heads) with no gradient, in eval mode; :meth:`encode` is its one forward per step."""

    def __init__(self, backbone: DinoVisionTransformer, config: BackboneConfig, kind: TeacherKind,
                 heads: TeacherHeads | None = None, precision: TeacherPrecision = "auto") -> None:
        self.backbone, self.config, self.kind, self.heads, self.precision = backbone, config, kind, heads, precision
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def modules(self) -> list[nn.Module]:
        heads = [] if self.heads is None else [h for h in (self.heads.dino, self.heads.ibot) if h is not None]
        return [self.backbone, *heads]

    @property
    def has_heads(self) -> bool:
        return self.heads is not None

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: torch.device | str) -> FrozenTeacher:
        for module in self.modules():
            module.to(device)
        return self

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 where asked (auto: on CUDA), else fp32 even inside the student's autocast region."""
        device = self.device
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def encode(self, images: Tensor, grid: tuple[int, int]) -> TeacherTokens:
        """Normalised CLS and patch tokens of ``images`` (B, C, H, W), patches resized to ``grid``."""
        with self.autocast():
            out = self.backbone.forward_features(images)
        patch = self.config.patch_size
        own_grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        patches = resize_patch_grid(feature(out, "x_norm_patchtokens").float(), own_grid, grid)  # (B, N, Dt)
        return TeacherTokens(cls=feature(out, "x_norm_clstoken").float(), patches=patches)

    @torch.no_grad()
    def head_logits(self, tokens: Tensor, which: Literal["dino", "ibot"]) -> Tensor:
        """Prototype logits (N, K) of tokens (N, Dt) through the DINO or the iBOT head, float32."""
        if self.heads is None:
            raise ValueError("this teacher has no heads; distil in feature space (teacher.mode: features)")
        head = self.heads.ibot if which == "ibot" and self.heads.ibot is not None else self.heads.dino
        with self.autocast():
            return head(tokens).float()

    def fingerprint(self) -> str:
        """sha256 over every weight (and the architecture): identifies the teacher bit for bit."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for module in self.modules():
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def load_teacher(source: str | Path, backbone: BackboneConfig, device: torch.device | str = "cpu",
                 precision: TeacherPrecision = "auto") -> FrozenTeacher:
    """The frozen teacher at ``source`` (see the module docstring); ``backbone`` describes a bare state_dict.

    ``source`` is parsed by the one model-source parser (components/registry/uri.py); a registry URI must
    have been resolved to its local folder by the caller."""
    parsed = parse_source(str(source)).require("path", "hub", "state_dict")
    path = Path(parsed.text)
    if parsed.kind == "path" and path.is_dir():
        checkpoint = path if ckpt.is_complete(path) else ckpt.latest_checkpoint(path)
        if checkpoint is not None:
            return teacher_from_checkpoint(checkpoint, precision).to(device)
        if (path / CONFIG_FILE).is_file():
            bundle = load_backbone(path)
            return FrozenTeacher(bundle.model, bundle.config, "backbone", precision=precision).to(device)
        raise FileNotFoundError(f"{path}: neither a pretraining checkpoint nor a backbone folder")
    if parsed.kind == "path":  # a weights file: its architecture is the params' teacher.backbone
        model = build_backbone(dataclasses.replace(backbone, drop_path_rate=0.0))
        load_pretrained_backbone(model, parsed.text)
        return FrozenTeacher(model, backbone, "state_dict", precision=precision).to(device)
    # hub: and state_dict: name their own architecture, which params cannot contradict
    bundle = load_local_backbone(parsed)
    return FrozenTeacher(bundle.model, bundle.config, "state_dict", precision=precision).to(device)


def teacher_from_checkpoint(path: Path, precision: TeacherPrecision = "auto") -> FrozenTeacher:
    """The EMA teacher (backbone + heads) of a pretraining checkpoint, rebuilt from its architecture record."""
    probe: dict[str, Any] = {"extra": {"architecture": ""}}
    ckpt.load_checkpoint(path, probe)
    record = probe["extra"].get("architecture")
    if not record:
        raise ValueError(f"{path}: no architecture record; cannot rebuild the teacher's heads")
    arch = json.loads(record)
    backbone = from_mapping(BackboneConfig, arch["backbone"], f"{path}:backbone")
    dino_head = from_mapping(HeadConfig, arch["dino_head"], f"{path}:dino_head")
    ibot_head = from_mapping(HeadConfig, arch["ibot_head"], f"{path}:ibot_head")
    objective = ObjectiveConfig(dino=DinoObjectiveConfig(head=dino_head),
                                ibot=IbotObjectiveConfig(head=ibot_head, separate_head=bool(arch["separate_head"])))
    meta = SSLMetaArch(backbone, objective)
    ckpt.load_checkpoint(path, {"model": meta})
    heads = TeacherHeads(dino=meta.head("teacher"),
                         ibot=meta.head("teacher", "ibot_head") if objective.ibot.separate_head else None,
                         dino_config=dino_head, ibot_config=ibot_head)
    return FrozenTeacher(meta.backbone("teacher"), backbone, "checkpoint", heads, precision)


def resolve_mode(requested: str, teacher: FrozenTeacher) -> Literal["heads", "features"]:
    """``auto``: through the heads when the teacher has them, else in feature space."""
    if requested == "heads" and not teacher.has_heads:
        raise ValueError(f"teacher.mode is heads but the {teacher.kind} teacher has no heads; use a pretraining "
                         "checkpoint as teacher.source, or teacher.mode: features")
    if requested in ("heads", "features"):
        return "heads" if requested == "heads" else "features"
    return "heads" if teacher.has_heads else "features"
