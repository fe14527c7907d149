"""The PCA picture: components against numpy SVD and scikit-learn, the foreground split, the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from components.evaluate.pca_picture import (
    PICTURE_NAME,
    PcaPictureConfig,
    draw_pca_picture,
    evaluate_pca_picture,
    foreground_scores,
    pca_colours,
    principal_components,
)
from components.models import BackboneConfig, build_backbone


def planted_features(rng: np.random.Generator, n: int, dim: int, scales: tuple[float, ...]) -> np.ndarray:
    """Rows on a known low-dimensional subspace (axis variances = scales^2) plus faint noise, in D dims."""
    basis, _ = np.linalg.qr(rng.standard_normal((dim, len(scales))))  # (D, k) orthonormal columns
    latent = rng.standard_normal((n, len(scales))) * np.array(scales)
    return latent @ basis.T + 1e-3 * rng.standard_normal((n, dim)) + 5.0  # an offset PCA must remove


def test_principal_components_match_sklearn_and_svd() -> None:
    rng = np.random.default_rng(0)
    features = planted_features(rng, 300, 24, (5.0, 3.0, 1.5))
    scores, components = principal_components(features, 3)
    reference = PCA(n_components=3, svd_solver="full").fit(features)
    for k in range(3):  # equal up to sign
        sign = np.sign(components[k] @ reference.components_[k])
        assert np.allclose(components[k], sign * reference.components_[k], atol=1e-8)
        assert np.allclose(scores[:, k], sign * reference.transform(features)[:, k], atol=1e-8)
        assert components[k][np.abs(components[k]).argmax()] > 0  # the documented sign convention
    _, singular, _ = np.linalg.svd(features - features.mean(axis=0), full_matrices=False)
    assert np.allclose(scores.var(axis=0, ddof=1), singular[:3] ** 2 / (len(features) - 1))


def test_first_component_separates_a_centred_object() -> None:
    rng = np.random.default_rng(1)
    n_images, h, w, dim = 3, 8, 8, 16
    patches = 0.05 * rng.standard_normal((n_images, h, w, dim))
    direction = rng.standard_normal(dim)
    inner = np.zeros((h, w), dtype=bool)
    inner[2:6, 2:6] = True  # the "object": patches shifted along one direction
    patches[:, inner] += direction
    scores = foreground_scores(patches)
    assert (scores[:, inner] > 0).all() and (scores[:, ~inner] < 0).all()  # oriented: border low
    # flipping the data's sign must not flip the decision
    assert np.array_equal(foreground_scores(-patches) > 0, scores > 0)


def test_colours_recover_the_planted_structure_of_the_foreground() -> None:
    rng = np.random.default_rng(2)
    n_images, h, w, dim = 2, 10, 10, 32
    inner = np.zeros((h, w), dtype=bool)
    inner[2:8, 2:8] = True
    n_fg = n_images * int(inner.sum())
    fg_features = planted_features(rng, n_fg, dim, (2.0, 1.0, 0.5)) - 5.0
    patches = 0.02 * rng.standard_normal((n_images, h, w, dim))
    offset = 20.0 * np.eye(dim)[0]
    patches[:, inner] = fg_features.reshape(n_images, -1, dim) + offset
    colours, foreground = pca_colours(patches)
    assert np.array_equal(foreground, np.broadcast_to(inner, foreground.shape))
    assert (colours[~foreground] == 0).all()
    reference = PCA(n_components=3).fit_transform(patches[foreground])  # (F, 3)
    for k in range(3):
        channel = colours[foreground][:, k]
        assert channel.min() == pytest.approx(0.0) and channel.max() == pytest.approx(1.0)
        scaled = (reference[:, k] - reference[:, k].min()) / np.ptp(reference[:, k])
        assert np.allclose(channel, scaled, atol=1e-8) or np.allclose(channel, 1 - scaled, atol=1e-8)


def test_picture_layout(tmp_path: Path) -> None:
    images = np.zeros((3, 20, 20, 3), dtype=np.uint8)
    colours = np.zeros((3, 5, 5, 3))
    colours[1, 2, 3] = (1.0, 0.0, 0.0)  # one red patch in row 1
    path = draw_pca_picture(images, colours, tmp_path / "p.png", tile=40)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (3 * 40, 2 * 40, 3)
    # patch (2, 3) of a 5x5 grid on a 40-px tile covers rows 16..23, columns 24..31
    assert tuple(picture[40 + 16, 40 + 24]) == (255, 0, 0) and tuple(picture[40 + 23, 40 + 31]) == (255, 0, 0)
    assert tuple(picture[40 + 15, 40 + 24]) == (0, 0, 0)


def test_evaluate_pca_picture_with_a_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=0.0,
                                          layerscale_init=None))
    cfg = PcaPictureConfig(photos=["chelsea", "coffee"], tile=56)
    metrics = evaluate_pca_picture(model, cfg, (0.5,) * 3, (0.25,) * 3, tmp_path)
    assert 0.0 < metrics["pca_foreground_fraction"] <= 1.0
    with Image.open(tmp_path / PICTURE_NAME) as picture:
        assert picture.size == (2 * 56, 2 * 56)
