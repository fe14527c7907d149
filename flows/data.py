"""Prefect flow for the ``data`` stage: the demo image pool."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import markdown_table
from flows.stage_task import io_stage_task


@flow(name="data", log_prints=True)
def data_flow(params: str = "params/data.yaml", project_params: str = "params/project.yaml",
              overrides: list[str] | None = None) -> dict[str, object]:
    logger = get_run_logger()
    outputs = io_stage_task.with_options(name="build-demo-pool", retries=3)("data", params, project_params, overrides)
    counts = outputs["counts"]
    assert isinstance(counts, dict)
    logger.info("demo pool: %s images, labels at %s", counts.get("total"), outputs["labels_uri"])
    create_markdown_artifact(
        key="demo-pool",
        markdown="## Demo pool\n\n" + markdown_table(counts, "images", "count")
        + f"\n\nLabels table: `{outputs['labels_uri']}`\n",
        description="Images written by the data stage",
    )
    return outputs
