"""The MLflow model registry as dinoflow sees it: resolve versions to local files, read their lineage,
and the ``dinoflow models`` commands (pure functions returning dicts). See docs/registry-and-serving.md."""

from components.registry.resolve import ResolvedModel, find_backbone_dir, resolve_model_uri

__all__ = ["ResolvedModel", "find_backbone_dir", "resolve_model_uri"]
