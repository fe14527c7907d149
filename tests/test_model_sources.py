"""The one model-source parser (components/registry/uri.py), resolving each kind to local files, and
loading a registry version from a plain Python process that never ran the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components.models import BackboneConfig, build_backbone
from components.models import load as load_local
from components.models.export import save_backbone
from components.registry.resolve import resolve
from components.registry.uri import parse_source

ROOT = Path(__file__).resolve().parents[1]
PICO = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28)


@pytest.mark.parametrize(("text", "kind", "fields"), [
    ("models:/a-b@champion", "registry", {"name": "a-b", "alias": "champion"}),
    ("models:/a/b/7", "registry", {"name": "a/b", "version": "7"}),
    ("hub:dinov2_vits14_reg", "hub", {"name": "dinov2_vits14_reg"}),
    ("pixels:32", "pixels", {"size": 32}),
    ("random:vit_pico:4:28", "random", {}),
    ("state_dict:vit_small:14:518:dinov2_vits14", "state_dict", {"target": "dinov2_vits14"}),
    ("state_dict:vit_small:14:518:/w/x:y.pth", "state_dict", {"target": "/w/x:y.pth"}),
    ("outputs/pretrain/backbone", "path", {"target": "outputs/pretrain/backbone"}),
])
def test_every_form_parses_to_its_kind(text: str, kind: str, fields: dict[str, object]) -> None:
    source = parse_source(text)
    assert source.kind == kind and source.text == text
    assert {key: getattr(source, key) for key in fields} == fields
    assert source.is_backbone == (kind != "pixels")


@pytest.mark.parametrize(("text", "message"), [
    ("", "must not be empty"), ("models:/only-a-name", "NAME@ALIAS"), ("models:/a/latest", "NAME/VERSION"),
    ("hub:dinov2_vitx14", "unknown released model"), ("pixels:2", "4 <= size <= 256"), ("pixels:big", "pixels:<size>"),
    ("random:vit_pico:4", "random:<arch>:<patch>:<img_size>"), ("random:vit_pico:four:28", "random:<arch>"),
    ("state_dict:vit_small:14:518:", "state_dict:<arch>"),
])
def test_malformed_sources_are_refused_with_the_expected_form(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_source(text)
    with pytest.raises(ValueError, match="expected one of: registry"):
        parse_source("pixels:32").require("registry", "path")


def test_local_sources_resolve_by_what_they_hold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone(PICO).eval()
    folder = save_backbone(model, PICO, tmp_path / "backbone")
    pyfunc = tmp_path / "pulled"
    (pyfunc / "artifacts").mkdir(parents=True)
    (pyfunc / "MLmodel").write_text("flavors: {}\n")
    save_backbone(model, PICO, pyfunc / "artifacts" / "backbone")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cache = tmp_path / "cache"
    assert resolve("backbone", tmp_path, cache).backbone_dir == folder  # relative to the root
    assert (resolve(str(pyfunc), tmp_path, cache).layout, resolve(str(pyfunc), tmp_path, cache).backbone_dir) == \
        ("pyfunc", pyfunc / "artifacts" / "backbone")
    assert resolve(str(weights), tmp_path, cache).layout == "weights"
    assert resolve(f"state_dict:vit_pico:4:28:{weights}", tmp_path, cache).directory == weights
    assert resolve("hub:dinov2_vits14", tmp_path, cache).directory is None  # nothing is downloaded to resolve
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve("missing", tmp_path, cache)
    # Loading: a folder, the same weights as state_dict:, a seeded random: model, and clear refusals.
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(load_local(folder).model(x), expected, atol=0, rtol=0)
        stated = load_local(f"state_dict:vit_pico:4:28:{weights.name}", root=tmp_path).model
        torch.testing.assert_close(stated(x), expected, atol=0, rtol=0)
    first, again = load_local("random:vit_pico:4:28", seed=3), load_local("random:vit_pico:4:28", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  again.model.state_dict().values(), strict=True))
    assert first.config.layerscale_init is None
    with pytest.raises(ValueError, match=r"components\.registry\.load"):
        load_local("models:/x@champion")
    with pytest.raises(ValueError, match="state_dict:<arch>"):
        load_local(weights)


def test_plain_python_in_the_project_folder_loads_a_registry_version(tmp_path: Path) -> None:
    """No CLI, no MLFLOW_TRACKING_URI: the project's params/project.yaml decides where the registry is."""
    import mlflow
    from mlflow import MlflowClient

    project = tmp_path / "project"
    (project / "params").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'someone-elses'\n")
    store = f"sqlite:///{tmp_path / 'registry.db'}"
    (project / "params" / "project.yaml").write_text(
        f"tracking:\n  uri: {store}\n  artifact_root: {(tmp_path / 'artifacts').as_uri()}\n")
    torch.manual_seed(1)
    folder = save_backbone(build_backbone(PICO), PICO, tmp_path / "backbone", mean=(0.3,) * 3, std=(0.2,) * 3)
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        experiment = mlflow.create_experiment("plain", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(folder), artifact_path="backbone")
        from components.registry.publish import register_backbone

        register_backbone("someone-backbone", run.info.run_id)  # the plain layout, alias challenger
        assert str(MlflowClient().get_model_version_by_alias("someone-backbone", "challenger").version) == "1"
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)
    script = ("import json, components.registry as r\n"
              "b = r.load('models:/someone-backbone@challenger')\n"
              "print(json.dumps({'mean': list(b.mean), 'version': b.metadata['registry']['version'],"
              " 'sum': float(sum(p.detach().sum() for p in b.model.parameters()))}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DINOFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    reference = float(sum(p.detach().sum() for p in load_local(folder).model.parameters()))
    assert answer["mean"] == [0.3] * 3 and answer["version"] == "1"
    assert answer["sum"] == pytest.approx(reference, rel=1e-6)
    assert (project / ".dinoflow" / "cache" / "models").is_dir()  # downloaded into that project's state
