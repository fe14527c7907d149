"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: locate, fetch, verify, read.

The package installs the four gzipped IDX files under ``/usr/share/datasets/fashion-mnist``. When
it is not installed, root installs it with apt-get; anyone else gets it with ``apt-get download``
and ``dpkg-deb -x`` into the cache. The gzip files are recompressed by Debian, so the checksums
below are of the decompressed IDX bytes, which are the upstream dataset's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.data.idx import read_idx_gz

DEBIAN_PACKAGE = "dataset-fashion-mnist"
PACKAGE_DATA_DIR = Path("usr/share/datasets/fashion-mnist")
INSTALLED_DATA_DIR = Path("/") / PACKAGE_DATA_DIR
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# sha256 of the decompressed IDX files, with their element counts.
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLIT_FILES = {"train": "train", "test": "t10k"}


class DatasetUnavailableError(RuntimeError):
    """Fashion-MNIST could not be found or fetched."""


class ChecksumError(RuntimeError):
    """A dataset file does not have the expected content."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8


def has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IDX_SHA256)


def locate(source_dir: Path, cache_dir: Path, allow_fetch: bool = True) -> Path:
    """The folder holding the four IDX files: installed package, cache, or fetched now."""
    for folder in (source_dir, cache_dir / PACKAGE_DATA_DIR):
        if has_all_files(folder):
            return folder
    if not allow_fetch:
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found in {source_dir} or {cache_dir}; install the Debian package "
            f"'{DEBIAN_PACKAGE}' or allow fetching"
        )
    return fetch(cache_dir)


def fetch(cache_dir: Path) -> Path:
    """Install the Debian package (as root) or extract it into ``cache_dir`` (as anyone)."""
    errors: list[str] = []
    if shutil.which("apt-get") is None:
        raise DatasetUnavailableError(f"apt-get is not available to fetch '{DEBIAN_PACKAGE}'")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", DEBIAN_PACKAGE]
        failure = _run(install)
        if failure:  # often only a stale package list: refresh it once and retry
            _run(["apt-get", "update", "-q"])
            failure = _run(install)
        if not failure and has_all_files(INSTALLED_DATA_DIR):
            return INSTALLED_DATA_DIR
        errors.append(failure or f"package installed but files are missing from {INSTALLED_DATA_DIR}")
    extracted = _download_and_extract(cache_dir, errors)
    if extracted is not None:
        return extracted
    raise DatasetUnavailableError(
        f"could not fetch Debian package '{DEBIAN_PACKAGE}': " + " | ".join(errors)
    )


def _download_and_extract(cache_dir: Path, errors: list[str]) -> Path | None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        result = _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=Path(work))
        debs = sorted(Path(work).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if result or not debs:
            errors.append(result or "apt-get download produced no .deb")
            return None
        staging = Path(work) / "root"
        result = _run(["dpkg-deb", "-x", str(debs[0]), str(staging)])
        if result or not has_all_files(staging / PACKAGE_DATA_DIR):
            errors.append(result or "the .deb did not contain the IDX files")
            return None
        target = cache_dir / PACKAGE_DATA_DIR
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        # A rename publishes the folder whole: a crash never leaves a half-extracted cache.
        os.replace(staging / PACKAGE_DATA_DIR, target)
        return target


def _run(command: list[str], cwd: Path | None = None) -> str:
    """Run a command; '' on success, else a one-line reason."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(command)}: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return f"{' '.join(command)} exited {done.returncode}: {tail[0]}"
    return ""


def load_split(folder: Path, split: str, verify: bool = True) -> Split:
    """Read one split (``train`` or ``test``), checking content checksums and consistency."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    stem = SPLIT_FILES[split]
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{stem}-{kind}-ubyte.gz"
        array, raw = read_idx_gz(folder / name)
        if verify:
            digest = hashlib.sha256(raw).hexdigest()
            if digest != IDX_SHA256[name]:
                raise ChecksumError(f"{folder / name}: sha256 {digest} != expected {IDX_SHA256[name]}")
        arrays.append(array)
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ChecksumError(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    return Split(images=images, labels=labels)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of each class (all when 0), seeded, in ascending order."""
    if per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = min(per_class, len(members))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))
