"""The ``curate`` stage: a raw pool (folder or s3:// prefix) -> a curated manifest, rejects, stats, pictures.

Builds the demo pool with planted truth when ``demo.enabled`` (idempotent), runs (or continues) the
resumable pipeline of components/curation/pipeline.py, writes the outputs atomically, and records one
MLflow run: params, counts per step as metrics (plus precision/recall against the planted truth for
the demo), the stats, report and pictures as artifacts, and the manifest as an MLflow dataset input.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from components.curation.calibration_picture import calibration_picture
from components.curation.config import CurateConfig, load_curate_config
from components.curation.demo_pool import build_curation_demo, score_against_truth
from components.curation.pictures import cluster_grid, duplicate_grid
from components.curation.pipeline import CURATE_REASONS, CurationResult, run_curation
from components.registry.resolve import resolve
from components.stages.context import StageContext
from components.storage import ObjectStore, StoreLocator, open_store, read_uri
from components.storage.atomic import write_parquet_atomic, write_text_atomic
from components.tracking import stage_run
from components.tracking.datasets import log_manifest_input

__all__ = ["CurateOutputs", "curate_markdown", "load_curate_config", "run_curate"]


@dataclass(frozen=True)
class CurateOutputs:
    manifest_path: Path
    rejects_path: Path
    stats_path: Path
    pictures: dict[str, Path]  # name -> PNG
    report_path: Path
    stats: dict[str, Any]
    run_id: str

    def summary(self) -> dict[str, object]:
        """What the CLI prints, the flow returns and its report shows: paths, counts, the MLflow run."""
        return {"manifest": str(self.manifest_path), "rejects": str(self.rejects_path),
                "stats_path": str(self.stats_path), "report": str(self.report_path),
                "pictures": {name: str(path) for name, path in self.pictures.items()},
                "mlflow_run_id": self.run_id, "steps": self.stats["steps"], "stats": self.stats}


def resolved(path: str, root: Path) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def with_demo(cfg: CurateConfig, context: StageContext) -> tuple[CurateConfig, pl.DataFrame | None]:
    """A copy of ``cfg`` pointing at the demo pool (built now if needed), and the planted truth."""
    if not cfg.demo.enabled:
        return cfg, None
    demo = build_curation_demo(cfg.demo, context.store, context.state)
    out = copy.deepcopy(cfg)
    out.ingest.pool = demo.pool_uri
    out.eval_dedup.sets = out.eval_dedup.sets or [demo.eval_uri]
    out.retrieval.seeds = out.retrieval.seeds or demo.seeds_uri
    out.outputs.labels = out.outputs.labels or demo.labels_uri
    return out, demo.truth


def resolve_backbone(cfg: CurateConfig, context: StageContext) -> CurateConfig:
    """A registry URI becomes its downloaded backbone folder, a relative folder an absolute one (inside the
    run, so the registry is the project's); ``pixels:``, ``random:``, ``state_dict:`` stay as they are."""
    model = resolve(cfg.embed.backbone, context.root, context.state / "cache" / "models")
    if model.source.kind not in ("registry", "path"):
        return cfg
    out = copy.deepcopy(cfg)
    out.embed.backbone = str(model.require_backbone_dir())
    return out


def run_curate(context: StageContext, cfg: CurateConfig) -> CurateOutputs:
    import mlflow

    cfg.validate()
    default_work = context.state / "curate" / "work"
    work_dir = resolved(cfg.outputs.work_dir, context.root) if cfg.outputs.work_dir else default_work
    project_store = context.project.store

    def store_opener(uri: str) -> ObjectStore:  # the project's S3 endpoint/region apply to the pool too
        return open_store(uri, endpoint_url=project_store.endpoint_url, region=project_store.region)

    # The configured store's images are recorded by key, other project paths relative to the root: the
    # outputs (work dir included) are DVC outputs and must be the same files in every checkout.
    locator = StoreLocator.for_store(context.store, project=context.root)

    with stage_run(context.tracking, "curate", cfg, tags=context.tags) as run:
        effective, truth = with_demo(cfg, context)
        effective = resolve_backbone(effective, context)
        result = run_curation(effective, work_dir, store_opener, locator)
        stats = dict(result.stats)
        if truth is not None:
            stats["demo"] = score_against_truth(truth, result.ingest_kept, result.rejected, result.manifest)
        paths = write_outputs(result, stats, effective, context.root)
        pictures = draw_pictures(result, effective, resolved(cfg.outputs.pictures, context.root), locator.read)
        report = resolved(cfg.outputs.pictures, context.root) / "report.md"
        # the pictures sit next to the report: named relative to it (a DVC output), not by absolute path
        write_text_atomic(curate_markdown(stats, {name: Path(path.name) for name, path in pictures.items()}), report)
        mlflow.log_metrics(run_metrics(stats))
        mlflow.set_tags({"dinoflow.curate.pool": effective.ingest.pool,
                         "dinoflow.curate.embedder": effective.embed.backbone})
        for path in (paths["stats"], report, *pictures.values()):
            mlflow.log_artifact(str(path), artifact_path="curate")
        # the md5 of the parquet file: the same digest dvc.lock records for the output
        log_manifest_input(paths["manifest"], name="curated-manifest", context="curated-output")
    return CurateOutputs(manifest_path=paths["manifest"], rejects_path=paths["rejects"], stats_path=paths["stats"],
                         pictures=pictures, report_path=report, stats=stats, run_id=run.info.run_id)


def write_outputs(result: CurationResult, stats: dict[str, Any], cfg: CurateConfig, root: Path) -> dict[str, Path]:
    paths = {"manifest": resolved(cfg.outputs.manifest, root), "rejects": resolved(cfg.outputs.rejects, root),
             "stats": resolved(cfg.outputs.stats, root)}
    write_parquet_atomic(result.manifest, paths["manifest"])
    write_parquet_atomic(result.rejected, paths["rejects"])
    # Last: DVC metrics; NaN (a demo metric with nothing to count) is not JSON, so it becomes null.
    write_text_atomic(json.dumps({"curate": json_safe(stats)}, indent=2, sort_keys=True) + "\n", paths["stats"])
    return paths


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def draw_pictures(result: CurationResult, cfg: CurateConfig, folder: Path,
                  read: Callable[[str], bytes] = read_uri) -> dict[str, Path]:
    """The duplicate-groups and cluster grids; ``read`` fetches a ``uri`` of the tables (keys included)."""
    uri_of = dict(zip(result.ingest_kept["id"].to_list(), result.ingest_kept["uri"].to_list(), strict=True))
    out = cfg.outputs
    groups = [(f"{len(removed) + 1} images", [uri_of[kept], *[uri_of[r] for r in removed]])
              for kept, removed in result.duplicate_groups[:out.grid_groups]]
    pictures = {"duplicates": duplicate_grid(groups, folder / "duplicates.png", per_row=out.grid_per_row, read=read)}
    if result.clusters is not None and result.clusters.height:
        sizes = result.clusters.group_by("cluster").len().sort(["len", "cluster"], descending=[True, False])
        rows = []
        for cluster, size in sizes.head(out.grid_clusters).iter_rows():
            members = result.clusters.filter(pl.col("cluster") == cluster).sort("id")["id"].head(out.grid_per_row)
            rows.append((f"cluster {cluster} (n={size})", [uri_of[i] for i in members.to_list()]))
        pictures["clusters"] = cluster_grid(rows, folder / "clusters.png", per_row=out.grid_per_row, read=read)
    if result.calibration is not None:
        pictures["calibration"] = calibration_picture(result.calibration, folder / "calibration.png")
    return pictures


def run_metrics(stats: dict[str, Any]) -> dict[str, float]:
    metrics = {f"count.{step}": float(n) for step, n in stats["steps"].items()}
    metrics.update({f"rejected.{reason}": float(n) for reason, n in stats["rejected_by_reason"].items()})
    metrics["reconciled"] = 1.0 if stats["reconciled"] else 0.0
    metrics.update({f"demo.{k}": float(v) for k, v in stats.get("demo", {}).items() if not math.isnan(v)})
    metrics.update(flat_numbers("calibrate", stats.get("calibration", {})))
    return metrics


def flat_numbers(prefix: str, tree: dict[str, Any]) -> dict[str, float]:
    """Every number (and bool) of a nested dict as ``prefix.key.subkey``; None (an undefined precision) left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(name, value))
        elif isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    return out


def calibration_markdown(calibration: dict[str, Any]) -> list[str]:
    """The calibration section of the report: chosen and hand-set thresholds with what each does on this pool."""
    def row(label: str, point: dict[str, Any]) -> str:
        precision = "n/a" if point["precision"] is None else f"{point['precision']:.3f}"
        return (f"| {label} | {point['threshold']:.4f} | {point['recall']:.3f} | {point['false_removal']:.3f} | "
                f"{precision} |")

    near, evals, hand = calibration["near_dedup"], calibration["eval_dedup"], calibration["configured"]
    applied = "**applied** to this run's dedup" if calibration["applied"] else "reported only (calibrate.apply: false)"
    lines = ["", "### Threshold calibration on this pool", "",
             f"{calibration['sampled']:,} pool images sampled, {calibration['copies_per_image']} planted "
             f"cop{'y' if calibration['copies_per_image'] == 1 else 'ies'} each (crops, rescaling, JPEG, colour, "
             f"rotation, flips, text); the chosen thresholds are {applied}. "
             "Recall: planted copies above the threshold. False removal: sampled images whose nearest *other* "
             "pool image is above it (they would be merged with a different image). Precision: on one copy and "
             "one nearest distinct image per sampled image.", "",
             "| threshold | cosine > | recall | false removal | precision |", "|---|---:|---:|---:|---:|",
             row(f"near_dedup chosen (precision >= {near['target_precision']})", near),
             row("near_dedup set by hand", hand["near_dedup"]),
             row(f"eval_dedup chosen (precision >= {evals['target_precision']})", evals),
             row("eval_dedup set by hand", hand["eval_dedup"])]
    for name, choice in (("near_dedup", near), ("eval_dedup", evals)):
        measured = hand[name]
        if measured["precision"] is not None and measured["precision"] < choice["target_precision"]:
            lines += ["", f"**The hand-set {name} threshold {measured['threshold']:.4f} falls short of precision "
                          f"{choice['target_precision']} on this pool ({measured['precision']:.3f}): about "
                          f"{100 * measured['false_removal']:.1f}% of the pool's images would be joined to a different "
                          "image, and all but one of each such group removed.**"]
        if not choice["reached"]:
            lines += ["", f"**{name}: no threshold reaches precision {choice['target_precision']} with this "
                          "descriptor on this pool**; the one chosen removes no sampled distinct image and catches "
                          "what it can. A better copy descriptor is needed."]
    by_edit = ", ".join(f"{edit} {value:.2f}" for edit, value in calibration["recall_by_edit"].items())
    lines += ["", f"Recall by edit at the chosen near-dedup threshold: {by_edit}.",
              f"Thresholds used in this run: near_dedup {calibration['used']['near_dedup']:.4f}, "
              f"eval_dedup {calibration['used']['eval_dedup']:.4f}."]
    return lines


def curate_markdown(stats: dict[str, Any], pictures: dict[str, Path]) -> str:
    """Counts per step and reason, the reconciliation, demo scores and where the pictures are."""
    steps = stats["steps"]
    listed = max(int(steps["listed"]), 1)
    lines = [f"## Curation of `{stats['pool']}`", "", f"Embedder: `{stats['embedder']}`", "",
             "| step | images | % of listed |", "|---|---:|---:|"]
    lines += [f"| {name} | {n:,} | {100 * n / listed:.1f}% |" for name, n in steps.items()]
    verdict = "yes" if stats["reconciled"] else "**NO**"
    lines += ["", f"Reconciled (listed == manifest + rejected = {steps['manifest']:,} + {stats['rejected']:,}): "
              f"{verdict}", "", "| reason | files | meaning |", "|---|---:|---|"]
    lines += [f"| `{code}` | {n:,} | {CURATE_REASONS[code]} |" for code, n in stats["rejected_by_reason"].items()]
    if "demo" in stats:
        lines += ["", "### Against the planted truth (demo)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in stats["demo"].items()]
    if "calibration" in stats:
        lines += calibration_markdown(stats["calibration"])
    if stats.get("cluster_sizes"):
        lines += ["", f"Top-level cluster sizes: {stats['cluster_sizes']}"]
    lines += ["", "### Pictures", ""] + [f"- {name}: `{path}`" for name, path in pictures.items()]
    return "\n".join(lines) + "\n"
