"""Image embeddings for near-duplicate search, written as streamable shards (DINOv2 paper §3, appendix A).

Every image of a kept table is decoded, resized (shorter side) and centre-cropped, normalised and
fed to a backbone; its CLS token (``x_norm_clstoken``), L2-normalised, is the embedding, so inner
product == cosine similarity downstream. Embeddings go to ``shard_00000.npy`` (float32, (n, D)) +
``shard_00000.ids.parquet`` (the ids in row order), at most ``shard_size`` rows each, every file written
atomically; ``index.json`` is written last and lists the shards, so its presence means a complete run.
Only one shard is ever held in memory, when writing and when reading back (``iter_shards``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image

from components.curation import reasons
from components.curation.descriptor import is_pixel_backbone, parse_pixel_backbone
from components.curation.schema import REJECTED_SCHEMA
from components.models import DinoVisionTransformer
from components.models.export import IMAGENET_MEAN, IMAGENET_STD
from components.models.hub import load as load_local_backbone
from components.registry.uri import parse_source
from components.storage import read_uri
from components.storage.atomic import save_npy_atomic, write_parquet_atomic, write_text_atomic

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.parquet"
FORMAT = "dinoflow-embeddings/1"


@dataclass
class EmbedConfig:
    # A dinoflow backbone folder (model.safetensors + config.json); "state_dict:<arch>:<patch>:<img_size>:<src>"
    # (a checkpoint or official DINOv2 state_dict file, or a released name); "pixels:<size>" (the
    # classic pixel copy descriptor of descriptor.py, the offline demo's copy detector); or
    # "random:<arch>:<patch>:<img_size>" (random init: tests only, NOT a copy detector).
    backbone: str = "random:vit_pico:4:28"
    image_size: int = 224  # shorter side resized to this, then centre-cropped to a square
    batch_size: int = 64  # images per forward pass
    shard_size: int = 65_536  # rows per shard file: bounds memory when writing and reading
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_threads: int = 0  # torch intra-op threads for the run; 0: leave torch's setting alone
    decode_workers: int = 4  # threads reading and decoding images (PIL and I/O release the GIL)
    device: str = "cpu"
    seed: int = 0  # weights of a "random:" backbone

    def validate(self) -> None:
        if not self.backbone:
            raise ValueError("backbone must name a backbone folder, 'state_dict:...', 'pixels:<size>' or 'random:...'")
        parse_source(self.backbone)  # a malformed source (or pixel size) fails at validation, not mid-run
        if min(self.image_size, self.batch_size, self.shard_size, self.decode_workers) < 1 or self.num_threads < 0:
            raise ValueError("image_size, batch_size, shard_size, decode_workers must be >= 1, num_threads >= 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file stem: <name>.npy and <name>.ids.parquet
    rows: int


@dataclass(frozen=True)
class EmbeddingShards:
    """A folder of embedding shards; reads them one at a time."""

    directory: Path
    dim: int
    shards: tuple[ShardInfo, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def iter_shards(self, mmap: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors (n, D) float32) per shard, in order; memory-mapped by default."""
        for shard in self.shards:
            vectors = np.load(self.directory / f"{shard.name}.npy", mmap_mode="r" if mmap else None)  # (n, D)
            ids = pl.read_parquet(self.directory / f"{shard.name}.ids.parquet")["id"].to_list()
            if vectors.shape != (shard.rows, self.dim) or len(ids) != shard.rows:
                raise ValueError(f"{self.directory / shard.name}: shape {vectors.shape}, {len(ids)} ids, "
                                 f"index says ({shard.rows}, {self.dim})")
            yield ids, vectors

    def ids(self) -> list[str]:
        """All ids in row order (strings only: small next to the vectors)."""
        return [i for s in self.shards for i in pl.read_parquet(self.directory / f"{s.name}.ids.parquet")["id"]]

    def rejected(self) -> pl.DataFrame:
        """Rows that could not be embedded (``embed_failed``), REJECTED_SCHEMA; empty when none."""
        path = self.directory / REJECTS_FILE
        return pl.read_parquet(path) if path.is_file() else pl.DataFrame(schema=REJECTED_SCHEMA)

    @classmethod
    def open(cls, directory: str | Path) -> EmbeddingShards:
        folder = Path(directory)
        payload = json.loads((folder / INDEX_FILE).read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"{folder}: unknown format {payload.get('format')!r}, expected {FORMAT!r}")
        shards = tuple(ShardInfo(name=s["name"], rows=int(s["rows"])) for s in payload["shards"])
        return cls(directory=folder, dim=int(payload["dim"]), shards=shards, metadata=payload.get("metadata", {}))


class ShardWriter:
    """Buffers (ids, vectors) and writes a shard whenever ``shard_size`` rows are pending."""

    def __init__(self, out_dir: str | Path, shard_size: int) -> None:
        self.directory = Path(out_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.dim: int | None = None
        self.shards: list[ShardInfo] = []
        self._ids: list[str] = []
        self._parts: list[np.ndarray] = []  # each (b, D); together < shard_size rows between flushes

    @property
    def num_rows(self) -> int:
        """Rows added so far, written or pending."""
        return sum(s.rows for s in self.shards) + len(self._ids)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}")
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of width {vectors.shape[1]}, earlier ones were {self.dim}")
        start = 0
        while start < len(ids):  # split the batch at shard boundaries
            take = min(self.shard_size - len(self._ids), len(ids) - start)
            self._ids.extend(ids[start:start + take])
            self._parts.append(np.asarray(vectors[start:start + take], dtype=np.float32))
            start += take
            if len(self._ids) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        name = f"shard_{len(self.shards):05d}"
        save_npy_atomic(np.concatenate(self._parts), self.directory / f"{name}.npy")  # (n, D)
        write_parquet_atomic(pl.DataFrame({"id": self._ids}, schema={"id": pl.Utf8}),
                             self.directory / f"{name}.ids.parquet")
        self.shards.append(ShardInfo(name=name, rows=len(self._ids)))
        self._ids, self._parts = [], []

    def close(self, rejected: pl.DataFrame | None = None, metadata: dict[str, Any] | None = None,
              dim: int | None = None) -> EmbeddingShards:
        """Write the last shard, the rejects and (last) ``index.json``; ``dim`` is needed only with no rows."""
        self._flush()
        width = self.dim if self.dim is not None else dim
        if width is None:
            raise ValueError("no vectors were added: pass dim= to record the embedding width")
        write_parquet_atomic(rejected if rejected is not None else pl.DataFrame(schema=REJECTED_SCHEMA),
                             self.directory / REJECTS_FILE)
        payload = {"format": FORMAT, "dim": width, "num_rows": sum(s.rows for s in self.shards),
                   "shards": [{"name": s.name, "rows": s.rows} for s in self.shards], "metadata": metadata or {}}
        write_text_atomic(json.dumps(payload, indent=2, sort_keys=True) + "\n", self.directory / INDEX_FILE)
        return EmbeddingShards.open(self.directory)


def write_vectors(ids: Sequence[str], vectors: np.ndarray, out_dir: str | Path, shard_size: int,
                  metadata: dict[str, Any] | None = None) -> EmbeddingShards:
    """Shards from precomputed vectors (N, D) (evaluation sets embedded elsewhere, tests)."""
    writer = ShardWriter(out_dir, shard_size)
    writer.add(list(ids), vectors)
    return writer.close(metadata=metadata, dim=int(vectors.shape[1]))


def load_embedding_model(cfg: EmbedConfig) -> DinoVisionTransformer:
    """The backbone ``cfg.backbone`` names (a folder, ``state_dict:`` or ``random:``, seeded by ``cfg.seed``)."""
    source = parse_source(cfg.backbone).require("path", "state_dict", "random", "hub")
    model = load_local_backbone(source, seed=cfg.seed).model
    patch = int(model.patch_size)
    if cfg.image_size % patch:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of the backbone's patch size {patch}")
    return model.to(cfg.device).eval()


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop ``size``x``size``, scale to [0, 1], normalise: (3, S, S)."""
    rgb = image.convert("RGB")  # palette / grey / RGBA / CMYK -> RGB (alpha is dropped, not composited)
    width, height = rgb.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    scaled = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)  # (S, S, 3)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)  # (3, S, S)


@dataclass(frozen=True)
class Embedder:
    """How one ``EmbedConfig`` turns images into unit vectors: ``prepare`` runs per image (in the decode
    threads), ``finish`` per batch of stacked prepared images (the model's forward pass, or nothing)."""

    dim: int
    prepare: Callable[[Image.Image], np.ndarray]  # one image -> (3, S, S) pixels, or an already final (D,) vector
    finish: Callable[[np.ndarray], np.ndarray]  # (b, ...) stacked prepared images -> (b, D) unit rows


def load_embedder(cfg: EmbedConfig) -> Embedder:
    """The one place that decides how ``cfg.backbone`` describes an image (embed step, calibration, benchmarks)."""
    if is_pixel_backbone(cfg.backbone):
        descriptor = parse_pixel_backbone(cfg.backbone)  # finished in the decode threads: no model to batch for
        return Embedder(dim=descriptor.dim, prepare=descriptor.describe, finish=lambda vectors: vectors)
    model = load_embedding_model(cfg)
    return Embedder(dim=int(model.embed_dim),
                    prepare=lambda image: preprocess(image, cfg.image_size, cfg.mean, cfg.std),
                    finish=lambda pixels: embed_batch(model, pixels, cfg.device))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads at ``count`` (0: left alone), restored after: a library call leaves it unchanged."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def describe_images(images: Sequence[Image.Image], cfg: EmbedConfig, embedder: Embedder | None = None) -> np.ndarray:
    """Unit rows (n, D) for in-memory images, exactly as ``embed_images`` would embed them from files.

    Pass ``embedder`` (``load_embedder(cfg)``) when calling repeatedly, so the model is loaded once."""
    cfg.validate()
    model = embedder or load_embedder(cfg)
    parts = [np.zeros((0, model.dim), dtype=np.float32)]
    with torch_threads(cfg.num_threads):
        for start in range(0, len(images), cfg.batch_size):
            stacked = np.stack([model.prepare(image) for image in images[start:start + cfg.batch_size]])  # (b, ...)
            parts.append(np.asarray(model.finish(stacked), dtype=np.float32))  # (b, D)
    return np.concatenate(parts)  # (n, D)


def decode_one(uri: str, embedder: Embedder, read: Callable[[str], bytes] = read_uri) -> np.ndarray | str:
    """The image prepared by ``embedder`` (pixels, or a finished descriptor vector), or an error
    message: one bad file must never stop the run. ``read`` fetches ``uri`` (a store key resolves
    through ``StoreLocator.read``)."""
    try:
        with Image.open(io.BytesIO(read(uri))) as image:
            return embedder.prepare(image)
    except Exception as exc:  # stores and decoders raise many types; each one becomes a rejection
        return f"{type(exc).__name__}: {exc}"


@torch.inference_mode()
def embed_batch(model: DinoVisionTransformer, pixels: np.ndarray, device: str) -> np.ndarray:
    """L2-normalised CLS embeddings (B, D) of preprocessed images (B, 3, S, S)."""
    features = model.forward_features(torch.from_numpy(pixels).to(device))
    cls = features["x_norm_clstoken"]
    if cls is None:
        raise RuntimeError("the backbone returned no x_norm_clstoken")
    cls = cls.float()  # (B, D)
    return torch.nn.functional.normalize(cls, dim=-1).cpu().numpy()  # (B, D), unit rows: dot == cosine


def embed_failed_frame(rows: pl.DataFrame, messages: list[str]) -> pl.DataFrame:
    """REJECTED_SCHEMA rows for images that failed here, carrying what the kept table knew about them."""
    known = [c for c in ("uri", "key", "sha256", "bytes", "width", "height", "format") if c in rows.columns]
    frame = rows.select(known).with_columns(pl.Series("message", messages, dtype=pl.Utf8),
                                            pl.lit(reasons.EMBED_FAILED).alias("reason"))
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in REJECTED_SCHEMA.items()
               if name not in frame.columns]
    return frame.with_columns(missing).select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA)


def embed_images(rows: pl.DataFrame, cfg: EmbedConfig, out_dir: str | Path,
                 read: Callable[[str], bytes] = read_uri, backbone_name: str | None = None) -> EmbeddingShards:
    """Embed every row (needs ``id`` and ``uri``) into shards under ``out_dir``, in row order.

    ``read`` fetches a row's ``uri`` (default: absolute URIs only; the pipeline passes its store
    locator so keys of the configured store resolve). ``backbone_name`` is what ``index.json`` records
    as the backbone (default ``cfg.backbone``; the pipeline records a folder without this checkout's path).

    Rows whose image cannot be read or decoded are left out of the shards and recorded in
    ``rejects.parquet`` with reason ``embed_failed``; embedded + rejected == rows is checked.
    """
    cfg.validate()
    if "id" not in rows.columns or "uri" not in rows.columns:
        raise ValueError(f"rows need columns id and uri, got {rows.columns}")
    embedder = load_embedder(cfg)
    writer = ShardWriter(out_dir, cfg.shard_size)
    failed: list[pl.DataFrame] = [embed_failed_frame(rows.clear(), [])]
    with torch_threads(cfg.num_threads), ThreadPoolExecutor(max_workers=cfg.decode_workers) as executor:
        for batch_rows in batched_frames(rows, cfg.batch_size):
            decoded = list(executor.map(lambda uri: decode_one(uri, embedder, read), batch_rows["uri"].to_list()))
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            bad = [i for i, d in enumerate(decoded) if isinstance(d, str)]
            if good:
                stacked = np.stack([decoded[i] for i in good])  # (b, 3, S, S), or (b, D) descriptors
                writer.add(batch_rows["id"][good].to_list(), embedder.finish(stacked))  # (b, D)
            if bad:
                failed.append(embed_failed_frame(batch_rows[bad], [str(decoded[i]) for i in bad]))
    rejected = pl.concat(failed)
    embedded = writer.num_rows
    if embedded + rejected.height != rows.height:
        raise RuntimeError(f"embedding: {rows.height} rows != {embedded} embedded + {rejected.height} rejected")
    metadata = {"backbone": cfg.backbone if backbone_name is None else backbone_name,
                "image_size": cfg.image_size, "mean": list(cfg.mean),
                "std": list(cfg.std), "rows_in": rows.height, "embed_failed": rejected.height}
    return writer.close(rejected=rejected, metadata=metadata, dim=embedder.dim)


def batched_frames(rows: pl.DataFrame, size: int) -> Iterator[pl.DataFrame]:
    for start in range(0, rows.height, size):
        yield rows.slice(start, size)


__all__ = ["EmbedConfig", "Embedder", "EmbeddingShards", "ShardInfo", "ShardWriter", "describe_images", "embed_images",
           "load_embedder", "write_vectors"]
