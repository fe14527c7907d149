"""The whole curation pipeline (DINOv2 §3 / appendix A), resumable step by step.

ingest + exact dedup -> embed -> (threshold calibration on planted copies) -> self near-dedup ->
relative dedup against eval sets -> retrieval from seed images -> hierarchical k-means + balanced
sampling -> manifest. Each step writes its outputs atomically into ``work_dir/<step>/`` and then
``done.json`` holding a fingerprint of (its config section, the fingerprints of its inputs). A rerun
skips every step whose marker matches, so an interrupted run continues where it stopped and ends with
the same manifest; changing a section reruns that step and everything downstream of it. Embeddings
are read shard by shard (``iter_shards``).

With a ``StoreLocator`` of the configured store (the curate stage passes one), every table, stats file
and fingerprint records the images of that store by their key and other local folders relative to the
project, never by this checkout's absolute path: the work dir and the outputs are DVC outputs and come
out byte-identical in every checkout. Images are then read through the locator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from components.curation import reasons
from components.curation.calibrate import CalibrationResult, CalibrationScores, calibrate_from_scores, measure_pool
from components.curation.config import CurateConfig, DedupConfig
from components.curation.dedup_near import eval_dedup, near_dedup, rejection_frame
from components.curation.embed import EmbeddingShards, ShardWriter, embed_images
from components.curation.ingest import (
    IngestConfig,
    IngestResult,
    ReconciliationError,
    ingest_pool,
    reconcile,
    write_ingest_outputs,
)
from components.curation.knn_graph import KnnConfig
from components.curation.schema import REJECTED_SCHEMA
from components.storage import ObjectStore, StoreLocator, file_uri_to_path, is_store_key, open_store, read_uri
from components.storage.atomic import write_parquet_atomic, write_text_atomic

DONE_FILE = "done.json"
# Reasons of the selection steps. Not (yet) in reasons.ALL_REASONS, which this module may not change:
# an image that is fine but was not chosen still gets a row, so listed == manifest + rejects holds.
NOT_RETRIEVED = reasons.NOT_RETRIEVED
NOT_SAMPLED = reasons.NOT_SAMPLED
CURATE_REASONS: dict[str, str] = reasons.ALL_REASONS
STEPS = ("listed", "ingest_kept", "embedded", "near_dedup_kept", "eval_dedup_kept", "retrieved", "sampled", "manifest")


@dataclass(frozen=True)
class CurationResult:
    manifest: pl.DataFrame  # id, uri, key, sha256, width, height, split (+ label, class_name), sorted by key
    rejected: pl.DataFrame  # REJECTED_SCHEMA, every listed file not in the manifest, sorted by key
    stats: dict[str, Any]
    work_dir: Path
    ingest_kept: pl.DataFrame  # KEPT_SCHEMA: id <-> uri/key of every valid unique image
    duplicate_groups: list[tuple[str, list[str]]]  # (kept id, removed ids), largest groups first
    clusters: pl.DataFrame | None  # id, cluster (top level of the hierarchy) of the retrieved rows
    calibration: CalibrationResult | None = None  # thresholds measured on the pool (calibrate.enabled)


# ------------------------------------------------------------------------------- step bookkeeping


def fingerprint(*parts: Any) -> str:
    payload = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) and not isinstance(p, type) else p
                          for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def run_step(work_dir: Path, name: str, key: str, compute: Callable[[Path], None]) -> Path:
    """``work_dir/name`` with ``compute``'s outputs, reusing them when ``done.json`` holds ``key``."""
    folder = work_dir / name
    marker = folder / DONE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a half-done or outdated step starts clean
    folder.mkdir(parents=True)
    compute(folder)
    write_text_atomic(json.dumps({"step": name, "fingerprint": key}) + "\n", marker)  # last: the step is complete
    return folder


def knn(cfg: DedupConfig) -> KnnConfig:
    return KnnConfig(k=cfg.k, threshold=cfg.threshold, index=cfg.index, nprobe=cfg.nprobe)


def without(section: Any, *names: str) -> dict[str, Any]:
    """A config section's fields minus those that cannot change the result (threads, batch sizes)."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in names}


# ------------------------------------------------------------------------------- steps


def recorded(locator: StoreLocator | None, location: str) -> str:
    """``location`` as stats and fingerprints record it: with a locator, without this checkout's path."""
    return location if locator is None or not location else locator.describe(location)


def portable_ingest(result: IngestResult, locator: StoreLocator | None) -> IngestResult:
    """``result`` with the URIs of a pool inside the configured store replaced by store keys.

    ``uri`` becomes ``<pool key>/<key>``, an exact duplicate's ``duplicate_of`` the kept row's new
    ``uri``, and the pool root in messages and stats its key. A pool outside the store is left as is:
    its URIs come from the configuration, not from the checkout.
    """
    root = str(result.stats.get("pool", ""))
    prefix = locator.portable(root) if locator is not None and root else root
    if locator is None or not root or not is_store_key(prefix):
        return result

    def ref() -> pl.Expr:
        return pl.concat_str(pl.lit(prefix + "/"), pl.col("key")) if prefix else pl.col("key")

    kept = result.kept.with_columns(ref().alias("uri"))
    messages = pl.col("message").str.replace_all(root, prefix or ".", literal=True)
    if root.startswith("file://"):
        messages = messages.str.replace_all(str(file_uri_to_path(root)), prefix or ".", literal=True)
    rejected = result.rejected.with_columns(
        ref().alias("uri"), messages,
        pl.col("duplicate_of").replace(result.kept["uri"], kept["uri"]))  # exact duplicates name a kept uri
    return IngestResult(kept=kept, rejected=rejected, stats={**result.stats, "pool": prefix})


def ingest_step(pool: IngestConfig, store_opener: Callable[[str], ObjectStore],
                locator: StoreLocator | None = None) -> Callable[[Path], None]:
    def compute(folder: Path) -> None:
        write_ingest_outputs(portable_ingest(ingest_pool(pool, store_opener), locator), folder)
    return compute


def read_ingest(folder: Path) -> IngestResult:
    return IngestResult(kept=pl.read_parquet(folder / "kept.parquet"),
                        rejected=pl.read_parquet(folder / "rejects.parquet"),
                        stats=json.loads((folder / "stats.json").read_text()))


def ingest_and_embed(work_dir: Path, name: str, pool: IngestConfig, cfg: CurateConfig, upstream: str,
                     store_opener: Callable[[str], ObjectStore], locator: StoreLocator | None = None,
                     ) -> tuple[IngestResult, EmbeddingShards, str]:
    """Ingest one image folder (pool, eval set or seed set) and embed what it kept."""
    recorded_pool = dataclasses.replace(pool, pool=recorded(locator, pool.pool))
    ingest_key = fingerprint(name, without(recorded_pool, "workers", "batch_size"), upstream)
    ingested = read_ingest(run_step(work_dir, f"{name}_ingest", ingest_key, ingest_step(pool, store_opener, locator)))
    backbone = recorded(locator, cfg.embed.backbone)
    embed_key = fingerprint(without(dataclasses.replace(cfg.embed, backbone=backbone),
                                    "batch_size", "num_threads", "decode_workers", "device"), ingest_key)
    read = locator.read if locator is not None else read_uri
    folder = run_step(work_dir, f"{name}_embed", embed_key,
                      lambda out: (embed_images(ingested.kept, cfg.embed, out / "shards", read=read,
                                                backbone_name=backbone), None)[1])
    return ingested, EmbeddingShards.open(folder / "shards"), embed_key


def subset_shards(shards: EmbeddingShards, keep: set[str], out_dir: Path) -> EmbeddingShards:
    """The rows of ``shards`` whose id is in ``keep``, in order, streamed shard by shard."""
    writer = ShardWriter(out_dir, max(1, max((s.rows for s in shards.shards), default=1)))
    for ids, vectors in shards.iter_shards():
        mask = np.fromiter((i in keep for i in ids), dtype=bool, count=len(ids))  # (n,)
        if mask.any():
            writer.add([i for i, m in zip(ids, mask, strict=True) if m], np.asarray(vectors[mask]))  # (m, D)
    return writer.close(metadata=shards.metadata, dim=shards.dim)


def write_frames(folder: Path, **frames: pl.DataFrame) -> None:
    for name, frame in frames.items():
        write_parquet_atomic(frame, folder / f"{name}.parquet")


def not_selected(rows: pl.DataFrame, reason: str, message: str) -> pl.DataFrame:
    return rejection_frame(rows, reason, [None] * rows.height, [message] * rows.height)  # type: ignore[list-item]


def read_table(location: str) -> pl.DataFrame:
    """A parquet table from a local path or a store URI."""
    if "://" in location:
        return pl.read_parquet(io.BytesIO(read_uri(location)))
    return pl.read_parquet(location)


# ------------------------------------------------------------------------------- the pipeline


def run_curation(cfg: CurateConfig, work_dir: Path, store_opener: Callable[[str], ObjectStore] = open_store,
                 locator: StoreLocator | None = None) -> CurationResult:
    """Run (or continue) every configured step; returns the manifest, the rejects and the stats.

    ``locator``: the configured store; its images are then recorded by key (see the module docstring)."""
    cfg.validate()
    pool = cfg.ingest.to_ingest()
    pool.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    ingest, shards, embed_key = ingest_and_embed(work_dir, "pool", pool, cfg, "", store_opener, locator)
    calibration = calibrate_step(work_dir, cfg, ingest, shards, embed_key, locator) if cfg.calibrate.enabled else None
    if calibration is not None and cfg.calibrate.apply:
        cfg = with_calibrated_thresholds(cfg, calibration)  # the dedup fingerprints below then hold the new values

    near_key = fingerprint(cfg.near_dedup, embed_key)

    def near_compute(folder: Path) -> None:
        if cfg.near_dedup.enabled:
            result = near_dedup(ingest.kept, shards, knn(cfg.near_dedup))
            write_frames(folder, kept=result.kept, rejects=result.rejected)
        else:  # still move embed failures to the rejects
            failed = shards.rejected()
            write_frames(folder, kept=ingest.kept.filter(~pl.col("uri").is_in(failed["uri"].to_list())),
                         rejects=failed)

    near_dir = run_step(work_dir, "near_dedup", near_key, near_compute)
    near_kept = pl.read_parquet(near_dir / "kept.parquet")
    near_rejected = pl.read_parquet(near_dir / "rejects.parquet")

    eval_sets = [recorded(locator, location) for location in cfg.eval_dedup.sets]
    eval_key = fingerprint(dataclasses.replace(cfg.eval_dedup, sets=eval_sets), recorded(locator, cfg.embed.backbone),
                           near_key)
    eval_shards = []
    for i, location in enumerate(cfg.eval_dedup.sets if cfg.eval_dedup.enabled else []):
        _, set_shards, set_key = ingest_and_embed(work_dir, f"eval{i}", cfg.ingest.to_ingest(location), cfg, eval_key,
                                                  store_opener, locator)
        eval_shards.append(set_shards)
        eval_key = fingerprint(eval_key, set_key)

    def eval_compute(folder: Path) -> None:
        if not eval_shards:
            write_frames(folder, kept=near_kept, rejects=pl.DataFrame(schema=REJECTED_SCHEMA))
            return
        combined = concat_shards(eval_shards, folder / "eval_shards")
        result = eval_dedup(near_kept, shards, combined, knn(cfg.eval_dedup))
        write_frames(folder, kept=result.kept, rejects=result.rejected)

    eval_dir = run_step(work_dir, "eval_dedup", eval_key, eval_compute)
    clean = pl.read_parquet(eval_dir / "kept.parquet")
    eval_rejected = pl.read_parquet(eval_dir / "rejects.parquet")

    selected, select_rejected, clusters, select_stats = select(cfg, work_dir, shards, clean, eval_key, store_opener,
                                                               locator)
    manifest = build_manifest(selected, cfg)
    rejected = pl.concat([ingest.rejected, near_rejected, eval_rejected, select_rejected]).sort("key")
    n_listed = int(ingest.stats["steps"]["listed"])
    reconcile("curation", n_listed, manifest.height, rejected.height)
    if manifest["id"].n_unique() != manifest.height:
        raise ReconciliationError("the manifest holds an id twice")
    stats = curation_stats(cfg, ingest, shards, near_kept, clean, manifest, rejected, select_stats, clusters,
                           locator)
    if calibration is not None:
        used = {"near_dedup": cfg.near_dedup.threshold, "eval_dedup": cfg.eval_dedup.threshold}
        stats["calibration"] = {**calibration.summary(), "applied": cfg.calibrate.apply, "used": used}
    return CurationResult(manifest=manifest, rejected=rejected, stats=stats, work_dir=work_dir,
                          ingest_kept=ingest.kept, duplicate_groups=duplicate_groups(near_rejected),
                          clusters=clusters, calibration=calibration)


def calibrate_step(work_dir: Path, cfg: CurateConfig, ingest: IngestResult, shards: EmbeddingShards, upstream: str,
                   locator: StoreLocator | None = None) -> CalibrationResult:
    """Planted copies of pool images scored against the pool (calibrate.py); the hand-set thresholds measured.

    Only the scores are the step's output: the targets are applied to them on every run, so changing a
    target (or ``apply``) re-describes nothing."""
    key = fingerprint("calibrate", without(cfg.calibrate, "enabled", "apply", "target_precision",
                                           "eval_target_precision"), upstream)
    read = locator.read if locator is not None else read_uri
    folder = run_step(work_dir, "calibrate", key,
                      lambda out: measure_pool(ingest.kept, shards, cfg.embed, cfg.calibrate, read).write(out))
    configured = {"near_dedup": cfg.near_dedup.threshold, "eval_dedup": cfg.eval_dedup.threshold}
    return calibrate_from_scores(CalibrationScores.read(folder), cfg.calibrate, configured)


def with_calibrated_thresholds(cfg: CurateConfig, calibration: CalibrationResult) -> CurateConfig:
    """A copy of ``cfg`` whose near_dedup / eval_dedup thresholds are the calibrated ones.

    Clipped to [-1, 1]: a float32 cosine of identical vectors can come out a hair above 1."""
    near = min(1.0, max(-1.0, calibration.near_dedup.point.threshold))
    evals = min(1.0, max(-1.0, calibration.eval_dedup.point.threshold))
    return dataclasses.replace(cfg, near_dedup=dataclasses.replace(cfg.near_dedup, threshold=near),
                               eval_dedup=dataclasses.replace(cfg.eval_dedup, threshold=evals))


def concat_shards(parts: list[EmbeddingShards], out_dir: Path) -> EmbeddingShards:
    """Several eval sets as one shard folder (streamed; ids may repeat across sets, which is harmless)."""
    writer = ShardWriter(out_dir, 65_536)
    for part in parts:
        for ids, vectors in part.iter_shards():
            writer.add(ids, np.asarray(vectors))
    return writer.close(dim=parts[0].dim)


def select(cfg: CurateConfig, work_dir: Path, shards: EmbeddingShards, clean: pl.DataFrame, upstream: str,
           store_opener: Callable[[str], ObjectStore], locator: StoreLocator | None = None,
           ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame | None, dict[str, Any]]:
    """Retrieval then balancing: (selected rows, their not_* rejections, clusters, stats)."""
    stats: dict[str, Any] = {}
    rejected = [pl.DataFrame(schema=REJECTED_SCHEMA)]
    current, key = clean, upstream
    if cfg.retrieval.seeds:
        from components.curation.retrieval import RetrievalConfig, retrieve

        _, seed_shards, seed_key = ingest_and_embed(work_dir, "seeds", cfg.ingest.to_ingest(cfg.retrieval.seeds), cfg,
                                                    key, store_opener, locator)
        key = fingerprint(dataclasses.replace(cfg.retrieval, seeds=recorded(locator, cfg.retrieval.seeds)), seed_key)
        section = cfg.retrieval

        def retrieve_compute(folder: Path) -> None:
            pool = subset_shards(shards, set(current["id"].to_list()), folder / "pool_shards")
            rcfg = RetrievalConfig(mode=section.mode, n_per_seed=section.n_per_seed,
                                   min_similarity=section.min_similarity, n_clusters=section.n_clusters,
                                   min_seeds_per_cluster=section.min_seeds_per_cluster,
                                   max_per_cluster=section.max_per_cluster, seed=section.seed,
                                   kmeans_max_train_rows=section.kmeans_max_train_rows)
            result = retrieve(pool, seed_shards, rcfg)
            pool_ids = pool.ids()
            seed_of = [result.seed_of.get(int(r)) for r in result.rows]
            write_frames(folder, selected=pl.DataFrame({"id": [pool_ids[int(r)] for r in result.rows],
                                                        "seed": pl.Series(seed_of, dtype=pl.Utf8)}))
            write_text_atomic(json.dumps(result.stats, sort_keys=True, default=int) + "\n", folder / "stats.json")

        folder = run_step(work_dir, "retrieval", key, retrieve_compute)
        chosen = set(pl.read_parquet(folder / "selected.parquet")["id"].to_list())
        stats["retrieval"] = json.loads((folder / "stats.json").read_text())
        rejected.append(not_selected(current.filter(~pl.col("id").is_in(list(chosen))), NOT_RETRIEVED,
                                     f"not among the {cfg.retrieval.n_per_seed} nearest pool images of any seed"))
        current = current.filter(pl.col("id").is_in(list(chosen)))
    clusters = None
    if cfg.balance.levels and current.height:
        from components.curation.hierarchical import balanced_sample, hierarchical_kmeans

        key = fingerprint(cfg.balance, key)
        section_b = cfg.balance
        rows_in = current

        def balance_compute(folder: Path) -> None:
            source = subset_shards(shards, set(rows_in["id"].to_list()), folder / "shards")
            levels = [min(k, source.num_rows) for k in section_b.levels]
            hk = hierarchical_kmeans(source, section_b.kmeans_config(levels))
            top = hk.point_clusters(len(levels) - 1)
            target = section_b.target_size or source.num_rows
            picked = balanced_sample(hk, target, seed=section_b.seed, strategy=section_b.strategy)
            chosen = np.zeros(source.num_rows, dtype=bool)
            chosen[picked] = True
            write_frames(folder, clusters=pl.DataFrame({"id": hk.ids, "cluster": top.astype(np.int64),
                                                        "leaf": hk.point_clusters(0).astype(np.int64),
                                                        "sampled": chosen}))

        folder = run_step(work_dir, "balance", key, balance_compute)
        clusters = pl.read_parquet(folder / "clusters.parquet")
        sampled = set(clusters.filter(pl.col("sampled"))["id"].to_list())
        stats["cluster_sizes"] = clusters.group_by("cluster").len().sort("cluster")["len"].to_list()
        rejected.append(not_selected(current.filter(~pl.col("id").is_in(list(sampled))), NOT_SAMPLED,
                                     f"balanced sampling to {cfg.balance.target_size} images left it out"))
        current = current.filter(pl.col("id").is_in(list(sampled)))
    return current, pl.concat(rejected), clusters, stats


def build_manifest(selected: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    """The pretraining manifest: a ``uri`` per image, ``split`` for DataConfig.splits, labels if known.

    ``uri`` is as ingest recorded it: a key of the configured store, or an absolute URI outside it."""
    # format / extension_mismatch: decided from the bytes at ingest, kept so a user sees a PNG named .jpg
    columns = ["id", "uri", "key", "sha256", "width", "height", "format", "extension_mismatch"]
    manifest = selected.select(columns).with_columns(pl.lit(cfg.outputs.split).alias("split"))
    if cfg.outputs.labels:
        labels = read_table(cfg.outputs.labels).select("key", pl.col("label").cast(pl.Int32), "class_name")
        manifest = manifest.join(labels.unique("key"), on="key", how="left")
    return manifest.sort("key")


def duplicate_groups(near_rejected: pl.DataFrame) -> list[tuple[str, list[str]]]:
    """(kept id, removed ids) per near-duplicate component, largest first, then by kept id."""
    dups = near_rejected.filter(pl.col("reason") == reasons.NEAR_DUPLICATE)
    if dups.is_empty():
        return []
    grouped = dups.group_by("duplicate_of").agg(pl.col("sha256").sort()).with_columns(
        pl.col("sha256").list.len().alias("n")).sort(["n", "duplicate_of"], descending=[True, False])
    from components.curation.schema import image_id

    return [(kept, [image_id(s) for s in removed]) for kept, removed in
            zip(grouped["duplicate_of"].to_list(), grouped["sha256"].to_list(), strict=True)]


def count_by_reason(rejected: pl.DataFrame) -> dict[str, int]:
    found = {str(r): int(n) for r, n in rejected.group_by("reason").len().iter_rows()} if rejected.height else {}
    return {code: found.get(code, 0) for code in CURATE_REASONS}


def curation_stats(cfg: CurateConfig, ingest: IngestResult, shards: EmbeddingShards, near_kept: pl.DataFrame,
                   clean: pl.DataFrame, manifest: pl.DataFrame, rejected: pl.DataFrame, select_stats: dict[str, Any],
                   clusters: pl.DataFrame | None, locator: StoreLocator | None = None) -> dict[str, Any]:
    """Counts per step and per reason (zeros included) and the reconciliation, as JSON for DVC metrics."""
    retrieved = (clusters.height if clusters is not None else manifest.height) if cfg.retrieval.seeds else clean.height
    steps = {"listed": int(ingest.stats["steps"]["listed"]), "ingest_kept": ingest.kept.height,
             "embedded": shards.num_rows, "near_dedup_kept": near_kept.height, "eval_dedup_kept": clean.height,
             "retrieved": retrieved, "sampled": manifest.height, "manifest": manifest.height}
    return {"pool": recorded(locator, cfg.ingest.pool), "embedder": recorded(locator, cfg.embed.backbone),
            "steps": steps,
            "rejected": rejected.height, "rejected_by_reason": count_by_reason(rejected),
            "reconciled": steps["listed"] == manifest.height + rejected.height,
            **select_stats}


__all__ = ["CURATE_REASONS", "NOT_RETRIEVED", "NOT_SAMPLED", "CurationResult", "run_curation"]
