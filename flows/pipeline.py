"""The whole pipeline as one Prefect flow: each stage runs as a sub-flow, in order.

Stages are added here as they land (curate, pretrain, distill, evaluate); each is the same
function the DVC stage command calls.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.data import data_flow
from flows.evaluate import evaluate_flow
from flows.pretrain import pretrain_flow

STAGES = ("data", "pretrain", "evaluate")


@flow(name="pipeline", log_prints=True)
def pipeline_flow(project_params: str = "params/project.yaml") -> dict[str, object]:
    logger = get_run_logger()
    results: dict[str, object] = {}
    results["data"] = data_flow(params="params/data.yaml", project_params=project_params)
    results["pretrain"] = pretrain_flow(params="params/pretrain.yaml", project_params=project_params)
    results["evaluate"] = evaluate_flow(params="params/evaluate.yaml", project_params=project_params)
    logger.info("pipeline finished stages: %s", ", ".join(results))
    return results
