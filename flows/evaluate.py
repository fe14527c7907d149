"""Prefect flow for the ``evaluate`` stage: k-NN and linear probes of a backbone against its baselines."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.evaluate.report import stage_table, stage_verdict
from flows.common import with_alias
from flows.stage_task import io_stage_task


def evaluation_markdown(outputs: dict[str, object]) -> str:
    version = f" (registry version {outputs['model_version']})" if outputs["model_version"] else ""
    metrics, champion = outputs["metrics"], outputs.get("champion")
    assert isinstance(metrics, dict)
    champion_metrics = champion["metrics"] if isinstance(champion, dict) else None
    against = f" Champion: version {champion['version']}." if isinstance(champion, dict) else ""
    sentence = stage_verdict(metrics)
    verdict = "" if sentence is None else f"\n{sentence}\n"
    return (f"## Evaluation of `{outputs['model']}`{version}\n\nFashion-MNIST subset; MLflow run "
            f"`{outputs['mlflow_run_id']}`.{against}\n\n" + stage_table(metrics, champion_metrics) + "\n"
            + verdict)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: str = "params/evaluate.yaml", project_params: str = "params/project.yaml",
                  model: str | None = None, overrides: list[str] | None = None) -> dict[str, object]:
    """Evaluate the configured (or given) model; ``model`` is short for ``overrides=["model=..."]``.

    Retried with backoff (registry downloads, dataset fetch); extracted features are cached, so a retry
    recomputes little."""
    logger = get_run_logger()
    overrides = with_alias(overrides, "model", model)
    outputs = io_stage_task.with_options(name="evaluate")("evaluate", params, project_params, overrides)
    metrics = outputs["metrics"]
    assert isinstance(metrics, dict)
    logger.info("evaluate %s: k-NN top-1 (k=20) %s", outputs["model"], metrics.get("knn_top1_k20"))
    create_markdown_artifact(key="evaluate", description="Frozen-backbone evaluation on Fashion-MNIST",
                             markdown=evaluation_markdown(outputs))
    return outputs
