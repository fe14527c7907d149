"""The whole curation pipeline on a small planted-truth pool: known answers, resume, S3, pretrain-readable.

Real Fashion-MNIST / scikit-learn / scikit-image images written to a real local store (and a real S3
server), the real ingest, pixel descriptor, Faiss graphs, retrieval and hierarchical k-means.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from components.curation import reasons
from components.curation.config import (
    BalanceSection,
    CurateConfig,
    DedupConfig,
    DemoPoolConfig,
    EvalDedupConfig,
    OutputsConfig,
    PoolSection,
    RetrievalSection,
)
from components.curation.demo_pool import DemoPool, build_curation_demo, score_against_truth
from components.curation.embed import EmbedConfig
from components.curation.pictures import duplicate_grid
from components.curation.pipeline import NOT_RETRIEVED, NOT_SAMPLED, run_curation
from components.data.manifest_dataset import ManifestImageDataset, load_manifest
from components.storage import open_store
from tests.test_curation_demo import small_demo


def curate_config(demo: DemoPool, eval_set: str | None = None, target: int = 20) -> CurateConfig:
    return CurateConfig(
        ingest=PoolSection(pool=demo.pool_uri, workers=2),
        embed=EmbedConfig(backbone="pixels:32", decode_workers=2),
        near_dedup=DedupConfig(threshold=0.96),
        eval_dedup=EvalDedupConfig(threshold=0.955, sets=[eval_set or demo.eval_uri]),
        retrieval=RetrievalSection(seeds=demo.seeds_uri, n_per_seed=4),
        balance=BalanceSection(levels=[6, 2], target_size=target, n_iter=10, resampling_steps=2),
        outputs=OutputsConfig(labels=demo.labels_uri))


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPool:
    folder = tmp_path_factory.mktemp("curation-demo")
    return build_curation_demo(small_demo(), open_store(folder / "store"), folder / "state")


def manifest_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def test_pipeline_finds_the_planted_answers_and_reconciles(local_demo: DemoPool, tmp_path: Path) -> None:
    result = run_curation(curate_config(local_demo), tmp_path / "work")
    stats = result.stats
    assert stats["reconciled"] and stats["steps"]["listed"] == result.manifest.height + result.rejected.height
    assert stats["steps"]["listed"] == local_demo.truth.height
    by_reason = stats["rejected_by_reason"]
    assert by_reason[reasons.EXACT_DUPLICATE] == 4
    assert by_reason[NOT_SAMPLED] == stats["steps"]["retrieved"] - 20 and result.manifest.height == 20
    assert by_reason[NOT_RETRIEVED] == stats["steps"]["eval_dedup_kept"] - stats["steps"]["retrieved"]
    # every listed key is exactly once in manifest + rejects
    keys = result.manifest["key"].to_list() + result.rejected["key"].to_list()
    assert sorted(keys) == sorted(local_demo.truth["key"].to_list())
    scores = score_against_truth(local_demo.truth, result.ingest_kept, result.rejected, result.manifest)
    assert scores["corrupt_reason_accuracy"] == 1.0 and scores["dup_recall_exact"] == 1.0
    for kind in ("resize", "jpeg", "brightness"):
        assert scores[f"dup_recall_near_{kind}"] == 1.0, kind
    assert scores["dup_precision_near"] >= 0.9
    assert scores["eval_leak_precision"] == 1.0 and scores["eval_leak_recall"] >= 0.5
    assert scores["manifest_fashion_share"] >= 0.9  # distractors are (nearly) never retrieved by fashion seeds
    # each duplicate group names its kept image first, and the removed ones point at it
    kept_id, removed = result.duplicate_groups[0]
    dups = result.rejected.filter(pl.col("reason") == reasons.NEAR_DUPLICATE)
    assert set(dups.filter(pl.col("duplicate_of") == kept_id)["sha256"].str.slice(0, 24).to_list()) == set(removed)
    assert result.clusters is not None and result.clusters["cluster"].n_unique() == 2


def test_manifest_is_readable_by_pretraining(local_demo: DemoPool, tmp_path: Path) -> None:
    result = run_curation(curate_config(local_demo), tmp_path / "work")
    path = tmp_path / "manifest.parquet"
    result.manifest.write_parquet(path)
    frame = load_manifest(path)
    assert {"uri", "split", "label", "class_name"} <= set(frame.columns)
    assert frame.filter(pl.col("split").is_in(["train"])).height == frame.height
    fashion = frame.filter(pl.col("label") >= 0)
    assert fashion.height >= 18 and fashion["class_name"].null_count() == 0
    dataset = ManifestImageDataset(frame, transform=lambda image, seed: image)
    image = dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"


def test_interrupted_run_continues_and_gives_the_same_manifest(local_demo: DemoPool, tmp_path: Path) -> None:
    clean = run_curation(curate_config(local_demo), tmp_path / "clean")
    # a real failure mid-run: the eval set's folder is not there when the eval step reaches it
    eval_folder = Path(local_demo.eval_uri.removeprefix("file://"))
    moved = eval_folder.with_name("eval-away")
    eval_folder.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            run_curation(curate_config(local_demo), tmp_path / "work")
    finally:
        moved.rename(eval_folder)
    work = tmp_path / "work"
    done_before = {step: (work / step / "done.json").stat().st_mtime_ns
                   for step in ("pool_ingest", "pool_embed", "near_dedup")}
    assert not (work / "eval_dedup" / "done.json").exists()
    resumed = run_curation(curate_config(local_demo), work)
    # finished steps were not redone, and the result is byte-for-byte the clean run's
    assert {step: (work / step / "done.json").stat().st_mtime_ns for step in done_before} == done_before
    assert manifest_bytes(resumed.manifest) == manifest_bytes(clean.manifest)
    assert resumed.rejected.equals(clean.rejected)
    # a changed section reruns that step and everything after it, nothing before
    changed = run_curation(curate_config(local_demo, target=15), work)
    assert changed.manifest.height == 15
    assert {step: (work / step / "done.json").stat().st_mtime_ns for step in done_before} == done_before


def test_duplicate_grid_draws_one_row_per_group(tmp_path: Path, local_demo: DemoPool) -> None:
    uris = [local_demo.pool_uri + "/" + k for k in local_demo.truth.filter(pl.col("role") == "original")["key"][:5]]
    path = duplicate_grid([("a", uris[:3]), ("b", uris[3:]), ("missing", ["file:///nonexistent.png"])],
                          tmp_path / "dups.png", per_row=4, cell=32)
    with Image.open(path) as image:
        assert image.size == (150 + 4 * 36 + 4, 3 * 36 + 4)
        pixels = image.convert("RGB")
        assert pixels.getpixel((150 + 4, 4)) == (0, 160, 0)  # kept image: green frame
        assert pixels.getpixel((150 + 4 + 36, 4)) == (200, 0, 0)  # removed: red frame


def test_curation_from_an_s3_pool(bucket_uri: str, tmp_path: Path) -> None:
    store = open_store(bucket_uri, create_bucket=True)
    cfg_demo: DemoPoolConfig = small_demo("s3demo")
    demo = build_curation_demo(cfg_demo, store, tmp_path / "state")
    assert demo.pool_uri.startswith("s3://")
    result = run_curation(curate_config(demo), tmp_path / "work")
    assert result.stats["reconciled"] and result.manifest["uri"].str.starts_with("s3://").all()
    assert result.stats["rejected_by_reason"][reasons.EXACT_DUPLICATE] == 4
    scores = score_against_truth(demo.truth, result.ingest_kept, result.rejected, result.manifest)
    assert scores["corrupt_reason_accuracy"] == 1.0 and scores["dup_recall_near_jpeg"] == 1.0


def test_dedup_params_reach_the_knn_graph_including_nprobe() -> None:
    from components.config.loader import from_mapping
    from components.curation.config import DedupConfig
    from components.curation.pipeline import knn

    cfg = from_mapping(DedupConfig, {"k": 8, "threshold": 0.9, "index": "ivf_blocked", "nprobe": 14})
    graph = knn(cfg)
    assert (graph.k, graph.threshold, graph.index, graph.nprobe) == (8, 0.9, "ivf_blocked", 14)
    assert knn(DedupConfig()).nprobe is None  # the library default
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        DedupConfig(nprobe=0).validate()
