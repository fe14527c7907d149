"""Copy detection: µAP against hand values and scikit-learn, the edits, and the protocol end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from components.evaluate.copydetect import (
    EDITS,
    CopyDetectConfig,
    apply_edit,
    build_copydetect_data,
    copydetect_metrics,
    evaluate_copydetect,
    micro_average_precision,
    top_candidates,
)
from components.models import BackboneConfig, build_backbone


def test_micro_average_precision_hand_values() -> None:
    # ranked: pos, neg, pos, neg; a third ground-truth pair is never predicted
    value = micro_average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]), 3)
    assert value == pytest.approx((1 / 1 + 2 / 3) / 3)
    # ties keep the given order
    assert micro_average_precision(np.array([0.5, 0.5]), np.array([False, True]), 1) == pytest.approx(0.5)
    assert micro_average_precision(np.array([0.5, 0.5]), np.array([True, False]), 1) == pytest.approx(1.0)
    assert micro_average_precision(np.array([0.3, 0.2]), np.array([False, False]), 2) == 0.0
    with pytest.raises(ValueError, match="ground-truth"):
        micro_average_precision(np.array([0.3, 0.2]), np.array([True, True]), 1)


def test_micro_average_precision_is_sklearn_ap_times_the_recall_ceiling() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.standard_normal(200)  # continuous: no ties
        positive = rng.random(200) < 0.15
        n_positives = int(positive.sum()) + int(rng.integers(0, 10))  # some pairs never predicted
        ceiling = positive.sum() / n_positives
        expected = average_precision_score(positive, scores) * ceiling
        assert micro_average_precision(scores, positive, n_positives) == pytest.approx(expected, abs=1e-12)


def test_top_candidates_and_metrics_hand_example() -> None:
    sims = np.array([[0.9, 0.1, 0.2], [0.3, 0.4, 0.8], [0.85, 0.0, 0.0]])
    predictions = top_candidates(sims, 2)
    assert predictions.query.tolist() == [0, 0, 1, 1, 2, 2]
    assert predictions.reference.tolist() == [0, 2, 2, 1, 0, 1]  # query 2's tie goes to reference 1
    metrics = copydetect_metrics(sims, np.array([0, 1, -1]), ["blur", "jpeg", "none"], candidates=2)
    # pooled ranking: .9 pos, .85 neg, .8 neg, .4 pos, ... -> (1/1 + 2/4) / 2
    assert metrics == pytest.approx({"copydetect_muap": 0.75, "copydetect_recall_at_1": 0.5,
                                     "copydetect_recall_at_1_blur": 1.0, "copydetect_recall_at_1_jpeg": 0.0})


def test_edits_are_seeded_and_change_the_image() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for edit in EDITS:
        first = apply_edit(image, edit, np.random.default_rng(1))
        again = apply_edit(image, edit, np.random.default_rng(1))
        assert first.shape == image.shape and first.dtype == np.uint8
        assert np.array_equal(first, again), edit
        assert not np.array_equal(first, image), edit
    with pytest.raises(ValueError, match="unknown edit"):
        apply_edit(image, "mirror", np.random.default_rng(0))


def test_demo_data_layout() -> None:
    cfg = CopyDetectConfig(reference_photos=4, copies_per_edit=3, edits=["blur", "text"])
    data = build_copydetect_data(cfg)
    assert data.references.shape == (4 * 4, 64, 64, 3)
    n_distractors = (18 - 4) * 4
    assert data.queries.shape[0] == 2 * 3 + n_distractors
    assert (data.source[:6] >= 0).all() and (data.source[6:] == -1).all()
    assert data.edit[:6] == ["blur"] * 3 + ["text"] * 3 and set(data.edit[6:]) == {"none"}


class PixelBackbone(nn.Module):
    """A stand-in backbone whose CLS is the raw normalised pixels: a floor any real backbone should beat on
    photometric edits. Same get_intermediate_layers contract as DinoVisionTransformer."""

    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the extractor a device

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple[object, ...]:
        patches = F.avg_pool2d(x, self.patch_size).flatten(2).transpose(1, 2)  # (B, N, 3)
        cls = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)  # (B, 3 * H * W)
        return ((patches, cls),) * n if return_class_token else (patches,) * n


def test_pixel_features_find_photometric_copies() -> None:
    metrics = evaluate_copydetect(PixelBackbone(), CopyDetectConfig(), (0.5,) * 3, (0.25,) * 3)
    assert set(metrics) == {"copydetect_muap", "copydetect_recall_at_1",
                            *(f"copydetect_recall_at_1_{edit}" for edit in EDITS)}
    assert metrics["copydetect_recall_at_1_blur"] >= 0.75
    assert metrics["copydetect_recall_at_1_jpeg"] >= 0.75
    assert metrics["copydetect_recall_at_1_colour"] >= 0.75
    assert 0.5 < metrics["copydetect_muap"] <= 1.0


def test_evaluate_copydetect_with_a_vit(tmp_path: object) -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=0.0,
                                          layerscale_init=None))
    cfg = CopyDetectConfig(copies_per_edit=4)
    metrics = evaluate_copydetect(model, cfg, (0.5,) * 3, (0.25,) * 3)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert len(metrics) == 2 + len(EDITS)
