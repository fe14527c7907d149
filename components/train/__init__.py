"""Training-loop building blocks: atomic, resharding DCP checkpoints."""

from components.train.checkpoint import (
    CheckpointError,
    ModelState,
    OptimizerState,
    capture_rng_state,
    download_latest_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    upload_checkpoint,
)

__all__ = [
    "CheckpointError",
    "ModelState",
    "OptimizerState",
    "capture_rng_state",
    "download_latest_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "upload_checkpoint",
]
