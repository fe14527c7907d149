"""Threshold calibration: known answers on constructed scores, the exact search, a real pool, the stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from components.curation.calibrate import (
    CalibrateConfig,
    CalibrationScores,
    calibrate_from_scores,
    choose_threshold,
    measure_pool,
    nearest_other,
    operating_point,
    threshold_curve,
)
from components.curation.calibration_picture import calibration_picture
from components.curation.copy_edits import CopyEditConfig
from components.curation.embed import EmbedConfig, describe_images, embed_images
from components.curation.knn_graph import InMemoryVectors
from components.storage import read_uri
from tests.test_curation_demo import fashion_images


def constructed_scores() -> CalibrationScores:
    """100 sampled images: copies at 0.900..0.990; distinct neighbours at 0.50..0.85, plus one at 0.95 and one at 0.97.

    Known answers (recall R, false removal F, precision R / (R + F)):
      target 0.99: below 0.95 F >= 0.02 with R <= 1 (P <= 0.98); in [0.95, 0.97) F = 0.01 with R <= 0.45
      (P < 0.98); at 0.97 F = 0 -> the threshold is exactly 0.97.
      target 0.95: below 0.90 R = 1, so P = 1 / (1 + F) >= 0.95 needs F <= 0.0526, i.e. at most 5 distinct
      scores above t: t = the 95th of the 98 (k = 94, 0.5 + 94 * 0.35 / 97), where F = 3 + 2 = 0.05.
    """
    copies = np.linspace(0.90, 0.99, 100).reshape(100, 1)  # (n, 1)
    distinct = np.concatenate([np.linspace(0.50, 0.85, 98), [0.95, 0.97]])  # (n,)
    edits = [["crop+jpeg"] if i % 2 else ["flip"] for i in range(100)]
    return CalibrationScores(ids=[f"img{i:03d}" for i in range(100)], copy_scores=copies, copy_edits=edits,
                             distinct_scores=distinct, neighbour_ids=[f"nb{i:03d}" for i in range(100)],
                             pool_rows=500)


def test_curve_is_monotone_and_counts_strictly_above() -> None:
    scores = constructed_scores()
    curve = threshold_curve(scores.copy_scores, scores.distinct_scores)
    assert np.all(np.diff(curve.thresholds) > 0) and curve.thresholds[0] == -1.0
    assert np.all(np.diff(curve.recall) <= 0) and np.all(np.diff(curve.false_removal) <= 0)
    assert curve.recall[0] == 1.0 and curve.false_removal[0] == 1.0
    at_top = int(np.searchsorted(curve.thresholds, 0.99))
    assert curve.recall[at_top] == 0.0 and np.isnan(curve.precision[at_top])  # nothing above the top score
    at_97 = int(np.searchsorted(curve.thresholds, 0.97))
    assert curve.false_removal[at_97] == 0.0 and curve.false_removal[at_97 - 1] == 0.01  # strict ">"


def test_calibration_picks_the_known_threshold_for_the_target() -> None:
    scores = constructed_scores()
    curve = threshold_curve(scores.copy_scores, scores.distinct_scores)
    strict = choose_threshold(curve, scores.distinct_scores, 0.99)
    assert strict.reached and strict.point.threshold == pytest.approx(0.97)
    assert strict.point.false_removal == 0.0 and strict.point.precision == 1.0
    assert strict.point.recall == pytest.approx(np.mean(scores.copy_scores > 0.97))
    loose = choose_threshold(curve, scores.distinct_scores, 0.95)
    assert loose.reached and loose.point.threshold == pytest.approx(0.5 + 94 * 0.35 / 97)
    assert loose.point.false_removal == pytest.approx(0.05) and loose.point.recall == 1.0
    # the lowest threshold meeting the target: one candidate lower misses it
    for choice in (strict, loose):
        i = int(np.searchsorted(curve.thresholds, choice.point.threshold))
        assert np.nan_to_num(curve.precision[i - 1]) < choice.target_precision <= curve.precision[i]


def test_unreachable_target_falls_back_to_removing_no_sampled_distinct_image() -> None:
    copies = np.full((50, 1), 0.90)  # every copy at 0.90
    distinct = np.concatenate([np.full(25, 0.95), np.full(25, 0.40)])  # half of the images have a twin above it
    curve = threshold_curve(copies, distinct)
    choice = choose_threshold(curve, distinct, 0.99)
    assert not choice.reached and choice.point.threshold == 0.95
    assert choice.point.false_removal == 0.0 and choice.point.recall == 0.0


def test_hand_set_thresholds_are_measured_and_the_summary_is_json() -> None:
    scores = constructed_scores()
    result = calibrate_from_scores(scores, CalibrateConfig(target_precision=0.99, eval_target_precision=0.95),
                                   {"near_dedup": 0.96, "eval_dedup": 0.80})
    hand = result.configured["near_dedup"]
    assert hand.recall == pytest.approx(np.mean(scores.copy_scores > 0.96)) and hand.false_removal == 0.01
    assert hand.precision == pytest.approx(hand.recall / (hand.recall + 0.01))
    low = result.configured["eval_dedup"]
    assert low.recall == 1.0 and low.false_removal == pytest.approx(np.mean(scores.distinct_scores > 0.80))
    assert result.near_dedup.point.threshold == pytest.approx(0.97)
    assert result.eval_dedup.point.threshold < result.near_dedup.point.threshold  # lower target, lower threshold
    summary = json.loads(json.dumps(result.summary()))
    assert summary["sampled"] == 100 and summary["near_dedup"]["reached"] is True
    # flips are the even images (copies 0.900, 0.902, ...), crop+jpeg the odd ones; at > 0.97 both lose the same
    assert set(summary["recall_by_edit"]) == {"crop", "jpeg", "flip"}
    assert summary["recall_by_edit"]["crop"] == summary["recall_by_edit"]["jpeg"]
    assert operating_point(scores.copy_scores, scores.distinct_scores, 2.0).summary()["precision"] is None


def test_scores_round_trip_and_picture(tmp_path: Path) -> None:
    scores = constructed_scores()
    scores.write(tmp_path)
    again = CalibrationScores.read(tmp_path)
    assert again.ids == scores.ids and again.copy_edits == scores.copy_edits and again.pool_rows == 500
    assert np.array_equal(again.copy_scores, scores.copy_scores)
    result = calibrate_from_scores(again, CalibrateConfig(), {"near_dedup": 0.96, "eval_dedup": 0.955})
    path = calibration_picture(result, tmp_path / "calibration.png")
    with Image.open(path) as picture:
        assert picture.size[0] > 600 and picture.getextrema() != ((255, 255), (255, 255), (255, 255))
    assert calibration_picture(result, tmp_path / "again.png").read_bytes() == path.read_bytes()


def test_nearest_other_matches_brute_force_across_shards() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(53, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, D)
    vectors[40] = vectors[7]  # an identical twin: a pool duplicate counts as a distinct neighbour at cosine 1
    pool = InMemoryVectors([f"v{i}" for i in range(53)], vectors, shard_size=10)
    rows = np.array([0, 7, 19, 40, 52])
    best, best_id = nearest_other(pool, vectors[rows], rows)
    sims = vectors[rows] @ vectors.T  # (5, N)
    sims[np.arange(5), rows] = -np.inf
    assert np.allclose(best, sims.max(axis=1), atol=1e-6)
    assert best_id == [f"v{int(j)}" for j in sims.argmax(axis=1)]
    assert best_id[1] == "v40" and best_id[3] == "v7"


def write_pool(folder: Path, n: int) -> pl.DataFrame:
    folder.mkdir(parents=True)
    uris = []
    for i, pixels in enumerate(fashion_images(n)):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        uris.append(path.as_uri())
    return pl.DataFrame({"id": [f"id{i:03d}" for i in range(n)], "uri": uris})


def test_measure_pool_on_real_images_is_seeded_and_consistent(tmp_path: Path) -> None:
    rows = write_pool(tmp_path / "pool", 40)
    embed = EmbedConfig(backbone="pixels:16", decode_workers=2, batch_size=16)
    shards = embed_images(rows, embed, tmp_path / "shards")
    cfg = CalibrateConfig(enabled=True, sample_size=12, copies_per_image=2, seed=3)
    first = measure_pool(rows, shards, embed, cfg)
    again = measure_pool(rows, shards, embed, cfg)
    assert first.copy_scores.shape == (12, 2) and len(first.ids) == 12 and first.pool_rows == 40
    assert np.array_equal(first.copy_scores, again.copy_scores) and first.copy_edits == again.copy_edits
    assert np.all(first.copy_scores <= 1.0 + 1e-6) and set(first.neighbour_ids) <= set(rows["id"].to_list())
    assert all(n != i for i, n in zip(first.ids, first.neighbour_ids, strict=True))
    # a copy score is the cosine of the embed step's vector and describe_images' vector of an edit-free copy
    no_edit = CalibrateConfig(sample_size=12, seed=3, edits=CopyEditConfig(max_crop=0.0, probabilities={"crop": 1}))
    identical = measure_pool(rows, shards, embed, no_edit)
    assert np.allclose(identical.copy_scores, 1.0, atol=1e-5)
    ids, vectors = next(shards.iter_shards())
    with Image.open(io.BytesIO(read_uri(rows["uri"][0]))) as image:
        described = describe_images([image], embed)  # (1, D)
    assert ids[0] == rows["id"][0] and np.array_equal(described[0], vectors[0])  # the embed step's vector, exactly


def test_calibration_needs_two_pool_images(tmp_path: Path) -> None:
    rows = write_pool(tmp_path / "pool", 1)
    embed = EmbedConfig(backbone="pixels:16", decode_workers=1)
    with pytest.raises(ValueError, match="at least 2"):
        measure_pool(rows, embed_images(rows, embed, tmp_path / "shards"), embed, CalibrateConfig())


def test_curate_stage_calibrates_applies_and_reports(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from components.stages.context import make_context
    from components.stages.curate import run_curate
    from tests.test_curation_stage import stage_config

    (tmp_path / "pyproject.toml").write_text("")
    cfg = stage_config(tmp_path)
    cfg.calibrate = CalibrateConfig(enabled=True, apply=True, sample_size=30, copies_per_image=2)
    outputs = run_curate(make_context(root=tmp_path), cfg)

    stats = json.loads(outputs.stats_path.read_text())["curate"]["calibration"]
    assert stats["sampled"] == 30 and stats["copies_per_image"] == 2 and stats["applied"] is True
    chosen = stats["near_dedup"]["threshold"]
    assert stats["used"]["near_dedup"] == pytest.approx(min(1.0, chosen))  # applied to this run's dedup
    assert stats["configured"]["near_dedup"]["threshold"] == 0.96  # the hand-set value, measured
    assert (not stats["near_dedup"]["reached"]) or stats["near_dedup"]["precision"] >= 0.99
    assert (tmp_path / "work" / "calibrate" / "done.json").is_file()  # a cached step like the others
    with Image.open(outputs.pictures["calibration"]) as picture:
        assert picture.width > 600
    report = outputs.report_path.read_text()
    assert "Threshold calibration on this pool" in report and "near_dedup set by hand" in report
    run = MlflowClient().get_run(outputs.run_id)
    assert run.data.metrics["calibrate.near_dedup.threshold"] == pytest.approx(chosen)
    assert run.data.metrics["calibrate.applied"] == 1.0 and "calibrate.configured.near_dedup.recall" in run.data.metrics

    # report only: the hand-set thresholds are used again; the scores are reused (no new planted copies)
    scores_file = tmp_path / "work" / "calibrate" / "scores.parquet"
    before = scores_file.stat().st_mtime_ns
    cfg.calibrate.apply = False
    again = run_curate(make_context(root=tmp_path), cfg)
    used = json.loads(again.stats_path.read_text())["curate"]["calibration"]["used"]
    assert used == {"near_dedup": 0.96, "eval_dedup": cfg.eval_dedup.threshold}
    assert scores_file.stat().st_mtime_ns == before


def test_cli_calibrate_switch_is_one_override() -> None:
    from components.curation.config import load_curate_config
    from flows.cli import _overrides, build_parser

    args = build_parser().parse_args(["curate", "--calibrate", "--set", "calibrate.sample_size=50"])
    overrides = _overrides(args)
    assert overrides == ["calibrate.sample_size=50", "calibrate.enabled=true"]
    plain = _overrides(build_parser().parse_args(["curate"]))
    assert plain == []
    repo = Path(__file__).resolve().parents[1]
    cfg = load_curate_config(repo / "params" / "curate.yaml", ["calibrate.enabled=false", *overrides])
    assert cfg.calibrate.enabled and cfg.calibrate.sample_size == 50
