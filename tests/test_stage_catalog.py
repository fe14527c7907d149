"""One list of stages: dvc.yaml, the pipeline flow and the CLI all follow components/stages/catalog.py,
and ``--set`` overrides reach the stage through one loader, checked like the YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, apply_overrides
from components.stages.catalog import STAGES, get_stage, stage_names
from flows.cli import STAGE_ALIASES, _overrides, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_lists_the_catalog_stages_in_order_with_their_commands() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == stage_names()
    for stage in STAGES:
        assert dvc[stage.name]["cmd"].split() == ["dinoflow", stage.name, "--params", stage.params]
        assert any(stage.params in entry for entry in dvc[stage.name]["params"]), stage.name


def test_pipeline_flow_and_cli_derive_from_the_catalog() -> None:
    from flows.pipeline import STAGE_FLOWS

    assert set(STAGE_FLOWS) == set(stage_names())
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(name in commands for name in stage_names())
    assert ", ".join(stage_names()) in commands["pipeline"].description
    for stage in STAGES:
        assert commands[stage.name].get_default("params") == stage.params
        assert callable(getattr(__import__(stage.module, fromlist=["_"]), f"run_{stage.name}"))
    with pytest.raises(KeyError, match="the stages are data, curate"):
        get_stage("nope")
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert f"({', '.join(stage_names())})" in deployments["pipeline"]["description"]


def test_overrides_are_typed_and_checked_like_the_file(tmp_path: Path) -> None:
    params = tmp_path / "pretrain.yaml"
    params.write_text((ROOT / "params" / "pretrain.yaml").read_text())
    stage = get_stage("pretrain")
    cfg = stage.load_config(params, ["objective.optim.base_lr=0.002", "crops.local_crops_number=2",
                                     "objective.optim.base_lr=0.003"])  # later wins
    assert cfg.objective.optim.base_lr == 0.003 and cfg.crops.local_crops_number == 2
    unknown = r"with --set objective\.optim\.base_lrr=1: unknown key 'objective\.optim\.base_lrr'"
    with pytest.raises(ConfigError, match=unknown):
        stage.load_config(params, ["objective.optim.base_lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        stage.load_config(params, ["crops.local_crops_number=many"])
    with pytest.raises(ConfigError, match=r"not a multiple of backbone\.patch_size"):  # validation runs too
        stage.load_config(params, ["crops.global_crops_size=30"])
    with pytest.raises(ConfigError, match=r"KEY\.PATH=VALUE"):
        stage.load_config(params, ["objective.optim.base_lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_shorthand_flags_are_overrides() -> None:
    parser = build_parser()
    args = parser.parse_args(["distill", "--teacher", "models:/x@champion", "--set", "objective.optim.iterations=5"])
    assert _overrides(args) == ["objective.optim.iterations=5", 'teacher.source="models:/x@champion"']
    args = parser.parse_args(["evaluate", "--model", "yes"])  # quoted: a path named "yes" stays a string
    cfg = get_stage("evaluate").load_config(ROOT / "params" / "evaluate.yaml", _overrides(args))
    assert cfg.model == "yes"
    assert set(STAGE_ALIASES) == {"distill", "evaluate"}
