"""The one list of stages: their order, their params files, and the one way to run any of them.

The pipeline flow, the CLI (its commands and help text) and ``dvc.yaml`` all follow :data:`STAGES`
(tests/test_stage_catalog.py checks that dvc.yaml agrees). :func:`run_stage` is what the CLI's
``--engine local`` and every Prefect stage task call: it builds the context, loads the params with
the ``--set`` overrides applied (components/config/loader.py: parsed and validated like the YAML),
and runs the stage. Its result's ``summary()`` is what the CLI prints, the flow returns and the
Prefect report shows. Stage modules are imported on first use: ``dinoflow --help`` stays instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from components.stages.context import StageContext, make_context


class StageOutputs(Protocol):
    def summary(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class Stage:
    name: str
    params: str  # the default params file, relative to the project root
    module: str  # components.stages.<module>: defines ``load_<name>_config`` and ``run_<name>``
    summary: str  # one line for help texts

    def load_config(self, path: str | Path, overrides: Sequence[str] = ()) -> Any:
        loader = getattr(importlib.import_module(self.module), f"load_{self.name}_config")
        return loader(path, overrides)

    def run(self, context: StageContext, config: Any) -> StageOutputs:
        runner = getattr(importlib.import_module(self.module), f"run_{self.name}")
        outputs: StageOutputs = runner(context, config)
        return outputs


# In the order the pipeline runs them (and dvc.yaml lists them).
STAGES: tuple[Stage, ...] = (
    Stage("data", "params/data.yaml", "components.stages.data",
          "fetch Fashion-MNIST and bundled photos; write the demo image pool and labels table"),
    Stage("curate", "params/curate.yaml", "components.stages.curate",
          "curate a raw image pool: validate, dedup, eval dedup, retrieval, balanced sampling"),
    Stage("pretrain", "params/pretrain.yaml", "components.stages.pretrain",
          "pretrain a ViT backbone with the DINOv2 recipe; export and register the teacher"),
    Stage("distill", "params/distill.yaml", "components.stages.distill",
          "distill a frozen teacher into a smaller student; export and register the student's EMA"),
    Stage("evaluate", "params/evaluate.yaml", "components.stages.evaluate",
          "k-NN and linear probes of a frozen backbone on Fashion-MNIST, against baselines"),
)


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES]


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(stage_names())}")


def run_stage(name: str, params: str | None = None, project_params: str = "params/project.yaml",
              overrides: Sequence[str] = (), extra_tags: Mapping[str, str] | None = None) -> StageOutputs:
    """Run stage ``name`` with ``params`` (default: its own file) and ``overrides`` (``key.path=value``)."""
    stage = get_stage(name)
    context = make_context(project_params, extra_tags=extra_tags)
    path = Path(params or stage.params)
    config = stage.load_config(path if path.is_absolute() else context.root / path, overrides)
    return stage.run(context, config)
