"""The paired bootstrap interval against scipy.stats.bootstrap and the normal approximation, the promotion
decision that uses its lower bound, and validation queries that never touch the test split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from components.evaluate.bootstrap import paired_bootstrap
from components.evaluate.config import EvaluateConfig
from components.evaluate.promotion import PromotionPolicy, decide


def paired_hits(n: int, p_champion: float, p_challenger: float, agreement: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Correlated per-query hits: with probability ``agreement`` the challenger copies the champion."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < p_champion
    own = rng.random(n) < p_challenger
    b = np.where(rng.random(n) < agreement, a, own)
    return a, b


def test_interval_matches_scipy_and_the_normal_approximation() -> None:
    a, b = paired_hits(4000, 0.70, 0.74, agreement=0.6, seed=0)
    ours = paired_bootstrap(a, b, n_resamples=4000, confidence=0.95, seed=1)
    d = b.astype(float) - a.astype(float)
    assert ours.delta == pytest.approx(d.mean(), abs=1e-12) and ours.n_queries == 4000
    reference = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y: np.mean(y) - np.mean(x),
                                paired=True, vectorized=False, n_resamples=4000, confidence_level=0.95,
                                method="percentile", random_state=np.random.default_rng(2)).confidence_interval
    se = d.std(ddof=1) / np.sqrt(d.size)
    for low, high in ((reference.low, reference.high), (d.mean() - 1.96 * se, d.mean() + 1.96 * se)):
        assert ours.low == pytest.approx(low, abs=0.25 * se) and ours.high == pytest.approx(high, abs=0.25 * se)
    # Pairing matters: the same marginals unpaired would give a wider interval.
    unpaired_se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert ours.high - ours.low < 2 * 1.96 * unpaired_se * 0.8


def test_interval_is_reproducible_and_refuses_mismatched_samples() -> None:
    a, b = paired_hits(500, 0.6, 0.6, agreement=0.5, seed=3)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(a, b[:-1])
    identical = paired_bootstrap(a, a)
    assert (identical.delta, identical.low, identical.high) == (0.0, 0.0, 0.0)


def test_promotion_needs_the_lower_bound_to_clear_the_margin() -> None:
    policy = PromotionPolicy(min_improvement=0.005, guarded_metrics={})
    champion, challenger = {"knn_top1_k20": 0.700}, {"knn_top1_k20": 0.720}
    # 500 noisy queries: +0.02 is within the noise, so the challenger is not promoted on the point estimate.
    a, b = paired_hits(500, 0.70, 0.72, agreement=0.3, seed=4)
    noisy = paired_bootstrap(a, b)
    assert noisy.low < 0.005 < noisy.high
    rejected = decide(champion, challenger, policy, noisy)
    assert not rejected.promote and "lower bound" in rejected.reasons[0] and "paired bootstrap" in rejected.reasons[0]
    assert rejected.numbers["interval.ci_low"] == pytest.approx(noisy.low)
    # 20,000 strongly paired queries: the same gain is clearly real.
    a, b = paired_hits(20_000, 0.70, 0.75, agreement=0.8, seed=5)
    clear = paired_bootstrap(a, b)
    assert clear.low > 0.005 and decide(champion, challenger, policy, clear).promote
    # No per-query outcomes (e.g. a probe metric): the point estimate decides, and the reason says so.
    point = decide(champion, challenger, policy)
    assert point.promote and "point estimate" in point.reasons[0] and point.interval is None


def test_validation_queries_come_from_train_beside_the_references(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from components.stages.evaluate import load_eval_data

    cfg = EvaluateConfig()
    cfg.dataset.cache_dir = str(tmp_path)
    cfg.dataset.train_per_class, cfg.dataset.test_per_class, cfg.dataset.queries = 30, 20, "validation"
    val = load_eval_data(cfg, tmp_path)
    cfg.dataset.queries = "test"
    test = load_eval_data(cfg, tmp_path)
    assert len(val.test_images) == 200 and np.bincount(val.test_labels).tolist() == [20] * 10
    assert np.array_equal(val.train_images, test.train_images)  # the same references
    refs = {image.tobytes() for image in val.train_images}
    assert not any(image.tobytes() in refs for image in val.test_images)  # disjoint from them
    tests = {image.tobytes() for image in test.test_images}
    assert not any(image.tobytes() in tests for image in val.test_images)  # and not the test split's
    assert val.version != test.version
    with pytest.raises(ValueError, match="validation queries"):
        cfg.dataset.queries, cfg.dataset.test_per_class = "validation", 0
        cfg.dataset.validate()
