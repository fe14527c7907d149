"""Typed parameters of the ``curate`` stage (params/curate.yaml, top-level section ``curate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from components.config.loader import load_config
from components.curation.calibrate import CalibrateConfig
from components.curation.embed import EmbedConfig
from components.curation.hierarchical import Distance, HierarchicalKMeansConfig
from components.curation.ingest import DEFAULT_EXTENSIONS, PIL_DEFAULT_MAX_PIXELS, IngestConfig
from components.curation.knn_graph import IndexKind


@dataclass
class PoolSection:
    """IngestConfig's fields, with ``pool`` allowed empty here: the demo fills it in at run time."""

    pool: str = ""  # local folder, file:///folder or s3://bucket/prefix
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    max_pixels: int = PIL_DEFAULT_MAX_PIXELS
    min_side: int = 1
    workers: int = 8
    batch_size: int = 256

    def to_ingest(self, pool: str | None = None) -> IngestConfig:
        """The IngestConfig for ``pool`` (default: this section's own pool) with these rules."""
        return IngestConfig(pool=self.pool if pool is None else pool, extensions=list(self.extensions),
                            max_pixels=self.max_pixels, min_side=self.min_side, workers=self.workers,
                            batch_size=self.batch_size)

    def validate(self) -> None:
        if self.pool:
            self.to_ingest().validate()
        elif self.max_pixels < 1 or self.min_side < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("max_pixels, min_side, workers and batch_size must be >= 1")


@dataclass
class DedupConfig:
    """One k-NN graph dedup step: paper values by default (self 0.6, eval 0.45, k = 64)."""

    enabled: bool = True
    k: int = 64
    threshold: float = 0.6  # cosine strictly above this joins two images
    index: IndexKind = "auto"
    # IVF lists probed (ivf / ivf_blocked; None: the library default, 10 for the blocked self-join). Recall@64
    # of the blocked search at 10 falls with pool size (0.961 at 1M, 0.943 at 2M, 0.927 at 4M rows); about
    # 10 * sqrt(rows / 1M) holds it at 0.95 (docs/curation.md, Scale).
    nprobe: int | None = None

    def validate(self) -> None:
        if self.k < 1 or not -1.0 <= self.threshold <= 1.0:
            raise ValueError("dedup: k must be >= 1 and threshold within [-1, 1]")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError("dedup: nprobe must be >= 1 (or null for the library default)")


@dataclass
class EvalDedupConfig(DedupConfig):
    threshold: float = 0.45
    sets: list[str] = field(default_factory=list)  # folders / s3:// prefixes of evaluation images


@dataclass
class RetrievalSection:
    """Retrieval from curated seed images (paper §3): off when ``seeds`` is empty."""

    seeds: str = ""  # folder / s3:// prefix of curated seed images
    mode: str = "sample"  # sample | cluster | both
    n_per_seed: int = 4
    min_similarity: float = 0.0
    n_clusters: int = 100
    min_seeds_per_cluster: int = 4
    max_per_cluster: int = 10_000
    kmeans_max_train_rows: int = 0  # cluster mode: k-means trains on a seeded sample of this many rows (0: all, in RAM)
    seed: int = 0

    def validate(self) -> None:
        if self.kmeans_max_train_rows < 0:
            raise ValueError("retrieval.kmeans_max_train_rows must be >= 0")
        if self.mode not in ("sample", "cluster", "both"):
            raise ValueError(f"retrieval.mode must be sample, cluster or both, got {self.mode!r}")
        if self.n_per_seed < 1 or self.n_clusters < 1 or self.min_seeds_per_cluster < 1 or self.max_per_cluster < 1:
            raise ValueError("retrieval: n_per_seed, n_clusters, min_seeds_per_cluster, max_per_cluster must be >= 1")


@dataclass
class BalanceSection:
    """Hierarchical k-means + balanced sampling (Vo et al. 2024): off when ``levels`` is empty."""

    levels: list[int] = field(default_factory=list)  # clusters per level, bottom first, e.g. [1000, 100]
    target_size: int = 0  # images to sample; 0 = keep all rows (clusters still computed for the pictures)
    strategy: str = "random"  # random | closest
    # k-means defaults of the official ssl-data-curation code (see HierarchicalKMeansConfig):
    n_iter: int = 50  # configs/*.yaml n_iters: 50
    resampling_steps: int = 10  # n_resamples=10 (src/hierarchical_kmeans_gpu.py), n_resampling_steps 10 per level
    # Points per cluster per resampling step, one per level (bottom first); empty: ceil(mean cluster size / 2)
    # at every level, the configs' rule ("roughly half the average cluster size"), e.g. their [10, 5, 3].
    resample_per_cluster: list[int] = field(default_factory=list)
    max_train_rows: int = 0  # k-means trains on a seeded sample of this many rows (0: all, in RAM); all are assigned
    distance: Distance = "l2"  # official dist="l2"; "cosine": spherical k-means on unit vectors
    init_trials: int = 0  # greedy k-means++ candidates per centre; 0: 2 + int(ln K) (official); 1: plain k-means++
    n_redo: int = 1  # official num_init=1; more: seeded restarts per k-means run, the lowest cost kept
    seed: int = 0

    def validate(self) -> None:
        if self.max_train_rows < 0 or self.resampling_steps < 0 or self.init_trials < 0 or self.n_redo < 1:
            raise ValueError("balance.max_train_rows, resampling_steps, init_trials must be >= 0 and n_redo >= 1")
        if self.distance not in ("l2", "cosine"):
            raise ValueError(f"balance.distance must be l2 or cosine, got {self.distance!r}")
        if any(k < 1 for k in self.levels) or self.target_size < 0 or self.n_iter < 1:
            raise ValueError("balance: levels must be >= 1, target_size >= 0, n_iter >= 1")
        if self.resample_per_cluster and (len(self.resample_per_cluster) != len(self.levels)
                                          or min(self.resample_per_cluster) < 0):
            raise ValueError("balance.resample_per_cluster: one size >= 0 per level, or [] for half the mean size")
        if self.strategy not in ("random", "closest"):
            raise ValueError(f"balance.strategy must be random or closest, got {self.strategy!r}")

    def kmeans_config(self, levels: list[int]) -> HierarchicalKMeansConfig:
        """The hierarchical k-means settings of this section, with ``levels`` capped to the pool."""
        return HierarchicalKMeansConfig(
            levels=levels, n_iter=self.n_iter, resampling_steps=self.resampling_steps,
            resample_per_cluster=self.resample_per_cluster, distance=self.distance,
            init_trials=self.init_trials, seed=self.seed, max_train_rows=self.max_train_rows, n_redo=self.n_redo)


@dataclass
class OutputsConfig:
    manifest: str = "data/curated/manifest.parquet"  # the curated training set (DVC output)
    rejects: str = "data/curated/rejects.parquet"  # every listed file not in the manifest, with a reason
    stats: str = "metrics/curate.json"  # counts per step (DVC metrics)
    pictures: str = "data/curated/pictures"  # cluster and duplicate grids (PNG)
    work_dir: str = ""  # per-step outputs and completion markers; empty: <state>/curate/work
    labels: str = ""  # optional labels table (key, label, class_name; a path or URI) carried into the manifest
    split: str = "train"  # the manifest's `split` value (pretrain's data.splits filter)
    grid_clusters: int = 8  # rows of the cluster picture
    grid_per_row: int = 8  # images per row in both pictures
    grid_groups: int = 12  # rows of the duplicate-groups picture

    def validate(self) -> None:
        if not self.manifest or not self.rejects or not self.stats:
            raise ValueError("outputs: manifest, rejects and stats must be set")
        if min(self.grid_clusters, self.grid_per_row, self.grid_groups) < 1:
            raise ValueError("outputs: grid sizes must be >= 1")


@dataclass
class DemoPoolConfig:
    """A raw pool with planted truth, written to the object store (see demo_pool.py)."""

    enabled: bool = False
    prefix: str = "pool/curate-demo"  # key prefix in the project's object store
    fashion_per_class: int = 30  # x 10 classes Fashion-MNIST train images in the pool (seeds drawn alongside)
    digits: int = 60  # scikit-learn digits upscaled to 28x28 (distractors)
    textures: int = 40  # 28x28 patches of scikit-image textures (distractors)
    exact_copies: int = 10  # same bytes under another key
    near_copies: int = 40  # crop+resize, resize, JPEG, brightness variants of pool images
    seeds_per_class: int = 5  # curated seed set (Fashion-MNIST train images not in the pool)
    eval_per_class: int = 10  # evaluation set (Fashion-MNIST test images)
    eval_copies: int = 10  # near-copies of evaluation images planted into the pool
    seed: int = 0
    source_dir: str = "/usr/share/datasets/fashion-mnist"
    cache_dir: str = ""  # empty: <state>/cache/fashion-mnist
    allow_fetch: bool = True

    def validate(self) -> None:
        counts = (self.fashion_per_class, self.digits, self.textures, self.exact_copies, self.near_copies,
                  self.seeds_per_class, self.eval_per_class, self.eval_copies)
        if min(counts) < 0 or self.fashion_per_class < 1:
            raise ValueError("demo: counts must be >= 0 and fashion_per_class >= 1")
        if self.eval_copies > 10 * self.eval_per_class:
            raise ValueError("demo: eval_copies cannot exceed the evaluation set size")


@dataclass
class CurateConfig:
    ingest: PoolSection = field(default_factory=PoolSection)  # ingest.pool is set by the demo when enabled
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)  # thresholds measured on this pool
    near_dedup: DedupConfig = field(default_factory=DedupConfig)
    eval_dedup: EvalDedupConfig = field(default_factory=EvalDedupConfig)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    demo: DemoPoolConfig = field(default_factory=DemoPoolConfig)

    def validate(self) -> None:
        if not self.demo.enabled and not self.ingest.pool:
            raise ValueError("ingest.pool must name a folder or s3:// prefix (or enable the demo)")
        for section in (self.embed, self.calibrate, self.near_dedup, self.eval_dedup, self.retrieval, self.balance,
                        self.outputs, self.demo):
            section.validate()


def load_curate_config(path: str | Path = "params/curate.yaml", overrides: Sequence[str] = ()) -> CurateConfig:
    cfg = load_config(CurateConfig, path, section="curate", overrides=overrides)
    cfg.validate()
    return cfg


__all__ = ["BalanceSection", "CurateConfig", "DedupConfig", "DemoPoolConfig", "EvalDedupConfig", "OutputsConfig",
           "PoolSection", "RetrievalSection", "load_curate_config"]
