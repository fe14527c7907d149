"""Typed configuration: dataclasses loaded from ``params/*.yaml`` with clear errors."""

from components.config.loader import (
    ConfigError,
    apply_overrides,
    flatten,
    from_mapping,
    load_config,
    load_yaml,
    to_mapping,
)
from components.config.project import ProjectConfig, load_project_config

__all__ = [
    "ConfigError",
    "ProjectConfig",
    "apply_overrides",
    "flatten",
    "from_mapping",
    "load_config",
    "load_project_config",
    "load_yaml",
    "to_mapping",
]
