"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP) that are complete or absent.

Layout and commit protocol (docs/checkpoints.md): every rank writes its DCP shards into a hidden
``.step_NNNNNNNNN.tmp-<id>`` folder; after a barrier rank 0 writes the ``COMMITTED`` marker (step,
world size, format version, every file with its size) and renames the folder to
``step_NNNNNNNNN``. A reader trusts only folders whose marker parses and whose listed files exist
with the recorded sizes, so a crash at any point leaves either the previous checkpoint or the new one.
The same state saved twice gives byte-identical folders (no clock, no random id, no temp path inside),
so DVC hashes a checkpoint by what it holds.

What goes where in DCP:
- ``nn.Module`` values and :class:`OptimizerState` wrappers are *collective*: every rank contributes
  its (possibly FSDP2/DTensor-sharded) part through ``get_model_state_dict``/``get_optimizer_state_dict``,
  so a load on another world size reshards.
  A bare optimizer is paired with the state's only module.
- every other value (tensors, ints, strings, RNG states, scheduler ``state_dict()``s...) is per-rank
  *extra* state: non-tensor leaves are encoded as one JSON document stored as a uint8 tensor and
  tensors are stored as plain DCP tensors, so extra state never goes through pickle.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from components.storage import ObjectNotFoundError, ObjectStore, join_key
from components.storage.local import fsync_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "COMMITTED"
DCP_METADATA_NAME = ".metadata"
STEP_PATTERN = re.compile(r"^step_(\d{9,})$")
TEMP_PATTERN = re.compile(r"^\.step_(\d{9,})\.(?:tmp|old)-[0-9a-f]+$")
# Reserved DCP keys for the extra state; the '/' keeps them apart from dotted module FQNs.
EXTRA_ROOT = "_extra"
# JSON objects with this key stand for values JSON cannot hold directly.
TAG = "__dinoflow__"


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the previous complete one is untouched."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked."""


# --- collective state ---------------------------------------------------------------------------


class ModelState:
    """DCP ``Stateful`` view of a module through the resharding-aware state-dict helpers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """DCP ``Stateful`` view of an optimizer; the model is needed to key its state by parameter FQN."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], get_optimizer_state_dict(self.model, self.optimizer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, cast(Any, state_dict))


# --- extra state: JSON skeleton + tensors --------------------------------------------------------


def encode_extra(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A JSON-able skeleton of ``value``; tensors are appended to ``tensors`` and referenced by index."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().contiguous())
        return {TAG: "tensor", "index": len(tensors) - 1}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return {TAG: "bytes", "b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode_extra(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode_extra(v, tensors) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or TAG in value:
            raise TypeError(f"extra-state dict keys must be strings other than {TAG!r}: {list(value)[:5]}")
        return {k: encode_extra(v, tensors) for k, v in value.items()}
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return encode_extra(value.state_dict(), tensors)
    raise TypeError(f"cannot checkpoint extra state of type {type(value).__name__} without pickle")


def decode_extra(skeleton: Any, tensors: dict[int, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_extra`."""
    if isinstance(skeleton, list):
        return [decode_extra(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    kind = skeleton.get(TAG)
    if kind == "tensor":
        return tensors[skeleton["index"]]
    if kind == "bytes":
        return base64.b64decode(skeleton["b64"])
    if kind == "tuple":
        return tuple(decode_extra(v, tensors) for v in skeleton["items"])
    return {k: decode_extra(v, tensors) for k, v in skeleton.items()}


def json_to_tensor(document: Any) -> torch.Tensor:
    data = json.dumps(document, allow_nan=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_to_json(tensor: torch.Tensor) -> Any:
    return json.loads(tensor.numpy().tobytes().decode("utf-8"))


def assign_extra(state: dict[str, Any], key: str, loaded: Any) -> None:
    """Put a loaded extra value into ``state`` in place where the template allows it."""
    target = state[key]
    if isinstance(target, torch.Tensor) and isinstance(loaded, torch.Tensor) and target.shape == loaded.shape:
        with torch.no_grad():
            target.copy_(loaded)
    elif isinstance(target, dict) and isinstance(loaded, dict):
        target.clear()
        target.update(loaded)
    elif hasattr(target, "load_state_dict") and not isinstance(target, torch.Tensor):
        target.load_state_dict(loaded)
    else:
        state[key] = loaded


# --- RNG -----------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in a form :func:`save_checkpoint` stores without pickle."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a CUDA state is restored only where CUDA exists)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- process-group helpers -----------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def barrier() -> None:
    if distributed():
        dist.barrier()


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """Without a process group DCP warns on every call that it assumes one process, which is intended here."""
    with warnings.catch_warnings():
        if not distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def shared_token() -> str:
    """A random id chosen by rank 0 and known to every rank (all ranks must write the same folder)."""
    token = [uuid.uuid4().hex[:12]]
    if distributed():
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


# --- file system ---------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def parse_step(name: str) -> int | None:
    match = STEP_PATTERN.match(name)
    return int(match.group(1)) if match else None


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the marker."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER_NAME}


def write_marker(folder: Path, step: int) -> None:
    # No save time: the marker must hash the same for the same weights (DVC, fresh-clone demos).
    marker = {"format_version": FORMAT_VERSION, "step": step,
              "world_size": world_size(), "files": list_files(folder)}
    temp = folder / f".{MARKER_NAME}.part"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, folder / MARKER_NAME)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The parsed marker, or None (with a warning when present but unusable)."""
    path = folder / MARKER_NAME
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring checkpoint %s: unreadable marker (%s)", folder, exc)
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        logger.warning("ignoring checkpoint %s: unknown marker format", folder)
        return None
    return marker


def missing_files(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Files the marker lists that are absent or have another size (the DCP .metadata always counts)."""
    files: dict[str, int] = dict(marker.get("files") or {})
    files.setdefault(DCP_METADATA_NAME, -1)
    bad = []
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or (size >= 0 and path.stat().st_size != size):
            bad.append(name)
    return bad


def is_complete(folder: Path) -> bool:
    marker = read_marker(folder)
    if marker is None:
        return False
    bad = missing_files(folder, marker)
    if bad:
        logger.warning("ignoring checkpoint %s: marker present but files missing or truncated: %s", folder, bad[:5])
        return False
    return True


def committed_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        step = parse_step(child.name)
        if step is not None and child.is_dir() and is_complete(child):
            found.append((step, child))
    return sorted(found)


def publish(temp: Path, final: Path) -> None:
    """Rename the committed temp folder to its final name, replacing an older save of the same step."""
    if final.exists():
        aside = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final, aside)
        os.replace(temp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(temp, final)
    fsync_dir(final.parent)


class ReproducibleWriter(dcp.FileSystemWriter):
    """DCP's file writer without its per-save identity in ``.metadata``.

    The stock writer pickles a random ``save_id`` and the path it wrote to (here the temporary
    folder, whose name is random) into ``.metadata``; nothing reads them back on load, and they make
    two saves of the same state differ.
    """

    def storage_meta(self) -> None:
        return None


# --- public API ----------------------------------------------------------------------------------


def paired_optimizer(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> OptimizerState:
    """A bare optimizer belongs to the state's only module; with several modules the pairing is ambiguous."""
    modules = [v.model if isinstance(v, ModelState) else v for v in state.values()
               if isinstance(v, nn.Module | ModelState)]
    if len(modules) != 1:
        raise TypeError("with several modules (or none) in the state, wrap optimizers as OptimizerState(model, opt)")
    return OptimizerState(modules[0], optimizer)


def collective_state(state: dict[str, Any]) -> dict[str, ModelState | OptimizerState]:
    """The values every rank saves and loads together, as DCP statefuls."""
    views: dict[str, ModelState | OptimizerState] = {}
    for key, value in state.items():
        if key.startswith(EXTRA_ROOT):
            raise ValueError(f"state key {key!r} is reserved")
        if isinstance(value, torch.optim.Optimizer):
            views[key] = paired_optimizer(state, value)
        elif isinstance(value, ModelState | OptimizerState):
            views[key] = value
        elif isinstance(value, nn.Module):
            views[key] = ModelState(value)
    return views


def extra_json_key(source_rank: int) -> str:
    return f"{EXTRA_ROOT}/rank{source_rank}/json"


def extra_tensor_prefix(source_rank: int) -> str:
    return f"{EXTRA_ROOT}/rank{source_rank}/tensor/"


def extra_state(state: dict[str, Any], collective: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's extra values as a JSON document tensor plus plain tensors, under this rank's keys."""
    tensors: list[torch.Tensor] = []
    document = {key: encode_extra(value, tensors) for key, value in state.items() if key not in collective}
    if not document:
        return {}
    flat = {extra_json_key(rank()): json_to_tensor(document)}
    flat.update({f"{extra_tensor_prefix(rank())}{i}": t for i, t in enumerate(tensors)})
    return flat


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``directory/step_{step:09d}`` atomically; call on every rank when a process group exists.

    Modules and optimizers are saved collectively (sharded); everything else is this rank's extra
    state. Returns the final folder.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    directory = Path(directory)
    final = directory / step_dir_name(step)
    temp = directory / f".{final.name}.tmp-{shared_token()}"
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    collective = collective_state(state)
    dcp_state: dict[str, Any] = {**collective, **extra_state(state, collective)}
    try:
        with quiet_single_process():
            dcp.save(dcp_state, storage_writer=ReproducibleWriter(temp, sync_files=True))
        barrier()  # every rank's shards are on disk before the marker vouches for them
        if rank() == 0:
            write_marker(temp, step)
            publish(temp, final)
    except (OSError, CheckpointException) as exc:
        if not is_disk_full(exc):
            raise
        # No barrier here: DCP raises on every rank alike, and a rank waiting for another would hang.
        if rank() == 0:
            shutil.rmtree(temp, ignore_errors=True)  # the partial folder: give its space back
        raise DiskFullError(errno.ENOSPC, disk_full_message(directory, step)) from exc
    barrier()  # nobody reads or prunes before the rename
    return final


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or EDQUOT) anywhere in the exception, its causes, or the per-rank failures DCP collected."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, CheckpointException):
            pending.extend(failure[0] for failure in current.failures.values())
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return "No space left on device" in str(exc)


def disk_full_message(directory: Path, step: int) -> str:
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    latest = latest_checkpoint(directory)
    kept = f"the newest complete checkpoint is still {latest}" if latest else "there is no complete checkpoint yet"
    return (f"checkpoint of step {step} not written: no space left on the device of {directory} "
            f"({free:,} bytes free); the partial folder was removed and {kept}. Free space (or lower "
            "checkpoint.keep_last) and rerun the same command: training resumes from the newest complete one.")


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint folder, ignoring temp, unmarked and truncated folders."""
    found = committed_checkpoints(Path(directory))
    return found[-1][1] if found else None


def extra_templates(path: Path) -> dict[str, torch.Tensor]:
    """Empty tensors shaped like the stored extra state of this rank (rank 0's when absent; see docs)."""
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    source = rank() if extra_json_key(rank()) in stored else 0
    wanted = extra_tensor_prefix(source)
    templates = {}
    for fqn, meta in stored.items():
        if fqn == extra_json_key(source) or fqn.startswith(wanted):
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointError(f"{path}: {fqn} is not a tensor")
            templates[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return templates


def decode_loaded_extra(loaded: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The extra document from loaded template tensors (one source rank's keys only)."""
    json_keys = [k for k in loaded if k.endswith("/json")]
    if not json_keys:
        return {}
    prefix = json_keys[0][: -len("json")] + "tensor/"
    tensors = {int(k[len(prefix):]): v for k, v in loaded.items() if k.startswith(prefix)}
    document = tensor_to_json(loaded[json_keys[0]])
    return {key: decode_extra(skeleton, tensors) for key, skeleton in document.items()}


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Load ``path`` into ``state`` in place (modules, optimizers, extra values); any world size.

    Every key of ``state`` must be in the checkpoint; checkpoint keys absent from ``state`` are skipped.
    Extra state comes from the same rank of the saving job, or from its rank 0 when that rank did not exist.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    collective = collective_state(state)
    extra_keys = [k for k in state if k not in collective]
    templates = extra_templates(path) if extra_keys else {}
    with quiet_single_process():
        dcp.load({**collective, **templates}, storage_reader=dcp.FileSystemReader(path))
    if not extra_keys:
        return
    extra = decode_loaded_extra(templates)
    missing = [k for k in extra_keys if k not in extra]
    if missing:
        raise CheckpointError(f"{path} lacks extra state {missing}")
    for key in extra_keys:
        assign_extra(state, key, extra[key])


def prune_checkpoints(directory: Path, keep_last: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last`` and temp folders older than the newest.

    Call on one rank only. Returns the removed folders.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(directory)
    committed = committed_checkpoints(directory)
    if not committed:
        return []
    doomed = [folder for _, folder in committed[:-keep_last]]
    newest = committed[-1][0]
    for child in sorted(directory.iterdir()):
        match = TEMP_PATTERN.match(child.name)
        # A temp folder at or past the newest step may be a save in progress on another process.
        if match and child.is_dir() and int(match.group(1)) < newest:
            doomed.append(child)
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


# --- object-store mirror -------------------------------------------------------------------------


def upload_checkpoint(path: Path, store: ObjectStore, prefix: str) -> str:
    """Copy a complete checkpoint to ``store`` under ``prefix/step_N/``, marker last; returns that key prefix."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    base = join_key(prefix, path.name)
    for name in list_files(path):
        store.upload_file(join_key(base, name), path / name)
    # Last, so that a reader who sees the marker sees every file it lists.
    store.upload_file(join_key(base, MARKER_NAME), path / MARKER_NAME)
    return base


def store_markers(store: ObjectStore, prefix: str) -> Iterator[tuple[int, str]]:
    """(step, key prefix) of every checkpoint under ``prefix`` that has a marker."""
    root = join_key(prefix)
    for key in store.list(f"{root}/" if root else ""):
        parts = key[len(root) + 1:].split("/") if root else key.split("/")
        if len(parts) == 2 and parts[1] == MARKER_NAME:
            step = parse_step(parts[0])
            if step is not None:
                yield step, join_key(root, parts[0])


def download_checkpoint(store: ObjectStore, base: str, target: Path) -> bool:
    """Fetch one checkpoint into ``target`` via a temp folder, marker last; False if the store copy is partial."""
    try:
        files = dict(json.loads(store.read(join_key(base, MARKER_NAME))).get("files") or {})
    except (ValueError, AttributeError, TypeError) as exc:
        logger.warning("skipping checkpoint %s in %s: unreadable marker (%s)", base, store.uri, exc)
        return False
    temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        for name in files:
            store.download_file(join_key(base, name), temp / name)
        store.download_file(join_key(base, MARKER_NAME), temp / MARKER_NAME)
    except ObjectNotFoundError as exc:
        logger.warning("skipping partial checkpoint %s in %s: %s", base, store.uri, exc)
        shutil.rmtree(temp, ignore_errors=True)
        return False
    if not is_complete(temp):
        shutil.rmtree(temp, ignore_errors=True)
        return False
    publish(temp, target)
    return True


def download_latest_checkpoint(store: ObjectStore, prefix: str, local_dir: Path) -> Path | None:
    """The newest checkpoint under ``prefix`` with a marker, downloaded to ``local_dir/step_N`` (reused if there)."""
    local_dir = Path(local_dir)
    for step, base in sorted(store_markers(store, prefix), reverse=True):
        target = local_dir / step_dir_name(step)
        if target.is_dir() and is_complete(target):
            return target
        local_dir.mkdir(parents=True, exist_ok=True)
        if download_checkpoint(store, base, target):
            return target
    return None
