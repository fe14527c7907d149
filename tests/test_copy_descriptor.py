"""The SSCD-style copy descriptor: its loss is the InfoNCE it claims, it learns, and its export is a backbone."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.curation.copy_descriptor import (
    CopyDescriptorConfig,
    build_descriptor_model,
    copy_views,
    describe,
    export_copy_descriptor,
    info_nce_loss,
    learning_rate,
    make_optimizer,
    train_copy_descriptor,
    training_step,
)
from components.curation.copy_edits import CopyEditConfig
from components.curation.embed import EmbedConfig, describe_images, load_embedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**changes: object) -> CopyDescriptorConfig:
    """A 16 px, 2-block, 32-wide ViT: trains a step in milliseconds."""
    base = CopyDescriptorConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, batch_size=8,
                                steps=30, lr=2e-3, warmup_steps=0, koleo_weight=0.1, seed=0)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def tiny_pool(n: int = 16, side: int = 16, seed: int = 0) -> list[Image.Image]:
    """Distinct smooth grey images with a bright blob at a different place in each."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    images = []
    for _ in range(n):
        cy, cx, freq = rng.uniform(3, side - 3), rng.uniform(3, side - 3), rng.uniform(0.3, 1.2)
        blob = 200 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 8.0)  # (S, S)
        waves = 40 * np.sin(freq * x + rng.uniform(0, 6)) * np.cos(freq * y)  # (S, S)
        images.append(Image.fromarray(np.clip(30 + blob + waves, 0, 255).astype(np.uint8), mode="L"))
    return images


# ------------------------------------------------------------------------------- the loss


def reference_info_nce(first: np.ndarray, second: np.ndarray, temperature: float) -> float:
    """NT-Xent written out view by view in float64: -log(exp(s_pos / T) / sum_{k != i} exp(s_ik / T))."""
    views = np.concatenate([first, second]).astype(np.float64)  # (2B, D)
    batch = first.shape[0]
    total = 0.0
    for i in range(2 * batch):
        partner = (i + batch) % (2 * batch)
        others = [k for k in range(2 * batch) if k != i]
        logits = np.array([views[i] @ views[k] / temperature for k in others])  # (2B - 1,)
        positive = views[i] @ views[partner] / temperature
        top = logits.max()
        total += -(positive - top - math.log(np.exp(logits - top).sum()))
    return total / (2 * batch)


def unit_rows(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_info_nce_matches_a_float64_reference(temperature: float) -> None:
    first, second = unit_rows((6, 5), 0), unit_rows((6, 5), 1)  # (B, D) each
    ours = info_nce_loss(first, second, temperature)
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(reference_info_nce(first.numpy(), second.numpy(), temperature), rel=1e-10)


def test_info_nce_matches_cross_entropy_on_a_hand_built_logits_matrix() -> None:
    # Two images, two views each: rows a0, a1, b0, b1; a0's positive is b0, its negatives a1 and b1.
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    second = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    t = 0.5
    a0, a1, b0, b1 = first[0], first[1], second[0], second[1]
    logits = torch.stack([
        torch.stack([a0 @ b0, a0 @ a1, a0 @ b1]),  # a0: positive first
        torch.stack([a1 @ b1, a1 @ a0, a1 @ b0]),
        torch.stack([b0 @ a0, b0 @ a1, b0 @ b1]),
        torch.stack([b1 @ a1, b1 @ a0, b1 @ b0]),
    ]) / t  # (4, 3)
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert float(info_nce_loss(first, second, t)) == pytest.approx(float(expected), rel=1e-12)


def test_info_nce_is_low_for_matched_views_and_high_for_swapped_ones() -> None:
    first = unit_rows((8, 16), 2)
    assert float(info_nce_loss(first, first, 0.05)) < 0.01  # each view's partner is itself: found at once
    assert float(info_nce_loss(first, first.roll(1, dims=0), 0.05)) > 5.0  # the partner is another image


# ------------------------------------------------------------------------------- training


def test_views_have_the_embed_steps_shape_and_are_seeded() -> None:
    cfg = tiny_config()
    images = tiny_pool(4)
    first, second = copy_views(images, np.random.default_rng(3), cfg)
    again, _ = copy_views(images, np.random.default_rng(3), cfg)
    assert first.shape == second.shape == (4, 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_loss_decreases_over_a_few_steps_on_a_fixed_batch() -> None:
    cfg = tiny_config()
    model = build_descriptor_model(cfg)
    optimizer = make_optimizer(model, cfg)
    first, second = copy_views(tiny_pool(8), np.random.default_rng(0), cfg)  # (8, 3, 16, 16) each, fixed
    losses = [training_step(model, optimizer, first, second, cfg, lr=cfg.lr).total.item() for _ in range(25)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_training_loop_stops_at_its_step_count_and_logs_the_curve() -> None:
    cfg = tiny_config(steps=4, warmup_steps=1)
    run = train_copy_descriptor(tiny_pool(12), cfg, log_every=2)
    assert run.steps == 4 and run.images == 4 * cfg.batch_size
    assert [row["step"] for row in run.history] == [1, 2, 4]
    assert {"loss", "info_nce", "koleo", "lr", "positive_cosine"} <= set(run.history[0])
    assert run.summary()["config"]["temperature"] == cfg.temperature


def test_learning_rate_warms_up_and_anneals_to_min_lr() -> None:
    cfg = tiny_config(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert learning_rate(0.0, cfg) == 0.0
    assert learning_rate(0.1, cfg) == pytest.approx(1e-3)
    assert learning_rate(1.0, cfg) == pytest.approx(1e-5)
    values = [learning_rate(p, cfg) for p in np.linspace(0.1, 1.0, 20)]
    assert all(a >= b for a, b in itertools.pairwise(values))


# ------------------------------------------------------------------------------- export


def test_exported_folder_loads_as_a_backbone_and_gives_the_same_vectors(tmp_path: Path) -> None:
    cfg = tiny_config(steps=2)
    run = train_copy_descriptor(tiny_pool(10), cfg)
    folder = export_copy_descriptor(run, tmp_path / "descriptor")
    assert json.loads((folder / "config.json").read_text())["metadata"]["kind"] == "copy_descriptor"

    images = tiny_pool(5, side=20, seed=9)  # another size: the embedder resizes, as for any backbone
    embed = EmbedConfig(backbone=str(folder), image_size=cfg.image_size, num_threads=1)
    embedder = load_embedder(embed)
    loaded = describe_images(images, embed, embedder)  # (5, D) through the normal loader
    pixels = torch.stack([torch.from_numpy(embedder.prepare(image)) for image in images])  # (5, 3, S, S)
    with torch.no_grad():
        in_memory = describe(run.model.eval(), pixels).numpy()  # (5, D)
    assert loaded.shape == (5, cfg.embed_dim)
    np.testing.assert_allclose(loaded, in_memory, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(loaded, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(("changes", "message"), [
    ({"image_size": 30, "patch_size": 4}, "image_size 30 must be a multiple of patch_size 4"),
    ({"embed_dim": 30, "num_heads": 4}, "embed_dim 30 must be a multiple of num_heads 4"),
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"koleo_weight": -1.0}, "koleo_weight must be >= 0"),
    ({"steps": 0}, "steps >= 1"),
    ({"warmup_steps": 50, "steps": 10}, "warmup_steps <= steps"),
    ({"lr": 0.0}, "lr > 0"),
    ({"identity_view_prob": 1.5}, "identity_view_prob must be in [0, 1]"),
    ({"edits": CopyEditConfig(probabilities={"crop": 0.5, "flip": 0.0})}, "must include ['flip']"),
    ({"edits": CopyEditConfig(max_crop=1.5)}, "max_crop must be in [0, 1)"),
])
def test_config_errors_say_what_is_wrong(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="copy"):
        tiny_config(**changes).validate()
    with pytest.raises(ValueError) as error:
        tiny_config(**changes).validate()
    assert message in str(error.value)


def test_a_pool_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than batch_size 8"):
        train_copy_descriptor(tiny_pool(5), tiny_config())
