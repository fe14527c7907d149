"""Two runs of the same config give the same weights bit for bit with ``run.deterministic`` (two threads).

Without the switch, two 2-thread CPU runs of the CPU preset's model drifted apart (the DVC stages'
``dvc.lock`` then changed after every ``make demo``); with one thread they were equal, so the cause is
kernel reduction order, which ``torch.use_deterministic_algorithms`` fixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from components.config import from_mapping
from components.train.config import PretrainConfig
from components.train.determinism import deterministic_algorithms
from components.train.engine import run_pretraining
from tests.test_checkpoint import folder_bytes
from tests.test_pretrain_engine import CPU, write_pool


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the case that drifted: one thread was already reproducible
    yield
    torch.set_num_threads(previous)


def preset_sized_config(manifest: Path, output: Path, deterministic: bool) -> PretrainConfig:
    """The CPU preset's model (256 wide, patch 7, bf16 where native) on a tiny pool, a few steps.

    Batch 128 as the preset: at batch 32 the drift did not show (the reduction is only split across
    threads above a size)."""
    return from_mapping(PretrainConfig, {
        "data": {"manifest": str(manifest), "batch_size_per_rank": 128, "num_workers": 0, "seed": 1,
                 "augmentation": "batched"},
        "crops": {"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2},
        "backbone": {"arch": "vit_small", "embed_dim": 256, "depth": 2, "num_heads": 4, "patch_size": 7,
                     "img_size": 28},
        "objective": {"dino": {"head": {"n_prototypes": 256, "hidden_dim": 256, "bottleneck_dim": 64}},
                      "ibot": {"head": {"n_prototypes": 256, "hidden_dim": 256, "bottleneck_dim": 64}},
                      "teacher": {"warmup_teacher_temp_iters": 2},
                      "optim": {"iterations": 4, "warmup_iters": 1, "freeze_last_layer_iters": 1}},
        "run": {"output_dir": str(output), "deterministic": deterministic},
        "checkpoint": {"every": 100},
    })


def trained_weights(manifest: Path, output: Path) -> dict[str, torch.Tensor]:
    _, model = run_pretraining(preset_sized_config(manifest, output, deterministic=True), CPU, output.parent)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_bytes(output: Path) -> dict[str, bytes]:
    """Every file of the checkpoints folder (a DVC output of the pretrain stage), by relative path."""
    return folder_bytes(output / "checkpoints")


@pytest.mark.slow
def test_deterministic_runs_end_with_identical_weights(tmp_path: Path, two_torch_threads: None) -> None:
    manifest = write_pool(tmp_path, n=64, corrupt=False)
    first = trained_weights(manifest, tmp_path / "a")
    second = trained_weights(manifest, tmp_path / "b")
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"{len(differing)} tensors differ between two identical runs, e.g. {differing[:3]}"
    # Same weights must mean the same checkpoint bytes too, or dvc.lock changes after every demo.
    first_files, second_files = checkpoint_bytes(tmp_path / "a"), checkpoint_bytes(tmp_path / "b")
    assert any(name.endswith("/COMMITTED") for name in first_files)
    assert first_files.keys() == second_files.keys()
    assert not [name for name in first_files if first_files[name] != second_files[name]]
    assert not torch.are_deterministic_algorithms_enabled(), "the run must restore the process's setting"


def test_the_switch_restores_the_previous_setting() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
