"""Data-parallel strategies of the pretraining engine: gradient all-reduce (``ddp``) or FSDP2 (``fsdp``).

``ddp`` keeps a full replica on every rank and averages gradients with
:func:`components.train.distributed.all_reduce_gradients` (no DDP wrapper: the meta-architecture is
driven through ``forward_backward`` and the backbone through ``forward_features``, which a DDP
wrapper's ``forward`` hooks would never see).

``fsdp`` shards with ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter DTensor sharding):
every transformer block is one unit, then each backbone root (patch embedding, tokens, final norm)
and each head. The teacher is sharded exactly like the student, so parameter ``n`` of both has the
same local shard on a rank and the EMA (:mod:`components.ssl.ema`) stays shard-local, with no
communication. FSDP reduce-scatters the gradients itself, so the engine skips its all-reduce.

FSDP2 only hooks ``nn.Module.forward``; the backbone is called through ``forward_features`` /
``forward_features_list`` and its blocks through ``forward_packed``, so those are registered with
``register_fsdp_forward_method`` or their parameters would still be sharded when they run. (All FSDP2
names used here are public in ``torch.distributed.fsdp`` since torch 2.6, so in 2.11 and 2.14.)

Left out on purpose: meta-device initialisation. The model is built on the device (every rank holds
the full model once before sharding), which is fine up to ViT-g on an 80 GB GPU; a larger model would
need ``torch.device("meta")`` construction, ``to_empty`` and a re-run of the initialisers after sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from components.ssl.meta_arch import SSLMetaArch
from components.train.distributed import DistEnv

Strategy = Literal["auto", "ddp", "fsdp"]
ParamDtype = Literal["bf16", "fp32"]

# Methods other than ``forward`` through which the engine runs sharded modules.
BACKBONE_ENTRY_POINTS = ("forward_features", "forward_features_list")
BLOCK_ENTRY_POINTS = ("forward_packed",)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_strategy(strategy: Strategy, env: DistEnv) -> Literal["ddp", "fsdp"]:
    """``auto``: FSDP for multi-GPU runs, else the all-reduce. A single process never shards: there is no
    process group to shard over, and the all-reduce is then a no-op, i.e. plain training."""
    if not env.distributed:
        return "ddp"
    if strategy == "auto":
        return "fsdp" if env.device.type == "cuda" else "ddp"
    return strategy


def param_dtype_for(name: ParamDtype) -> torch.dtype:
    return DTYPES[name]


def default_mesh(model: nn.Module) -> DeviceMesh:
    """A 1-D mesh over the whole process group on the model's device type (not FSDP's default, which
    picks CUDA whenever it is present, even for a CPU/gloo run)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP sharding needs an initialised process group (init_distributed with WORLD_SIZE > 1)")
    device_type = next(model.parameters()).device.type
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_meta_arch(model: SSLMetaArch, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                    mesh: DeviceMesh | None = None) -> None:
    """Shard student and teacher in place with FSDP2 (blocks, then backbone root, then each head).

    Call after the weights are final on every rank (built with one seed, broadcast, or loaded) and
    before the optimizer is built: the optimizer must hold the sharded DTensor parameters.
    """
    mesh = mesh or default_mesh(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for which, side in (("student", model.student), ("teacher", model.teacher)):
        backbone = model.backbone(which)
        for block in backbone.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
            _register(block, BLOCK_ENTRY_POINTS)
        fully_shard(backbone, mesh=mesh, mp_policy=policy)
        _register(backbone, BACKBONE_ENTRY_POINTS)
        for name, head in side.items():
            if name != "backbone":
                fully_shard(head, mesh=mesh, mp_policy=policy)
    model.teacher.requires_grad_(False)  # sharding re-creates the parameters; keep the teacher frozen
    reshard_teacher_after_forward(model.teacher)


def reshard_teacher_after_forward(teacher: nn.ModuleDict) -> None:
    """Make the teacher's roots (backbone, heads) free their gathered parameters after every forward.

    FSDP keeps a root's parameters unsharded after forward, expecting the backward to need them; the
    teacher has no backward, so they would stay gathered: a memory leak of the full root parameters
    and, worse, the teacher's ``named_parameters`` would then be full tensors while the student's are
    shards, breaking the shard-local EMA."""
    for name, module in teacher.items():
        if not isinstance(module, FSDPModule):
            continue
        methods = BACKBONE_ENTRY_POINTS if name == "backbone" else ()
        for method in methods:
            _reshard_after(module, method)
        module.register_forward_hook(_reshard_hook)  # hooks run after FSDP's own post-forward hook


def _reshard_hook(module: nn.Module, args: object, output: object) -> None:
    cast(FSDPModule, module).reshard()


def _reshard_after(module: FSDPModule, method: str) -> None:
    inner = getattr(module, method)

    @functools.wraps(inner)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        module.reshard()
        return out

    setattr(module, method, wrapped)  # an instance attribute, as register_fsdp_forward_method installs its own


def _register(module: nn.Module, methods: Iterable[str]) -> None:
    for method in methods:
        if hasattr(module, method):
            register_fsdp_forward_method(module, method)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every DTensor gathered to its full tensor (a collective under FSDP)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}
