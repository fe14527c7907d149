"""What the training loop knows of tracking: the StepTracker protocol, and the FLOP counts behind MFU.

The loop calls ``log_step`` / ``close`` on whatever tracker the stage hands it; the MLflow one lives in
components/tracking/steps.py, so components/train/ never imports MLflow. Every rank but 0 (and any
run without a tracker) gets :class:`NullTracker`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class StepTracker(Protocol):
    def log_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        return None

    def close(self) -> None:
        return None


def flops_per_image(model: Any, global_size: int, local_size: int, n_local: int, device: Any) -> float:
    """Counted FLOPs of one training image: the student's forward+backward (3x forward) over all crops
    plus the teacher's forward over the two global crops, from torch's FLOP counter on one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backbone = model.backbone("student")

    def forward_flops(size: int, count: int) -> float:
        if count == 0:
            return 0.0
        x = torch.zeros(count, 3, size, size, device=device)
        # Eval mode and a forked RNG: counting must not consume the drop-path random stream, or a
        # resumed run would diverge from an uninterrupted one.
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), FlopCounterMode(display=False) as counter:
                backbone.forward_features(x)
        finally:
            backbone.train(was_training)
        return float(counter.get_total_flops())

    global_flops = forward_flops(global_size, 2)
    local_flops = forward_flops(local_size, n_local)
    return 3.0 * (global_flops + local_flops) + global_flops


# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets), for the MFU estimate.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: Any) -> float | None:
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
