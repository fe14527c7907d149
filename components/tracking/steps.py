"""The MLflow step tracker of training stages: per-step metrics logged asynchronously, a progress bar.

MLflow's asynchronous logging queues metrics on a background thread, so a slow tracking server never
stalls a training step. It implements components/train/tracking.py's ``StepTracker`` protocol; the
training loop knows only that protocol.
"""

from __future__ import annotations

import time
from collections.abc import Mapping


class MlflowStepTracker:
    """Per-step metrics to the active MLflow run (async) and a tqdm bar with ETA."""

    def __init__(self, total_steps: int, start_step: int, show_progress: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                         disable=not show_progress, dynamic_ncols=True, mininterval=1.0)
        self._last_step = start_step
        self._started = time.perf_counter()

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(dict(metrics), step=step, synchronous=False)
        self._bar.update(step + 1 - self._last_step)
        self._last_step = step + 1
        shown = {k: f"{metrics[k]:.3f}" for k in ("total_loss", "images_per_second") if k in metrics}
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        import mlflow

        self._bar.close()
        flush = getattr(mlflow, "flush_async_logging", None)
        if callable(flush):
            flush()
