"""The whole pipeline as one Prefect flow: each stage runs as a sub-flow, in the catalog's order.

The order is components/stages/catalog.py's ``STAGES`` (dvc.yaml agrees; a test checks it). Each
stage is the same components function its DVC stage command calls. One MLflow parent run
("pipeline") groups the stage runs: they become its children through DINOFLOW_PARENT_RUN_ID, and the
parent carries the Prefect flow-run id, the code version and, at the end, each stage's outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.stages.catalog import STAGES
from components.stages.context import make_context
from components.tracking import pipeline_run
from flows.common import markdown_table, mlflow_run_url, prefect_tags
from flows.curate import curate_flow
from flows.data import data_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.pretrain import pretrain_flow

StageFlow = Callable[..., dict[str, object]]

# The Prefect flow of each catalog stage (tests/test_stage_catalog.py checks every stage has one).
STAGE_FLOWS: dict[str, StageFlow] = {"data": data_flow, "curate": curate_flow, "pretrain": pretrain_flow,
                                     "distill": distill_flow, "evaluate": evaluate_flow}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(project_params: str = "params/project.yaml") -> dict[str, object]:
    logger = get_run_logger()
    context = make_context(project_params, extra_tags=prefect_tags())
    results: dict[str, object] = {}
    with pipeline_run(context.tracking, context.tags) as parent_run_id:
        for stage in STAGES:
            results[stage.name] = STAGE_FLOWS[stage.name](params=stage.params, project_params=project_params)
        results["mlflow_parent_run_id"] = parent_run_id
    names = [stage.name for stage in STAGES]
    logger.info("pipeline finished stages: %s (MLflow parent run %s)", ", ".join(names), parent_run_id)
    create_markdown_artifact(
        key="pipeline", description="Pipeline run",
        markdown="## Pipeline\n\n" + markdown_table({n: "done" for n in names}, "stage", "status")
        + f"\n\nMLflow parent run (a child run per stage): [{parent_run_id}]({mlflow_run_url(parent_run_id)})\n",
    )
    return results
