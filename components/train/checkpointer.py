"""The training loop's checkpointer (torchtitan-style): ``load()`` once, ``save(step, last=...)`` every step.

It owns what a checkpoint holds, when one is written and where:

- **what**: model (student, EMA teacher, heads, loss centers), optimizer, step, data-stream position,
  the saving rank and its own CPU and CUDA generators (drop path), and the architecture fingerprint;
  a pending lazy center update is applied first so the saved buffers are current;
- **when**: every ``checkpoint.every`` steps and at the last step of an invocation (``last=True``);
- **where**: ``<output_dir>/checkpoints`` (DCP layout, components/train/checkpoint.py), pruned to
  ``checkpoint.keep_last``, mirrored to the object store under ``checkpoint.store_prefix`` when set; a
  machine with no local checkpoint resumes from the newest mirrored one.

Every checkpoint records the run's identity (components/train/run_identity.py: data, crops, objective,
schedule, initial weights, architecture). A checkpoint of another identity is never resumed silently:
``checkpoint.on_config_change`` restarts the run with the old checkpoints moved aside (default), stops
with the changed keys named, or resumes anyway (the official behaviour; an architecture change still
stops, :class:`CheckpointMismatchError`). A rank the saving job did not have gets generators derived
from (seed, rank, step) instead of a copy of rank 0's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from components.ssl.meta_arch import SSLMetaArch
from components.storage import ObjectStore
from components.train import checkpoint as ckpt
from components.train.config import CheckpointConfig
from components.train.distributed import DistEnv, barrier
from components.train.run_identity import describe_changes, encode_identity

log = logging.getLogger(__name__)


SUPERSEDED_DIR = "superseded"  # under the checkpoint folder: runs a restart moved aside


class CheckpointMismatchError(RuntimeError):
    """The checkpoint to resume from belongs to another run (another architecture, or another identity
    with ``checkpoint.on_config_change: error``)."""


def device_rng_states(device: torch.device) -> dict[str, Tensor]:
    """This process's generators that training draws from (drop path, any device randomness)."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def rank_step_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of a rank that has no saved state at ``step`` (added on resume)."""
    return int(np.random.SeedSequence([seed, rank, step, 0x72616E6B]).generate_state(1)[0])


def restore_rng_states(extra: dict[str, Any], env: DistEnv, seed: int, step: int) -> str:
    """Put this rank's saved generators back; a rank the saving job did not have (its extra state is rank 0's)
    gets generators derived from (seed, rank, step) instead of a copy of rank 0's. Returns which it did."""
    saved_rank = extra.get("rank", env.rank)  # checkpoints before the record held every rank's own state
    if saved_rank != env.rank:
        torch.manual_seed(rank_step_seed(seed, env.rank, step))  # the CPU and every CUDA generator
        return "derived"
    torch.set_rng_state(extra["torch_rng"])
    if env.device.type == "cuda":
        if "cuda_rng" in extra:
            torch.cuda.set_rng_state(extra["cuda_rng"], env.device)
        else:  # saved on CPU, resumed on CUDA
            torch.cuda.manual_seed(rank_step_seed(seed, env.rank, step))
    return "restored"


class Checkpointer:
    """Loads the newest complete checkpoint of a run and saves new ones (see the module docstring)."""

    def __init__(self, model: SSLMetaArch, optimizer: torch.optim.Optimizer, env: DistEnv, directory: Path,
                 config: CheckpointConfig, fingerprint: str, seed: int, store: ObjectStore | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        self.model, self.optimizer, self.env = model, optimizer, env
        self.directory, self.config, self.fingerprint, self.seed = Path(directory), config, fingerprint, seed
        # The run's identity (run_identity.run_identity); None: only the architecture is checked.
        self.identity = identity
        self.store = store if config.store_prefix else None
        self.last_saved = 0  # the step of the newest checkpoint this run has (loaded or written)

    def state(self, step: int, data_position: int) -> dict[str, Any]:
        """What one checkpoint holds (the same structure is the template a load fills in)."""
        for loss in (self.model.dino_loss, self.model.ibot_patch_loss):
            loss.apply_center_update()  # a pending (lazy) center update must be in the saved buffers
        return {"model": self.model, "optimizer": self.optimizer,
                "extra": {"step": step, "data_position": data_position, "rank": self.env.rank,
                          **device_rng_states(self.env.device), "architecture": self.fingerprint,
                          "identity": "" if self.identity is None else encode_identity(self.identity)}}

    def load(self) -> tuple[int, int]:
        """Resume from the newest complete checkpoint, if any: (step, data-stream position) to start from."""
        self.fetch_from_store()
        latest = ckpt.latest_checkpoint(self.directory)
        if latest is None:
            return 0, 0
        architecture, identity = self.recorded(latest)
        if not self.same_run(latest, architecture, identity):
            self.set_aside(identity or architecture or "")
            return 0, 0
        state = self.state(0, 0)
        ckpt.load_checkpoint(latest, state)
        step, position = int(state["extra"]["step"]), int(state["extra"]["data_position"])
        generators = restore_rng_states(state["extra"], self.env, self.seed, step)
        if self.env.is_main:
            log.info("resumed from %s at step %d (data position %d)", latest, step, position)
        if generators == "derived":
            log.info("rank %d is new to this run: its generators are seeded from (seed, rank, step)", self.env.rank)
        self.last_saved = step
        return step, position

    def save(self, step: int, data_position: int, last: bool = False) -> Path | None:
        """Write a checkpoint of ``step`` when it is due (every ``checkpoint.every`` steps, or ``last``);
        returns its folder, or None when none was due. Collective: every rank calls it."""
        if not last and step % self.config.every:
            return None
        path = ckpt.save_checkpoint(self.directory, step, self.state(step, data_position))
        if self.env.is_main:
            if self.store is not None:
                ckpt.upload_checkpoint(path, self.store, self.config.store_prefix)  # marker uploaded last
            ckpt.prune_checkpoints(self.directory, self.config.keep_last)
        barrier()
        self.last_saved = step
        return path

    def fetch_from_store(self) -> None:
        """On a machine without local checkpoints, bring the newest mirrored one (rank 0, shared folder)."""
        if self.store is not None and self.env.is_main and ckpt.latest_checkpoint(self.directory) is None:
            found = ckpt.download_latest_checkpoint(self.store, self.config.store_prefix, self.directory)
            if found is not None:
                log.info("fetched checkpoint %s from the object store prefix %s", found.name,
                         self.config.store_prefix)
        barrier()

    def recorded(self, path: Path) -> tuple[str | None, str | None]:
        """(architecture, identity) recorded in the checkpoint at ``path``; None where it predates the record."""
        probe: dict[str, Any] = {"extra": {"architecture": "", "identity": ""}}
        ckpt.load_checkpoint(path, probe)
        extra = probe["extra"]
        identity = extra.get("identity")
        return extra.get("architecture"), identity or None

    def same_run(self, path: Path, architecture: str | None, identity: str | None) -> bool:
        """Whether ``path`` (with its :meth:`recorded` values) continues this run; raises where the policy (or
        the tensors) forbid going on."""
        architecture_changed = architecture is not None and architecture != self.fingerprint
        if architecture is None:  # written before the record existed: the strict model load still guards shapes
            log.warning("%s has no architecture record; loading it as is", path)
        if identity is None or self.identity is None:
            if architecture_changed and self.config.on_config_change != "restart":
                raise self.architecture_error(path, architecture)
            return not architecture_changed
        recorded = json.loads(identity)
        if recorded == self.identity:  # the identity holds the architecture
            return True
        policy = self.config.on_config_change
        changes = describe_changes(recorded, self.identity)
        if policy == "restart":
            log.warning("%s belongs to another run (%s): starting this one from step 0; checkpoint.on_config_change "
                        "decides this", path, changes)
            return False
        if architecture_changed:
            raise self.architecture_error(path, architecture, changes)
        if policy == "error":
            raise CheckpointMismatchError(
                f"{path} belongs to another run: {changes}. Set checkpoint.on_config_change to 'restart' (move "
                f"its checkpoints aside and train from step 0) or 'resume' (continue from it anyway), use another "
                f"run.output_dir, or restore the old params.")
        log.warning("%s belongs to another run (%s); resuming it anyway (checkpoint.on_config_change: resume)",
                    path, changes)
        return True

    def architecture_error(self, path: Path, recorded: str | None, changes: str = "") -> CheckpointMismatchError:
        what = f"changed: {changes}" if changes else f"{recorded}; this run has {self.fingerprint}"
        return CheckpointMismatchError(
            f"{path} was written by a run with another backbone or head ({what}). Use another run.output_dir, "
            f"delete the old checkpoints, or set checkpoint.on_config_change: restart.")

    def set_aside(self, record: str) -> None:
        """Move every checkpoint of the other run to ``superseded/<digest of its record>/`` (nothing is deleted;
        an earlier copy of the same run there is replaced). Rank 0 moves; every rank waits for it."""
        barrier()  # every rank has read the old checkpoint's record before rank 0 moves it
        if self.env.is_main:
            key = hashlib.sha256(record.encode()).hexdigest()[:12]
            target = self.directory / SUPERSEDED_DIR / key
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for child in sorted(self.directory.iterdir()):
                if child.name != SUPERSEDED_DIR:
                    shutil.move(str(child), str(target / child.name))
            log.warning("moved the other run's checkpoints to %s", target)
        barrier()
