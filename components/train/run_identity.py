"""What a checkpoint must share with the run that resumes it: the run's identity.

Resuming is only right when the checkpoint belongs to the same run. The architecture fingerprint
(``ModelRecipe.fingerprint``) says whether the tensors fit; it does not say whether the run is the same:
a checkpoint of a finished run with ``base_lr`` 0.004 fits a run with 0.008 exactly, and resuming it
trains nothing and exports the old weights under the new params. That is what ``dvc repro`` did after a
params or curation change, because the checkpoint folder is a persistent DVC output.

The identity is everything that decides the trajectory of the weights:

- ``architecture``: the recipe's fingerprint (backbone, heads; for distillation also the teacher's weights);
- ``data``: the training images (a digest of the manifest's rows after the ``splits`` filter, in order),
  the splits, the seed and the augmentation path;
- ``crops``, ``objective`` (losses, teacher schedules, optimizer and its schedule length), ``highres``,
  ``init``.

Deliberately left out, because a resume may change them: where the run writes and how it reports
(``run``, ``checkpoint``, ``publish``), ``run.max_steps`` (a budget of one invocation),
``run.deterministic`` (other kernels, the same distributions), ``data.num_workers`` (the stream is keyed by
(seed, step, slot), not by the loader) and ``data.batch_size_per_rank`` and ``parallel`` (resuming on
another number of ranks is supported: the stream position is global).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

from components.config.loader import to_mapping
from components.train.config import PretrainConfig

TRAJECTORY_SECTIONS = ("crops", "objective", "highres", "init")
DATA_KEYS = ("splits", "seed", "augmentation")
ROW_IDENTITY_COLUMNS = ("uri", "sha256")  # the image's address and, when the manifest has it, its content
ABSENT = object()  # a key on one side of a comparison only


def manifest_digest(frame: pl.DataFrame) -> str:
    """sha256 over the rows the stream draws from, in order: their ``uri`` and ``sha256`` when present."""
    columns = [pl.col(c).cast(pl.Utf8).fill_null("") for c in ROW_IDENTITY_COLUMNS if c in frame.columns]
    lines = frame.select(pl.concat_str(columns, separator="\t").alias("row"))["row"]  # (rows,)
    return hashlib.sha256("\n".join(lines.to_list()).encode()).hexdigest()


def run_identity(cfg: PretrainConfig, architecture: str, frame: pl.DataFrame) -> dict[str, Any]:
    """The identity of a run (see the module docstring): plain JSON values, comparable key by key."""
    data = {key: to_mapping(getattr(cfg.data, key)) for key in DATA_KEYS}
    data.update(manifest_rows=frame.height, manifest_digest=manifest_digest(frame))
    identity: dict[str, Any] = {"architecture": json.loads(architecture), "data": data}
    identity.update({section: to_mapping(getattr(cfg, section)) for section in TRAJECTORY_SECTIONS})
    return identity


def encode_identity(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaves (lists are leaves): ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ (or exist on one side only), sorted."""
    old, new = flatten(recorded), flatten(current)
    return sorted(key for key in old.keys() | new.keys() if old.get(key, ABSENT) != new.get(key, ABSENT))


def describe_changes(recorded: dict[str, Any], current: dict[str, Any], limit: int = 8) -> str:
    """``key: old -> new`` for the first ``limit`` changed keys (manifest digests shortened)."""
    old, new = flatten(recorded), flatten(current)
    keys = changed_keys(recorded, current)

    def show(value: Any) -> str:
        text = json.dumps(value) if value is not ABSENT else "(absent)"
        return text[:14] + '…"' if len(text) > 20 and isinstance(value, str) else text

    parts = [f"{key}: {show(old.get(key, ABSENT))} -> {show(new.get(key, ABSENT))}" for key in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more


__all__ = ["changed_keys", "describe_changes", "encode_identity", "manifest_digest", "run_identity"]
