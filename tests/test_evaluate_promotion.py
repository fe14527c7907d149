"""Champion / challenger: the policy's decisions, and rounds against a real SQLite MLflow registry.

Backbones are tiny real ViTs saved with save_backbone and registered the way the pretrain stage does.
A "worse" backbone has its final LayerNorm zeroed: every feature is 0, so every protocol predicts one
class and scores exactly chance (0.1 on the balanced test subset); an untrained ViT scores well above.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from components.evaluate.config import EvaluateConfig, LinearConfig, LogregConfig
from components.evaluate.promotion import PromotionPolicy, decide
from components.models import BackboneConfig, build_backbone
from components.models.export import save_backbone
from components.registry.promotion import apply_decision, champion_metrics, metrics_from_tags
from components.registry.publish import register_backbone as register
from components.stages.context import StageContext, make_context
from components.stages.evaluate import EvaluationFailed, run_evaluate, run_promotion
from components.tracking.mlflow_setup import configure

# LayerScale off: an untrained ViT then gives distinct features (k-NN well above chance), a dead one exactly chance.
ARCH = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, layerscale_init=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# ---------------------------------------------------------------- the policy alone


def test_no_champion_promotes_the_challenger() -> None:
    decision = decide(None, {"knn_top1_k20": 0.3})
    assert decision.promote and decision.primary_delta is None and "no champion" in decision.reasons[0]


def test_better_challenger_is_promoted_and_worse_is_not() -> None:
    champion = {"knn_top1_k20": 0.40, "linear_top1": 0.50}
    better = decide(champion, {"knn_top1_k20": 0.41, "linear_top1": 0.495})
    assert better.promote and better.primary_delta == pytest.approx(0.01)
    assert better.numbers["improvement.linear_top1"] == pytest.approx(-0.005)  # within the allowed 0.01
    slightly = decide(champion, {"knn_top1_k20": 0.404, "linear_top1": 0.6})  # +0.004 < min_improvement 0.005
    assert not slightly.promote and slightly.primary_delta == pytest.approx(0.004)
    worse = decide(champion, {"knn_top1_k20": 0.30, "linear_top1": 0.6})
    assert not worse.promote and worse.label == "rejected"


def test_guarded_metric_regression_blocks_promotion() -> None:
    policy = PromotionPolicy(guarded_metrics={"linear_top1": 0.01, "logreg_top1": 0.02})
    champion = {"knn_top1_k20": 0.40, "linear_top1": 0.50, "logreg_top1": 0.5}
    blocked = decide(champion, {"knn_top1_k20": 0.50, "linear_top1": 0.48, "logreg_top1": 0.5}, policy)
    assert not blocked.promote
    assert any("linear_top1: regression 0.0200 exceeds" in reason for reason in blocked.reasons)
    missing = decide(champion, {"knn_top1_k20": 0.50, "linear_top1": 0.50}, policy)  # logreg not measured
    assert missing.promote and any("logreg_top1: not compared" in reason for reason in missing.reasons)


def test_lower_is_better_metrics_count_a_drop_as_improvement() -> None:
    policy = PromotionPolicy(primary_metric="depth_rmse", min_improvement=0.01, guarded_metrics={})
    assert decide({"depth_rmse": 0.50}, {"depth_rmse": 0.45}, policy).promote
    assert not decide({"depth_rmse": 0.50}, {"depth_rmse": 0.55}, policy).promote
    assert decide({"depth_rmse": 0.50}, {"depth_rmse": 0.45}, policy).primary_delta == pytest.approx(0.05)


def test_policy_validation() -> None:
    for bad in (PromotionPolicy(min_improvement=-0.1), PromotionPolicy(guarded_metrics={"linear_top1": -1.0}),
                PromotionPolicy(champion_alias="same", challenger_alias="same"), PromotionPolicy(primary_metric="")):
        with pytest.raises(ValueError):
            bad.validate()
    assert not decide({"knn_top1_k20": 0.1}, {"linear_top1": 0.9}).promote  # no primary on the challenger


# ---------------------------------------------------------------- against a real registry


def tiny_config(tmp_path: Path, name: str) -> EvaluateConfig:
    cfg = EvaluateConfig(ks=[5, 20], cache_dir=str(tmp_path / "features"),
                         metrics_path=str(tmp_path / "metrics" / "eval.json"),
                         plots_path=str(tmp_path / "metrics" / "sweep.json"),
                         linear=LinearConfig(epochs=2, learning_rates=[0.1], min_steps=0),
                         logreg=LogregConfig(c_grid=[1.0], max_iter=20, tol=1e-4),
                         champion=f"models:/{name}@champion")
    cfg.dataset.train_per_class, cfg.dataset.test_per_class = 20, 10
    cfg.baselines.random_init = cfg.baselines.pixels = cfg.baselines.random_no_layerscale = False
    cfg.schedule.model_name = name
    cfg.promotion.queries_per_class = 10  # 100 validation queries: the test models differ by far more than its CI
    return cfg


def project(tmp_path: Path) -> StageContext:
    (tmp_path / "pyproject.toml").write_text("")
    context = make_context(root=tmp_path)
    configure(context.tracking)
    return context


def save_tiny(folder: Path, seed: int, dead: bool = False) -> Path:
    """An untrained pico ViT; ``dead``: final norm zeroed, so every feature is exactly 0."""
    torch.manual_seed(seed)
    model = build_backbone(ARCH)
    if dead:
        with torch.no_grad():
            model.norm.weight.zero_()
            model.norm.bias.zero_()
    return save_backbone(model, ARCH, folder)


def register_folder(name: str, folder: Path) -> str:
    """As the pretrain stage does: the folder as run artifacts, a new version, alias challenger."""
    import mlflow

    with mlflow.start_run(run_name="fake-pretrain") as run:
        mlflow.log_artifacts(str(folder), artifact_path="backbone")
    return register(name, run.info.run_id)


def aliases(name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {alias: str(version) for alias, version in MlflowClient().get_registered_model(name).aliases.items()}


def version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, version).tags)


@pytest.mark.slow
def test_rounds_promote_better_keep_champion_against_worse_and_reuse_features(tmp_path: Path) -> None:
    context = project(tmp_path)
    name = f"test-promotion-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, name)

    # Round 1: a chance-level first version and no champion: it becomes champion anyway.
    v1 = register_folder(name, save_tiny(tmp_path / "v1", seed=1, dead=True))
    first = run_promotion(context, cfg)
    assert first.decision is not None and first.decision.promote and first.champion_version is None
    assert aliases(name) == {"champion": v1, "challenger": v1}
    assert first.evaluations["challenger"].metrics["knn_top1_k20"] == pytest.approx(0.1)
    assert version_tags(name, v1)["promotion.decision"] == "promoted"

    # Round 2: an untrained ViT beats the dead one: promoted; both versions carry the decision.
    v2 = register_folder(name, save_tiny(tmp_path / "v2", seed=2))
    second = run_promotion(context, cfg)
    assert second.decision is not None and second.decision.promote
    assert aliases(name) == {"champion": v2, "challenger": v2}
    delta = float(version_tags(name, v2)["promotion.primary_delta"])
    assert delta == pytest.approx(second.evaluations["challenger"].metrics["knn_top1_k20"] - 0.1, abs=1e-6)
    assert delta >= cfg.promotion.min_improvement
    interval = second.summary()["interval"]  # the promotion cleared the margin with its lower bound
    assert isinstance(interval, dict) and interval["n_queries"] == 100 and interval["ci_low"] >= 0.005
    assert interval["delta"] == pytest.approx(delta, abs=1e-6)
    for version, role in ((v1, "champion"), (v2, "challenger")):
        tags = version_tags(name, version)
        assert tags["promotion.role"] == role and tags["promotion.challenger_version"] == v2
        assert tags["promotion.champion_version"] == v1 and tags["promotion.decision"] == "promoted"
    # The challenger's report showed the champion's numbers beside its own.
    shown = second.evaluations["challenger"].champion
    assert shown is not None and shown.version == v1 and shown.metrics["knn_top1_k20"] == pytest.approx(0.1)

    # Round 3: a worse challenger is rejected; v2 stays champion; v2's features came from the cache.
    cached = set((tmp_path / "features").iterdir())
    v3 = register_folder(name, save_tiny(tmp_path / "v3", seed=3, dead=True))
    third = run_promotion(context, cfg)
    assert third.decision is not None and not third.decision.promote
    assert aliases(name) == {"champion": v2, "challenger": v3}
    assert version_tags(name, v3)["promotion.decision"] == "rejected"
    summary = third.summary()
    assert summary["decision"] == "rejected" and summary["champion_after"] == v2 and summary["challenger"] == v3
    assert third.evaluations["champion"].metrics == pytest.approx(second.evaluations["challenger"].metrics)
    assert len(set((tmp_path / "features").iterdir()) - cached) == 4  # only v3's train + test (.npy + .json)


@pytest.mark.slow
def test_failed_evaluation_moves_no_alias_and_is_recorded(tmp_path: Path) -> None:
    context = project(tmp_path)
    name = f"test-promotion-fail-{uuid.uuid4().hex[:8]}"
    good = register_folder(name, save_tiny(tmp_path / "good", seed=4))
    run_promotion(context, tiny_config(tmp_path, name))
    assert aliases(name)["champion"] == good
    corrupt = save_tiny(tmp_path / "corrupt", seed=5)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    bad = register_folder(name, corrupt)
    with pytest.raises(EvaluationFailed, match=f"challenger \\(version {bad}\\)"):
        run_promotion(context, tiny_config(tmp_path, name))
    assert aliases(name) == {"champion": good, "challenger": bad}
    tags = version_tags(name, bad)
    assert tags["promotion.decision"] == "evaluation_failed" and tags["promotion.role"] == "challenger"
    assert tags["promotion.error"]
    assert version_tags(name, good)["promotion.decision"] == "promoted"  # the champion's own record is untouched


def test_apply_decision_moves_the_alias_only_when_promoting(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project(tmp_path)
    client = MlflowClient()
    name = f"test-apply-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    champion, challenger = (str(client.create_model_version(name, f"file:///nowhere/{i}").version) for i in (1, 2))
    client.set_registered_model_alias(name, "champion", champion)
    blocked = decide({"knn_top1_k20": 0.4, "linear_top1": 0.5}, {"knn_top1_k20": 0.5, "linear_top1": 0.4})
    apply_decision(client, name, blocked, champion, challenger)
    assert aliases(name) == {"champion": champion}
    for version in (champion, challenger):
        tags = version_tags(name, version)
        assert tags["promotion.decision"] == "rejected"
        assert float(tags["promotion.improvement.linear_top1"]) == pytest.approx(-0.1)
        assert float(tags["promotion.primary_delta"]) == pytest.approx(0.1)
    promoted = decide({"knn_top1_k20": 0.4}, {"knn_top1_k20": 0.5})
    apply_decision(client, name, promoted, champion, challenger)
    assert aliases(name) == {"champion": challenger}


def test_champion_metrics_read_back_from_eval_tags(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project(tmp_path)
    client = MlflowClient()
    name = f"test-champion-{uuid.uuid4().hex[:8]}"
    assert champion_metrics(client, name) is None  # no such model
    client.create_registered_model(name)
    version = str(client.create_model_version(name, "file:///nowhere").version)
    client.set_registered_model_alias(name, "champion", version)
    assert champion_metrics(client, name) is None  # never evaluated
    for key, value in {"eval.knn_top1_k20": "0.412000", "eval.run_id": "abc", "eval.note": "n/a"}.items():
        client.set_model_version_tag(name, version, key, value)
    found = champion_metrics(client, name)
    assert found is not None and found.version == version and found.run_id == "abc"
    assert found.metrics == {"knn_top1_k20": 0.412}
    assert champion_metrics(client, name, exclude_version=version) is None  # the model is the champion itself
    assert metrics_from_tags({"eval.a": "1", "other.b": "2"}) == {"a": 1.0}


@pytest.mark.slow
def test_evaluating_a_folder_shows_the_champion_column(tmp_path: Path) -> None:
    from flows.evaluate import evaluation_markdown

    context = project(tmp_path)
    name = f"test-column-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, name)
    register_folder(name, save_tiny(tmp_path / "champ", seed=6, dead=True))
    run_promotion(context, cfg)  # evaluated and promoted: eval.* tags on the champion
    cfg.model = str(save_tiny(tmp_path / "candidate", seed=7))
    outputs = run_evaluate(context, cfg)
    assert outputs.champion is not None and outputs.champion.metrics["knn_top1_k20"] == pytest.approx(0.1)
    markdown = evaluation_markdown(outputs.summary())
    assert "| metric | model | champion |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| knn_top1_k20 |"))
    assert row.endswith("| 0.1000 |")
