"""Prefect flow for the ``curate`` stage: raw pool -> curated manifest, rejects, stats and pictures."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from components.stages.context import make_context
from components.stages.curate import curate_markdown, load_curate_config, run_curate
from flows.common import prefect_tags


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), log_prints=True)
def curate_task(params: str, project_params: str) -> dict[str, object]:
    """Curate (continuing an interrupted run from its last complete step); returns paths and counts.

    Retried with backoff: pool listing and reads are I/O, and a retry continues from the last complete step."""
    context = make_context(project_params, extra_tags=prefect_tags())
    outputs = run_curate(context, load_curate_config(context.root / params))
    return {"manifest": str(outputs.manifest_path), "rejects": str(outputs.rejects_path),
            "stats_path": str(outputs.stats_path), "report": str(outputs.report_path),
            "pictures": {name: str(path) for name, path in outputs.pictures.items()},
            "mlflow_run_id": outputs.run_id, "stats": outputs.stats}


@flow(name="curate", log_prints=True)
def curate_flow(params: str = "params/curate.yaml", project_params: str = "params/project.yaml"
                ) -> dict[str, object]:
    logger = get_run_logger()
    outputs = curate_task(params, project_params)
    stats = outputs["stats"]
    pictures = outputs["pictures"]
    assert isinstance(stats, dict) and isinstance(pictures, dict)
    logger.info("curate: %s images in the manifest, %s rejected", stats["steps"]["manifest"], stats["rejected"])
    markdown = curate_markdown(stats, {name: Path(str(path)) for name, path in pictures.items()})
    markdown += f"\nManifest: `{outputs['manifest']}`; rejects: `{outputs['rejects']}`; " \
                f"MLflow run `{outputs['mlflow_run_id']}` (artifacts under `curate/`).\n"
    create_markdown_artifact(key="curate", description="Curation run", markdown=markdown)
    return outputs
