"""The data and curate stages write the same files in every checkout, so ``dvc.lock`` stays put.

Two fresh "checkouts" at different absolute paths, each with its default object store inside
(``<checkout>/.dinoflow/store``, as after a fresh clone), run the stage functions that ``dvc repro``
runs (``dinoflow data`` and ``dinoflow curate``) on tiny params. Every file of every output and metric
that dvc.yaml declares for those stages must be byte-identical across the two: then the md5s DVC
records in dvc.lock are too. The manifests hold store keys, and readers resolve them against the
configured store.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
import yaml

from components.config.project import configured_store_locator
from components.curation.config import BalanceSection, CurateConfig, load_curate_config
from components.data.demo_pool import DemoDataConfig, FashionMnistConfig
from components.data.manifest_dataset import ManifestImageDataset
from components.stages.context import StageContext, make_context
from components.stages.curate import run_curate
from components.stages.data import run_data
from components.storage import InvalidKeyError, LocalObjectStore, StoreLocator, is_store_key
from components.train.engine import DataStream
from tests.test_curation_demo import small_demo

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "curate")


def make_checkout(folder: Path, shared_state: Path) -> Path:
    """A project folder like a fresh clone: dvc.yaml and params/project.yaml (tracking in the test session's)."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("")
    (folder / "dvc.yaml").write_text((REPO_ROOT / "dvc.yaml").read_text())
    project = yaml.safe_load((REPO_ROOT / "params" / "project.yaml").read_text())
    project["tracking"].update({"uri": f"sqlite:///{shared_state / 'mlflow' / 'mlflow.db'}",
                                "artifact_root": (shared_state / "mlflow" / "artifacts").as_uri()})
    (folder / "params").mkdir()
    (folder / "params" / "project.yaml").write_text(yaml.safe_dump(project))
    return folder


def data_config() -> DemoDataConfig:
    return DemoDataConfig(fashion_mnist=FashionMnistConfig(train_per_class=2, test_per_class=1), photos=["coffee"],
                          write_workers=2)


def curate_config() -> CurateConfig:
    cfg = load_curate_config(REPO_ROOT / "params" / "curate.yaml")  # the shipped outputs, work dir included
    cfg.demo = small_demo("curate-demo")
    cfg.ingest.workers = cfg.embed.decode_workers = 2
    cfg.balance = BalanceSection(levels=[6, 2], target_size=20, n_iter=10, resampling_steps=2)
    return cfg


def run_stages(root: Path, monkeypatch: pytest.MonkeyPatch) -> StageContext:
    monkeypatch.setenv("DINOFLOW_HOME", str(root / ".dinoflow"))  # a fresh clone's state: inside the checkout
    monkeypatch.delenv("DINOFLOW_STORE_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = make_context(root=root)
    assert context.store.uri.startswith(root.resolve().as_uri() + "/")  # the default store is in the checkout
    run_data(context, data_config())
    run_curate(context, curate_config())
    return context


def declared_outputs(root: Path) -> list[Path]:
    """The outs and metrics dvc.yaml declares for the data and curate stages."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = [e for name in STAGES for kind in ("outs", "metrics") for e in stages[name].get(kind, [])]
    return [root / (entry if isinstance(entry, str) else next(iter(entry))) for entry in entries]


def output_files(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for output in declared_outputs(root):
        assert output.exists(), f"{output} (declared in dvc.yaml) was not written"
        for path in sorted([output] if output.is_file() else [p for p in output.rglob("*") if p.is_file()]):
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def test_two_checkouts_write_identical_dvc_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_state = Path(os.environ["DINOFLOW_HOME"])
    first = make_checkout(tmp_path / "a" / "checkout", shared_state)
    second = make_checkout(tmp_path / "elsewhere" / "another-clone", shared_state)
    first_context = run_stages(first, monkeypatch)
    second_context = run_stages(second, monkeypatch)
    assert first_context.store.uri != second_context.store.uri

    files_a, files_b = output_files(first), output_files(second)
    assert sorted(files_a) == sorted(files_b)
    assert any(name.startswith("data/curated/work/") for name in files_a)  # the step outputs are compared too
    with_paths = sorted({name for root, files in ((first, files_a), (second, files_b)) for name, data in files.items()
                         if any(where.encode() in data for where in (str(root), str(root.resolve())))})
    assert not with_paths, f"outputs holding the checkout's absolute path: {with_paths}"
    differing = sorted(name for name in files_a if files_a[name] != files_b[name])
    assert not differing, f"outputs differ between checkouts: {differing}"

    # The manifests hold keys of the configured store, and every reader resolves them against it.
    pool = pl.read_parquet(second / "data" / "demo" / "pool.parquet")
    curated = pl.read_parquet(second / "data" / "curated" / "manifest.parquet")
    assert curated.height == 20
    for frame in (pool, curated):
        assert all(is_store_key(uri) for uri in frame["uri"].to_list())
        sizes = ManifestImageDataset(frame.head(3), lambda image, seed: image.size, store=second_context.store)
        assert [sizes[i] for i in range(3)] == [(r["width"], r["height"]) for r in frame.head(3).iter_rows(named=True)]
    configured = configured_store_locator(second)  # what a reader handed no store uses (DINOFLOW_HOME of `second`)
    assert configured == StoreLocator.for_store(second_context.store)
    assert configured.read(curated["uri"][0]) == second_context.store.read(curated["uri"][0])


def test_store_locator_turns_store_uris_into_keys_and_back(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "a b" / "store")
    store.write("pool/x y.png", b"pixels")
    locator = StoreLocator.for_store(store, project=tmp_path)
    uri = store.url_for("pool/x y.png")  # file:///.../a%20b/store/pool/x%20y.png
    assert locator.portable(uri) == "pool/x y.png" and locator.portable(store.uri) == ""
    assert locator.resolve("pool/x y.png") == uri
    assert locator.read("pool/x y.png") == locator.read(uri) == b"pixels"  # keys, and older absolute URIs
    outside = (tmp_path / "elsewhere.png").as_uri()
    assert locator.portable(outside) == outside and locator.resolve(outside) == outside
    assert locator.describe(str(tmp_path / "outputs" / "backbone")) == "./outputs/backbone"
    assert locator.describe("pixels:32") == "pixels:32"
    with pytest.raises(InvalidKeyError):
        locator.resolve("../escape.png")
    bucket = StoreLocator("s3://bucket/prefix")
    assert bucket.portable("s3://bucket/prefix/pool/a.png") == "pool/a.png"
    assert bucket.portable("s3://bucket/prefix-other/a.png") == "s3://bucket/prefix-other/a.png"
    assert bucket.resolve("pool/a.png") == "s3://bucket/prefix/pool/a.png"


def test_pretraining_reads_a_keyed_manifest_through_the_configured_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_pretrain_engine import CPU, tiny_config, write_pool

    absolute = write_pool(tmp_path, n=8, corrupt=False)
    store = LocalObjectStore(tmp_path / "store")
    locator = StoreLocator.for_store(store)
    keyed = tmp_path / "keyed.parquet"
    frame = pl.read_parquet(absolute)
    frame.with_columns(pl.Series("uri", [locator.portable(u) for u in frame["uri"]])).write_parquet(keyed)
    assert pl.read_parquet(keyed)["uri"][0] == "img/000.png"
    cfg = tiny_config(keyed, tmp_path / "out")
    loaded = DataStream(cfg, CPU, tmp_path, store).batches(0)  # the stage passes its store
    assert loaded is not None and loaded.n_skipped == 0
    monkeypatch.setenv("DINOFLOW_STORE_URI", str(tmp_path / "store"))  # no store given: the configured one
    loaded = DataStream(cfg, CPU, tmp_path).batches(0)
    assert loaded is not None and loaded.n_skipped == 0


def test_ingest_tables_of_a_pool_in_the_store_hold_keys_only(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from components.curation.ingest import IngestConfig, ingest_pool
    from components.curation.pipeline import portable_ingest

    store = LocalObjectStore(tmp_path / "checkout" / ".dinoflow" / "store")
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buffer, format="PNG")
    for key in ("pool/raw/a.png", "pool/raw/b copy.png"):  # b is an exact duplicate of a
        store.write(key, buffer.getvalue())
    (store.root / "pool" / "raw" / "gone.png").symlink_to(tmp_path / "missing.png")  # unreadable
    result = ingest_pool(IngestConfig(pool=store.url_for("pool/raw"), workers=1))
    assert set(result.rejected["reason"]) == {"exact_duplicate", "unreadable"}
    portable = portable_ingest(result, StoreLocator.for_store(store))
    assert portable.kept["uri"].to_list() == ["pool/raw/a.png"]
    assert portable.rejected.sort("key")["uri"].to_list() == ["pool/raw/b copy.png", "pool/raw/gone.png"]
    assert portable.rejected["duplicate_of"].drop_nulls().to_list() == ["pool/raw/a.png"]
    assert portable.stats["pool"] == "pool/raw"
    cells = [str(v) for frame in (portable.kept, portable.rejected) for row in frame.iter_rows() for v in row]
    assert not [c for c in cells if str(tmp_path) in c]
    assert portable_ingest(result, None) is result  # no locator: the absolute URIs stay (direct library use)
