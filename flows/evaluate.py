"""Prefect flow for the ``evaluate`` stage: k-NN and linear probes of a backbone against its baselines."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.stages.context import make_context
from components.stages.evaluate import load_evaluate_config, run_evaluate
from flows.common import prefect_tags

BASELINES = ("random_init", "pixels")


@task(log_prints=True)
def evaluate_task(params: str, project_params: str, model: str | None) -> dict[str, object]:
    """Evaluate the configured (or given) model; returns metrics and ids, not features."""
    context = make_context(project_params, extra_tags=prefect_tags())
    cfg = load_evaluate_config(context.root / params)
    if model:
        cfg.model = model
    out = run_evaluate(context, cfg)
    return {"model": out.model.uri, "model_version": out.model.version, "mlflow_run_id": out.run_id,
            "metrics_path": str(out.metrics_path), "metrics": out.metrics}


def comparison_table(metrics: dict[str, float]) -> str:
    """One row per metric, one column for the model and each baseline present."""
    columns = ["model", *[b for b in BASELINES if any(k.startswith(f"{b}.") for k in metrics)]]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in (k for k in metrics if "." not in k):
        cells = [metrics.get(key if c == "model" else f"{c}.{key}") for c in columns]
        lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: str = "params/evaluate.yaml", project_params: str = "params/project.yaml",
                  model: str | None = None) -> dict[str, object]:
    logger = get_run_logger()
    outputs = evaluate_task(params, project_params, model)
    metrics = outputs["metrics"]
    assert isinstance(metrics, dict)
    logger.info("evaluate %s: k-NN top-1 (k=20) %s", outputs["model"], metrics.get("knn_top1_k20"))
    version = f" (registry version {outputs['model_version']})" if outputs["model_version"] else ""
    create_markdown_artifact(
        key="evaluate", description="Frozen-backbone evaluation on Fashion-MNIST",
        markdown=f"## Evaluation of `{outputs['model']}`{version}\n\nFashion-MNIST subset; MLflow run "
        f"`{outputs['mlflow_run_id']}`.\n\n" + comparison_table(metrics) + "\n",
    )
    return outputs
