"""DCP training checkpoints: exact round trip, complete-or-absent commits, pruning, resharding, store mirror."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from components.storage import LocalObjectStore
from components.train import (
    CheckpointError,
    OptimizerState,
    capture_rng_state,
    download_latest_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    upload_checkpoint,
)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model.register_buffer("center", torch.zeros(1, 3))
    return model


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and AdamW after two steps, so the optimizer has exp_avg/exp_avg_sq/step state."""
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.04)
    for _ in range(2):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.get_buffer("center").add_(0.5)
    return model, optimizer


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "optimizer": OptimizerState(model, optimizer), "extra": extra}


def assert_same_training_state(a: tuple[nn.Module, torch.optim.Optimizer],
                               b: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    for (ka, va), (kb, vb) in zip(a[0].state_dict().items(), b[0].state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, per_param in sa["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, sb["state"][index][name]), (index, name)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    source = trained(0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng = capture_rng_state()
    extra = {"scheduler_step": 1234, "sampler": {"epoch": 3, "position": 77}, "name": "vit_s", "lr": 1e-3 / 3,
             "betas": (0.9, 0.95), "blob": b"\x00\xffraw", "none": None, "rng": rng}
    path = save_checkpoint(tmp_path, 100, state_of(*source, extra))
    assert path == tmp_path / "step_000000100"
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])

    target = trained(9)  # different weights and optimizer moments, overwritten by the load
    loaded: dict[str, Any] = {}
    state = state_of(*target, loaded)
    load_checkpoint(path, state)
    assert state["extra"] is loaded  # dicts are filled in place
    assert_same_training_state(source, target)
    rng_back = loaded.pop("rng")
    assert loaded == {k: v for k, v in extra.items() if k != "rng"}
    assert isinstance(loaded["betas"], tuple)
    restore_rng_state(rng_back)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_state_saved_twice_gives_byte_identical_folders(tmp_path: Path) -> None:
    """DVC hashes checkpoint folders: no clock, save id or temporary path may leak into them."""
    model, optimizer = trained(0)
    torch.manual_seed(3)
    extra = {"scheduler_step": 12, "rng": capture_rng_state()}
    first = save_checkpoint(tmp_path / "a", 5, state_of(model, optimizer, extra))
    second = save_checkpoint(tmp_path / "b", 5, state_of(model, optimizer, extra))
    first_bytes, second_bytes = folder_bytes(first), folder_bytes(second)
    assert {".metadata", "COMMITTED"} <= set(first_bytes)
    assert first_bytes == second_bytes
    assert str(tmp_path).encode() not in first_bytes[".metadata"]
    load_checkpoint(second, state_of(*trained(9), {}))  # still a loadable checkpoint

    model.get_buffer("center").add_(1.0)  # and a different state does hash differently
    third = save_checkpoint(tmp_path / "c", 5, state_of(model, optimizer, extra))
    assert folder_bytes(third) != first_bytes


def test_top_level_tensor_loads_in_place_and_missing_key_fails(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"ema": torch.arange(4.0), "step": 1})
    target = torch.zeros(4)
    load_checkpoint(path, {"ema": target})
    assert torch.equal(target, torch.arange(4.0))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, {"absent": 0})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, {"bad": object()})


def test_bare_optimizer_pairs_with_the_only_module(tmp_path: Path) -> None:
    source = trained(0)
    path = save_checkpoint(tmp_path, 7, {"model": source[0], "optimizer": source[1], "step": 7})
    target = trained(9)
    load_checkpoint(path, {"model": target[0], "optimizer": target[1]})
    assert_same_training_state(source, target)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 8, {"a": source[0], "b": make_model(1), "optimizer": source[1]})


def fake_crashes(directory: Path) -> None:
    """Leftovers of interrupted saves, all newer than the committed checkpoints."""
    (directory / ".step_000000900.tmp-abc123").mkdir()
    (directory / ".step_000000900.tmp-abc123" / "__0_0.distcp").write_bytes(b"partial")
    shutil.copytree(directory / "step_000000002", directory / "step_000000800")
    (directory / "step_000000800" / "COMMITTED").unlink()  # written but never committed
    shutil.copytree(directory / "step_000000002", directory / "step_000000700")
    (directory / "step_000000700" / ".metadata").unlink()  # marker present, files gone
    shutil.copytree(directory / "step_000000002", directory / "step_000000600")
    (directory / "step_000000600" / "__0_0.distcp").write_bytes(b"short")  # truncated shard
    (directory / "step_junk").mkdir()


def test_latest_ignores_crashed_writes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert latest_checkpoint(tmp_path / "nothing") is None
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))})
    fake_crashes(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_000000002"
    assert "step_000000700" in caplog.text and "step_000000600" in caplog.text
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "step_000000700", {"w": torch.zeros(3)})
    # a newer real save still wins, and saving the same step again replaces it
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 3, {"w": torch.ones(3)})
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000000003"
    w = torch.zeros(3)
    load_checkpoint(tmp_path / "step_000000003", {"w": w})
    assert torch.equal(w, torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_prune_keeps_newest_and_drops_stale_temp(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2)})
    (tmp_path / ".step_000000035.tmp-aa").mkdir()  # stale: older than the newest commit
    (tmp_path / ".step_000000050.tmp-bb").mkdir()  # possibly in progress: kept
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [".step_000000035.tmp-aa", "step_000000010", "step_000000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_000000050.tmp-bb", "step_000000030",
                                                          "step_000000040"]
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_object_store_mirror_needs_marker(tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    source = trained(0)
    first = save_checkpoint(local, 5, state_of(*source, {"step": 5}))
    second = save_checkpoint(local, 6, state_of(*source, {"step": 6}))
    store = LocalObjectStore(tmp_path / "store")
    assert upload_checkpoint(first, store, "runs/a/checkpoints") == "runs/a/checkpoints/step_000000005"
    # an interrupted upload of step 6: every file but the marker
    for item in sorted(second.iterdir()):
        if item.name != "COMMITTED":
            store.upload_file(f"runs/a/checkpoints/step_000000006/{item.name}", item)
    # step 7 has its marker in the store but lost a data file: skipped with a warning
    third = save_checkpoint(local, 7, state_of(*source, {"step": 7}))
    upload_checkpoint(third, store, "runs/a/checkpoints")
    store.delete("runs/a/checkpoints/step_000000007/.metadata")
    fetched = download_latest_checkpoint(store, "runs/a/checkpoints", tmp_path / "fetched")
    assert fetched == tmp_path / "fetched" / "step_000000005"
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == ["step_000000005"]
    target = trained(9)
    extra: dict[str, Any] = {}
    assert fetched is not None
    load_checkpoint(fetched, state_of(*target, extra))
    assert_same_training_state(source, target)
    assert extra == {"step": 5}
    assert download_latest_checkpoint(store, "runs/b", tmp_path / "none") is None


WORLD_SIZE = 2


def fsdp_trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model and AdamW after one step on a fixed batch; under FSDP2 each rank holds half of every tensor."""
    model = make_model(3)
    if dist.is_initialized():
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(4)
    model(torch.randn(4, 6)).pow(2).mean().backward()  # same batch on each rank: averaged grads are equal
    optimizer.step()
    return model, optimizer


def save_sharded(directory: Path) -> None:
    model, optimizer = fsdp_trained()
    assert isinstance(model[0].weight, DTensor)
    save_checkpoint(directory, 1, {"model": model, "optimizer": optimizer})


def run_rank(rank: int, init_file: str, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, optimizer = trained(0)  # same seed on every rank: replicated, as after DDP
        extra = {"step": 42, "rank_that_wrote": rank}
        path = save_checkpoint(Path(directory), 42, state_of(model, optimizer, extra))
        # every rank sees the committed folder as soon as save returns
        assert latest_checkpoint(Path(directory)) == path
        back: dict[str, Any] = {}
        load_checkpoint(path, {"model": make_model(5), "extra": back})  # same world size: own rank's extra
        assert back == extra
        save_sharded(Path(directory) / "fsdp")
    finally:
        dist.destroy_process_group()


def test_two_process_save_loads_in_one_process(tmp_path: Path) -> None:
    mp.spawn(run_rank, args=(str(tmp_path / "pg-init"), str(tmp_path / "ckpt")), nprocs=WORLD_SIZE, join=True)
    path = latest_checkpoint(tmp_path / "ckpt")
    assert path is not None
    assert json.loads((path / "COMMITTED").read_text())["world_size"] == WORLD_SIZE
    target = trained(9)
    extra: dict[str, Any] = {}
    load_checkpoint(path, state_of(*target, extra))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same reduction order, hence bit-equal floats
    try:
        reference = trained(0)
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(reference, target)
    assert extra == {"step": 42, "rank_that_wrote": 0}  # rank 1 is gone: rank 0's extra state

    # FSDP2 shards (DTensors) saved by two ranks reshard into one plain module and optimizer
    target = trained(9)
    load_checkpoint(tmp_path / "ckpt" / "fsdp" / "step_000000001",
                    {"model": target[0], "optimizer": OptimizerState(*target)})
    torch.set_num_threads(1)
    try:
        reference = fsdp_trained()  # no process group here: the plain single-process run
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(reference, target)


def test_each_rank_gets_its_own_generators_back_and_a_new_rank_a_derived_one() -> None:
    from components.train.checkpointer import device_rng_states, rank_step_seed, restore_rng_states
    from components.train.distributed import DistEnv

    cpu = torch.device("cpu")
    torch.manual_seed(123)
    saved = {"rank": 1, **device_rng_states(cpu)}
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    assert restore_rng_states(saved, DistEnv(1, 2, 1, cpu), seed=7, step=40) == "restored"
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)

    # Rank 2 of a resume on three processes finds rank 0's extra state: it must not replay rank 0's stream.
    rank0 = {"rank": 0, **device_rng_states(cpu)}
    rank0_draw = torch.rand(3)
    assert restore_rng_states(rank0, DistEnv(2, 3, 2, cpu), seed=7, step=40) == "derived"
    new_rank_draw = torch.rand(3)
    assert not torch.equal(new_rank_draw, rank0_draw)
    torch.manual_seed(rank_step_seed(7, 2, 40))
    torch.testing.assert_close(torch.rand(3), new_rank_draw, rtol=0, atol=0)
    assert rank_step_seed(7, 2, 40) != rank_step_seed(7, 1, 40) != rank_step_seed(7, 1, 41)


def tiny_model_optimizer_env() -> tuple[Any, torch.optim.Optimizer, Any]:
    """A vit_pico meta-architecture with tiny heads, its AdamW and a one-process CPU environment."""
    from components.ssl.meta_arch import SSLMetaArch
    from components.train.config import PretrainConfig
    from components.train.distributed import DistEnv

    cfg = PretrainConfig()
    cfg.backbone = dataclasses.replace(cfg.backbone, arch="vit_pico", patch_size=4, img_size=28)
    cfg.objective.dino.head = cfg.objective.ibot.head = dataclasses.replace(
        cfg.objective.dino.head, n_prototypes=16, hidden_dim=16, bottleneck_dim=8)
    model = SSLMetaArch(cfg.backbone, cfg.objective)
    return model, torch.optim.AdamW(model.parameters()), DistEnv(0, 1, 0, torch.device("cpu"))


def test_checkpointer_saves_when_due_and_on_the_last_step(tmp_path: Path) -> None:
    from components.train.checkpointer import Checkpointer
    from components.train.config import CheckpointConfig

    model, optimizer, env = tiny_model_optimizer_env()
    checkpointer = Checkpointer(model, optimizer, env, tmp_path / "ckpt", CheckpointConfig(every=3, keep_last=1),
                                "arch-a", seed=0)
    assert checkpointer.load() == (0, 0)  # nothing yet: a fresh run
    assert [checkpointer.save(step, step * 4) is not None for step in (1, 2, 3)] == [False, False, True]
    assert checkpointer.save(4, 16, last=True) is not None and checkpointer.last_saved == 4
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")] == ["step_000000004"]
    again = Checkpointer(model, optimizer, env, tmp_path / "ckpt", CheckpointConfig(every=3), "arch-a", seed=0)
    assert again.load() == (4, 16) and again.last_saved == 4
    from components.train.checkpointer import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="another backbone or head"):
        Checkpointer(model, optimizer, env, tmp_path / "ckpt", CheckpointConfig(on_config_change="error"),
                     "arch-b", seed=0).load()
    other = Checkpointer(model, optimizer, env, tmp_path / "ckpt", CheckpointConfig(), "arch-b", seed=0)
    assert other.load() == (0, 0)  # default: the other run is set aside and this one starts over
    (aside,) = (tmp_path / "ckpt" / "superseded").iterdir()
    assert [p.name for p in aside.iterdir()] == ["step_000000004"]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")]


def test_checkpointer_compares_the_run_identity_under_each_policy(tmp_path: Path) -> None:
    from components.train.checkpointer import Checkpointer, CheckpointMismatchError
    from components.train.config import CheckpointConfig

    model, optimizer, env = tiny_model_optimizer_env()
    folder = tmp_path / "ckpt"

    def checkpointer(identity: dict[str, object], policy: str = "restart") -> Checkpointer:
        return Checkpointer(model, optimizer, env, folder, CheckpointConfig(on_config_change=policy),  # type: ignore[arg-type]
                            "arch", seed=0, identity=identity)

    run_a = {"architecture": {"depth": 2}, "objective": {"optim": {"base_lr": 0.004}}}
    run_b = {"architecture": {"depth": 2}, "objective": {"optim": {"base_lr": 0.008}}}
    checkpointer(run_a).save(5, 20, last=True)
    assert checkpointer(run_a).load() == (5, 20)  # the same run resumes
    with pytest.raises(CheckpointMismatchError, match=r"objective\.optim\.base_lr: 0\.004 -> 0\.008"):
        checkpointer(run_b, "error").load()
    assert checkpointer(run_b, "resume").load() == (5, 20)  # the official behaviour, one switch away
    assert checkpointer(run_b).load() == (0, 0)
    (aside,) = (folder / "superseded").iterdir()
    assert [p.name for p in aside.iterdir()] == ["step_000000005"]
    checkpointer(run_b).save(3, 12, last=True)
    assert checkpointer(run_b).load() == (3, 12)  # the new run resumes its own checkpoints
