"""The run identity a checkpoint must share with the run that resumes it (components/train/run_identity.py)."""

from __future__ import annotations

import dataclasses

import polars as pl

from components.train.config import PretrainConfig
from components.train.run_identity import changed_keys, describe_changes, manifest_digest, run_identity

FRAME = pl.DataFrame({"uri": ["s3://b/a.png", "s3://b/b.png"], "sha256": ["aa", "bb"], "split": ["train"] * 2})


def test_manifest_digest_follows_the_rows_and_their_content_not_other_columns() -> None:
    digest = manifest_digest(FRAME)
    assert digest == manifest_digest(FRAME.with_columns(pl.lit("val").alias("split")))  # not an identity column
    assert digest != manifest_digest(FRAME.reverse())  # the stream draws by row position
    assert digest != manifest_digest(FRAME.with_columns(pl.Series("sha256", ["aa", "cc"])))  # same name, new bytes
    assert digest != manifest_digest(FRAME.head(1))
    assert manifest_digest(FRAME.drop("sha256")) != digest  # a manifest without hashes still has an identity


def test_run_identity_holds_the_trajectory_and_leaves_out_reporting_and_budget_keys() -> None:
    cfg = PretrainConfig()
    identity = run_identity(cfg, '{"backbone": "x"}', FRAME)
    assert set(identity) == {"architecture", "data", "crops", "objective", "highres", "init"}
    assert identity["data"]["manifest_rows"] == 2 and identity["architecture"] == {"backbone": "x"}
    reported = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, log_every=1, max_steps=3,
                                                                  output_dir="elsewhere", deterministic=True),
                                   checkpoint=dataclasses.replace(cfg.checkpoint, every=1, keep_last=9))
    reported.data = dataclasses.replace(cfg.data, num_workers=7, batch_size_per_rank=3)
    assert run_identity(reported, '{"backbone": "x"}', FRAME) == identity
    trained = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=1))
    assert changed_keys(identity, run_identity(trained, '{"backbone": "x"}', FRAME)) == ["data.seed"]


def test_changed_keys_and_their_description() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "gone": True, "digest": "0123456789abcdef0123456789"}
    new = {"a": {"b": 2, "c": [1, 2]}, "new": None, "digest": "fedcba9876543210fedcba9876"}
    assert changed_keys(old, new) == ["a.b", "digest", "gone", "new"]
    text = describe_changes(old, new, limit=3)
    assert text.startswith('a.b: 1 -> 2; digest: "0123456789abc…" -> "fedcba9876543…"; gone: true -> (absent)')
    assert text.endswith(" and 1 more")
    assert changed_keys(old, old) == []
