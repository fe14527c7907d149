from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.models import BackboneConfig, build_backbone
from components.models.export import CONFIG_FILE, WEIGHTS_FILE, load_backbone, save_backbone


def test_backbone_round_trip_without_pickle(tmp_path: Path) -> None:
    config = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, num_register_tokens=2)
    torch.manual_seed(0)
    model = build_backbone(config).eval()
    folder = save_backbone(model, config, tmp_path / "backbone", mean=(0.5,) * 3, std=(0.25,) * 3,
                           metadata={"run_id": "abc", "step": 7})
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    bundle = load_backbone(folder)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(bundle.model(x), model(x), rtol=0, atol=0)
    assert bundle.config == config and bundle.mean == (0.5,) * 3 and bundle.metadata["step"] == 7
    assert json.loads((folder / CONFIG_FILE).read_text())["embed_dim"] == model.embed_dim


def test_load_rejects_incomplete_folders(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a backbone folder"):
        load_backbone(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="unknown format"):
        load_backbone(tmp_path)
