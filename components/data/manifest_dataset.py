"""Pretraining input: images named by a manifest, decoded and augmented; bad images skipped, counted, never fatal.

* ``ManifestImageDataset`` reads item ``i``'s ``uri``, decodes it fully with PIL (RGB), and returns
  ``transform(image, seed_for(i))``. A ``uri`` is a key of the configured object store (what the
  pipeline writes: manifests are DVC outputs, the same file in every checkout) or an absolute
  ``s3://``/``file://`` URI (objects elsewhere, older manifests); keys resolve against the ``store``
  given, else the store of params/project.yaml (components/storage/locations.py). An image that
  is missing, empty, truncated or not an image gives a ``SkippedSample`` marker instead of an
  exception: at 100M images a handful of bad objects is a certainty, and one of them must not end
  a multi-day run.
* ``skip_corrupt(collate_fn)`` wraps a collate function: markers are dropped from the batch and
  travel *with* the batch (``CollatedWithSkips``), so counting works unchanged inside DataLoader
  worker processes (no shared counters). A batch with nothing left is ``None``: skip the step, and
  count ``batch_size`` skipped samples.
* ``build_pretrain_loader`` makes the (infinite) DataLoader with per-worker, per-rank seeding.

Only *data* failures are skipped: ``ObjectNotFoundError``/``OSError`` from reading, and PIL's
decode errors. Anything else (a credentials error from S3, a bug in the transform) still raises,
so a misconfigured run fails loudly instead of silently skipping every sample; so does
``StoreUnavailableError`` (the store kept failing past its retry budget, ``DINOFLOW_S3_RETRY_SECONDS``),
which says nothing about the image: the run stops and a rerun resumes from the last checkpoint.

The decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is left on: an image over twice the
limit is skipped with its reason; one between 1x and 2x passes with PIL's warning.
"""

from __future__ import annotations

import functools
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from components.config.project import configured_store_locator
from components.storage import ObjectNotFoundError, ObjectStore, StoreLocator

# Distinct image seeds per run seed for datasets below ~1M images (a prime, so seeds don't alias).
SEED_STRIDE = 1_000_003

# What reading or decoding a bad object raises. SyntaxError/EOFError: some PIL plugins on garbage.
_READ_ERRORS: tuple[type[BaseException], ...] = (ObjectNotFoundError, OSError)
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for an item that could not be read or decoded."""

    index: int
    uri: str
    reason: str


class CollatedWithSkips(NamedTuple):
    """A collated batch and the samples dropped from it. A NamedTuple so ``pin_memory`` recurses into it."""

    batch: Any
    n_skipped: int
    skipped: list[SkippedSample]

    @property
    def reasons(self) -> list[str]:
        return [f"{sample.uri}: {sample.reason}" for sample in self.skipped]


def seed_for(seed: int, index: int) -> int:
    """Augmentation seed of item ``index``: fixed per (run seed, index), whichever worker or rank loads it."""
    return seed * SEED_STRIDE + index


def load_manifest(manifest: pl.DataFrame | Path | str) -> pl.DataFrame:
    """The manifest table itself, or read from a parquet file."""
    frame = manifest if isinstance(manifest, pl.DataFrame) else pl.read_parquet(manifest)
    if "uri" not in frame.columns:
        raise ValueError(f"manifest has no 'uri' column (columns: {frame.columns})")
    return frame


def uri_array(uris: Sequence[str]) -> np.ndarray:
    """URIs as a fixed-width bytes array: no per-item Python objects, so forked workers don't copy pages."""
    return np.array([uri.encode("utf-8") for uri in uris], dtype=np.bytes_)  # (N,) |S<max_len>


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode ``data`` (``load()`` finds truncation now, not later inside the transform) as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


class ManifestImageDataset(Dataset[Any]):
    """Item ``i`` = ``transform(rgb image at uri[i % N], seed_for(seed, i))``, or a ``SkippedSample``.

    Indices ``>= N`` are taken modulo ``N``, so epoch-tagged indices (``InfiniteShardedSampler(tag_epoch=True)``)
    read the same image with a fresh seed each epoch.
    """

    def __init__(
        self,
        manifest: pl.DataFrame | Path | str,
        transform: Callable[[Image.Image, int], Any],
        read_bytes: Callable[[str], bytes] | None = None,
        seed: int = 0,
        store: ObjectStore | StoreLocator | None = None,
    ) -> None:
        """``read_bytes`` reads a ``uri``; default: ``store``'s locator (a key resolves against ``store``,
        else against the configured store of the project around the current folder)."""
        frame = load_manifest(manifest)
        self._uris = uri_array(frame["uri"].to_list())
        self.transform = transform
        if read_bytes is None:
            read_bytes = (StoreLocator.for_store(store) if store is not None else configured_store_locator()).read
        self.read_bytes = read_bytes
        self.seed = seed

    def __len__(self) -> int:
        return len(self._uris)

    def uri(self, index: int) -> str:
        return bytes(self._uris[index % len(self._uris)]).decode("utf-8")

    def __getitem__(self, index: int) -> Any:
        uri = self.uri(index)
        try:
            data = self.read_bytes(uri)
        except _READ_ERRORS as exc:
            return SkippedSample(index, uri, f"read failed: {type(exc).__name__}: {exc}")
        if not data:
            return SkippedSample(index, uri, "empty object (0 bytes)")
        try:
            image = decode_rgb(data)
        except _DECODE_ERRORS as exc:
            return SkippedSample(index, uri, f"decode failed: {type(exc).__name__}: {exc}")
        return self.transform(image, seed_for(self.seed, index))


def _collate_skipping(collate_fn: Callable[[list[Any]], Any], samples: list[Any]) -> CollatedWithSkips | None:
    skipped = [sample for sample in samples if isinstance(sample, SkippedSample)]
    kept = [sample for sample in samples if not isinstance(sample, SkippedSample)]
    if not kept:
        return None
    return CollatedWithSkips(collate_fn(kept), len(skipped), skipped)


def skip_corrupt(collate_fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], CollatedWithSkips | None]:
    """Wrap ``collate_fn`` to drop ``SkippedSample`` markers; ``None`` when the whole batch was bad.

    A ``functools.partial`` (not a closure) so the wrapper pickles into spawned DataLoader workers.
    """
    return functools.partial(_collate_skipping, collate_fn)


def worker_seed(seed: int, rank: int, worker_id: int) -> int:
    """A 32-bit seed per (run seed, rank, worker): SeedSequence mixes them, so no two triples collide by sum."""
    return int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """``worker_init_fn``: seed Python's, NumPy's and torch's global RNGs of this worker process."""
    value = worker_seed(seed, rank, worker_id)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def build_pretrain_loader(
    dataset: Dataset[Any],
    sampler: Sampler[int],
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int,
    seed: int,
    rank: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader[Any]:
    """An endless loader of per-rank batches of ``batch_size`` drawn from an infinite ``sampler``.

    ``drop_last`` is moot with an infinite sampler (every batch is full), so it is left False; a
    finite sampler would give a short last batch. ``rank`` defaults to ``sampler.rank`` when present.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    rank = int(getattr(sampler, "rank", 0)) if rank is None else rank
    # Fixes DataLoader's per-worker base seed (it would otherwise come from the global RNG). With
    # num_workers=0 the main process's RNGs are deliberately left alone: reseeding them is the trainer's call.
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        worker_init_fn=functools.partial(seed_worker, seed, rank) if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
    )
