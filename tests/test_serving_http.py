"""The pyfunc embedding model: in process against an independent numpy reference, and over HTTP
through ``mlflow models serve`` (a real scoring server on 127.0.0.1) with real photos."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from components.environment import quiet_offline_defaults
from components.models import BackboneConfig, build_backbone
from components.models.export import save_backbone
from components.registry import load
from components.registry.publish import log_backbone_pyfunc
from components.serving import EmbedOptions, embed_images

NAME = "serving-test-backbone"
MEAN, STD = (0.45, 0.42, 0.4), (0.22, 0.23, 0.24)
SIZE = 28


@dataclass(frozen=True)
class Served:
    backbone_dir: Path
    model_uri: str  # models:/NAME/1
    tracking_uri: str
    state: Path


def photos() -> np.ndarray:
    """Two real photos (scikit-image's astronaut and coffee), (2, 40, 48, 3) uint8."""
    out = [(resize(im, (40, 48), anti_aliasing=True) * 255).round().astype(np.uint8)
           for im in (skdata.astronaut(), skdata.coffee())]
    return np.stack(out)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment("serving-test")
        config = BackboneConfig(arch="vit_pico", patch_size=4, img_size=SIZE, num_register_tokens=1)
        torch.manual_seed(11)
        folder = save_backbone(build_backbone(config), config, root / "backbone", mean=MEAN, std=STD)
        with mlflow.start_run(run_name="serve"):
            log_backbone_pyfunc(folder, registered_model_name=NAME, model_config={"avgpool": True})
        yield Served(folder, f"models:/{NAME}/1", uri, root / "state")
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def reference_embeddings(folder: Path, images: np.ndarray) -> np.ndarray:
    """CLS ++ mean patch token, normalised in float64 numpy by hand: independent of the serving code."""
    x = images.astype(np.float64) / 255.0
    x = (x - np.array(MEAN)) / np.array(STD)  # (B, H, W, 3)
    tensor = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))  # (B, 3, H, W)
    model = load(folder).model
    with torch.no_grad():
        out = model.forward_features(tensor)
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
    assert cls is not None and patches is not None
    return torch.cat([cls, patches.mean(dim=1)], dim=-1).numpy()  # (B, 2D)


def test_pyfunc_in_process_accepts_arrays_bytes_and_base64(served: Served) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(served.model_uri)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)  # native size: no resize involved
    expected = reference_embeddings(served.backbone_dir, images)
    assert expected.shape == (3, 128)
    np.testing.assert_allclose(model.predict(images), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.predict(images.astype(np.float32) / 255.0), expected, atol=1e-5, rtol=0)
    encoded = [png_bytes(im) for im in images]  # PNG is lossless: the same pixels
    np.testing.assert_allclose(model.predict(pd.DataFrame({"image": encoded})), expected, atol=1e-5, rtol=0)
    as_text = [base64.b64encode(b).decode() for b in encoded]
    np.testing.assert_allclose(model.predict(pd.DataFrame({"image": as_text})), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model.predict(np.zeros((2, SIZE, SIZE), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_json(url: str, payload: object) -> object:
    import json

    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_over_http(served: Served, tmp_path: Path) -> None:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **quiet_offline_defaults(served.state), "MLFLOW_TRACKING_URI": served.tracking_uri,
           "MLFLOW_REGISTRY_URI": served.tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", served.model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # own group: stop it whole
    try:
        wait_for_ping(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        images = photos()
        from mlflow import MlflowClient

        registry = MlflowClient(tracking_uri=served.tracking_uri, registry_uri=served.tracking_uri)
        expected = embed_images(load(served.model_uri, cache_dir=tmp_path / "cache", client=registry),
                                list(images / 255.0),
                                EmbedOptions(avgpool=True))
        # 1. the arrays themselves (JSON integers)
        answer = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
        assert isinstance(answer, dict)
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, atol=1e-5, rtol=0)
        # 2. base64-encoded PNG files in a DataFrame column
        encoded = [base64.b64encode(png_bytes(im)).decode() for im in images]
        answer = post_json(f"http://127.0.0.1:{port}/invocations",
                           {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        assert isinstance(answer, dict)
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, atol=1e-5, rtol=0)
        assert np.asarray(answer["predictions"]).shape == (2, 128)
    finally:
        stop_process_group(server)
        log.close()


def wait_for_ping(url: str, server: subprocess.Popen[bytes], log_path: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"no /ping answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_process_group(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (uvicorn workers included), SIGKILL what lingers."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
