"""Scheduled champion / challenger evaluation: evaluate both aliases, apply the promotion policy.

Run once: ``dinoflow promote``. Serve on the params' cron schedule from this machine (a long-running
process; Ctrl-C stops it): ``dinoflow promote --serve``. Deploy to a work pool instead:
``prefect deploy --name scheduled-evaluation`` with the repository's prefect.yaml.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.evaluate.report import stage_table
from components.stages.context import make_context
from components.stages.evaluate import EvaluationFailed, load_evaluate_config, run_promotion
from flows.common import prefect_tags

FLOW_NAME = "scheduled-evaluation"


@task(log_prints=True)
def promotion_task(model_name: str, params: str, project_params: str,
                   overrides: list[str] | None = None) -> dict[str, object]:
    """One champion / challenger round; returns the decision and numbers, not features."""
    context = make_context(project_params, extra_tags=prefect_tags())
    cfg = load_evaluate_config(context.root / params, overrides or [])
    return run_promotion(context, cfg, model_name).summary()


def decision_markdown(summary: dict[str, object]) -> str:
    """The round as markdown: versions, the decision with its reasons, challenger vs champion."""
    metrics = summary["metrics"]
    reasons = summary["reasons"]
    assert isinstance(metrics, dict) and isinstance(reasons, list)
    lines = [f"## Champion / challenger: `{summary['model_name']}`", "",
             f"- champion before: {summary['champion_before'] or 'none'}",
             f"- challenger: {summary['challenger'] or 'none'}",
             f"- decision: **{summary['decision'] or 'nothing to compare'}**",
             f"- champion after: {summary['champion_after'] or 'none'}"]
    interval = summary.get("interval")
    if isinstance(interval, dict):
        lines.append(f"- primary metric improvement: {interval['delta']:+.4f}, "
                     f"{100 * interval['confidence']:.0f}% interval {interval['ci_low']:+.4f} to "
                     f"{interval['ci_high']:+.4f} (paired bootstrap, {int(interval['n_queries']):,} queries, "
                     f"{int(interval['n_resamples']):,} resamples)")
    lines.append("")
    lines += [f"- {reason}" for reason in reasons]
    if "challenger" in metrics:
        lines += ["", stage_table(metrics["challenger"], metrics.get("champion"))]
    elif "champion" in metrics:
        lines += ["", stage_table(metrics["champion"])]
    return "\n".join(lines) + "\n"


@flow(name=FLOW_NAME, log_prints=True)
def scheduled_evaluation(model_name: str = "dinoflow-backbone", params: str = "params/evaluate.yaml",
                         project_params: str = "params/project.yaml",
                         overrides: list[str] | None = None) -> dict[str, object]:
    """Evaluate the ``champion`` and ``challenger`` versions of ``model_name`` (an absent alias is
    skipped; features come from the cache when the weights were seen before), apply the promotion
    policy of ``params`` (section ``evaluate.promotion``) and report the decision as an artifact.
    A failed evaluation fails the run and moves no alias."""
    logger = get_run_logger()
    try:
        summary = promotion_task(model_name, params, project_params, overrides)
    except EvaluationFailed as exc:
        create_markdown_artifact(key="promotion", description="Champion / challenger decision",
                                 markdown=f"## Champion / challenger: `{model_name}`\n\n**evaluation failed**: "
                                 f"{exc}\n\nNo alias was moved; the version is tagged "
                                 "`promotion.decision=evaluation_failed`.\n")
        raise
    logger.info("%s: decision %s, champion %s -> %s", model_name, summary["decision"],
                summary["champion_before"], summary["champion_after"])
    create_markdown_artifact(key="promotion", description="Champion / challenger decision",
                             markdown=decision_markdown(summary))
    return summary


def serve(params: str = "params/evaluate.yaml", project_params: str = "params/project.yaml",
          overrides: list[str] | None = None) -> None:
    """Serve the flow from this process on the cron of ``params`` (``evaluate.schedule``), against the
    configured Prefect API (the embedded, project-local one unless PREFECT_API_URL is set)."""
    cfg = load_evaluate_config(make_context(project_params).root / params, overrides or [])
    schedule = cfg.schedule
    scheduled_evaluation.serve(
        name=schedule.deployment, cron=schedule.cron,
        parameters={"model_name": schedule.model_name, "params": params, "project_params": project_params,
                    "overrides": overrides or []},
        tags=["dinoflow", "evaluation"],
        description="Nightly champion / challenger evaluation and promotion of the registered backbone",
    )
