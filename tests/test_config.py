from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from components.config import ConfigError, flatten, from_mapping, load_config, to_mapping
from components.config.project import ProjectConfig, load_project_config
from components.stages.data import load_data_config

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int
    mode: Literal["a", "b"] = "a"
    path: Path | None = None
    inner: Inner = field(default_factory=Inner)
    table: dict[str, int] = field(default_factory=dict)
    enabled: bool = True

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError("steps must be positive")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_loads_nested_typed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "run:\n  steps: 3\n  mode: b\n  path: out/x\n  inner: {rate: 1, names: [x, y]}\n"
                           "  table: {k: 2}\n  enabled: false\n")
    cfg = load_config(Outer, path, section="run")
    assert cfg == Outer(steps=3, mode="b", path=Path("out/x"), inner=Inner(rate=1.0, names=["x", "y"]),
                        table={"k": 2}, enabled=False)
    assert isinstance(cfg.inner.rate, float)


def test_round_trip_and_flatten() -> None:
    cfg = Outer(steps=2, inner=Inner(rate=0.5, names=["a"]))
    assert from_mapping(Outer, to_mapping(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["inner.rate"] == 0.5 and flat["steps"] == 2 and flat["inner.names"] == ["a"]


def test_scientific_notation_string_is_a_float(tmp_path: Path) -> None:
    cfg = load_config(Inner, write(tmp_path, "rate: 1e-3\n"))
    assert cfg.rate == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: 1\nstesp: 2\n", "unknown key 'stesp'"),
        ("steps: 1\ninner: {rat: 2}\n", "unknown key 'inner.rat'"),
        ("steps: two\n", "key 'steps': expected int, got str 'two'"),
        ("steps: true\n", "key 'steps': expected int, got bool"),
        ("steps: 1\nmode: c\n", "key 'mode': expected one of 'a', 'b'"),
        ("steps: 1\ninner: {names: x}\n", "key 'inner.names': expected a list"),
        ("steps: 1\ninner: {names: [1]}\n", "key 'inner.names[0]': expected str"),
        ("mode: a\n", "missing required key 'steps'"),
        ("steps: 0\n", "steps must be positive"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("steps: [1\n", "not valid YAML"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_file_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: parameter file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="missing section 'run'"):
        load_config(Outer, write(tmp_path, "steps: 1\n"), section="run")


def test_shipped_params_load() -> None:
    project = load_project_config(REPO / "params" / "project.yaml")
    assert project.tracking.experiment == "dinoflow"
    data = load_data_config(REPO / "params" / "data.yaml")
    assert data.fashion_mnist.train_per_class > 0 and data.photos


def test_project_precedence_environment_then_params_then_default(tmp_path: Path) -> None:
    project = ProjectConfig()
    assert project.store_uri(tmp_path, {}) == str(tmp_path / "store")
    assert project.tracking_uri(tmp_path, {}) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    project.store.uri = "s3://b/p"
    project.tracking.uri = "http://127.0.0.1:5000"
    assert project.store_uri(tmp_path, {}) == "s3://b/p"
    assert project.tracking_uri(tmp_path, {}) == "http://127.0.0.1:5000"
    env = {"DINOFLOW_STORE_URI": "s3://other/x", "MLFLOW_TRACKING_URI": "http://127.0.0.1:6000"}
    assert project.store_uri(tmp_path, env) == "s3://other/x"
    assert project.tracking_uri(tmp_path, env) == "http://127.0.0.1:6000"


@pytest.mark.parametrize("preset", sorted((REPO / "params" / "presets").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_gpu_presets_load_and_validate(preset: Path) -> None:
    from components.distill.config import load_distill_config
    from components.train.config import load_pretrain_config

    cfg = load_distill_config(preset) if preset.name.startswith("distill") else load_pretrain_config(preset)
    assert cfg.objective.precision == "bf16" and cfg.data.manifest == "data/curated/manifest.parquet"


def test_fp16_training_is_refused_with_the_reason(tmp_path: Path) -> None:
    from components.train.config import load_pretrain_config

    file = tmp_path / "pretrain.yaml"
    file.write_text("pretrain:\n  objective:\n    precision: fp16\n")
    with pytest.raises(ConfigError, match="needs gradient loss scaling"):
        load_pretrain_config(file)


def test_a_key_of_the_earlier_run_layout_names_its_new_place(tmp_path: Path) -> None:
    from components.train.config import load_pretrain_config

    old = tmp_path / "pretrain.yaml"
    old.write_text("pretrain:\n  run:\n    output_dir: out\n    checkpoint_every: 50\n")
    with pytest.raises(ConfigError, match=r"key 'run\.checkpoint_every' has moved to 'checkpoint\.every'"):
        load_pretrain_config(old)
    old.write_text("pretrain:\n  run:\n    registered_model_name: x\n")
    with pytest.raises(ConfigError, match=r"has moved to 'publish\.registered_model_name'"):
        load_pretrain_config(old)
