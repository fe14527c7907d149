"""Embedding shards, k-NN graphs, union-find, self near-dedup and relative (eval) dedup.

Real PIL images and near-copies of them (JPEG recompression, resize, 1-pixel shift), a real random-init
pico ViT, and a deterministic pixel embedding for exact numerical checks; every graph is checked against
a numpy brute-force cosine reference.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image, ImageChops

from components.curation import reasons
from components.curation.dedup_near import eval_dedup, near_dedup, near_dedup_from_vectors
from components.curation.embed import EmbedConfig, EmbeddingShards, embed_images, preprocess, write_vectors
from components.curation.ingest import ReconciliationError
from components.curation.knn_graph import InMemoryVectors, KnnConfig, build_knn_graph
from components.curation.schema import REJECTED_SCHEMA
from components.curation.union_find import UnionFind, connected_components
from components.models import BackboneConfig, build_backbone

GROUPS = 5  # distinct source images
COPIES = ("orig", "jpeg", "shift", "small")  # each source and three near-copies
PIXEL_THRESHOLD = 0.8  # pixel embedding: near-copies >= 0.97, distinct images <= ~0.5


# ------------------------------------------------------------------------------------ images


def photo(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    """A smooth random colour field: distinct per seed, like a blurry photo."""
    small = np.random.default_rng(seed).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def variant(image: Image.Image, kind: str) -> Image.Image:
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "shift":
        return ImageChops.offset(image, 1, 0)
    if kind == "small":
        return image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR)
    return image


def pool_images() -> dict[str, Image.Image]:
    """id -> image: GROUPS sources x COPIES; ids sort so that the original is not always first."""
    return {f"g{g}-{kind}": variant(photo(g), kind) for g in range(GROUPS) for kind in COPIES}


def pixel_embedding(image: Image.Image) -> np.ndarray:
    """Deterministic 'identity' embedding (256,): 16x16 grey pixels, mean removed, unit length."""
    grey = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    grey -= grey.mean()
    return (grey / np.linalg.norm(grey)).astype(np.float32)


def write_pool(root: Path, images: dict[str, Image.Image]) -> pl.DataFrame:
    """PNG files + a kept-style table (id, uri, key, width, height)."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, image in images.items():
        path = root / f"{image_id}.png"
        image.save(path)
        records.append({"id": image_id, "uri": path.as_uri(), "key": path.name, "width": image.width,
                        "height": image.height})
    return pl.DataFrame(records, schema={"id": pl.Utf8, "uri": pl.Utf8, "key": pl.Utf8, "width": pl.Int32,
                                         "height": pl.Int32})


# ------------------------------------------------------------------------- brute-force references


def brute_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T  # (N, N)
    i, j = np.nonzero(np.triu(sims > threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def brute_knn_pairs(vectors: np.ndarray, k: int, threshold: float) -> set[tuple[int, int]]:
    """Union of each row's k nearest others, above threshold, as (min, max) pairs."""
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T  # (N, N)
    np.fill_diagonal(sims, -np.inf)
    pairs = set()
    for i, row in enumerate(sims):
        for j in np.argsort(-row, kind="stable")[:k]:
            if row[j] > threshold:
                pairs.add((min(i, int(j)), max(i, int(j))))
    return pairs


def brute_components(n: int, pairs: set[tuple[int, int]]) -> list[frozenset[int]]:
    """Components by repeated boolean matrix closure (independent of union-find)."""
    reach = np.eye(n, dtype=bool)
    for i, j in pairs:
        reach[i, j] = reach[j, i] = True
    while True:
        grown = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
        if (grown == reach).all():
            break
        reach = grown
    return sorted({frozenset(np.nonzero(r)[0].tolist()) for r in reach}, key=min)


def label_sets(labels: np.ndarray) -> list[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for node, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(node)
    return sorted((frozenset(g) for g in groups.values()), key=min)


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))  # (N, D)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def graph_pairs(vectors: np.ndarray, **kwargs: object) -> set[tuple[int, int]]:
    graph = build_knn_graph(InMemoryVectors([str(i) for i in range(len(vectors))], vectors, shard_size=32),
                            **kwargs)  # type: ignore[arg-type]
    assert (graph.edges.src < graph.edges.dst).all()
    return set(zip(graph.edges.src.tolist(), graph.edges.dst.tolist(), strict=True))


# ------------------------------------------------------------------------------ union-find / graph


def test_union_find_components_match_matrix_closure() -> None:
    rng = np.random.default_rng(0)
    n = 60
    src, dst = rng.integers(0, n, 45), rng.integers(0, n, 45)
    labels = connected_components(n, src, dst)
    pairs = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist(), strict=True) if a != b}
    assert label_sets(labels) == brute_components(n, pairs)
    assert all(labels[min(c)] == min(c) for c in label_sets(labels))  # label = smallest member
    shuffled = rng.permutation(len(src))
    assert (connected_components(n, src[shuffled], dst[shuffled]) == labels).all()  # order-independent

    sets = UnionFind(4)
    assert sets.union(0, 1) and sets.union(2, 3) and sets.union(1, 3) and not sets.union(0, 2)
    assert sets.size[sets.find(0)] == 4


def test_flat_graph_equals_numpy_brute_force() -> None:
    vectors = clustered_vectors(150, 16, clusters=12, spread=0.35, seed=1)
    threshold = 0.8
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    assert np.abs(sims - threshold).min() > 1e-5  # no pair sits on the threshold: exact set equality is fair
    expected = brute_pairs(vectors, threshold)
    assert len(expected) > 100
    assert graph_pairs(vectors, k=1000, threshold=threshold) == expected  # k capped at N - 1
    for k in (1, 3, 8):  # a small k: the union of each row's k nearest others
        assert graph_pairs(vectors, k=k, threshold=threshold) == brute_knn_pairs(vectors, k, threshold)

    graph = build_knn_graph(InMemoryVectors([f"v{i}" for i in range(150)], vectors, shard_size=7), 1000, threshold)
    assert graph.ids == [f"v{i}" for i in range(150)]
    np.testing.assert_allclose(graph.edges.cosine, sims[graph.edges.src, graph.edges.dst], atol=1e-5)


def test_ivf_with_all_lists_probed_equals_flat() -> None:
    vectors = clustered_vectors(400, 16, clusters=20, spread=0.3, seed=2)
    flat = graph_pairs(vectors, k=10, threshold=0.7)
    assert graph_pairs(vectors, k=10, threshold=0.7, index="ivf", nlist=8, nprobe=8) == flat
    assert graph_pairs(vectors, k=10, threshold=0.7, index="auto", nlist=8, nprobe=8, ivf_min_rows=100) == flat
    approx = graph_pairs(vectors, k=10, threshold=0.7, index="ivf", nlist=8, nprobe=1)
    assert approx <= brute_pairs(vectors, 0.7)  # approximate: may miss edges, never invents one


def test_tiny_pools() -> None:
    one = build_knn_graph(InMemoryVectors(["a"], np.ones((1, 4), np.float32) / 2), 64, 0.6)
    assert one.edges.num_edges == 0 and one.ids == ["a"]
    empty = build_knn_graph(InMemoryVectors([], np.zeros((0, 4), np.float32)), 64, 0.6)
    assert empty.edges.num_edges == 0


# ------------------------------------------------------------------------ self dedup (identity path)


def test_self_dedup_of_pixel_embeddings_groups_each_image_with_its_copies() -> None:
    images = pool_images()
    ids = list(images)
    vectors = np.stack([pixel_embedding(im) for im in images.values()])  # (20, 256)
    pixels = np.array([im.width * im.height for im in images.values()])
    result = near_dedup_from_vectors(ids, vectors, k=64, threshold=PIXEL_THRESHOLD, pixels=pixels, shard_size=6)

    expected = brute_components(len(ids), brute_pairs(vectors, PIXEL_THRESHOLD))
    assert label_sets(result["component"].to_numpy()) == expected
    assert expected == [frozenset(range(g * len(COPIES), (g + 1) * len(COPIES))) for g in range(GROUPS)]
    # Kept: most pixels (the 48x40 ones: orig, jpeg, shift tie), then the smallest id ("g0-jpeg").
    kept = result.filter(pl.col("duplicate_of").is_null())["id"].to_list()
    assert kept == [f"g{g}-jpeg" for g in range(GROUPS)]
    dup_of = dict(zip(result["id"], result["duplicate_of"], strict=True))
    assert all(dup_of[f"g{g}-{kind}"] == f"g{g}-jpeg" for g in range(GROUPS) for kind in ("orig", "shift", "small"))
    assert set(result["component_size"].to_list()) == {len(COPIES)}


def test_kept_choice_does_not_depend_on_row_order() -> None:
    images = pool_images()
    ids = list(images)
    vectors = np.stack([pixel_embedding(im) for im in images.values()])
    base = near_dedup_from_vectors(ids, vectors, threshold=PIXEL_THRESHOLD)  # no pixels: smallest id wins
    assert base.filter(pl.col("duplicate_of").is_null())["id"].to_list() == [f"g{g}-jpeg" for g in range(GROUPS)]
    order = np.random.default_rng(3).permutation(len(ids))
    shuffled = near_dedup_from_vectors([ids[i] for i in order], vectors[order], threshold=PIXEL_THRESHOLD,
                                       shard_size=5)
    assignment = dict(base.select("id", "duplicate_of").iter_rows())
    assert dict(shuffled.select("id", "duplicate_of").iter_rows()) == assignment


def test_near_dedup_table_reconciles_and_names_the_kept_id(tmp_path: Path) -> None:
    images = pool_images()
    rows = write_pool(tmp_path / "pool", images)
    vectors = np.stack([pixel_embedding(im) for im in images.values()])
    shards = write_vectors(list(images), vectors, tmp_path / "emb", shard_size=7)
    result = near_dedup(rows, shards, KnnConfig(k=64, threshold=PIXEL_THRESHOLD))
    assert result.kept.height + result.rejected.height == rows.height
    assert result.kept.columns == rows.columns and result.rejected.schema == REJECTED_SCHEMA
    assert sorted(result.kept["id"]) == [f"g{g}-jpeg" for g in range(GROUPS)]
    assert set(result.rejected["reason"]) == {reasons.NEAR_DUPLICATE}
    by_key = dict(zip(result.rejected["key"], result.rejected["duplicate_of"], strict=True))
    assert by_key["g2-small.png"] == "g2-jpeg"
    assert result.stats["steps"] == {"input": 20, "kept": 5, "rejected": 15}
    assert result.stats["components"] == GROUPS and result.stats["largest_component"] == len(COPIES)


def test_rows_without_embedding_or_rejection_fail_reconciliation(tmp_path: Path) -> None:
    images = pool_images()
    rows = write_pool(tmp_path / "pool", images)
    ids = list(images)[:-1]  # the last row was never embedded, and no rejection says why
    vectors = np.stack([pixel_embedding(images[i]) for i in ids])
    with pytest.raises(ReconciliationError):
        near_dedup(rows, write_vectors(ids, vectors, tmp_path / "emb", shard_size=8))


# ------------------------------------------------------------------------------- relative dedup


def circle_vectors(degrees: list[float], dim: int = 4) -> np.ndarray:
    """Unit vectors at the given angles in the first plane (cosine of two = cos of the angle between)."""
    out = np.zeros((len(degrees), dim), np.float32)
    out[:, 0] = np.cos(np.radians(degrees))
    out[:, 1] = np.sin(np.radians(degrees))
    return out


def test_eval_leak_removes_the_whole_component() -> None:
    # Eval image at 0 deg; pool chain at 50, 100, 150 deg: neighbours 50 deg apart (cos 0.64 > 0.45),
    # but 100 and 150 are far from the eval image itself (cos < 0). A far pool image elsewhere stays.
    pool = circle_vectors([50, 100, 150, 0, 0])
    pool[3:] = 0.0
    pool[3, 2] = 1.0  # "far-a": orthogonal to everything
    pool[4, 3] = 1.0  # "far-b"
    pool_ids = ["chain-50", "chain-100", "chain-150", "far-a", "far-b"]
    evals = circle_vectors([0, 270])  # the 270 deg eval image is > 90 deg from every pool image: matches none
    rows = pl.DataFrame({"id": pool_ids, "uri": [f"file:///{i}.png" for i in pool_ids]})
    result = eval_dedup(rows, InMemoryVectors(pool_ids, pool), InMemoryVectors(["eval-0", "eval-270"], evals),
                        KnnConfig(k=64, threshold=0.45))
    assert result.kept["id"].to_list() == ["far-a", "far-b"]
    assert result.rejected["reason"].to_list() == [reasons.EVAL_LEAK] * 3
    assert result.rejected["duplicate_of"].to_list() == ["eval-0"] * 3
    assert result.kept.height + result.rejected.height == rows.height
    # Direct similarity alone would have let two of them through: the chain is what removes them.
    assert (pool[1:3] @ evals[0] < 0.45).all()
    assert result.stats["eval_images_matched"] == 1


def test_eval_copies_of_real_images_remove_their_pool_group(tmp_path: Path) -> None:
    images = pool_images()
    rows = write_pool(tmp_path / "pool", images)
    pool = write_vectors(list(images), np.stack([pixel_embedding(im) for im in images.values()]),
                         tmp_path / "pool-emb", shard_size=6)
    # The eval set holds a resized copy of group 1's source and an unrelated image.
    eval_images = {"test-1": photo(1).resize((64, 56)), "test-x": photo(99)}
    evals = write_vectors(list(eval_images), np.stack([pixel_embedding(im) for im in eval_images.values()]),
                          tmp_path / "eval-emb", shard_size=1)
    result = eval_dedup(rows, pool, evals, KnnConfig(k=64, threshold=0.45))
    assert sorted(result.rejected["key"]) == sorted(f"g1-{kind}.png" for kind in COPIES)
    assert set(result.rejected["duplicate_of"]) == {"test-1"}
    assert result.kept.height == rows.height - len(COPIES)


# ------------------------------------------------------------------------------- embedding (ViT)


def test_embed_images_streams_shards_and_records_failures(tmp_path: Path) -> None:
    images = pool_images()
    rows = write_pool(tmp_path / "pool", images)
    broken = tmp_path / "pool" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = pl.concat([rows, pl.DataFrame({"id": ["broken"], "uri": [broken.as_uri()], "key": ["broken.png"],
                                          "width": [10], "height": [10]}, schema=rows.schema)])
    cfg = EmbedConfig(backbone="random:vit_pico:4:28", image_size=28, batch_size=4, shard_size=6, num_threads=1,
                      decode_workers=2)
    shards = embed_images(rows, cfg, tmp_path / "emb")

    n = len(images)
    assert shards.num_rows == n and shards.dim == 64
    assert [s.rows for s in shards.shards] == [6, 6, 6, 2]  # shard_size < n: several shards
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard_*")) == sorted(
        f"shard_{i:05d}{ext}" for i in range(4) for ext in (".npy", ".ids.parquet"))
    assert not list((tmp_path / "emb").glob(".*part"))  # no temp files left behind
    index = json.loads((tmp_path / "emb" / "index.json").read_text())
    assert index["dim"] == 64 and index["num_rows"] == n and len(index["shards"]) == 4

    failed = shards.rejected()
    assert failed["key"].to_list() == ["broken.png"] and failed["reason"].to_list() == [reasons.EMBED_FAILED]
    assert shards.num_rows + failed.height == rows.height

    # Round trip: the same ids in order, memory-mapped shards, unit rows equal to a direct forward pass.
    reopened = EmbeddingShards.open(tmp_path / "emb")
    parts = list(reopened.iter_shards())
    assert all(isinstance(v, np.memmap) and v.dtype == np.float32 for _, v in parts)
    ids = [i for part_ids, _ in parts for i in part_ids]
    assert ids == list(images) == reopened.ids()
    vectors = np.concatenate([np.asarray(v) for _, v in parts])  # (n, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=0.0,
                                         layerscale_init=None)).eval()
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([preprocess(Image.open(tmp_path / "pool" / f"{i}.png"), 28, cfg.mean,
                                                      cfg.std) for i in ids]))
        cls = model.forward_features(batch)["x_norm_clstoken"]
    assert cls is not None
    reference = cls.numpy() / np.linalg.norm(cls.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-4)


def test_preprocess_resizes_shorter_side_and_centre_crops() -> None:
    # A 60x30 image whose left and right quarters are red and the middle half is blue:
    # the shorter side goes to 30 -> no resize, the centre 30x30 crop is all blue.
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :15, 0] = pixels[:, 45:, 0] = 255
    pixels[:, 15:45, 2] = 255
    out = preprocess(Image.fromarray(pixels), 30, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (3, 30, 30) and out.dtype == np.float32
    np.testing.assert_allclose(out[2], 1.0)
    np.testing.assert_allclose(out[:2], 0.0)
    grey = preprocess(Image.new("L", (10, 20), 51), 28, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))  # upscaled, grey -> RGB
    assert grey.shape == (3, 28, 28)
    np.testing.assert_allclose(grey[:, 0, 0], (np.array([0.2, 0.2, 0.2]) - [0.1, 0.2, 0.3]) / 0.5, atol=1e-6)


def test_vit_embeddings_end_to_end_match_the_brute_force_graph(tmp_path: Path) -> None:
    """The pico ViT's components equal the brute-force ones; on these synthetic copies they are the groups.

    A random-init ViT is NOT a copy detector: the gap between copies (>= 0.998) and distinct images
    (<= ~0.96) only holds for these blurry colour fields, and the threshold is read off the data.
    """
    images = pool_images()
    rows = write_pool(tmp_path / "pool", images)
    shards = embed_images(rows, EmbedConfig(image_size=28, batch_size=8, shard_size=5), tmp_path / "emb")
    vectors = np.concatenate([np.asarray(v) for _, v in shards.iter_shards()])  # (20, 64)
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    same_group = np.kron(np.eye(GROUPS), np.ones((len(COPIES), len(COPIES)))).astype(bool)
    lowest_copy, highest_other = sims[same_group].min(), sims[~same_group].max()
    assert lowest_copy - highest_other > 0.01
    threshold = float((lowest_copy + highest_other) / 2)
    result = near_dedup(rows, shards, KnnConfig(k=64, threshold=threshold))
    expected = brute_components(len(vectors), brute_pairs(vectors, threshold))
    assert expected == [frozenset(range(g * len(COPIES), (g + 1) * len(COPIES))) for g in range(GROUPS)]
    assert sorted(result.kept["id"]) == [f"g{g}-jpeg" for g in range(GROUPS)]  # 48x40 beats 36x30; then smallest id
    assert result.kept.height + result.rejected.height == rows.height
    assert math.isclose(result.stats["threshold"], threshold)
