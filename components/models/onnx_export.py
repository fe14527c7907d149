"""Export a dinoflow backbone folder to ONNX and check it with onnxruntime.

The graph takes ``pixel_values`` (B, 3, H, W), already normalised, at the backbone's native size
(``img_size``; the trace fixes the spatial size, the batch is dynamic) and returns ``cls`` (B, D) and
``patch_tokens`` (B, N, D), both after the final norm (``x_norm_clstoken`` / ``x_norm_patchtokens``),
plus ``register_tokens`` (B, R, D) for register models. The normalisation and sizes are stored as ONNX
metadata properties (``dinoflow.mean``, ``dinoflow.std``, ``dinoflow.img_size``, ``dinoflow.patch_size``).

The TorchScript-based exporter (``dynamo=False``) is used: the torch.export-based one needs the
``onnxscript`` package, which dinoflow does not depend on. A single ONNX protobuf is limited to 2 GiB,
so ViT-g (1.1 B parameters) would need external-data files; that path is not exercised here.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from components.models.export import load_backbone
from components.models.vit import DinoVisionTransformer

INPUT_NAME = "pixel_values"
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    opset: int
    output_names: list[str]
    max_abs_diff: float  # onnxruntime vs torch, over every output, at a batch size other than the traced one


class TokenOutputs(nn.Module):
    """``forward_features`` as a tuple of tensors (ONNX graphs return tensors, not dicts)."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.with_registers = backbone.num_register_tokens > 0

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone.forward_features(pixel_values)
        keys = ["x_norm_clstoken", "x_norm_patchtokens"] + (["x_norm_regtokens"] if self.with_registers else [])
        # (B, D), (B, N, D) [, (B, R, D)]
        return tuple(t for key in keys if (t := out[key]) is not None)


def export_onnx(backbone_dir: Path, out_path: Path, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4) -> OnnxExport:
    """Write ``out_path`` atomically after checking onnxruntime against torch within ``tolerance``."""
    bundle = load_backbone(backbone_dir)
    wrapper = TokenOutputs(bundle.model).eval()
    size = bundle.config.img_size
    names = ["cls", "patch_tokens"] + (["register_tokens"] if wrapper.with_registers else [])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.tmp-", suffix=".onnx")
    os.close(fd)
    staging = Path(name)
    try:
        example = torch.randn(2, 3, size, size)
        with warnings.catch_warnings():
            # The shape checks inside the model become constants in the trace: expected for a fixed size.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(staging), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]})
        add_metadata(staging, {"dinoflow.mean": json.dumps(list(bundle.mean)),
                               "dinoflow.std": json.dumps(list(bundle.std)),
                               "dinoflow.img_size": str(size), "dinoflow.patch_size": str(bundle.config.patch_size),
                               "dinoflow.outputs": ",".join(names)})
        diff = compare_with_onnxruntime(staging, wrapper, size)
        if diff > tolerance:
            raise RuntimeError(f"ONNX export differs from torch by {diff:.3g} (> {tolerance})")
        os.replace(staging, out_path)
    finally:
        staging.unlink(missing_ok=True)
    return OnnxExport(out_path, opset, names, diff)


def add_metadata(path: Path, properties: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in properties.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def compare_with_onnxruntime(path: Path, wrapper: TokenOutputs, size: int, batch: int = 3) -> float:
    """Largest absolute difference over all outputs on a random batch (3: not the traced batch of 2)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)
    exported = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        reference = wrapper(x)
    return max(float(np.abs(np.asarray(e) - r.numpy()).max()) for e, r in zip(exported, reference, strict=True))
