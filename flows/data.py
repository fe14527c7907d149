"""Prefect flow for the ``data`` stage: the demo image pool."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from components.stages.context import make_context
from components.stages.data import load_data_config, run_data
from flows.common import markdown_table, prefect_tags


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), log_prints=True)
def build_demo_pool(params: str, project_params: str) -> dict[str, object]:
    """Write the pool (I/O against the object store, retried with backoff); returns paths, not data."""
    context = make_context(project_params, extra_tags=prefect_tags())
    result = run_data(context, load_data_config(context.root / params))
    return {"manifest": str(result.manifest_path), "labels_uri": result.labels_uri, "counts": result.counts}


@flow(name="data", log_prints=True)
def data_flow(params: str = "params/data.yaml", project_params: str = "params/project.yaml") -> dict[str, object]:
    logger = get_run_logger()
    outputs = build_demo_pool(params, project_params)
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
