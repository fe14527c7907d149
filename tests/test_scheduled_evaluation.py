"""The scheduled champion / challenger flow and the repository's Prefect deployments (prefect.yaml).

The flow runs in-process on Prefect's embedded API inside the test session's state folder
(tests/conftest.py points DINOFLOW_HOME, hence PREFECT_HOME, there), against the real SQLite registry.
"""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path

import pytest
import yaml

from components.evaluate.config import load_evaluate_config
from components.stages.context import make_context
from tests.test_evaluate_promotion import (
    aliases,
    project,
    register_folder,
    save_tiny,
    version_tags,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def deployments() -> dict[str, dict[str, object]]:
    document = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in document["deployments"]}


def test_prefect_yaml_deploys_existing_flows_to_named_pools() -> None:
    from prefect import Flow

    found = deployments()
    assert set(found) == {"pipeline", "scheduled-evaluation"}
    for deployment in found.values():
        path, function = str(deployment["entrypoint"]).split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, function), Flow), deployment["entrypoint"]
        pool = deployment["work_pool"]
        assert isinstance(pool, dict) and pool["name"] in ("cpu-pool", "gpu-pool")
    text = (REPO / "prefect.yaml").read_text().lower()
    assert not any(word in text for word in ("password", "secret_key", "token:")), "no secrets in prefect.yaml"


def test_schedule_in_prefect_yaml_matches_params_and_parameters_are_accepted() -> None:
    scheduled = deployments()["scheduled-evaluation"]
    cfg = load_evaluate_config(REPO / "params" / "evaluate.yaml")
    schedules = scheduled["schedules"]
    assert isinstance(schedules, list) and schedules[0]["cron"] == cfg.schedule.cron
    assert schedules[0]["timezone"] == cfg.schedule.timezone
    from flows.scheduled_evaluation import scheduled_evaluation

    parameters = scheduled["parameters"]
    assert isinstance(parameters, dict) and parameters["model_name"] == cfg.schedule.model_name
    scheduled_evaluation.validate_parameters(parameters)  # names and types the flow accepts
    for path in ("params", "project_params"):
        assert (REPO / str(parameters[path])).is_file()


def tiny_params(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {
        "dataset": {"train_per_class": 20, "test_per_class": 10},
        "ks": [5, 20], "cache_dir": str(tmp_path / "features"),
        "linear": {"epochs": 2, "learning_rates": [0.1], "min_steps": 0},
        "logreg": {"c_grid": [1.0], "max_iter": 20, "tol": 1.0e-4},
        "baselines": {"random_init": False, "random_no_layerscale": False, "pixels": False},
        "champion": f"models:/{name}@champion",
        "schedule": {"model_name": name},
    }}))
    return path


@pytest.mark.slow
def test_scheduled_flow_promotes_the_better_challenger(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.scheduled_evaluation import scheduled_evaluation

    project(tmp_path)  # MLflow pointed at the session's registry
    name = f"test-scheduled-{uuid.uuid4().hex[:8]}"
    champion = register_folder(name, save_tiny(tmp_path / "champion", seed=1, dead=True))
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, "champion", champion)
    challenger = register_folder(name, save_tiny(tmp_path / "challenger", seed=2))
    params = tiny_params(tmp_path, name)
    assert make_context().root == REPO  # the flow resolves params/project.yaml in this checkout

    summary = scheduled_evaluation(model_name=name, params=str(params))
    assert summary["decision"] == "promoted"
    assert summary["champion_before"] == champion and summary["champion_after"] == challenger
    assert aliases(name) == {"champion": challenger, "challenger": challenger}
    assert version_tags(name, champion)["promotion.role"] == "champion"

    # A second run: one version behind both aliases, so it is evaluated (from the feature cache) and
    # nothing is decided or moved.
    features = set((tmp_path / "features").iterdir())
    again = scheduled_evaluation(model_name=name, params=str(params))
    assert again["decision"] is None and again["champion_after"] == challenger
    assert set((tmp_path / "features").iterdir()) == features

    import asyncio

    async def artifact_markdown() -> str:
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            wanted = ArtifactFilter(key=ArtifactFilterKey(any_=["promotion"]))
            found = await client.read_artifacts(artifact_filter=wanted)
            return "\n".join(str(a.data) for a in found)

    markdown = asyncio.run(artifact_markdown())
    assert f"`{name}`" in markdown and "decision: **promoted**" in markdown
    assert "paired bootstrap" in markdown and "95% interval" in markdown
