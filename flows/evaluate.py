"""Prefect flow for the ``evaluate`` stage: k-NN and linear probes of a backbone against its baselines."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from components.stages.context import make_context
from components.stages.evaluate import EvaluateOutputs, load_evaluate_config, run_evaluate
from flows.common import prefect_tags

BASELINES = ("random_init", "random_no_layerscale", "pixels")


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), log_prints=True)
def evaluate_task(params: str, project_params: str, model: str | None) -> dict[str, object]:
    """Evaluate the configured (or given) model; returns metrics and ids, not features.

    Retried with backoff (registry downloads, dataset fetch); extracted features are cached, so a retry
    recomputes little."""
    context = make_context(project_params, extra_tags=prefect_tags())
    cfg = load_evaluate_config(context.root / params)
    if model:
        cfg.model = model
    out = run_evaluate(context, cfg)
    return evaluation_summary(out)


def evaluation_summary(out: EvaluateOutputs) -> dict[str, object]:
    """What a flow returns and reports: metrics and ids (no features), the champion's numbers if any."""
    champion = None if out.champion is None else {"version": out.champion.version, "metrics": out.champion.metrics}
    return {"model": out.model.uri, "model_version": out.model.version, "mlflow_run_id": out.run_id,
            "metrics_path": str(out.metrics_path), "metrics": out.metrics, "champion": champion}


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
    return (f"## Evaluation of `{outputs['model']}`{version}\n\nFashion-MNIST subset; MLflow run "
            f"`{outputs['mlflow_run_id']}`.{against}\n\n" + comparison_table(metrics, champion_metrics) + "\n")


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: str = "params/evaluate.yaml", project_params: str = "params/project.yaml",
                  model: str | None = None) -> dict[str, object]:
    logger = get_run_logger()
    outputs = evaluate_task(params, project_params, model)
    metrics = outputs["metrics"]
    assert isinstance(metrics, dict)
    logger.info("evaluate %s: k-NN top-1 (k=20) %s", outputs["model"], metrics.get("knn_top1_k20"))
    create_markdown_artifact(key="evaluate", description="Frozen-backbone evaluation on Fashion-MNIST",
                             markdown=evaluation_markdown(outputs))
    return outputs
