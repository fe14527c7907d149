"""The end-of-run table: flat eval.json keys folded into model and baseline columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.evaluate.report import (
    baseline_verdict,
    eval_table,
    read_eval_report,
    read_eval_table,
    split_baselines,
    stage_table,
    stage_verdict,
    verdict_of,
)

FLAT = {
    "knn_top1_k20": 0.43, "linear_top1": 0.59, "retrieval_map": 0.21,
    "baseline_random_init_knn_top1_k20": 0.41, "baseline_random_init_linear_top1": 0.56,
    "baseline_pixels_knn_top1_k20": 0.75, "baseline_pixels_linear_top1": 0.8,
}


def test_baselines_are_split_by_their_prefix() -> None:
    model, baselines = split_baselines(FLAT)
    assert model == {"knn_top1_k20": 0.43, "linear_top1": 0.59, "retrieval_map": 0.21}
    assert baselines == {"random_init": {"knn_top1_k20": 0.41, "linear_top1": 0.56},
                         "pixels": {"knn_top1_k20": 0.75, "linear_top1": 0.8}}


def test_a_baseline_named_like_another_is_not_folded_into_it() -> None:
    flat = {"knn_top1_k20": 0.7, "baseline_random_init_knn_top1_k20": 0.1,
            "baseline_random_no_layerscale_knn_top1_k20": 0.6}
    _, baselines = split_baselines(flat)
    assert baselines == {"random_init": {"knn_top1_k20": 0.1}, "random_no_layerscale": {"knn_top1_k20": 0.6}}
    assert eval_table(flat).splitlines()[0] == "| metric | model | random_init | random_no_layerscale |"


def test_table_rows_columns_and_blank_cells() -> None:
    lines = eval_table(FLAT).splitlines()
    assert lines[0] == "| metric | model | random_init | pixels |"
    assert "| knn_top1_k20 | 0.4300 | 0.4100 | 0.7500 |" in lines
    assert "| retrieval_map | 0.2100 |  |  |" in lines  # a suite without baselines
    assert len(lines) == 2 + 3


def test_selected_metrics_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(FLAT))
    table = read_eval_table(path, ("linear_top1", "absent"))
    assert table.splitlines()[2:] == ["| linear_top1 | 0.5900 | 0.5600 | 0.8000 |"]
    with pytest.raises(FileNotFoundError, match="dvc repro evaluate"):
        read_eval_table(tmp_path / "none.json")


def test_the_verdict_says_by_how_much_the_model_beats_or_misses_each_baseline(tmp_path: Path) -> None:
    text = baseline_verdict(0.7234, {"pixels": 0.746, "random_no_layerscale": 0.568, "random_init": 0.118})
    assert text == ("knn_top1_k20 0.7234: +60.5 points vs random_init (untrained, same init); "
                    "+15.5 points vs random_no_layerscale (random features); 2.3 points short of pixels (raw pixels).")
    assert baseline_verdict(0.5, {}) == "knn_top1_k20 0.5000: no baseline measured."
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(FLAT))
    report = read_eval_report(path, ("knn_top1_k20",))
    assert report.splitlines()[-1] == ("knn_top1_k20 0.4300: +2.0 points vs random_init (untrained, same init); "
                                       "32.0 points short of pixels (raw pixels).")
    assert verdict_of({"linear_top1": 0.5}) is None  # no headline metric: no sentence


STAGE = {"knn_top1_k20": 0.43, "linear_top1": 0.59, "pixels.knn_top1_k20": 0.75, "random_init.knn_top1_k20": 0.41,
         "random_init.linear_top1": 0.56, "pixels.linear_top1": 0.8, "retrieval_map": 0.21}


def test_a_stage_result_gives_the_same_table_and_verdict_as_its_metrics_file() -> None:
    """The CLI (eval.json) and the Prefect artifact (the stage's dotted keys) print one table shape."""
    assert stage_table(STAGE) == eval_table(FLAT)
    assert stage_verdict(STAGE) == verdict_of(FLAT)
    assert stage_verdict({"linear_top1": 0.5}) is None


def test_the_champion_column_comes_last_with_blanks_where_it_lacks_a_metric() -> None:
    lines = stage_table(STAGE, champion={"knn_top1_k20": 0.4}).splitlines()
    assert lines[0] == "| metric | model | random_init | pixels | champion |"
    assert "| knn_top1_k20 | 0.4300 | 0.4100 | 0.7500 | 0.4000 |" in lines
    assert "| linear_top1 | 0.5900 | 0.5600 | 0.8000 |  |" in lines
