"""The pretraining loop on tiny real-image manifests: runs, skips corrupt images, resumes exactly."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from components.config import from_mapping, to_mapping
from components.storage import LocalObjectStore
from components.train.config import PretrainConfig
from components.train.distributed import DistEnv
from components.train.engine import NonFiniteLossError, run_pretraining

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_pool(root: Path, n: int = 24, corrupt: bool = True) -> Path:
    """PNG images with structure (random blobs) in a local store, plus a manifest; optionally a corrupt one."""
    store = LocalObjectStore(root / "store")
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        pixels = (rng.random((28, 28)) * 60).astype(np.uint8)
        y, x = rng.integers(4, 20, size=2)
        pixels[y:y + 8, x:x + 8] = 200 + i % 50
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        store.write(f"img/{i:03d}.png", buffer.getvalue())
        uris.append(store.url_for(f"img/{i:03d}.png"))
    if corrupt:
        store.write("img/broken.png", b"\x89PNG\r\n\x1a\n truncated")
        uris.append(store.url_for("img/broken.png"))
    manifest = root / "manifest.parquet"
    pl.DataFrame({"id": [str(i) for i in range(len(uris))], "uri": uris, "split": ["train"] * len(uris)}
                 ).write_parquet(manifest)
    return manifest


def tiny_config(manifest: Path, output: Path, iterations: int = 6, **run: object) -> PretrainConfig:
    head = {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16}
    return from_mapping(PretrainConfig, {
        "data": {"manifest": str(manifest), "batch_size_per_rank": 4, "num_workers": 0, "seed": 3},
        "crops": {"global_crops_size": 28, "local_crops_size": 12, "local_crops_number": 2},
        "backbone": {"arch": "vit_pico", "patch_size": 4, "img_size": 28, "drop_path_rate": 0.1,
                     "layerscale_init": 0.1},
        "objective": {"precision": "fp32", "dino": {"head": head}, "ibot": {"head": head},
                      "teacher": {"warmup_teacher_temp_iters": 2},
                      "optim": {"iterations": iterations, "warmup_iters": 1, "freeze_last_layer_iters": 1}},
        "run": {"output_dir": str(output), "log_every": 1, **run},
        "checkpoint": {"every": 2, "keep_last": 2},
    })


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_single_process_run_skips_corrupt_images_and_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config(write_pool(tmp_path), tmp_path / "out")
    result, model = run_pretraining(cfg, CPU, tmp_path)
    assert result.finished and result.end_step == 6
    assert result.skipped_images >= 1, "the truncated PNG is seen in 6 steps x 4 images of a 25-image pool"
    assert all(np.isfinite(v) for v in result.last_losses.values())
    assert 0 < result.data_wait_seconds < result.loop_seconds  # the data-loading share of the loop is measured
    committed = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert committed == ["step_000000004", "step_000000006"]  # keep_last = 2
    monitors = model.last_step_monitors()
    assert monitors["student_cls_std"] > 0 and 0 < monitors["teacher_entropy"] <= np.log(64) + 1e-4


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path)
    _, straight = run_pretraining(tiny_config(manifest, tmp_path / "a"), CPU, tmp_path)
    first, _ = run_pretraining(tiny_config(manifest, tmp_path / "b", max_steps=3), CPU, tmp_path)
    assert first.end_step == 3 and not first.finished
    second, resumed = run_pretraining(tiny_config(manifest, tmp_path / "b"), CPU, tmp_path)
    assert second.start_step == 3 and second.finished
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import components.train.engine as engine
    from components.config import from_mapping
    from components.train.config import PretrainConfig
    import json
    cfg = from_mapping(PretrainConfig, json.loads(sys.argv[1]))
    original = engine.collate_step
    def slow_collate(*args, **kwargs):
        time.sleep(0.3)  # give the parent time to kill us between checkpoints
        return original(*args, **kwargs)
    engine.collate_step = slow_collate
    engine.run_pretraining(cfg, engine.DistEnv(0, 1, 0, torch.device("cpu")), Path(sys.argv[2]))
""")


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    import json

    manifest = write_pool(tmp_path)
    _, straight = run_pretraining(tiny_config(manifest, tmp_path / "a", iterations=8), CPU, tmp_path)
    cfg = tiny_config(manifest, tmp_path / "b", iterations=8)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(to_mapping(cfg)), str(tmp_path)],
                            env=dict(os.environ))
    target = tmp_path / "b" / "checkpoints" / "step_000000004"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the child never reached its second checkpoint"
    assert not (tmp_path / "b" / "checkpoints" / "step_000000008").exists(), "killed too late to test resume"
    result, resumed = run_pretraining(cfg, CPU, tmp_path)
    assert result.start_step in (4, 6) and result.finished
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0, msg=key)


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(write_pool(tmp_path, corrupt=False), tmp_path / "out")
    from components.ssl.meta_arch import SSLMetaArch

    original = SSLMetaArch.forward_backward

    def poisoned(self: SSLMetaArch, batch: dict[str, torch.Tensor], teacher_temp: float,
                 backward: bool = True) -> dict[str, torch.Tensor]:
        losses = original(self, batch, teacher_temp, backward)
        if poisoned.calls == 3:  # type: ignore[attr-defined]
            losses["koleo_loss"] = torch.tensor(float("nan"))
        poisoned.calls += 1  # type: ignore[attr-defined]
        return losses

    poisoned.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3: loss term 'koleo_loss' is nan"):
        run_pretraining(cfg, CPU, tmp_path)
    names = [p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert names == ["step_000000002"]


def test_high_resolution_phase_switches_crops_for_the_last_iterations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import components.train.engine as engine

    cfg = tiny_config(write_pool(tmp_path, corrupt=False), tmp_path / "out", iterations=4)
    cfg.highres.enabled, cfg.highres.iterations = True, 2
    cfg.highres.global_crops_size, cfg.highres.local_crops_size = 36, 16
    sizes: list[int] = []
    original = engine.collate_step

    def spy(cfg_: PretrainConfig, samples: list[object], step: int, device: torch.device,
            rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        batch = original(cfg_, samples, step, device, rank, world_size)
        sizes.append(int(batch["collated_global_crops"].shape[-1]))
        assert batch["collated_masks"].shape[1] == (sizes[-1] // 4) ** 2
        return batch

    monkeypatch.setattr(engine, "collate_step", spy)
    result, _ = run_pretraining(cfg, CPU, tmp_path)
    assert result.finished and sizes == [28, 28, 36, 36]


def committed_steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_")) if folder.is_dir() else []


def test_a_checkpoint_of_another_architecture_is_set_aside_or_refused(tmp_path: Path) -> None:
    from components.train.checkpointer import CheckpointMismatchError

    manifest = write_pool(tmp_path, corrupt=False)
    run_pretraining(tiny_config(manifest, tmp_path / "out", iterations=2), CPU, tmp_path)
    checkpoints = tmp_path / "out" / "checkpoints"
    for policy in ("error", "resume"):  # tensors of another shape can never be resumed
        other = tiny_config(manifest, tmp_path / "out", iterations=2)
        other.backbone.num_register_tokens = 2
        other.checkpoint.on_config_change = policy  # type: ignore[assignment]
        with pytest.raises(CheckpointMismatchError, match="another backbone or head"):
            run_pretraining(other, CPU, tmp_path)
    assert committed_steps(checkpoints) == ["step_000000002"]  # refusing touches nothing
    other = tiny_config(manifest, tmp_path / "out", iterations=2)
    other.backbone.num_register_tokens = 2
    restarted, _ = run_pretraining(other, CPU, tmp_path)  # default: restart
    assert restarted.start_step == 0 and restarted.finished
    (aside,) = (checkpoints / "superseded").iterdir()
    assert committed_steps(aside) == ["step_000000002"]  # the old run is kept, not deleted
    assert committed_steps(checkpoints) == ["step_000000002"]  # the new run's own


def test_a_params_or_data_change_restarts_instead_of_resuming_the_finished_run(tmp_path: Path) -> None:
    """dvc repro after editing params (or curation) must retrain, not resume the finished run and export it."""
    import polars as pl

    from components.train.checkpointer import CheckpointMismatchError

    manifest = write_pool(tmp_path, corrupt=False)
    checkpoints = tmp_path / "out" / "checkpoints"
    run_pretraining(tiny_config(manifest, tmp_path / "out", iterations=2), CPU, tmp_path)
    same, _ = run_pretraining(tiny_config(manifest, tmp_path / "out", iterations=2), CPU, tmp_path)
    assert same.start_step == 2 and same.end_step == 2  # the same run: resumed, nothing left to train

    lr = tiny_config(manifest, tmp_path / "out", iterations=2)
    lr.objective.optim.base_lr *= 2
    restarted, _ = run_pretraining(lr, CPU, tmp_path)
    assert restarted.start_step == 0 and restarted.end_step == 2
    assert len(list((checkpoints / "superseded").iterdir())) == 1

    curated = tmp_path / "curated.parquet"  # curation dropped an image: other training data
    pl.read_parquet(manifest).head(20).write_parquet(curated)
    data = tiny_config(curated, tmp_path / "out", iterations=2)
    data.objective.optim.base_lr = lr.objective.optim.base_lr
    data.checkpoint.on_config_change = "error"
    with pytest.raises(CheckpointMismatchError, match=r"data\.manifest_digest.*data\.manifest_rows: 24 -> 20"):
        run_pretraining(data, CPU, tmp_path)
    data.checkpoint.on_config_change = "restart"
    assert run_pretraining(data, CPU, tmp_path)[0].start_step == 0
    assert len(list((checkpoints / "superseded").iterdir())) == 2

    # Reporting and budget keys are not the run's identity: changing them resumes.
    relogged = tiny_config(curated, tmp_path / "out", iterations=2, log_every=5, max_steps=1)
    relogged.objective.optim.base_lr = lr.objective.optim.base_lr
    relogged.checkpoint.keep_last = 1
    assert run_pretraining(relogged, CPU, tmp_path)[0].start_step == 2


def test_extending_the_schedule_restarts_by_default_and_continues_with_resume(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    run_pretraining(tiny_config(manifest, tmp_path / "out", iterations=2), CPU, tmp_path)
    longer = tiny_config(manifest, tmp_path / "out", iterations=4)
    longer.checkpoint.on_config_change = "resume"  # the official behaviour: continue on the new schedule
    continued, _ = run_pretraining(longer, CPU, tmp_path)
    assert continued.start_step == 2 and continued.finished
    fresh, _ = run_pretraining(tiny_config(manifest, tmp_path / "out", iterations=6), CPU, tmp_path)
    assert fresh.start_step == 0 and fresh.finished  # a 6-step schedule is another trajectory


def test_continued_pretraining_warms_up_heads_with_the_backbone_frozen(tmp_path: Path) -> None:
    from components.models import build_backbone
    from components.models.export import save_backbone

    manifest = write_pool(tmp_path, corrupt=False)
    cfg = tiny_config(manifest, tmp_path / "out", iterations=2)
    torch.manual_seed(123)
    pretrained = build_backbone(cfg.backbone)
    save_backbone(pretrained, cfg.backbone, tmp_path / "released")
    cfg.init.backbone = str(tmp_path / "released")
    cfg.init.head_warmup_iters = 2
    cfg.objective.optim.freeze_last_layer_iters = 0
    _, model = run_pretraining(cfg, CPU, tmp_path)
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(model.backbone("student").state_dict()[key], value, rtol=0, atol=0, msg=key)
        # EMA of equal weights: m*t + (1-m)*t is t up to float rounding
        torch.testing.assert_close(model.backbone("teacher").state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    cfg.objective.optim.iterations = 3  # one more step, past the warm-up: now the backbone moves
    _, model = run_pretraining(cfg, CPU, tmp_path)
    moved = model.backbone("student").blocks[0].attn.qkv.weight
    assert not torch.equal(moved, pretrained.blocks[0].attn.qkv.weight)


def test_checkpoints_mirror_to_the_object_store_and_resume_on_a_fresh_machine(tmp_path: Path) -> None:
    import shutil

    manifest = write_pool(tmp_path, corrupt=False)
    store = LocalObjectStore(tmp_path / "bucket")
    cfg = tiny_config(manifest, tmp_path / "out", iterations=4, max_steps=2)
    cfg.checkpoint.store_prefix = "ckpt/run1"
    run_pretraining(cfg, CPU, tmp_path, store=store)
    assert store.exists("ckpt/run1/step_000000002/COMMITTED")
    shutil.rmtree(tmp_path / "out")  # a new machine: nothing local
    cfg.run.max_steps = 0
    result, _ = run_pretraining(cfg, CPU, tmp_path, store=store)
    assert result.start_step == 2 and result.finished
    assert store.exists("ckpt/run1/step_000000004/COMMITTED")
