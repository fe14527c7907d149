"""Manifests as MLflow dataset inputs: a run says which exact table of images it read or wrote.

The digest is the md5 of the parquet file's bytes, the same hash DVC records for the file, so an
MLflow run, ``dvc.lock`` and ``dinoflow models show`` agree on one data version.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from components.tracking.lineage import file_digest


def log_manifest_input(path: Path, name: str, context: str = "training") -> str:
    """Log ``path`` (a parquet manifest) as an input of the active MLflow run; returns its digest.

    ``context`` is MLflow's input tag (``training``, ``evaluation``, ``curated-output``, ...).
    The table's schema and row count travel with it; the rows themselves stay in the manifest.
    """
    import mlflow
    import polars as pl
    from mlflow.data.polars_dataset import from_polars

    digest = file_digest(path)
    frame = pl.read_parquet(path)
    with warnings.catch_warnings():  # MLflow registers two local-file source classes and warns it picked one
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        dataset = from_polars(frame, source=str(path.resolve()), name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    mlflow.set_tags({f"dinoflow.data.{name}.digest": digest, f"dinoflow.data.{name}.rows": str(frame.height),
                     f"dinoflow.data.{name}.path": str(path)})
    return digest
