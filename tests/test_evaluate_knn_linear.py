"""Evaluation protocols: feature extraction and cache, weighted k-NN, linear probe, logistic regression.

References are independent: a numpy brute-force k-NN written here, scikit-learn's KNeighborsClassifier
and LogisticRegression, and the backbone's own forward_features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from components.data import fashion_mnist
from components.evaluate import (
    FeatureSet,
    HeadSpec,
    cached_feature_set,
    cached_features,
    extract_features,
    fashion_mnist_batches,
    fashion_mnist_tensor,
    fit_logistic_regression,
    knn_classify,
    knn_predict,
    linear_probe,
    logreg_probe,
    model_fingerprint,
    pixel_features,
    validation_split,
)
from components.evaluate.linear import Pooling, Standardizer, epochs_for, train_linear_heads
from components.models import BackboneConfig, DinoVisionTransformer, build_backbone

T = 0.07


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------- features


@pytest.fixture(scope="module")
def pico() -> DinoVisionTransformer:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(arch="vit_pico", patch_size=7, img_size=28, layerscale_init=None))


def test_extract_features_matches_forward_features(pico: DinoVisionTransformer) -> None:
    images = torch.randn(10, 3, 28, 28)
    pico.train()  # extraction must switch to eval (no stochastic depth) and restore the mode
    features = extract_features(pico, images, batch_size=4, n_last_blocks=4, avgpool=True)
    assert pico.training
    pico.eval()
    with torch.no_grad():
        reference = pico.forward_features(images)
    cls, patches = reference["x_norm_clstoken"], reference["x_norm_patchtokens"]
    assert cls is not None and patches is not None
    assert features.class_tokens.shape == (10, 4, 64) and features.class_tokens.dtype == np.float32
    np.testing.assert_allclose(features.cls, cls.numpy(), rtol=1e-5, atol=1e-5)
    assert features.patch_mean is not None
    np.testing.assert_allclose(features.patch_mean, patches.mean(1).numpy(),
                               rtol=1e-5, atol=1e-5)
    # Batching does not change anything, and an iterable of batches is accepted.
    one_block = extract_features(pico, iter(images.split(3)), n_last_blocks=1)
    np.testing.assert_allclose(one_block.class_tokens[:, 0], features.cls, rtol=1e-5, atol=1e-5)
    assert one_block.patch_mean is None
    # The linear inputs are the official concatenations.
    assert features.linear_input(4, True).shape == (10, 5 * 64)
    np.testing.assert_array_equal(features.linear_input(1, False), features.cls)


def test_fashion_mnist_tensor_and_pixels() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    x = fashion_mnist_tensor(images, 28, mean, std)
    assert x.shape == (5, 3, 28, 28) and x.dtype == torch.float32
    for c in range(3):
        np.testing.assert_allclose(x[:, c].numpy(), (images / 255.0 - mean[c]) / std[c], rtol=1e-5, atol=1e-5)
    resized = torch.cat(list(fashion_mnist_batches(images, 56, mean, std, batch_size=2)))
    assert resized.shape == (5, 3, 56, 56)
    np.testing.assert_allclose(resized, fashion_mnist_tensor(images, 56, mean, std))
    pixels = pixel_features(images)
    assert pixels.shape == (5, 784) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[2].reshape(28, 28), images[2] / 255.0, rtol=1e-6)


def test_cache_computes_once_per_key(tmp_path: Path, pico: DinoVisionTransformer) -> None:
    calls: list[int] = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4)

    key = {"model": model_fingerprint(pico), "dataset": "fmnist-test-v1", "n_last_blocks": 4, "avgpool": True}
    first = cached_features(tmp_path, key, compute)
    again = cached_features(tmp_path, dict(reversed(list(key.items()))), compute)  # key order is irrelevant
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    cached_features(tmp_path, {**key, "dataset": "fmnist-test-v2"}, compute)  # a new dataset version
    assert len(calls) == 2
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".npy", ".npy"]  # no .part left
    # A model change is a new identity.
    changed = build_backbone(BackboneConfig(arch="vit_pico", patch_size=7, img_size=28))
    assert model_fingerprint(changed) != key["model"]

    features = FeatureSet(np.ones((3, 2, 4), np.float32), np.zeros((3, 4), np.float32))
    stored = cached_feature_set(tmp_path / "sets", key, lambda: features, avgpool=True)
    loaded = cached_feature_set(tmp_path / "sets", key, lambda: pytest.fail("recomputed"), avgpool=True)
    np.testing.assert_array_equal(stored.class_tokens, loaded.class_tokens)
    assert loaded.patch_mean is not None and loaded.n_blocks == 2


# ---------------------------------------------------------------- k-NN


def brute_force_votes(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, classes: int) -> np.ndarray:
    """Full similarity matrix, full sort: the textbook weighted k-NN."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = b @ a.T  # (N_test, N_train)
    order = np.argsort(-sims, axis=1)[:, : min(k, len(train))]
    votes = np.zeros((len(test), classes))
    for row in range(len(test)):
        for j in order[row]:
            votes[row, labels[j]] += np.exp(sims[row, j] / T)
    return votes


def test_knn_matches_numpy_brute_force() -> None:
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(300, 16)), rng.normal(size=(60, 16))  # float64: distinct similarities
    labels, targets = rng.integers(0, 7, size=300), rng.integers(0, 7, size=60)
    ks = (1, 10, 20, 100, 500)  # 500 > N_train: clipped to 300
    scores = knn_predict(train, labels, test, ks=ks, num_classes=7, query_chunk=16, train_chunk=64)
    metrics = knn_classify(train, labels, test, targets, ks=ks, num_classes=7, query_chunk=16, train_chunk=64)
    for k in ks:
        expected = brute_force_votes(train, labels, test, k, 7)
        np.testing.assert_allclose(scores[k].numpy(), expected, rtol=1e-12)
        ranked = np.argsort(-expected, axis=1, kind="stable")
        np.testing.assert_array_equal(scores[k].argmax(1).numpy(), ranked[:, 0])
        assert metrics[f"knn_top1_k{k}"] == pytest.approx(np.mean(ranked[:, 0] == targets))
        assert metrics[f"knn_top5_k{k}"] == pytest.approx(np.mean((ranked[:, :5] == targets[:, None]).any(1)))
    assert "knn_top1_k500" in metrics  # a clipped k keeps its requested name


def test_knn_chunking_is_exact_and_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 32))
    labels = rng.integers(0, 5, size=400)
    train = (centers[labels] + rng.normal(scale=1.5, size=(400, 32))).astype(np.float32)
    targets = rng.integers(0, 5, size=90)
    test = (centers[targets] + rng.normal(scale=1.5, size=(90, 32))).astype(np.float32)
    whole = knn_predict(train, labels, test, ks=(20,), query_chunk=4096, train_chunk=4096)[20]
    chunked = knn_predict(train, labels, test, ks=(20,), query_chunk=7, train_chunk=13)[20]
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-5)
    # scikit-learn: cosine distance d = 1 - sim, so exp(sim / T) is proportional to exp(-d / T).
    sk = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                              weights=lambda d: np.exp(-d / T)).fit(train, labels)
    np.testing.assert_array_equal(whole.argmax(1).numpy(), sk.predict(test))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> tuple[fashion_mnist.Split, fashion_mnist.Split]:
    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, tmp_path_factory.mktemp("cache"))
    return fashion_mnist.load_split(folder, "train"), fashion_mnist.load_split(folder, "test")


def test_knn_on_fashion_mnist_pixels(fmnist: tuple[fashion_mnist.Split, fashion_mnist.Split]) -> None:
    train, test = fmnist
    metrics = knn_classify(pixel_features(train.images[:5000]), train.labels[:5000],
                           pixel_features(test.images[:1000]), test.labels[:1000], ks=(20,), train_chunk=1024)
    # Raw-pixel cosine k-NN on Fashion-MNIST: ~80% here, ~85% with all 60k references.
    assert 0.75 < metrics["knn_top1_k20"] < 0.9
    assert metrics["knn_top5_k20"] > 0.95


# ---------------------------------------------------------------- linear probes


def separable(n: int, seed: int, classes: int = 4, dim: int = 8) -> tuple[FeatureSet, np.ndarray]:
    """Last-block CLS carries the class (a wide margin); earlier blocks and pooled patches are noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    tokens = rng.normal(size=(n, 4, dim)).astype(np.float32)
    tokens[:, -1, :classes] += 4.0 * np.eye(classes, dtype=np.float32)[labels]
    return FeatureSet(tokens, rng.normal(size=(n, dim)).astype(np.float32)), labels


def test_linear_probe_separable_and_selects_on_validation() -> None:
    train, y_train = separable(600, seed=3)
    test, y_test = separable(300, seed=4)
    options: dict[str, Any] = {"learning_rates": (1e-4, 1e-2, 0.1), "epochs": 4, "batch_size": 64, "seed": 0}
    result = linear_probe(train, y_train, test, y_test, **options)
    assert result["linear_top1"] > 0.97
    assert set(result["linear_best"]) == {"lr", "blocks", "pooling"}
    assert len(result["linear_grid_val_top1"]) == 3 * 2 * 2
    assert result["linear_val_top1"] == max(result["linear_grid_val_top1"].values())
    # Test labels never influence the choice: scrambled test labels give the same head, a worse score.
    scrambled = linear_probe(train, y_train, test, np.random.default_rng(5).permutation(y_test), **options)
    assert scrambled["linear_best"] == result["linear_best"]
    assert scrambled["linear_val_top1"] == result["linear_val_top1"]
    assert scrambled["linear_top1"] < 0.5


def test_grid_training_equals_torch_sgd_one_head_at_a_time() -> None:
    """The stacked, simultaneous update is torch's SGD + CosineAnnealingLR run on each head alone."""
    features, labels_np = separable(200, seed=10, classes=3)
    inputs: dict[tuple[int, Pooling], torch.Tensor] = {(1, "cls"): torch.from_numpy(features.linear_input(1, False)),
              (4, "cls"): torch.from_numpy(features.linear_input(4, False))}
    labels = torch.from_numpy(labels_np)
    grid = [HeadSpec(0.01, 1, "cls"), HeadSpec(0.5, 4, "cls"), HeadSpec(0.2, 1, "cls")]
    heads = train_linear_heads(inputs, labels, grid, num_classes=3, epochs=2, batch_size=32, seed=5)
    # The documented draws: each head's (C, D_in) init in grid order, then one permutation per epoch.
    generator = torch.Generator().manual_seed(5)
    inits = [torch.empty(3, inputs[(s.blocks, s.pooling)].shape[1]).normal_(0, 0.01, generator=generator)
             for s in grid]
    orders = [torch.randperm(200, generator=generator) for _ in range(2)]
    for spec, init, head in zip(grid, inits, heads, strict=True):
        x = inputs[(spec.blocks, spec.pooling)]
        reference = torch.nn.Linear(x.shape[1], 3)
        with torch.no_grad():
            reference.weight.copy_(init)
            reference.bias.zero_()
        optimizer = torch.optim.SGD(reference.parameters(), lr=spec.lr * 32 / 256, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * 7)
        for order in orders:
            for start in range(0, 200, 32):
                idx = order[start : start + 32]
                loss = torch.nn.functional.cross_entropy(reference(x[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        np.testing.assert_allclose(head.weight.detach(), reference.weight.detach(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(head.bias.detach(), reference.bias.detach(), rtol=1e-4, atol=1e-6)


def offset_separable(n: int, seed: int, classes: int = 4, dim: int = 8) -> tuple[FeatureSet, np.ndarray]:
    """Separable classes riding on a large common offset: the shape of the demo backbone's layer-normed
    features (|mean| ~0.7 per dimension, spread ~0.1), exaggerated so the raw grid fails outright."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    tokens = rng.normal(scale=0.02, size=(n, 1, dim)).astype(np.float32)
    tokens[:, 0, :classes] += 0.2 * np.eye(classes, dtype=np.float32)[labels]
    return FeatureSet(tokens + 100.0), labels


def test_standardised_probe_separates_offset_features_the_raw_grid_cannot() -> None:
    train, y_train = offset_separable(600, seed=1)
    test, y_test = offset_separable(300, seed=2)
    options: dict[str, Any] = {"learning_rates": (1e-3, 1e-2, 0.1), "epochs": 4, "batch_size": 64, "min_steps": 500}
    standardised = linear_probe(train, y_train, test, y_test, standardize=True, **options)
    raw = linear_probe(train, y_train, test, y_test, standardize=False, **options)
    assert standardised["linear_top1"] > 0.99
    # The cause, shown: the offset dominates the Hessian, so no lr of the grid both stays stable and learns.
    assert raw["linear_top1"] < 0.5
    assert standardised["linear_epochs"] == epochs_for(4, 540, 64, 500) == 56  # 9 steps an epoch


def test_standardizer_folds_into_a_head_on_raw_features() -> None:
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.normal(size=(50, 6)) * [1, 2, 3, 0.1, 5, 1] + [3, -1, 0, 7, 2, 0]).astype(np.float32))
    x[:, 5] = 4.0  # a constant dimension: left at 0 after centring, never divided by 0
    scaler = Standardizer.fit(x)
    x64 = x.double().numpy()
    np.testing.assert_allclose(scaler.mean.numpy(), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scaler.std.numpy()[:5], x64.std(0)[:5], rtol=1e-5)
    assert float(scaler.std[5]) == 1.0 and torch.allclose(scaler.apply(x)[:, 5], torch.zeros(50))
    head = torch.nn.Linear(6, 3)
    folded = scaler.fold_into(head)
    # Reference in float64 numpy: W ((x - mu) / sd) + b
    standardised = (x64 - x64.mean(0)) / np.where(x64.std(0) > 0, x64.std(0), 1.0)
    expected = standardised @ head.weight.detach().double().numpy().T
    expected += head.bias.detach().double().numpy()
    np.testing.assert_allclose(folded(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_on_fashion_mnist_pixels_is_close_to_logistic_regression(
    fmnist: tuple[fashion_mnist.Split, fashion_mnist.Split],
) -> None:
    train, test = fmnist
    idx = fashion_mnist.balanced_subset(train.labels, 200, 0)  # 2,000 train images
    x_train, y_train = pixel_features(train.images[idx]), train.labels[idx].astype(np.int64)
    x_test, y_test = pixel_features(test.images[:1000]), test.labels[:1000].astype(np.int64)
    result = linear_probe(FeatureSet(x_train[:, None]), y_train, FeatureSet(x_test[:, None]), y_test,
                          learning_rates=(0.01, 0.1, 1.0), epochs=10, batch_size=64, min_steps=1000, num_classes=10)
    reference = LogisticRegression(C=1.0, max_iter=300).fit(x_train, y_train).score(x_test, y_test)  # scikit-learn
    assert reference > 0.75  # the reference itself is sane: ~0.8 on 2k Fashion-MNIST images
    assert abs(result["linear_top1"] - reference) < 0.03


def test_validation_split_is_seeded_and_disjoint() -> None:
    fit, val = validation_split(100, 0.1, seed=7)
    assert len(val) == 10 and len(fit) == 90 and not set(fit) & set(val)
    np.testing.assert_array_equal(val, validation_split(100, 0.1, seed=7)[1])
    assert not np.array_equal(val, validation_split(100, 0.1, seed=8)[1])


@pytest.mark.parametrize("C", [0.05, 1.0, 50.0])
def test_logistic_regression_agrees_with_scikit_learn(C: float) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(250, 6))
    y = (x[:, :3] + rng.normal(scale=0.7, size=(250, 3))).argmax(1)
    weight, bias = fit_logistic_regression(x, y, C, num_classes=3)
    sk = LogisticRegression(C=C, max_iter=10000, tol=1e-12).fit(x, y)  # the reference (multinomial, lbfgs)
    np.testing.assert_allclose(weight.numpy(), sk.coef_, atol=1e-4)
    np.testing.assert_allclose(bias.numpy(), sk.intercept_, atol=1e-4)


def test_logreg_probe_separable() -> None:
    train, y_train = separable(400, seed=8)
    test, y_test = separable(200, seed=9)
    result = logreg_probe(train, y_train, test, y_test, c_grid=(0.01, 1.0, 100.0))
    assert result["logreg_top1"] > 0.97
    assert result["logreg_best_C"] in (0.01, 1.0, 100.0)
    scrambled = logreg_probe(train, y_train, test, np.random.default_rng(5).permutation(y_test),
                             c_grid=(0.01, 1.0, 100.0))
    assert scrambled["logreg_best_C"] == result["logreg_best_C"] and scrambled["logreg_top1"] < 0.5
