"""Plain-folder datasets for the dense probes, their readers, and the demo data written in that format.

Layout (one folder per dataset, one sub-folder per split)::

    ROOT/dataset.json                      {"format", "task", "splits", ...task fields}
    ROOT/SPLIT/images/NAME.png             RGB (or grey) input image
    ROOT/SPLIT/masks/NAME.png              segmentation: uint8 class ids, 255 = ignore
    ROOT/SPLIT/depth/NAME.png              depth: uint16, metres = value / depth_scale, 0 = invalid

``dataset.json`` for segmentation has ``classes`` (names, index = class id) and ``ignore_index``;
for depth it has ``depth_scale``. Every file is written atomically (temp file + rename) and
``dataset.json`` last, so a folder whose ``dataset.json`` exists is complete.

Demo data (docs/evaluation-protocols.md): segmentation composites of Fashion-MNIST items pasted on
crops of scikit-image photos (the item's pixels are the mask, class = Fashion-MNIST class + 1,
background 0), and depth tiles of scikit-image's ``stereo_motorcycle`` (depth = K / disparity).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from components.data.fashion_mnist import CLASS_NAMES
from components.data.photos import load_photo
from components.storage.atomic import save_png_atomic, write_text_atomic

FORMAT = "dinoflow-dense/1"
DATASET_FILE = "dataset.json"
IGNORE_INDEX = 255
DEFAULT_DEPTH_SCALE = 1000.0  # millimetres in the PNG: 65.535 m at most
# Depth of the stereo demo: Z = f * B / disparity with the Middlebury 2014 Motorcycle calibration at the
# quarter resolution scikit-image ships (f = 3979.911 px / 4, B = 0.193 m); the x-offset ``doffs`` of the
# two principal points is ignored, so depths are proportional to 1 / disparity, not exact metres.
STEREO_DEPTH_CONSTANT = 3979.911 / 4 * 0.193  # metres * pixels, about 192.0
# Backgrounds of the segmentation demo: photos and textures bundled in the scikit-image wheel.
DEMO_BACKGROUNDS = ("astronaut", "brick", "chelsea", "coffee", "grass", "gravel", "rocket", "immunohistochemistry")
ITEM_THRESHOLD = 40  # Fashion-MNIST pixels brighter than this are the item; darker ones are its black backdrop

Task = Literal["segmentation", "depth"]


@dataclass(frozen=True)
class DenseSplit:
    """One split in memory: images (N, H, W, 3) uint8 and targets (N, H, W): uint8 class ids or float32 metres."""

    names: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    targets: np.ndarray  # (N, H, W) uint8 mask or float32 depth (0 = invalid)


# ---------------------------------------------------------------- atomic PNG / JSON writes


# ---------------------------------------------------------------- depth PNG codec


def encode_depth(depth_m: np.ndarray, scale: float) -> np.ndarray:
    """Metres (H, W) float -> uint16 (H, W): round(depth * scale); non-finite or <= 0 become 0 (invalid)."""
    depth = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    values = np.where(valid, np.round(np.where(valid, depth, 0.0) * scale), 0.0)
    if values.max(initial=0.0) > np.iinfo(np.uint16).max:
        raise ValueError(f"depth {depth[valid].max():.3f} m does not fit 16 bits at scale {scale}")
    return values.astype(np.uint16)


def decode_depth(values: np.ndarray, scale: float) -> np.ndarray:
    """uint16 (H, W) -> metres float32 (H, W); 0 stays 0 (invalid)."""
    return (np.asarray(values, dtype=np.float64) / scale).astype(np.float32)


def write_depth_png(values: np.ndarray, path: Path) -> Path:
    if values.dtype != np.uint16 or values.ndim != 2:
        raise ValueError(f"a depth PNG holds (H, W) uint16, got {values.dtype} {values.shape}")
    return save_png_atomic(Image.fromarray(values), path)  # PIL mode "I;16": 16-bit greyscale PNG


def read_depth_png(path: Path) -> np.ndarray:
    """The stored uint16 values, exactly (PIL may open 16-bit PNGs as mode "I", int32)."""
    with Image.open(path) as image:
        values = np.asarray(image)
    if values.ndim != 2 or values.min(initial=0) < 0 or values.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: not a 16-bit single-channel PNG")
    return values.astype(np.uint16)


# ---------------------------------------------------------------- readers


def read_dataset_info(root: Path) -> dict[str, object]:
    info_path = Path(root) / DATASET_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{root}: no {DATASET_FILE}; not a dense dataset folder (docs/evaluation-protocols.md)")
    info: dict[str, object] = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{info_path}: format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def read_split(root: Path, split: str) -> DenseSplit:
    """Read one split of a segmentation or depth folder; names are sorted, every image needs its target."""
    root = Path(root)
    info = read_dataset_info(root)
    task = info.get("task")
    if task not in ("segmentation", "depth"):
        raise ValueError(f"{root}: unknown task {task!r}")
    target_dir = root / split / ("masks" if task == "segmentation" else "depth")
    image_paths = sorted((root / split / "images").glob("*.png"))
    if not image_paths:
        raise FileNotFoundError(f"{root / split / 'images'}: no PNG images")
    images, targets = [], []
    for image_path in image_paths:
        target_path = target_dir / image_path.name
        if not target_path.is_file():
            raise FileNotFoundError(f"{image_path}: missing target {target_path}")
        image = _read_rgb(image_path)
        if task == "segmentation":
            with Image.open(target_path) as mask_image:
                target = np.asarray(mask_image)
            if target.dtype != np.uint8 or target.ndim != 2:
                raise ValueError(f"{target_path}: a mask must be (H, W) uint8 class ids, "
                                 f"got {target.dtype} {target.shape}")
        else:
            target = decode_depth(read_depth_png(target_path), float(info["depth_scale"]))  # type: ignore[arg-type]
        if target.shape != image.shape[:2]:
            raise ValueError(f"{target_path}: size {target.shape} differs from its image {image.shape[:2]}")
        images.append(image)
        targets.append(target)
    return DenseSplit([p.stem for p in image_paths], np.stack(images), np.stack(targets))


def segmentation_classes(root: Path) -> list[str]:
    classes = read_dataset_info(root).get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{root}/{DATASET_FILE}: segmentation needs a non-empty 'classes' list")
    return [str(name) for name in classes]


def rgb_tensor(images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3) -> normalised float32 (N, 3, size, size), bicubic with antialias."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0).permute(0, 3, 1, 2)  # (N, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


# ---------------------------------------------------------------- writers


def write_segmentation_dataset(root: Path, splits: dict[str, DenseSplit], classes: Sequence[str]) -> Path:
    root = Path(root)
    for split, data in splits.items():
        for name, image, mask in zip(data.names, data.images, data.targets, strict=True):
            save_png_atomic(Image.fromarray(image), root / split / "images" / f"{name}.png")
            save_png_atomic(Image.fromarray(mask.astype(np.uint8)), root / split / "masks" / f"{name}.png")
    info = {"format": FORMAT, "task": "segmentation", "splits": sorted(splits), "classes": list(classes),
            "ignore_index": IGNORE_INDEX}
    # last: its presence vouches for the files
    write_text_atomic(json.dumps(info, indent=2, sort_keys=True) + "\n", root / DATASET_FILE)
    return root


def write_depth_dataset(root: Path, splits: dict[str, DenseSplit], depth_scale: float = DEFAULT_DEPTH_SCALE) -> Path:
    root = Path(root)
    for split, data in splits.items():
        for name, image, depth in zip(data.names, data.images, data.targets, strict=True):
            save_png_atomic(Image.fromarray(image), root / split / "images" / f"{name}.png")
            write_depth_png(encode_depth(depth, depth_scale), root / split / "depth" / f"{name}.png")
    info = {"format": FORMAT, "task": "depth", "splits": sorted(splits), "depth_scale": depth_scale}
    write_text_atomic(json.dumps(info, indent=2, sort_keys=True) + "\n", root / DATASET_FILE)
    return root


# ---------------------------------------------------------------- demo: segmentation composites


def _rgb(photo: np.ndarray) -> np.ndarray:
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo


def composite(
    background: np.ndarray, item: np.ndarray, item_class: int, top: int, left: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a grey Fashion-MNIST item (h, w) onto an RGB background (H, W, 3) at (top, left).

    Returns the image and its mask: pixels brighter than ITEM_THRESHOLD replace the background
    and are labelled ``item_class + 1``; everything else is background 0."""
    image = background.copy()
    mask = np.zeros(background.shape[:2], dtype=np.uint8)
    h, w = item.shape
    region = item > ITEM_THRESHOLD  # (h, w)
    image[top : top + h, left : left + w][region] = item[region][:, None]
    mask[top : top + h, left : left + w][region] = item_class + 1
    return image, mask


def demo_segmentation_split(
    items: np.ndarray, labels: np.ndarray, n_images: int, size: int, seed: int, prefix: str
) -> DenseSplit:
    """``n_images`` composites (size x size): one item, resized to 45-75 % of the side, on a random photo crop."""
    rng = np.random.default_rng(seed)
    photos = [_rgb(load_photo(name)) for name in DEMO_BACKGROUNDS]
    images, masks = [], []
    for _ in range(n_images):
        photo = photos[int(rng.integers(len(photos)))]
        shortest = min(photo.shape[:2])
        smallest = min(size, shortest)  # no upscaling from a crop smaller than the output, when the photo allows
        crop_side = int(rng.integers(smallest, max(smallest, shortest // 2) + 1))
        top, left = (int(rng.integers(photo.shape[k] - crop_side + 1)) for k in (0, 1))
        crop = Image.fromarray(photo[top : top + crop_side, left : left + crop_side])
        background = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
        pick = int(rng.integers(len(items)))
        side = int(rng.integers(round(0.45 * size), round(0.75 * size) + 1))
        item = np.asarray(Image.fromarray(items[pick]).resize((side, side), Image.Resampling.BILINEAR))
        row, col = (int(rng.integers(size - side + 1)) for _ in range(2))
        image, mask = composite(background, item, int(labels[pick]), row, col)
        images.append(image)
        masks.append(mask)
    names = [f"{prefix}{i:05d}" for i in range(n_images)]
    return DenseSplit(names, np.stack(images), np.stack(masks))


def build_segmentation_demo(
    root: Path, items: np.ndarray, labels: np.ndarray, n_train: int = 96, n_val: int = 32, size: int = 28,
    seed: int = 0,
) -> Path:
    """Write the Fashion-MNIST-on-photos segmentation demo (classes: background + the 10 item classes).

    ``items`` (N, 28, 28) uint8 and ``labels`` (N,) are Fashion-MNIST images: the first half feeds the
    train composites, the second half the val ones, so no item appears in both splits."""
    if len(items) < 2 or len(items) != len(labels):
        raise ValueError(f"need at least 2 items with one label each, got {len(items)} items, {len(labels)} labels")
    half = len(items) // 2
    classes = ["background", *CLASS_NAMES]
    splits = {
        "train": demo_segmentation_split(items[:half], labels[:half], n_train, size, seed, "train"),
        "val": demo_segmentation_split(items[half:], labels[half:], n_val, size, seed + 1, "val"),
    }
    return write_segmentation_dataset(root, splits, classes)


# ---------------------------------------------------------------- demo: stereo depth tiles


def stereo_depth(disparity: np.ndarray, constant: float = STEREO_DEPTH_CONSTANT) -> np.ndarray:
    """Depth (H, W) float32 metres = constant / disparity; 0 (invalid) where disparity is not finite or <= 0."""
    disparity = np.asarray(disparity, dtype=np.float64)
    valid = np.isfinite(disparity) & (disparity > 0)
    depth = np.zeros(disparity.shape, dtype=np.float64)
    depth[valid] = constant / disparity[valid]
    return depth.astype(np.float32)


def tile_depth_scene(
    image: np.ndarray, depth: np.ndarray, tile: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping tile x tile crops on a grid, row-major, each reduced to size x size.

    Images shrink with bicubic (antialiased); depth is sub-sampled at the output pixel centres, so an
    invalid 0 never blends into a valid neighbour. Returns images (T, size, size, 3), depth (T, size, size)."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    centres = ((np.arange(size) + 0.5) * tile / size).astype(np.int64)  # (size,) pixel indices in a tile
    images, depths = [], []
    for r in range(rows):
        for c in range(cols):
            top, left = r * tile, c * tile
            crop = Image.fromarray(image[top : top + tile, left : left + tile])
            images.append(np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC)))
            depths.append(depth[top + centres[:, None], left + centres[None, :]])
    return np.stack(images), np.stack(depths).astype(np.float32)


def build_depth_demo(
    root: Path, tile: int = 80, size: int = 28, val_fraction: float = 0.25, seed: int = 0,
    depth_scale: float = DEFAULT_DEPTH_SCALE,
) -> Path:
    """Write the stereo-motorcycle depth demo: grid tiles of the left view, a seeded train / val split."""
    import skimage.data

    left, _right, disparity = skimage.data.stereo_motorcycle()
    images, depths = tile_depth_scene(np.asarray(left), stereo_depth(disparity), tile, size)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, round(len(images) * val_fraction))
    chosen = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
    splits = {
        split: DenseSplit([f"tile{i:03d}" for i in idx], images[idx], depths[idx]) for split, idx in chosen.items()
    }
    return write_depth_dataset(root, splits, depth_scale)
