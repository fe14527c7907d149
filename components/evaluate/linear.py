"""Linear probes on frozen features: the DINOv2 linear grid and L2-regularised logistic regression.

The linear grid follows the official ``eval/linear.py``: one linear head per (learning rate, last 1 or
4 blocks, CLS or CLS + pooled patches), all trained together on the same batches with SGD (momentum
0.9, no weight decay, cosine schedule, lr scaled by batch/256), heads initialised N(0, 0.01). Here
the features are precomputed (no augmentation; the official also feeds fixed centre crops), the best
head is chosen on a seeded validation split carved from train, and only that head is scored on test.

Two departures, both because the official settings assume 12,500 updates on ViT features whose spread
matches the lr grid (docs/evaluation.md, "Why the grid was behind logistic regression"): the heads see
features standardised with the fit split's per-dimension mean and std (folded back into the returned
heads, which read raw features), and training runs at least ``min_steps`` updates whatever the
epochs and set size.

Logistic regression follows ``eval/log_regression.py``: L2-normalised last-block CLS, full-batch
L-BFGS (here torch, float64), C chosen on the validation split, then refit on all of train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.evaluate.features import FeatureSet

Pooling = Literal["cls", "cls+avgpool"]
# The official grid (eval/linear.py); each value is scaled by batch_size / 256.
DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_BLOCKS = (1, 4)
DEFAULT_POOLINGS: tuple[Pooling, ...] = ("cls", "cls+avgpool")
# The official searches 45 values over 10^[-6, 5]; 8 over 10^[-2, 5] keeps a CPU run short.
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-2, 5, 8))


@dataclass(frozen=True)
class HeadSpec:
    lr: float
    blocks: int
    pooling: Pooling

    def as_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "blocks": self.blocks, "pooling": self.pooling}


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_idx, val_idx), both sorted; at least one sample on each side."""
    if n < 2 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"need n >= 2 and 0 < val_fraction < 1, got n={n}, val_fraction={val_fraction}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.long()
    return torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: labels may be read-only


def available_grid(
    features: FeatureSet,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    blocks: Sequence[int] | None = None,
    poolings: Sequence[Pooling] | None = None,
) -> list[HeadSpec]:
    """The grid, in a fixed order; ``None`` options mean the defaults the features can serve."""
    if blocks is None:
        blocks = [b for b in DEFAULT_BLOCKS if b <= features.n_blocks]
    if poolings is None:
        poolings = [p for p in DEFAULT_POOLINGS if p == "cls" or features.patch_mean is not None]
    return [HeadSpec(float(lr), b, p) for b in blocks for p in poolings for lr in learning_rates]


def cosine_factor(step: int, total: int) -> float:
    """CosineAnnealingLR's multiplier (eta_min 0) for the update at ``step`` of ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_linear_heads(
    inputs: dict[tuple[int, Pooling], torch.Tensor],
    labels: torch.Tensor,
    grid: Sequence[HeadSpec],
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[nn.Linear]:
    """One head per grid entry, all trained together on the same batches, one per grid entry returned.

    Heads reading the same input are stacked as (L, D_in, C) and run as one batched matmul; the loss
    is the sum of the heads' mean cross-entropies, so each head gets exactly its own gradient. The
    update is torch's SGD (momentum 0.9, dampening 0, no weight decay) with each head's own lr, on
    a cosine schedule per step. Randomness, from one generator seeded ``seed``: each head's weight
    ~ N(0, 0.01) as a (C, D_in) draw in grid order, then one permutation of the samples per epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.empty(num_classes, inputs[(s.blocks, s.pooling)].shape[1]).normal_(0.0, 0.01, generator=generator)
             for s in grid]
    scale = batch_size / 256  # the official linear scaling rule
    groups = {key: [i for i, s in enumerate(grid) if (s.blocks, s.pooling) == key] for key in inputs}
    groups = {key: members for key, members in groups.items() if members}
    weights = {key: torch.stack([draws[i].T for i in m]).requires_grad_(True) for key, m in groups.items()}  # (L, D, C)
    biases = {key: torch.zeros(len(m), num_classes, requires_grad=True) for key, m in groups.items()}  # (L, C)
    base_lrs = {key: torch.tensor([grid[i].lr * scale for i in m]) for key, m in groups.items()}  # (L,)
    params = [(weights[key], base_lrs[key][:, None, None]) for key in groups]
    params += [(biases[key], base_lrs[key][:, None]) for key in groups]
    momenta = [torch.zeros_like(p) for p, _ in params]
    n = len(labels)
    total = epochs * -(-n // batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            target = labels[idx]  # (b,)
            loss = torch.zeros(())
            for key in groups:
                logits = torch.einsum("bd,ldc->lbc", inputs[key][idx], weights[key]) + biases[key][:, None]  # (L, b, C)
                summed = F.cross_entropy(logits.reshape(-1, num_classes), target.repeat(len(logits)),
                                         reduction="sum")
                loss = loss + summed / len(idx)  # sum over heads of each head's mean
            for p, _ in params:
                p.grad = None
            loss.backward()
            factor = cosine_factor(step, total)
            with torch.no_grad():
                for (p, lr), buf in zip(params, momenta, strict=True):
                    assert p.grad is not None
                    buf.mul_(0.9).add_(p.grad)
                    p.sub_(lr * factor * buf)
            step += 1
    heads: dict[int, nn.Linear] = {}
    for key, members in groups.items():
        for row, i in enumerate(members):
            heads[i] = nn.Linear(weights[key].shape[1], num_classes)
            with torch.no_grad():
                heads[i].weight.copy_(weights[key][row].T)
                heads[i].bias.copy_(biases[key][row])
    return [heads[i] for i in range(len(grid))]


def _accuracy(head: nn.Linear, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(dim=1) == labels).float().mean())


def _inputs(features: FeatureSet, grid: Sequence[HeadSpec]) -> dict[tuple[int, Pooling], torch.Tensor]:
    keys = {(s.blocks, s.pooling) for s in grid}
    return {key: torch.from_numpy(features.linear_input(key[0], key[1] == "cls+avgpool")) for key in keys}


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension affine map x -> (x - mean) / std, from the fit split's statistics."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    @staticmethod
    def fit(x: torch.Tensor) -> Standardizer:
        x64 = x.double()
        std = x64.std(dim=0, unbiased=False)  # (D,)
        # A constant dimension carries nothing: dividing by 1 leaves it at 0 after centring.
        std = torch.where(std > 1e-12 * max(float(std.max()), 1.0), std, torch.ones_like(std))
        return Standardizer(mean=x64.mean(dim=0).float(), std=std.float())

    @staticmethod
    def identity(dim: int) -> Standardizer:
        return Standardizer(mean=torch.zeros(dim), std=torch.ones(dim))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (N, D)

    def fold_into(self, head: nn.Linear) -> nn.Linear:
        """The head on raw features: W' = W / std, b' = b - W' mean, so head'(x) == head(apply(x))."""
        raw = nn.Linear(head.in_features, head.out_features)
        with torch.no_grad():
            weight = head.weight.double() / self.std.double()  # (C, D)
            raw.weight.copy_(weight)
            raw.bias.copy_(head.bias.double() - weight @ self.mean.double())
        return raw


def epochs_for(epochs: int, n: int, batch_size: int, min_steps: int) -> int:
    """``epochs``, raised until the run makes at least ``min_steps`` updates (a small set at a large
    batch gives a few steps per epoch; the official recipe makes 12,500 whatever the epochs)."""
    steps_per_epoch = -(-n // batch_size)
    return max(epochs, -(-min_steps // steps_per_epoch))


def linear_probe(
    train: FeatureSet,
    train_labels: np.ndarray | torch.Tensor,
    test: FeatureSet,
    test_labels: np.ndarray | torch.Tensor,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    blocks: Sequence[int] | None = None,
    poolings: Sequence[Pooling] | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    standardize: bool = True,
    min_steps: int = 0,
) -> dict[str, Any]:
    """Train the grid on train minus a validation split, pick the best head on validation, score it on test.

    ``standardize``: heads train on features standardised with the fit split's statistics (the returned
    choice is scored on raw test features through the folded head). ``min_steps``: at least this many
    SGD updates (``epochs`` is raised when the split is small)."""
    y_all, y_test = _labels(train_labels), _labels(test_labels)
    classes = num_classes if num_classes is not None else int(max(int(y_all.max()), int(y_test.max()))) + 1
    grid = available_grid(train, learning_rates, blocks, poolings)
    fit_idx, val_idx = validation_split(len(train), val_fraction, seed)
    fit_inputs = _inputs(train.subset(fit_idx), grid)
    scalers = {key: Standardizer.fit(x) if standardize else Standardizer.identity(x.shape[1])
               for key, x in fit_inputs.items()}
    scaled = {key: scalers[key].apply(x) for key, x in fit_inputs.items()}
    run_epochs = epochs_for(epochs, len(fit_idx), batch_size, min_steps)
    trained = train_linear_heads(scaled, y_all[fit_idx], grid, classes, run_epochs, batch_size, seed)
    heads = [scalers[(s.blocks, s.pooling)].fold_into(h) for h, s in zip(trained, grid, strict=True)]
    val_inputs = _inputs(train.subset(val_idx), grid)
    y_val = y_all[val_idx]
    val_scores = [_accuracy(h, val_inputs[(s.blocks, s.pooling)], y_val) for h, s in zip(heads, grid, strict=True)]
    best = int(np.argmax(val_scores))  # first of equals: the grid order decides ties
    spec = grid[best]
    test_input = torch.from_numpy(test.linear_input(spec.blocks, spec.pooling == "cls+avgpool"))
    return {
        "linear_top1": _accuracy(heads[best], test_input, y_test),
        "linear_val_top1": val_scores[best],
        "linear_best": spec.as_dict(),
        "linear_epochs": run_epochs,
        "linear_grid_val_top1": {
            f"{s.blocks}blk_{s.pooling}_lr{s.lr:g}": v for s, v in zip(grid, val_scores, strict=True)
        },
    }


def fit_logistic_regression(
    x: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    C: float,
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-10,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, L2 on the weights only (scikit-learn's objective up to a factor):
    minimise mean CE + ||W||^2 / (2 C N) with full-batch L-BFGS in float64. Returns W (K, D), b (K,).
    ``init`` warm-starts from another solution (the previous C of a grid: far fewer iterations)."""
    features = torch.as_tensor(x).double()  # (N, D)
    target = _labels(labels)
    if init is None:
        weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
        bias = torch.zeros(num_classes, dtype=torch.float64)
    else:
        weight, bias = (t.detach().clone().double() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * C * len(features))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2,
                                  tolerance_grad=tol, tolerance_change=1e-14, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, target) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _logreg_accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(dim=1) == labels).float().mean())


def logreg_probe(
    train: FeatureSet,
    train_labels: np.ndarray | torch.Tensor,
    test: FeatureSet,
    test_labels: np.ndarray | torch.Tensor,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-7,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """C chosen on the validation split, then refit on all of train and scored on test.

    The grid runs in ascending C, each fit warm-started from the previous one (the official runs every
    C from scratch to tol 1e-12, max_iter 1000 on a GPU; that tolerance buys nothing in accuracy)."""
    y_all, y_test = _labels(train_labels), _labels(test_labels)
    classes = num_classes if num_classes is not None else int(max(int(y_all.max()), int(y_test.max()))) + 1
    x_all = F.normalize(torch.from_numpy(np.asarray(train.cls)).double(), dim=1)  # (N, D)
    x_test = F.normalize(torch.from_numpy(np.asarray(test.cls)).double(), dim=1)
    fit_idx, val_idx = validation_split(len(train), val_fraction, seed)
    fit_idx_t, val_idx_t = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
    grid = sorted(float(c) for c in c_grid)
    val_scores, solutions = [], []
    solution: tuple[torch.Tensor, torch.Tensor] | None = None
    for c in grid:
        solution = fit_logistic_regression(x_all[fit_idx_t], y_all[fit_idx_t], c, classes, max_iter, tol, solution)
        solutions.append(solution)
        val_scores.append(_logreg_accuracy(*solution, x_all[val_idx_t], y_all[val_idx_t]))
    best = int(np.argmax(val_scores))  # first of equals: the smallest C, the most regularised
    weight, bias = fit_logistic_regression(x_all, y_all, grid[best], classes, max_iter, tol, solutions[best])
    return {
        "logreg_top1": _logreg_accuracy(weight, bias, x_test, y_test),
        "logreg_val_top1": val_scores[best],
        "logreg_best_C": grid[best],
    }


def linear_evaluation(
    train: FeatureSet,
    train_labels: np.ndarray | torch.Tensor,
    test: FeatureSet,
    test_labels: np.ndarray | torch.Tensor,
    seed: int = 0,
    **linear_options: Any,
) -> dict[str, Any]:
    """Both probes on one feature pass: ``linear_probe``'s keys plus ``logreg_probe``'s."""
    return {
        **linear_probe(train, train_labels, test, test_labels, seed=seed, **linear_options),
        **logreg_probe(train, train_labels, test, test_labels, seed=seed),
    }
