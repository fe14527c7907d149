from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.models import BackboneConfig, build_backbone
from components.models.export import save_backbone
from components.models.pretrained import load_pretrained_backbone, official_url, resize_pos_embed


def pico(img_size: int = 28, registers: int = 0) -> torch.nn.Module:
    return build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=img_size,
                                         num_register_tokens=registers)).eval()


def test_from_a_dinoflow_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = pico()
    save_backbone(source, BackboneConfig(arch="vit_pico", patch_size=4, img_size=28), tmp_path / "bb")
    target = pico()
    assert load_pretrained_backbone(target, str(tmp_path / "bb")) == []
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_official_training_checkpoint_layout_with_chunks_and_another_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = pico(img_size=56)  # a 14x14 grid, as a release trained at another resolution
    nested = {f"teacher.backbone.{k.replace('blocks.', 'blocks.0.', 1) if k.startswith('blocks.') else k}": v
              for k, v in source.state_dict().items() if k != "mask_token"}
    torch.save({"model": nested, "iteration": 3}, tmp_path / "training_checkpoint.pth")
    target = pico(img_size=28)
    notes = load_pretrained_backbone(target, str(tmp_path / "training_checkpoint.pth"))
    assert any("pos_embed resized" in n for n in notes) and any("mask_token" in n for n in notes)
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    # At the source's own resolution the resized table is the source's table interpolated back:
    # the CLS position is untouched.
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])


def test_mismatched_architecture_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(pico(registers=2).state_dict(), tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="does not match the configured backbone"):
        load_pretrained_backbone(pico(), str(tmp_path / "reg.pth"))
    with pytest.raises(FileNotFoundError):
        load_pretrained_backbone(pico(), str(tmp_path / "absent.pth"))


def test_resize_pos_embed_identity_and_shape() -> None:
    table = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(table, (4, 4)) is table
    assert resize_pos_embed(table, (6, 6)).shape == (1, 37, 8)


def test_official_urls() -> None:
    assert official_url("dinov2_vits14").endswith("/dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert official_url("dinov2_vitl14_reg").endswith("/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")
