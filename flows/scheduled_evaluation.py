"""Scheduled champion / challenger evaluation: evaluate both aliases, apply the promotion policy.

Run once: ``python -m flows.scheduled_evaluation --once``. Serve on the params' cron schedule from this
machine (a long-running process; Ctrl-C stops it): ``python -m flows.scheduled_evaluation``. Deploy to a
work pool instead: ``prefect deploy --name scheduled-evaluation`` with the repository's prefect.yaml.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.evaluate.config import load_evaluate_config
from components.stages.context import make_context
from components.stages.evaluate import EvaluationFailed, run_promotion
from flows.common import prefect_tags
from flows.evaluate import comparison_table

FLOW_NAME = "scheduled-evaluation"


@task(log_prints=True)
def promotion_task(model_name: str, params: str, project_params: str) -> dict[str, object]:
    """One champion / challenger round; returns the decision and numbers, not features."""
    context = make_context(project_params, extra_tags=prefect_tags())
    cfg = load_evaluate_config(context.root / params)
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
             f"- champion after: {summary['champion_after'] or 'none'}", ""]
    lines += [f"- {reason}" for reason in reasons]
    if "challenger" in metrics:
        lines += ["", comparison_table(metrics["challenger"], metrics.get("champion"))]
    elif "champion" in metrics:
        lines += ["", comparison_table(metrics["champion"])]
    return "\n".join(lines) + "\n"


@flow(name=FLOW_NAME, log_prints=True)
def scheduled_evaluation(model_name: str = "dinoflow-backbone", params: str = "params/evaluate.yaml",
                         project_params: str = "params/project.yaml") -> dict[str, object]:
    """Evaluate the ``champion`` and ``challenger`` versions of ``model_name`` (an absent alias is
    skipped; features come from the cache when the weights were seen before), apply the promotion
    policy of ``params`` (section ``evaluate.promotion``) and report the decision as an artifact.
    A failed evaluation fails the run and moves no alias."""
    logger = get_run_logger()
    try:
        summary = promotion_task(model_name, params, project_params)
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


def serve(params: str = "params/evaluate.yaml", project_params: str = "params/project.yaml") -> None:
    """Serve the flow from this process on the cron of ``params`` (``evaluate.schedule``), against the
    configured Prefect API (the embedded, project-local one unless PREFECT_API_URL is set)."""
    cfg = load_evaluate_config(make_context(project_params).root / params)
    schedule = cfg.schedule
    scheduled_evaluation.serve(
        name=schedule.deployment, cron=schedule.cron,
        parameters={"model_name": schedule.model_name, "params": params, "project_params": project_params},
        tags=["dinoflow", "evaluation"],
        description="Nightly champion / challenger evaluation and promotion of the registered backbone",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params/evaluate.yaml")
    parser.add_argument("--project", default="params/project.yaml")
    parser.add_argument("--model-name", default=None, help="registered model (default: evaluate.schedule.model_name)")
    parser.add_argument("--once", action="store_true", help="run one round now instead of serving the schedule")
    args = parser.parse_args(argv)
    if args.once:
        cfg = load_evaluate_config(make_context(args.project).root / args.params)
        name = args.model_name or cfg.schedule.model_name
        scheduled_evaluation(model_name=name, params=args.params, project_params=args.project)
    else:
        serve(args.params, args.project)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
