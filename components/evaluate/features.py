"""Frozen-backbone features for the evaluation protocols, and an on-disk cache of them.

One pass through the backbone gives the CLS token of each of the last ``n`` blocks (layer-normed,
as the official linear probe reads them) and, optionally, the mean of the last block's patch tokens.
Every protocol then works on these arrays, so a backbone is run once per (model version, dataset
version, extraction options): ``cached_features`` keys the ``.npy`` files by exactly those.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.models.vit import DinoVisionTransformer
from components.storage.atomic import write_atomic

CACHE_FORMAT = "dinoflow-features/1"


@dataclass(frozen=True)
class FeatureSet:
    """Features of N images: ``class_tokens`` (N, B, D) for the last B blocks in block order,
    ``patch_mean`` (N, D) the average-pooled patch tokens of the last block, or None."""

    class_tokens: np.ndarray  # (N, B, D) float32
    patch_mean: np.ndarray | None = None  # (N, D) float32

    def __post_init__(self) -> None:
        if self.class_tokens.ndim != 3:
            raise ValueError(f"class_tokens must be (N, blocks, D), got {self.class_tokens.shape}")
        if self.patch_mean is not None and self.patch_mean.shape != (len(self), self.class_tokens.shape[2]):
            raise ValueError(
                f"patch_mean {self.patch_mean.shape} does not match class_tokens {self.class_tokens.shape}"
            )

    def __len__(self) -> int:
        return int(self.class_tokens.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.class_tokens.shape[1])

    @property
    def cls(self) -> np.ndarray:
        """CLS of the last block, (N, D): the backbone's ``x_norm_clstoken``, what k-NN uses."""
        return self.class_tokens[:, -1]

    def linear_input(self, use_n_blocks: int, use_avgpool: bool) -> np.ndarray:
        """The official ``create_linear_input``: CLS of the last ``use_n_blocks`` blocks concatenated,
        then the last block's pooled patch tokens when ``use_avgpool``. (N, use_n_blocks * D [+ D])."""
        if not 1 <= use_n_blocks <= self.n_blocks:
            raise ValueError(f"use_n_blocks must be in [1, {self.n_blocks}], got {use_n_blocks}")
        parts = [self.class_tokens[:, -use_n_blocks:].reshape(len(self), -1)]
        if use_avgpool:
            if self.patch_mean is None:
                raise ValueError("this FeatureSet was extracted without avgpool")
            parts.append(self.patch_mean)
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def subset(self, indices: np.ndarray) -> FeatureSet:
        pooled = None if self.patch_mean is None else self.patch_mean[indices]
        return FeatureSet(class_tokens=self.class_tokens[indices], patch_mean=pooled)

    def to_array(self) -> np.ndarray:
        """One (N, B [+ 1], D) array for the cache: the pooled tokens, if any, ride as a last 'block'."""
        if self.patch_mean is None:
            return self.class_tokens
        return np.concatenate([self.class_tokens, self.patch_mean[:, None]], axis=1)

    @staticmethod
    def from_array(array: np.ndarray, has_patch_mean: bool) -> FeatureSet:
        if has_patch_mean:
            return FeatureSet(class_tokens=array[:, :-1], patch_mean=array[:, -1])
        return FeatureSet(class_tokens=array)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
    else:
        yield from images


def extract_features(
    model: DinoVisionTransformer,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 256,
    n_last_blocks: int = 1,
    avgpool: bool = False,
) -> FeatureSet:
    """Run the frozen backbone over ``images`` ((N, 3, H, W), already normalised, or an iterable of
    such batches, in which case ``batch_size`` is theirs) and collect CLS (and pooled patch) features."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no stochastic depth, whatever state the caller left the model in
    class_chunks: list[np.ndarray] = []
    pooled_chunks: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size):
                outputs = model.get_intermediate_layers(
                    batch.to(device, non_blocking=True), n=n_last_blocks, return_class_token=True, norm=True
                )
                # outputs: per block (patch (b, P, D), cls (b, D)), in block order
                cls = torch.stack([c for _, c in outputs], dim=1)  # (b, B, D)
                class_chunks.append(cls.float().cpu().numpy())
                if avgpool:
                    pooled_chunks.append(outputs[-1][0].mean(dim=1).float().cpu().numpy())  # (b, D)
    finally:
        model.train(was_training)
    if not class_chunks:
        raise ValueError("no images to extract features from")
    pooled = np.concatenate(pooled_chunks) if avgpool else None
    return FeatureSet(class_tokens=np.concatenate(class_chunks), patch_mean=pooled)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: uint8 images of any shape (N, ...) flattened to (N, prod) float32 in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def fashion_mnist_tensor(
    images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 3, size, size), grey copied to 3 channels, resized, normalised."""
    # np.array copies: the loaded splits are read-only, which torch.from_numpy warns about
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)[:, None]  # (N, 1, 28, 28)
    if x.shape[-1] != size or x.shape[-2] != size:
        # antialias only matters when shrinking; bicubic matches the official eval resize
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, size, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def fashion_mnist_batches(
    images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """The same conversion batch by batch: 60k images at 224 px would be 36 GB as one tensor."""
    for start in range(0, len(images), batch_size):
        yield fashion_mnist_tensor(images[start : start + batch_size], size, mean, std)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: the model identity for cache keys."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def array_fingerprint(array: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes: a dataset version when no better one exists."""
    digest = hashlib.sha256(f"{array.shape}:{array.dtype};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """Stable name for a cache entry: sha256 of the parts as sorted JSON (so dict order never matters)."""
    canonical = json.dumps(dict(key_parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def cached_features(cache_dir: Path, key_parts: Mapping[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()`` once per ``key_parts`` (model identity, dataset version, options): later calls load it.

    The ``.npy`` is renamed into place before the ``.json`` that vouches for it, so an entry whose
    JSON is present is complete; a crash in between only leaves a file that the next call overwrites.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(key_parts)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    parts = json.loads(json.dumps(dict(key_parts), sort_keys=True, default=str))
    if meta_path.is_file() and array_path.is_file():
        meta = json.loads(meta_path.read_text())
        array = np.load(array_path, allow_pickle=False)
        if meta.get("key_parts") == parts and list(array.shape) == meta.get("shape"):
            return array
    array = np.asarray(compute())
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(array_path, lambda handle: np.save(handle, array, allow_pickle=False))
    meta = {"format": CACHE_FORMAT, "key_parts": parts, "shape": list(array.shape), "dtype": str(array.dtype)}
    write_atomic(meta_path, lambda handle: handle.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))
    return array


def cached_feature_set(
    cache_dir: Path, key_parts: Mapping[str, Any], compute: Callable[[], FeatureSet], avgpool: bool
) -> FeatureSet:
    """``cached_features`` for a FeatureSet; ``avgpool`` is part of the key since it changes the layout."""
    parts = {**dict(key_parts), "layout": "class_tokens+patch_mean" if avgpool else "class_tokens"}

    def packed() -> np.ndarray:
        features = compute()
        if (features.patch_mean is not None) != avgpool:
            raise ValueError(f"compute() returned patch_mean={features.patch_mean is not None}, expected {avgpool}")
        return features.to_array()

    array = cached_features(cache_dir, parts, packed)
    return FeatureSet.from_array(array, has_patch_mean=avgpool)
