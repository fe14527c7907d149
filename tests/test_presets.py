"""Every shipped preset in params/presets/ loads and trains: two steps on CPU with the preset's own patch
size, crop sizes and counts, DINO/iBOT heads, masking, precision and schedules, only narrower and shallower
(the attention-head count is kept), the high-resolution phase switched on for the second step. Crop sizes
that do not tile into patches are refused when the file is loaded, naming the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, from_mapping, load_yaml
from components.distill.config import DistillConfig, load_distill_config
from components.distill.meta_arch import distill_recipe, objective_for_teacher
from components.distill.teacher import load_teacher, resolve_mode
from components.models.builders import architecture_spec
from components.train.config import PretrainConfig, load_pretrain_config
from components.train.engine import run_pretraining
from tests.test_pretrain_engine import CPU, write_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

PRESETS = Path(__file__).resolve().parents[1] / "params" / "presets"
HEAD_DIM = 8  # width per attention head of the reduced models


def preset_files(section: str) -> list[Path]:
    return sorted(p for p in PRESETS.glob("*.yaml") if section in load_yaml(p))


def reduced(cfg: PretrainConfig, manifest: Path, output: Path) -> PretrainConfig:
    """The preset's run, only small: same heads per block, HEAD_DIM wide each, one block, two steps, one
    process, no loader workers; the high-resolution phase covers the second step."""
    heads = cfg.backbone.num_heads or architecture_spec(cfg.backbone.arch).num_heads
    cfg.backbone = dataclasses.replace(cfg.backbone, embed_dim=heads * HEAD_DIM, depth=1, num_heads=heads)
    cfg.data = dataclasses.replace(cfg.data, manifest=str(manifest), splits=[], batch_size_per_rank=2,
                                   num_workers=0)
    cfg.highres = dataclasses.replace(cfg.highres, enabled=True, iterations=cfg.objective.optim.iterations - 1)
    cfg.run = dataclasses.replace(cfg.run, output_dir=str(output), max_steps=2, device="cpu")
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, store_prefix="")
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("preset-pool"), n=8, corrupt=False)


def test_every_preset_file_is_covered() -> None:
    files = sorted(PRESETS.glob("*.yaml"))
    assert files and set(files) == set(preset_files("pretrain")) | set(preset_files("distill"))


@pytest.mark.parametrize("path", preset_files("pretrain"), ids=lambda p: p.stem)
def test_pretrain_preset_runs_two_steps(path: Path, pool: Path, tmp_path: Path) -> None:
    cfg = reduced(load_pretrain_config(path), pool, tmp_path / "run")
    result, model = run_pretraining(cfg, CPU, tmp_path)
    assert result.end_step == 2 and all(v == v for v in result.last_losses.values())  # finite, not NaN
    assert "ibot_loss" in result.last_losses
    assert model.backbone("student").patch_size == load_pretrain_config(path).backbone.patch_size


@pytest.mark.parametrize("path", preset_files("distill"), ids=lambda p: p.stem)
def test_distill_preset_runs_two_steps(path: Path, pool: Path, tmp_path: Path) -> None:
    """The teacher is the reduced run of the pretraining preset the distillation preset names, with heads."""
    preset = load_distill_config(path)
    teacher_preset = next(p for p in preset_files("pretrain")
                          if load_pretrain_config(p).publish.registered_model_name in preset.teacher.source)
    teacher_cfg = reduced(load_pretrain_config(teacher_preset), pool, tmp_path / "teacher")
    run_pretraining(teacher_cfg, CPU, tmp_path)

    cfg = reduced(preset, pool, tmp_path / "student")
    assert isinstance(cfg, DistillConfig)
    cfg.teacher.source = str(tmp_path / "teacher" / "checkpoints")
    teacher = load_teacher(cfg.teacher.source, cfg.teacher.backbone, "cpu", cfg.teacher.precision)
    mode = resolve_mode(cfg.teacher.mode, teacher)
    assert mode == "heads"
    cfg.objective = objective_for_teacher(cfg.objective, teacher, mode)
    result, _ = run_pretraining(cfg, CPU, tmp_path, recipe=distill_recipe(teacher, mode, cfg.features))
    assert result.end_step == 2 and all(v == v for v in result.last_losses.values())


@pytest.mark.parametrize(("crops", "highres", "message"), [
    ({"local_crops_size": 96}, {}, "crops.local_crops_size 96: not a multiple of backbone.patch_size 14"),
    ({"global_crops_size": 220}, {}, "crops.global_crops_size 220"),
    ({}, {"enabled": True, "global_crops_size": 520}, "highres.global_crops_size 520"),
    ({}, {"enabled": True, "local_crops_size": 100}, "highres.local_crops_size 100"),
])
def test_crop_sizes_that_do_not_tile_are_refused_with_file_and_key(tmp_path: Path, crops: dict[str, int],
                                                                  highres: dict[str, object], message: str) -> None:
    params = {"pretrain": {"crops": {"global_crops_size": 224, "local_crops_size": 98, **crops},
                           "backbone": {"arch": "vit_small", "patch_size": 14},
                           "highres": highres}}
    file = tmp_path / "pretrain.yaml"
    file.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as error:
        load_pretrain_config(file)
    assert str(file) in str(error.value) and message in str(error.value)


def test_no_local_crops_means_no_local_size_check() -> None:
    cfg = from_mapping(PretrainConfig, {"crops": {"local_crops_number": 0, "local_crops_size": 95},
                                        "backbone": {"arch": "vit_small", "patch_size": 14}})
    assert cfg.crop_sizes() == {"crops.global_crops_size": 224}


def test_distillation_checks_crops_against_the_teachers_patch(pool: Path, tmp_path: Path) -> None:
    """518 px high-resolution crops tile a /14 student but not a /16 teacher (which sees the global crops):
    distillation refuses them before the first step."""
    teacher_cfg = reduced(load_pretrain_config(PRESETS / "pretrain-vitl16-short.yaml"), pool, tmp_path / "teacher")
    teacher_cfg.run.max_steps = 1
    run_pretraining(teacher_cfg, CPU, tmp_path)
    cfg = reduced(load_distill_config(PRESETS / "distill-vitl-to-vits14.yaml"), pool, tmp_path / "student")
    cfg.highres.global_crops_size = 518  # a multiple of the student's 14, not of the teacher's 16
    cfg.validate()
    teacher = load_teacher(str(tmp_path / "teacher" / "checkpoints"), cfg.teacher.backbone, "cpu", "fp32")
    with pytest.raises(ValueError, match=r"highres\.global_crops_size 518: not a multiple of the teacher.s patch"):
        distill_recipe(teacher, "heads", cfg.features).build(cfg)

