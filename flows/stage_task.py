"""The one Prefect task every stage flow runs: ``components.stages.catalog.run_stage`` -> its summary."""

from __future__ import annotations

from prefect import task
from prefect.tasks import exponential_backoff

from components.stages.catalog import run_stage
from flows.common import prefect_tags


def stage_summary(name: str, params: str, project_params: str, overrides: list[str] | None) -> dict[str, object]:
    """Run one stage with the flow run's ids as MLflow tags; returns its summary (paths, ids, numbers)."""
    return run_stage(name, params, project_params, overrides or [], extra_tags=prefect_tags()).summary()


# I/O-bound stages (object store, registry downloads, dataset fetch) retry with backoff; each continues
# from its last complete step, so a retry redoes little. Training stages resume from their checkpoints
# when rerun, and are not retried inside one flow run (a crash there is worth a look first).
io_stage_task = task(stage_summary, name="stage", retries=2,
                     retry_delay_seconds=exponential_backoff(backoff_factor=2), log_prints=True)
training_stage_task = task(stage_summary, name="stage", log_prints=True)
