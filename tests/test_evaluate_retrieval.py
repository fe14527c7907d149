"""Retrieval metrics against hand-computed values and scikit-learn; the Fashion-MNIST protocol end to end."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from components.data import fashion_mnist
from components.evaluate.features import fashion_mnist_tensor
from components.evaluate.retrieval import (
    IRRELEVANT_COLOUR,
    PICTURE_NAME,
    RELEVANT_COLOUR,
    RetrievalConfig,
    average_precision,
    evaluate_retrieval,
    load_retrieval_data,
    mean_average_precision,
    queries_without_relevant,
    ranking,
    recall_at_k,
)
from components.models import BackboneConfig, DinoVisionTransformer, build_backbone

# Four queries over a gallery of four; row 1 and row 3 have ties, row 2 has no relevant item.
SIMS = np.array([
    [0.9, 0.8, 0.7, 0.6],  # ranks 0,1,2,3: hits at ranks 2, 4 -> AP (1/2 + 2/4) / 2 = 1/2
    [0.5, 0.5, 0.5, 0.1],  # tie -> 0,1,2,3: hit at rank 3 -> AP 1/3
    [0.3, 0.2, 0.1, 0.0],  # nothing relevant: excluded
    [0.2, 0.7, 0.7, 0.7],  # tie -> 1,2,3,0: hits (2, 0) at ranks 2, 4 -> AP 1/2
])
REL = np.array([
    [False, True, False, True],
    [False, False, True, False],
    [False, False, False, False],
    [True, False, True, False],
])


def test_ranking_breaks_ties_by_gallery_index() -> None:
    assert ranking(np.array([0.2, 0.7, 0.7, 0.7])).tolist() == [1, 2, 3, 0]
    assert ranking(SIMS).tolist()[1] == [0, 1, 2, 3]


def test_average_precision_hand_values() -> None:
    assert average_precision(SIMS[0], REL[0]) == pytest.approx(0.5)
    assert average_precision(SIMS[1], REL[1]) == pytest.approx(1 / 3)
    assert average_precision(SIMS[3], REL[3]) == pytest.approx(0.5)
    assert average_precision(np.array([0.1, 0.9]), np.array([False, True])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no relevant"):
        average_precision(SIMS[2], REL[2])


def test_map_and_recall_exclude_queries_without_relevant() -> None:
    assert queries_without_relevant(REL) == 1
    assert mean_average_precision(SIMS, REL) == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    # first relevant at 0-based rank 1, 2, 1 (row 2 excluded)
    assert recall_at_k(SIMS, REL, [1, 2, 3, 4]) == pytest.approx({1: 0.0, 2: 2 / 3, 3: 1.0, 4: 1.0})
    with pytest.raises(ValueError, match="no query"):
        mean_average_precision(SIMS[2:3], REL[2:3])


def test_average_precision_matches_sklearn_without_ties() -> None:
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((30, 50))  # continuous: no ties, so sklearn's threshold grouping agrees
    relevance = rng.random((30, 50)) < 0.2
    relevance[:, 0] = True  # every query has a relevant item
    for row in range(len(sims)):
        assert average_precision(sims[row], relevance[row]) == pytest.approx(
            average_precision_score(relevance[row], sims[row]), abs=1e-12)
    reference = np.mean([average_precision_score(r, s) for r, s in zip(relevance, sims, strict=True)])
    assert mean_average_precision(sims, relevance) == pytest.approx(reference, abs=1e-12)


def test_recall_at_k_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    sims, relevance = rng.standard_normal((40, 30)), rng.random((40, 30)) < 0.1
    counted = relevance.any(axis=1)
    for k, value in recall_at_k(sims, relevance, [1, 3, 10]).items():
        top = np.argsort(-sims, axis=1)[:, :k]
        hits = np.array([relevance[q, top[q]].any() for q in range(len(sims))])
        assert value == pytest.approx(hits[counted].mean())


# ---------------------------------------------------------------- protocol end to end


@pytest.fixture(scope="module")
def pico() -> DinoVisionTransformer:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=0.0,
                                          layerscale_init=None)).eval()


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def run(pico: DinoVisionTransformer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One protocol run (features cached, picture drawn) shared by the tests below."""
    folder = tmp_path_factory.mktemp("retrieval")
    cfg = RetrievalConfig(queries_per_class=3, gallery_per_class=12, ks=[1, 5], picture_queries=3,
                          picture_top_k=5, data_cache_dir=str(folder / "fashion-mnist"))
    metrics = evaluate_retrieval(pico, cfg, MEAN, STD, cache_dir=folder / "cache", picture_dir=folder)
    return {"cfg": cfg, "metrics": metrics, "folder": folder, "data": load_retrieval_data(cfg)}


@pytest.fixture(scope="module")
def reference(pico: DinoVisionTransformer, run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Independent of the module: CLS from forward_features, cosine in float64; (Q, G) sims and relevance."""
    data = run["data"]
    with torch.no_grad():
        q = pico.forward_features(fashion_mnist_tensor(data.query_images, 28, MEAN, STD))["x_norm_clstoken"]
        g = pico.forward_features(fashion_mnist_tensor(data.gallery_images, 28, MEAN, STD))["x_norm_clstoken"]
    assert q is not None and g is not None
    q64, g64 = q.double().numpy(), g.double().numpy()
    sims = (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (g64 / np.linalg.norm(g64, axis=1, keepdims=True)).T
    return sims, data.query_labels[:, None] == data.gallery_labels[None, :]


def test_evaluate_retrieval_matches_an_independent_computation(
    pico: DinoVisionTransformer, run: dict[str, Any], reference: tuple[np.ndarray, np.ndarray]
) -> None:
    metrics = run["metrics"]
    assert set(metrics) == {"retrieval_map", "retrieval_queries_excluded", "retrieval_recall_at_1",
                            "retrieval_recall_at_5"}
    sims, relevance = reference
    expected = np.mean([average_precision_score(r, s) for r, s in zip(relevance, sims, strict=True)])
    assert metrics["retrieval_map"] == pytest.approx(expected, abs=1e-4)  # float32 features vs float64
    assert metrics["retrieval_queries_excluded"] == 0.0
    first_hit = np.array([relevance[q, np.argsort(-sims[q])].argmax() for q in range(len(sims))])
    assert metrics["retrieval_recall_at_1"] == pytest.approx((first_hit < 1).mean())
    assert metrics["retrieval_recall_at_5"] == pytest.approx((first_hit < 5).mean())
    # Second run: features from the cache, identical numbers.
    assert len(list((run["folder"] / "cache").glob("*.npy"))) == 2
    assert evaluate_retrieval(pico, run["cfg"], MEAN, STD, cache_dir=run["folder"] / "cache") == metrics


def test_retrieval_picture_marks_relevant_results(
    run: dict[str, Any], reference: tuple[np.ndarray, np.ndarray]
) -> None:
    cfg: RetrievalConfig = run["cfg"]
    picture = np.asarray(Image.open(run["folder"] / PICTURE_NAME).convert("RGB"))
    tile, gap, k = 64, 16, cfg.picture_top_k
    assert picture.shape == (cfg.picture_queries * tile, (k + 1) * tile + gap, 3)
    corners = picture[::tile, tile + gap :: tile][:, :k]  # (rows, k, 3): each result tile's border pixel
    colours = {tuple(int(v) for v in c) for c in corners.reshape(-1, 3)}
    assert colours <= {RELEVANT_COLOUR, IRRELEVANT_COLOUR}
    # rows are the first query of classes 0, 1, 2 (queries are sorted by index, 3 per class)
    sims, relevance = reference
    labels = run["data"].query_labels
    for row in range(cfg.picture_queries):
        query = int(np.flatnonzero(labels == row)[0])
        top = np.argsort(-sims[query], kind="stable")[:k]
        green = [tuple(int(v) for v in c) == RELEVANT_COLOUR for c in corners[row]]
        assert green == relevance[query, top].tolist()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ks"):
        RetrievalConfig(ks=[0]).validate()
    with pytest.raises(ValueError):
        RetrievalConfig(queries_per_class=0).validate()
    assert fashion_mnist.INSTALLED_DATA_DIR.as_posix() == RetrievalConfig().source_dir
