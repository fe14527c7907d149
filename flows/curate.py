"""Prefect flow for the ``curate`` stage: raw pool -> curated manifest, rejects, stats and pictures."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.stages.curate import curate_markdown
from flows.stage_task import io_stage_task


@flow(name="curate", log_prints=True)
def curate_flow(params: str = "params/curate.yaml", project_params: str = "params/project.yaml",
                overrides: list[str] | None = None) -> dict[str, object]:
    logger = get_run_logger()
    outputs = io_stage_task.with_options(name="curate")("curate", params, project_params, overrides)
    stats = outputs["stats"]
    pictures = outputs["pictures"]
    assert isinstance(stats, dict) and isinstance(pictures, dict)
    logger.info("curate: %s images in the manifest, %s rejected", stats["steps"]["manifest"], stats["rejected"])
    markdown = curate_markdown(stats, {name: Path(str(path)) for name, path in pictures.items()})
    markdown += f"\nManifest: `{outputs['manifest']}`; rejects: `{outputs['rejects']}`; " \
                f"MLflow run `{outputs['mlflow_run_id']}` (artifacts under `curate/`).\n"
    create_markdown_artifact(key="curate", description="Curation run", markdown=markdown)
    return outputs
