"""Dense probes: mIoU / depth metrics against hand values and scikit-learn, the folder format, the demo
builders, and probes that must succeed on features that encode the answer per patch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import jaccard_score
from torch import nn

from components.data import fashion_mnist
from components.evaluate import dense_data
from components.evaluate.dense import (
    SILOG_VARIANCE_FOCUS,
    DenseConfig,
    depth_metrics,
    evaluate_dense,
    miou,
    silog_loss,
)
from components.models import BackboneConfig, build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------- metric math


def test_miou_hand_values() -> None:
    pred = np.array([[0, 1], [1, 1]])
    target = np.array([[0, 1], [255, 0]])  # one ignored pixel; class 2 absent everywhere
    assert miou(pred, target, n_classes=3) == pytest.approx((1 / 2 + 1 / 2) / 2)
    # a class predicted but absent from the target counts with IoU 0
    assert miou(np.array([2, 0]), np.array([0, 0]), n_classes=3) == pytest.approx((1 / 2 + 0) / 2)
    assert miou(np.array([1, 1]), np.array([1, 255]), n_classes=2) == 1.0
    with pytest.raises(ValueError, match="no valid pixel"):
        miou(np.array([0]), np.array([255]), n_classes=2)
    with pytest.raises(ValueError, match="class ids"):
        miou(np.array([5]), np.array([0]), n_classes=2)


def test_miou_matches_sklearn_macro_jaccard() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(4, 16, 16))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 6, size=target.shape))  # 255 where ignored
    keep = target != 255
    expected = jaccard_score(target[keep], pred[keep], average="macro")  # labels of target or prediction
    assert miou(pred, target, n_classes=6) == pytest.approx(expected, abs=1e-12)


def test_depth_metrics_hand_values() -> None:
    pred, target = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 4.0])
    scores = depth_metrics(pred, target, np.ones(3, dtype=bool))
    assert scores["rmse"] == pytest.approx(np.sqrt(1 / 3))
    assert scores["delta1"] == pytest.approx(2 / 3)  # ratio 2 fails, ratios 1 pass
    assert depth_metrics(pred, target, np.array([True, False, True])) == {"rmse": 0.0, "delta1": 1.0}
    edge = depth_metrics(np.array([1.24, 1.26]), np.array([1.0, 1.0]), np.ones(2, dtype=bool))
    assert edge["delta1"] == 0.5


def test_silog_loss_closed_form() -> None:
    rng = np.random.default_rng(1)
    target = rng.uniform(1, 10, size=(2, 5, 5))
    pred = target * rng.uniform(0.5, 2.0, size=target.shape)
    valid = rng.random(target.shape) < 0.7
    d = np.log(pred[valid]) - np.log(target[valid])
    expected = np.sqrt(np.mean(d**2) - SILOG_VARIANCE_FOCUS * np.mean(d) ** 2)
    loss = silog_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(valid))
    assert float(loss) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- folder format


def test_depth_png_round_trips_exactly(tmp_path: Path) -> None:
    values = np.random.default_rng(2).integers(0, 65536, size=(13, 17)).astype(np.uint16)
    values[0, 0], values[-1, -1] = 0, 65535
    dense_data.write_depth_png(values, tmp_path / "d.png")
    read = dense_data.read_depth_png(tmp_path / "d.png")
    assert read.dtype == np.uint16 and np.array_equal(read, values)
    depth = np.array([[1.2346, np.inf, 0.0, -1.0, np.nan]])
    encoded = dense_data.encode_depth(depth, 1000.0)
    assert encoded.tolist() == [[1235, 0, 0, 0, 0]]  # mm, rounded; invalid values become 0
    assert dense_data.decode_depth(encoded, 1000.0)[0, 0] == pytest.approx(1.235, abs=1e-6)
    with pytest.raises(ValueError, match="16 bits"):
        dense_data.encode_depth(np.array([[70.0]]), 1000.0)


def test_folder_datasets_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(3, 8, 12, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, size=(3, 8, 12)).astype(np.uint8)
    masks[0, 0, 0] = 255
    split = dense_data.DenseSplit(["a", "b", "c"], images, masks)
    root = dense_data.write_segmentation_dataset(tmp_path / "seg", {"train": split}, ["bg", "x", "y"])
    back = dense_data.read_split(root, "train")
    assert back.names == ["a", "b", "c"] and np.array_equal(back.images, images)
    assert np.array_equal(back.targets, masks) and dense_data.segmentation_classes(root) == ["bg", "x", "y"]
    depth = (rng.integers(1, 60000, size=(3, 8, 12)) / 1000.0).astype(np.float32)
    depth[1, 2, 3] = 0.0
    root = dense_data.write_depth_dataset(tmp_path / "depth", {"val": dense_data.DenseSplit(["a", "b", "c"],
                                                                                           images, depth)})
    back = dense_data.read_split(root, "val")
    assert np.allclose(back.targets, depth, atol=1e-6) and back.targets[1, 2, 3] == 0.0
    (root / "val" / "depth" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing target"):
        dense_data.read_split(root, "val")


# ---------------------------------------------------------------- demo builders


def test_composite_mask_is_the_item_pixels() -> None:
    background = np.full((10, 10, 3), 7, dtype=np.uint8)
    item = np.zeros((4, 4), dtype=np.uint8)
    item[1:3, 1:3] = 200
    item[0, 0] = dense_data.ITEM_THRESHOLD  # not brighter than the threshold: stays background
    image, mask = dense_data.composite(background, item, item_class=4, top=2, left=3)
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[3:5, 4:6] = 5
    assert np.array_equal(mask, expected)
    assert (image[mask == 5] == 200).all() and (image[mask == 0] == 7).all()


@pytest.fixture(scope="module")
def fm_test(tmp_path_factory: pytest.TempPathFactory) -> fashion_mnist.Split:
    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, tmp_path_factory.mktemp("fm"))
    return fashion_mnist.load_split(folder, "test")


def test_segmentation_demo_is_consistent(tmp_path: Path, fm_test: fashion_mnist.Split) -> None:
    root = dense_data.build_segmentation_demo(tmp_path / "seg", fm_test.images[:40], fm_test.labels[:40],
                                              n_train=12, n_val=4, size=28, seed=0)
    info = json.loads((root / "dataset.json").read_text())
    assert info["task"] == "segmentation" and len(info["classes"]) == 11 and info["classes"][0] == "background"
    train = dense_data.read_split(root, "train")
    assert train.images.shape == (12, 28, 28, 3) and train.targets.shape == (12, 28, 28)
    for image, mask in zip(train.images, train.targets, strict=True):
        classes = set(np.unique(mask).tolist())
        assert 0 in classes and len(classes) == 2  # background and one item
        item = mask > 0
        grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
        assert grey[item].all() and (image[item][:, 0] > dense_data.ITEM_THRESHOLD).all()
    assert len(dense_data.read_split(root, "val").names) == 4


def test_depth_demo_matches_the_disparity(tmp_path: Path) -> None:
    import skimage.data

    _, _, disparity = skimage.data.stereo_motorcycle()
    tile, size = 100, 20
    root = dense_data.build_depth_demo(tmp_path / "depth", tile=tile, size=size, val_fraction=0.25)
    cols = disparity.shape[1] // tile
    n_tiles = (disparity.shape[0] // tile) * cols
    train, val = dense_data.read_split(root, "train"), dense_data.read_split(root, "val")
    assert len(train.names) + len(val.names) == n_tiles and not set(train.names) & set(val.names)
    centres = ((np.arange(size) + 0.5) * tile / size).astype(int)
    for name, depth in zip(val.names, val.targets, strict=True):
        r, c = divmod(int(name.removeprefix("tile")), cols)
        disp = disparity[r * tile + centres[:, None], c * tile + centres[None, :]].astype(np.float64)
        valid = np.isfinite(disp) & (disp > 0)
        assert np.array_equal(depth > 0, valid)
        expected = dense_data.STEREO_DEPTH_CONSTANT / disp[valid]
        assert np.allclose(depth[valid], expected, atol=0.5 / dense_data.DEFAULT_DEPTH_SCALE + 1e-6)


# ---------------------------------------------------------------- probes


class LevelBackbone(nn.Module):
    """Stand-in backbone: each patch token is the one-hot of the patch's grey level (level = pixel / 20) and
    the level itself; CLS is the mean token. The forward_features dict contract of DinoVisionTransformer."""

    patch_size = 4

    def __init__(self, n_levels: int) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        level = (F.avg_pool2d(x[:, :1], self.patch_size) * 255 / 20).round().long().flatten(1)  # (B, N)
        tokens = torch.cat([F.one_hot(level, self.n_levels).float(), level[..., None].float()], dim=-1)
        return {"x_norm_clstoken": tokens.mean(dim=1), "x_norm_patchtokens": tokens}  # (B, D), (B, N, D)


def level_images(n: int, n_levels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28, 3) whose 4x4 patches have random grey levels; the level map (n, 28, 28)."""
    levels = np.random.default_rng(seed).integers(0, n_levels, size=(n, 7, 7))
    pixels = np.kron(levels, np.ones((4, 4), dtype=np.int64))  # (n, 28, 28)
    return np.repeat((pixels * 20).astype(np.uint8)[..., None], 3, axis=3), pixels


def test_probes_recover_per_patch_answers(tmp_path: Path) -> None:
    n_levels = 6
    splits_seg, splits_depth = {}, {}
    for split, (n, seed) in {"train": (48, 0), "val": (16, 1)}.items():
        images, levels = level_images(n, n_levels, seed)
        names = [f"{split}{i}" for i in range(n)]
        splits_seg[split] = dense_data.DenseSplit(names, images, levels.astype(np.uint8))
        splits_depth[split] = dense_data.DenseSplit(names, images, (1.0 + 0.5 * levels).astype(np.float32))
    seg_root = dense_data.write_segmentation_dataset(tmp_path / "seg", splits_seg, [str(i) for i in range(n_levels)])
    depth_root = dense_data.write_depth_dataset(tmp_path / "depth", splits_depth)
    cfg = DenseConfig(segmentation_dir=str(seg_root), depth_dir=str(depth_root), epochs=60, lr=5e-2,
                      depth_loss="l1")
    metrics = evaluate_dense(LevelBackbone(n_levels), cfg, (0.0,) * 3, (1.0,) * 3, cache_dir=tmp_path / "cache")
    # Even a perfect per-patch classifier loses some pixels: bilinear upsampling of its logits lets two
    # same-class neighbours outvote a patch near its corners. That oracle is the bar.
    val_levels = splits_seg["val"].targets[:, ::4, ::4].astype(np.int64)  # (16, 7, 7) patch labels
    oracle_logits = F.one_hot(torch.from_numpy(val_levels), n_levels).permute(0, 3, 1, 2).float()
    oracle = F.interpolate(oracle_logits, size=(28, 28), mode="bilinear", align_corners=False).argmax(dim=1)
    oracle_miou = miou(oracle.numpy(), splits_seg["val"].targets, n_levels)
    assert oracle_miou > 0.9
    assert metrics["seg_miou"] > oracle_miou - 0.03
    # The same bar for depth: the true per-patch depth, bilinearly upsampled; and far below a constant guess.
    val_depth = splits_depth["val"].targets
    patch_depth = torch.from_numpy(val_depth[:, ::4, ::4].copy())[:, None]  # (16, 1, 7, 7)
    upsampled = F.interpolate(patch_depth, size=(28, 28), mode="bilinear", align_corners=False)[:, 0].numpy()
    oracle_depth = depth_metrics(upsampled, val_depth, val_depth > 0)
    assert metrics["depth_rmse"] < oracle_depth["rmse"] + 0.02
    assert metrics["depth_delta1"] > oracle_depth["delta1"] - 0.02
    constant_rmse = float(np.sqrt(np.mean((val_depth - splits_depth["train"].targets.mean()) ** 2)))
    assert metrics["depth_rmse"] < 0.6 * constant_rmse
    # the one-hot carries nothing about an image's other patches: a shuffled-mask probe must fail
    shuffled = {k: dense_data.DenseSplit(v.names, v.images, v.targets[::-1].copy()) for k, v in splits_seg.items()}
    bad_root = dense_data.write_segmentation_dataset(tmp_path / "bad", shuffled, [str(i) for i in range(n_levels)])
    bad = DenseConfig(segmentation_dir=str(bad_root), depth=False, epochs=20, lr=5e-2)
    assert evaluate_dense(LevelBackbone(n_levels), bad, (0.0,) * 3, (1.0,) * 3)["seg_miou"] < 0.5


def test_evaluate_dense_demo_with_a_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=0.0,
                                          layerscale_init=None))
    cfg = DenseConfig(demo_dir=str(tmp_path / "demo"), data_cache_dir=str(tmp_path / "fm"), demo_train_images=16,
                      demo_val_images=8, demo_depth_tile=100, epochs=3)
    metrics = evaluate_dense(model, cfg, (0.5,) * 3, (0.25,) * 3, cache_dir=tmp_path / "cache")
    assert set(metrics) == {"seg_miou", "depth_rmse", "depth_delta1"}
    assert 0.0 <= metrics["seg_miou"] <= 1.0 and 0.0 <= metrics["depth_delta1"] <= 1.0
    assert np.isfinite(metrics["depth_rmse"]) and metrics["depth_rmse"] > 0
    assert (tmp_path / "demo").is_dir() and len(list((tmp_path / "cache").glob("*.npy"))) == 4
