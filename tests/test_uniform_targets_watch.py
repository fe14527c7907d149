"""The dead-DINO-head warning: uniform teacher targets past the temperature warm-up are reported once."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest

from components.ssl.monitoring import UniformTargetsWatch
from components.train.engine import run_pretraining
from tests.test_pretrain_engine import CPU, tiny_config, write_pool


def test_the_watch_speaks_once_and_only_past_the_warm_up() -> None:
    watch = UniformTargetsWatch(n_prototypes=1024, after_step=60)
    uniform = math.log(1024)
    assert watch.check(10, uniform) is None  # a fresh head maps every image alike: expected early on
    assert watch.check(80, uniform - 0.5) is None  # targets that carry information
    assert watch.check(80, None) is None  # no DINO teacher (feature distillation)
    message = watch.check(100, uniform - 0.001)
    assert message is not None and "step 100" in message and "6.9305" in message and "momentum_teacher" in message
    assert watch.check(120, uniform) is None  # once per run


def test_a_run_whose_teacher_stays_uniform_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(write_pool(tmp_path, corrupt=False), tmp_path / "out", iterations=4)
    # LayerScale 1e-5 makes every image's CLS token alike at first: the targets are uniform for 4 steps
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, layerscale_init=1e-5))
    with caplog.at_level(logging.WARNING, logger="components.train.engine"):
        run_pretraining(cfg, CPU, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "teacher targets are still uniform" in r.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0]
