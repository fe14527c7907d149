"""A paired bootstrap confidence interval for the difference of two models' metric on the same queries.

Champion and challenger are scored on the same query images, so their per-query outcomes are paired:
resampling *queries* (with replacement) and recomputing both means on each resample keeps the pairing,
and the spread of the difference is what decides whether a challenger is really better. The interval
is the percentile interval of ``n_resamples`` resampled differences (Efron & Tibshirani, ch. 13);
``tests/test_evaluate_bootstrap.py`` checks it against scipy.stats.bootstrap (paired, percentile) and
against the normal approximation ``mean(d) +- z * std(d) / sqrt(n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 256  # resamples drawn at a time: bounds memory to CHUNK x n indices


@dataclass(frozen=True)
class Interval:
    delta: float  # mean(challenger) - mean(champion) on all queries
    low: float
    high: float
    confidence: float
    n_queries: int
    n_resamples: int

    def as_numbers(self) -> dict[str, float]:
        return {"delta": self.delta, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence,
                "n_queries": float(self.n_queries), "n_resamples": float(self.n_resamples)}

    def describe(self) -> str:
        return (f"{self.delta:+.4f} ({100 * self.confidence:.0f}% CI {self.low:+.4f} to {self.high:+.4f}, "
                f"paired bootstrap over {self.n_queries:,} queries)")


def paired_bootstrap(champion: np.ndarray, challenger: np.ndarray, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Interval:
    """Interval of ``mean(challenger) - mean(champion)``; both are per-query outcomes of the same queries."""
    a = np.asarray(champion, dtype=np.float64).ravel()
    b = np.asarray(challenger, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples must be non-empty and of one length, got {a.size} and {b.size}")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("n_resamples must be >= 1 and confidence in (0, 1)")
    diff = b - a  # (n,): the pairing lives here
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, CHUNK):
        count = min(CHUNK, n_resamples - start)
        picks = rng.integers(0, diff.size, size=(count, diff.size))  # (count, n) query indices
        means[start:start + count] = diff[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(delta=float(diff.mean()), low=float(low), high=float(high), confidence=confidence,
                    n_queries=int(diff.size), n_resamples=n_resamples)
