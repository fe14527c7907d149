"""Distillation (DINOv2 §5) on tiny real-image pools: losses fall, the teacher stays frozen, the student's
EMA is what gets exported, resume is exact, and the stage takes its teacher from the MLflow registry."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.config import from_mapping
from components.distill.config import DistillConfig
from components.distill.feature_loss import feature_distance, resize_patch_grid
from components.distill.meta_arch import DistillMetaArch, Mode, distill_recipe, objective_for_teacher
from components.distill.teacher import FrozenTeacher, load_teacher, resolve_mode
from components.models.export import WEIGHTS_FILE, save_backbone
from components.ssl.param_groups import apply_schedules
from components.train.checkpointer import CheckpointMismatchError
from components.train.engine import DataStream, collate_step, run_pretraining
from tests.test_pretrain_engine import CPU, tiny_config, weights, write_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@dataclass(frozen=True)
class TinyTeacher:
    root: Path
    manifest: Path
    checkpoints: Path  # a pretraining run's checkpoint folder (teacher with heads)
    backbone: Path  # the same run's exported EMA backbone (teacher without heads)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> TinyTeacher:
    root = tmp_path_factory.mktemp("teacher")
    manifest = write_pool(root, n=16, corrupt=False)
    cfg = tiny_config(manifest, root / "pretrain", iterations=3)
    _, model = run_pretraining(cfg, CPU, root)
    backbone = save_backbone(model.backbone("teacher"), cfg.backbone, root / "pretrain" / "backbone")
    return TinyTeacher(root, manifest, root / "pretrain" / "checkpoints", backbone)


def distill_config(manifest: Path, output: Path, source: str, iterations: int = 4, patch_size: int = 4,
                   **run: object) -> DistillConfig:
    head = {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16}
    return from_mapping(DistillConfig, {
        "teacher": {"source": source},
        "data": {"manifest": str(manifest), "batch_size_per_rank": 4, "num_workers": 0, "seed": 5},
        "crops": {"global_crops_size": 28, "local_crops_size": 12 if patch_size == 4 else 14, "local_crops_number": 2},
        "backbone": {"arch": "vit_femto", "patch_size": patch_size, "img_size": 28, "drop_path_rate": 0.0,
                     "layerscale_init": 0.1},
        "objective": {"precision": "fp32", "dino": {"head": head}, "ibot": {"head": head},
                      "teacher": {"warmup_teacher_temp_iters": 1},
                      "optim": {"iterations": iterations, "warmup_iters": 1, "freeze_last_layer_iters": 0}},
        "run": {"output_dir": str(output), "log_every": 1, **run},
        "checkpoint": {"every": 2, "keep_last": 2},
    })


def prepared(cfg: DistillConfig) -> tuple[FrozenTeacher, Mode, DistillConfig]:
    teacher = load_teacher(cfg.teacher.source, cfg.teacher.backbone, "cpu", "fp32")
    mode = resolve_mode(cfg.teacher.mode, teacher)
    cfg.objective = objective_for_teacher(cfg.objective, teacher, mode)
    return teacher, mode, cfg


def fixed_batch(cfg: DistillConfig, root: Path) -> dict[str, torch.Tensor]:
    stream = DataStream(cfg, CPU, root)
    loaded = stream.batches(0)
    assert loaded is not None
    return collate_step(cfg, loaded.batch, 0, torch.device("cpu"))


def train_on_one_batch(model: DistillMetaArch, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.param_groups())
    apply_schedules(optimizer.param_groups, lr=2e-3, wd=0.0, last_layer_lr=2e-3)
    totals = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        totals.append(float(model.forward_backward(batch, teacher_temp=0.07)["total_loss"]))
        optimizer.step()
        model.update_teacher(0.9)
    return totals


def assert_frozen(teacher: FrozenTeacher, digest_before: str) -> None:
    for module in teacher.modules():
        assert not module.training
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    assert teacher.fingerprint() == digest_before, "the teacher's weights changed"


# ---------------------------------------------------------------- numerics against independent references


def test_feature_distances_match_float64_references() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 5, 8)), rng.normal(size=(6, 5, 8))
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    got = feature_distance(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), "cosine")
    assert float(got) == pytest.approx(float(np.mean(1 - cos)), rel=1e-5)
    diff, beta = np.abs(s - t), 0.7
    smooth = np.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    got = feature_distance(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                           "smooth_l1", beta=beta)
    assert float(got) == pytest.approx(float(smooth.mean()), rel=1e-5)


@pytest.mark.parametrize(("source", "target"), [((2, 2), (4, 4)), ((7, 7), (4, 4)), ((3, 5), (6, 10))])
def test_patch_grid_resize_matches_scikit_image_bilinear(source: tuple[int, int], target: tuple[int, int]) -> None:
    from skimage.transform import resize

    rng = np.random.default_rng(1)
    grid = rng.normal(size=(*source, 3))  # (h, w, D)
    expected = resize(grid, (*target, 3), order=1, mode="edge", anti_aliasing=False)  # half-pixel centres
    tokens = torch.tensor(grid.reshape(1, -1, 3), dtype=torch.float64)  # (1, h*w, D)
    got = resize_patch_grid(tokens, source, target).reshape(*target, 3).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)  # float32 interpolation


# ---------------------------------------------------------------- both modes learn, the teacher stays frozen


def test_heads_mode_from_a_pretraining_checkpoint_lowers_the_loss(tiny_teacher: TinyTeacher, tmp_path: Path) -> None:
    cfg = distill_config(tiny_teacher.manifest, tmp_path / "out", str(tiny_teacher.checkpoints))
    teacher, mode, cfg = prepared(cfg)
    assert teacher.kind == "checkpoint" and mode == "heads" and teacher.has_heads
    assert cfg.objective.dino.head.n_prototypes == 64, "the student's heads take the teacher's prototype count"
    digest = teacher.fingerprint()
    torch.manual_seed(0)
    model = DistillMetaArch(cfg.backbone, cfg.objective, teacher, mode, cfg.features)
    model.train()
    assert "frozen_teacher" not in "".join(model.state_dict()), "the teacher must stay out of checkpoints"
    totals = train_on_one_batch(model, fixed_batch(cfg, tiny_teacher.root), steps=6)
    assert totals[-1] < totals[0] - 0.05, totals
    assert_frozen(teacher, digest)


def test_features_mode_from_a_backbone_folder_lowers_the_loss(tiny_teacher: TinyTeacher, tmp_path: Path) -> None:
    # Student patch 7 (4x4 grid) against teacher patch 4 (7x7 grid): the teacher's patches are resized.
    cfg = distill_config(tiny_teacher.manifest, tmp_path / "out", str(tiny_teacher.backbone), patch_size=7)
    teacher, mode, cfg = prepared(cfg)
    assert teacher.kind == "backbone" and mode == "features" and not teacher.has_heads
    digest = teacher.fingerprint()
    torch.manual_seed(0)
    model = DistillMetaArch(cfg.backbone, cfg.objective, teacher, mode, cfg.features)
    model.train()
    assert set(model.student) == {"backbone", "cls_projection", "patch_projection"}
    assert model.projection("student", "cls_projection").weight.shape == (64, 32)  # student 32 -> teacher 64
    batch = fixed_batch(cfg, tiny_teacher.root)
    totals = train_on_one_batch(model, batch, steps=6)
    assert totals[-1] < 0.8 * totals[0], totals
    losses = model.forward_backward(batch, teacher_temp=0.07, backward=False)
    assert {"feature_cls_loss", "feature_local_cls_loss", "feature_patch_loss", "total_loss"} <= set(losses)
    assert_frozen(teacher, digest)


def test_heads_mode_is_refused_for_a_teacher_without_heads(tiny_teacher: TinyTeacher) -> None:
    teacher = load_teacher(str(tiny_teacher.backbone), DistillConfig().teacher.backbone)
    with pytest.raises(ValueError, match="no heads"):
        resolve_mode("heads", teacher)


def test_stochastic_depth_in_the_student_is_refused(tiny_teacher: TinyTeacher, tmp_path: Path) -> None:
    from components.config import ConfigError

    cfg = distill_config(tiny_teacher.manifest, tmp_path, str(tiny_teacher.backbone))
    from components.config import to_mapping

    values = to_mapping(cfg)
    values["backbone"]["drop_path_rate"] = 0.1
    with pytest.raises(ConfigError, match="stochastic depth"):
        from_mapping(DistillConfig, values)


# ---------------------------------------------------------------- the engine: EMA export, exact resume


def test_the_exported_student_is_its_ema_not_the_raw_student(tiny_teacher: TinyTeacher, tmp_path: Path) -> None:
    from components.stages.distill import export_student

    cfg = distill_config(tiny_teacher.manifest, tmp_path / "out", str(tiny_teacher.checkpoints))
    teacher, mode, cfg = prepared(cfg)
    digest = teacher.fingerprint()
    result, model = run_pretraining(cfg, CPU, tiny_teacher.root, recipe=distill_recipe(teacher, mode, cfg.features))
    assert result.finished and isinstance(model, DistillMetaArch)
    folder = export_student(cfg, tmp_path, model, result, {"dinoflow.distill_mode": mode})
    exported = load_file(str(folder / WEIGHTS_FILE))
    ema, raw = model.backbone("teacher").state_dict(), model.backbone("student").state_dict()
    assert exported.keys() == ema.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], ema[key], rtol=0, atol=0, msg=key)
    moved = [k for k in raw if raw[k].dtype.is_floating_point and not torch.equal(raw[k], ema[k])]
    assert len(moved) > len(raw) // 2, "the EMA should lag the raw student after a few steps"
    assert_frozen(teacher, digest)


@pytest.mark.parametrize("source", ["checkpoints", "backbone"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(tiny_teacher: TinyTeacher, tmp_path: Path,
                                                         source: str) -> None:
    location = str(getattr(tiny_teacher, source))

    def run(output: str, max_steps: int = 0) -> tuple[object, DistillMetaArch]:
        teacher, mode, cfg = prepared(distill_config(tiny_teacher.manifest, tmp_path / output, location,
                                                     max_steps=max_steps))
        result, model = run_pretraining(cfg, CPU, tiny_teacher.root, recipe=distill_recipe(teacher, mode, cfg.features))
        assert isinstance(model, DistillMetaArch)
        return result, model

    _, straight = run("a")
    stopped, _ = run("b", max_steps=3)
    assert not stopped.finished  # type: ignore[attr-defined]
    second, resumed = run("b")
    assert second.start_step == 3 and second.finished  # type: ignore[attr-defined]
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_another_teacher_restarts_the_student_or_is_refused(tiny_teacher: TinyTeacher, tmp_path: Path) -> None:
    teacher, mode, cfg = prepared(distill_config(tiny_teacher.manifest, tmp_path / "o", str(tiny_teacher.backbone),
                                                 max_steps=2))
    run_pretraining(cfg, CPU, tiny_teacher.root, recipe=distill_recipe(teacher, mode, cfg.features))
    with torch.no_grad():
        teacher.backbone.cls_token.add_(1.0)  # another teacher: same architecture, other weights
    cfg.checkpoint.on_config_change = "error"
    with pytest.raises(CheckpointMismatchError, match=r"architecture\.teacher"):
        run_pretraining(cfg, CPU, tiny_teacher.root, recipe=distill_recipe(teacher, mode, cfg.features))
    cfg.checkpoint.on_config_change = "restart"  # the default: a new teacher means a new student, from step 0
    result, _ = run_pretraining(cfg, CPU, tiny_teacher.root, recipe=distill_recipe(teacher, mode, cfg.features))
    assert result.start_step == 0 and result.end_step == 2


# ---------------------------------------------------------------- the stage, teacher from the registry


def register_teacher(tiny_teacher: TinyTeacher, root: Path, name: str) -> str:
    """Log a run with the tiny teacher's backbone and checkpoint artifacts and register it, as pretrain does."""
    import mlflow

    from components.registry.publish import register_backbone as register
    from components.stages.context import make_context
    from components.tracking.mlflow_setup import configure
    from components.train.checkpoint import latest_checkpoint

    configure(make_context(root=root).tracking)
    with mlflow.start_run(run_name="pretrain") as run:
        mlflow.log_artifacts(str(tiny_teacher.backbone), artifact_path="backbone")
        checkpoint = latest_checkpoint(tiny_teacher.checkpoints)
        assert checkpoint is not None
        mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
    return register(name, run.info.run_id)


@pytest.mark.slow
@pytest.mark.parametrize(("use_checkpoint", "expected_mode"), [(True, "heads"), (False, "features")])
def test_stage_distils_a_registry_teacher_and_records_its_lineage(tiny_teacher: TinyTeacher, tmp_path: Path,
                                                                  use_checkpoint: bool, expected_mode: str) -> None:
    from mlflow import MlflowClient

    from components.models.export import load_backbone
    from components.stages.context import make_context
    from components.stages.distill import run_distill

    (tmp_path / "pyproject.toml").write_text("")
    teacher_name, student_name = f"test-teacher-{uuid.uuid4().hex[:8]}", f"test-student-{uuid.uuid4().hex[:8]}"
    teacher_version = register_teacher(tiny_teacher, tmp_path, teacher_name)
    cfg = distill_config(tiny_teacher.manifest, tmp_path / "distill", f"models:/{teacher_name}@challenger",
                         iterations=2)
    cfg.publish.registered_model_name = student_name
    cfg.teacher.use_registry_checkpoint = use_checkpoint
    outputs = run_distill(make_context(root=tmp_path), cfg)
    assert outputs.result.finished and outputs.mode == expected_mode and outputs.backbone_dir is not None
    assert outputs.teacher.name == teacher_name and outputs.teacher.version == teacher_version

    client = MlflowClient()
    version = client.get_model_version_by_alias(student_name, "challenger")
    assert str(version.version) == outputs.model_version and version.run_id == outputs.run_id
    lineage = {"dinoflow.teacher_uri": f"models:/{teacher_name}@challenger", "dinoflow.teacher_name": teacher_name,
               "dinoflow.teacher_version": teacher_version, "dinoflow.distill_mode": expected_mode}
    assert lineage.items() <= version.tags.items()
    assert outputs.run_id is not None
    run = client.get_run(outputs.run_id)
    assert lineage.items() <= run.data.tags.items() and run.data.tags["dinoflow.stage"] == "distill"
    assert run.data.params["distill.resolved_mode"] == expected_mode
    # The teacher that trained the student is the registry version's, bit for bit, and was left untouched.
    registry_teacher = load_teacher(outputs.teacher.location, cfg.teacher.backbone)
    assert registry_teacher.kind == ("checkpoint" if use_checkpoint else "backbone")
    assert run.data.tags["dinoflow.teacher_fingerprint"] == registry_teacher.fingerprint()
    assert version.tags["dinoflow.teacher_fingerprint"] == registry_teacher.fingerprint()
    assert "total_loss" in run.data.metrics
    bundle = load_backbone(outputs.backbone_dir)
    assert bundle.config.arch == "vit_femto"
    assert bundle.metadata["dinoflow.teacher_fingerprint"] == registry_teacher.fingerprint()
    assert "dinoflow.teacher_version" not in bundle.metadata  # a per-store number: not in a DVC output
    assert bundle.model(torch.randn(1, 3, 28, 28)).shape == (1, 32)
