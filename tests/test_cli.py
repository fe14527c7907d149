from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from flows.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_and_explains_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "pipeline", "info"):
        assert command in out
    assert "labels table" in out
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(parser.description for parser in sub.values())


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("dinoflow")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0 and "pipeline" in done.stdout


def test_bad_params_exit_2_with_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "data.yaml"
    params.write_text("demo:\n  prefixx: x\n")
    assert main(["data", "--engine", "local", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert str(params) in err and "unknown key 'prefixx'" in err


def test_info_resolves_embedded_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    state = os.environ["DINOFLOW_HOME"]
    assert info["state_dir"] == state
    assert info["mlflow_tracking_uri"] in (os.environ.get("MLFLOW_TRACKING_URI"), f"sqlite:///{state}/mlflow/mlflow.db")


@pytest.mark.slow
def test_data_command_through_prefect_writes_pool_and_tracks_run(tmp_path: Path) -> None:
    """The foundation end to end: CLI -> Prefect flow -> component -> object store + MLflow."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "data.yaml").write_text(
        "demo:\n  manifest: data/demo/pool.parquet\n  fashion_mnist: {train_per_class: 2, test_per_class: 1}\n"
        "  photos: [coffee]\n"
    )
    (tmp_path / "pyproject.toml").write_text("")  # marks the project root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DINOFLOW_"))}
    exe = Path(sys.executable).with_name("dinoflow")
    done = subprocess.run([str(exe), "data"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-5000:]
    outputs = json.loads(done.stdout[done.stdout.index("{"):])
    assert outputs["counts"]["total"] == 20 + 10 + 1
    frame = pl.read_parquet(tmp_path / "data" / "demo" / "pool.parquet")
    assert frame.height == 31
    store = tmp_path / ".dinoflow" / "store" / "pool" / "demo"
    assert len(list((store / "fashion-mnist" / "train").glob("*.png"))) == 20

    import sqlite3

    with sqlite3.connect(tmp_path / ".dinoflow" / "mlflow" / "mlflow.db") as db:
        tags = dict(db.execute("select key, value from tags").fetchall())
        metrics = dict(db.execute("select key, value from metrics").fetchall())
    assert tags["dinoflow.stage"] == "data" and "prefect.flow_run_id" in tags
    assert metrics["images_total"] == 31.0


def test_report_prints_the_evaluation_table_and_ui_hints(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "evaluate.yaml").write_text("evaluate:\n  metrics_path: out/eval.json\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval.json").write_text(json.dumps({"knn_top1_k20": 0.5, "baseline_pixels_knn_top1_k20": 0.7}))
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "| knn_top1_k20 | 0.5000 | 0.7000 |" in out and "make mlflow-ui" in out
    assert "knn_top1_k20 0.5000: 20.0 points short of pixels (raw pixels)." in out
    (tmp_path / "out" / "eval.json").unlink()
    assert main(["report"]) == 2
    assert "dvc repro evaluate" in capsys.readouterr().err
