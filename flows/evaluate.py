"""Prefect flow for the ``evaluate`` stage: k-NN and linear probes of a backbone against its baselines."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.evaluate.report import HEADLINE_METRIC, baseline_verdict
from flows.common import with_alias
from flows.stage_task import io_stage_task

BASELINES = ("random_init", "random_no_layerscale", "pixels")


def comparison_table(metrics: dict[str, float], champion: dict[str, float] | None = None) -> str:
    """One row per metric, one column for the model, each baseline present and the champion if given."""
    columns = ["model", *[b for b in BASELINES if any(k.startswith(f"{b}.") for k in metrics)]]
    lookup = {**metrics, **{f"champion.{k}": v for k, v in (champion or {}).items()}}
    if champion:
        columns.append("champion")
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in (k for k in metrics if "." not in k):
        cells = [lookup.get(key if c == "model" else f"{c}.{key}") for c in columns]
        lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def evaluation_markdown(outputs: dict[str, object]) -> str:
    version = f" (registry version {outputs['model_version']})" if outputs["model_version"] else ""
    metrics, champion = outputs["metrics"], outputs.get("champion")
    assert isinstance(metrics, dict)
    champion_metrics = champion["metrics"] if isinstance(champion, dict) else None
    against = f" Champion: version {champion['version']}." if isinstance(champion, dict) else ""
    headline = metrics.get(HEADLINE_METRIC)
    verdict = "" if headline is None else "\n" + baseline_verdict(headline, {
        b: metrics[f"{b}.{HEADLINE_METRIC}"] for b in BASELINES if f"{b}.{HEADLINE_METRIC}" in metrics}) + "\n"
    return (f"## Evaluation of `{outputs['model']}`{version}\n\nFashion-MNIST subset; MLflow run "
            f"`{outputs['mlflow_run_id']}`.{against}\n\n" + comparison_table(metrics, champion_metrics) + "\n"
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
