"""Champion / challenger promotion as evaluation sees it: a policy from params and a pure decision.

``decide`` compares two metric dicts (the ``eval.*`` numbers of the champion and the challenger) and
says whether the challenger should become champion, with its reasons and numbers. Acting on a
decision (tags, the alias move) is the registry's: components/registry/promotion.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from components.evaluate.bootstrap import Interval


@dataclass
class PromotionPolicy:
    """When a challenger replaces the champion (params/evaluate.yaml, section ``evaluate.promotion``)."""

    primary_metric: str = "knn_top1_k20"
    min_improvement: float = 0.005  # the challenger must beat the champion's primary metric by this much
    # metric -> the largest regression allowed (in the metric's own units) before promotion is blocked
    guarded_metrics: dict[str, float] = field(default_factory=lambda: {"linear_top1": 0.01})
    # metric -> False where lower is better (errors, distances); any metric not listed: higher is better
    higher_is_better: dict[str, bool] = field(default_factory=lambda: {"depth_rmse": False})
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    # Where a round scores both versions. "validation": queries from the train split, disjoint from the
    # k-NN / probe references, so repeated rounds never select on the test split; "test": the test split.
    split: Literal["validation", "test"] = "validation"
    # Queries per class of that split: 1,000 = 10,000 queries, the size of Fashion-MNIST's test split
    # (k-NN top-1 then has a standard error of ~0.004; 500 queries had ~0.02). 0 with "test": all of it.
    queries_per_class: int = 1000
    # The primary metric's paired bootstrap: promote only when the interval's lower bound clears
    # min_improvement (a metric without per-query outcomes falls back to the point estimate, said so).
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0

    def validate(self) -> None:
        if not self.primary_metric:
            raise ValueError("primary_metric must name a metric")
        if self.min_improvement < 0:
            raise ValueError("min_improvement must be >= 0")
        if any(limit < 0 for limit in self.guarded_metrics.values()):
            raise ValueError("guarded_metrics limits are allowed regressions: each must be >= 0")
        if not self.champion_alias or not self.challenger_alias or self.champion_alias == self.challenger_alias:
            raise ValueError("champion_alias and challenger_alias must be two different non-empty names")
        if self.queries_per_class < 0 or (self.split == "validation" and self.queries_per_class == 0):
            raise ValueError("queries_per_class must be >= 1 (0, the whole split, only with split: test)")
        if self.bootstrap_resamples < 100 or not 0.5 <= self.confidence < 1.0:
            raise ValueError("bootstrap_resamples must be >= 100 and confidence in [0.5, 1)")

    def improvement(self, metric: str, champion: float, challenger: float) -> float:
        """How much better the challenger is (positive) or worse (negative), whatever the metric's direction."""
        delta = challenger - champion
        return delta if self.higher_is_better.get(metric, True) else -delta


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    # challenger.<m>, champion.<m> and improvement.<m> for the primary and every guarded metric compared
    numbers: dict[str, float]
    primary_metric: str
    primary_delta: float | None  # improvement of the primary metric; None without a champion to compare to
    interval: Interval | None = None  # its paired bootstrap interval (in the improvement's direction)

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"


def decide(champion: dict[str, float] | None, challenger: dict[str, float],
           policy: PromotionPolicy | None = None, interval: Interval | None = None) -> Decision:
    """Should ``challenger`` replace ``champion``? ``champion`` None: there is none, so it should.

    ``interval``: the paired bootstrap interval of the primary metric's improvement (challenger minus
    champion, sign flipped for lower-is-better metrics). With it, promotion needs its *lower bound* to
    clear ``min_improvement``: a difference within the noise of the query set never promotes."""
    policy = policy or PromotionPolicy()
    primary = policy.primary_metric
    if primary not in challenger:
        return Decision(False, [f"challenger has no {primary}: nothing to judge it by"], {}, primary, None)
    numbers = {f"challenger.{primary}": challenger[primary]}
    if champion is None:
        return Decision(True, ["no champion yet: the challenger becomes champion"], numbers, primary, None)
    if primary not in champion:
        return Decision(False, [f"champion has no {primary}: evaluate it before comparing"], numbers, primary, None)
    reasons: list[str] = []
    delta = policy.improvement(primary, champion[primary], challenger[primary])
    numbers.update({f"champion.{primary}": champion[primary], f"improvement.{primary}": delta})
    if interval is None:
        promote = delta >= policy.min_improvement
        reasons.append(f"{primary}: {challenger[primary]:.4f} vs champion {champion[primary]:.4f}, "
                       f"improvement {delta:+.4f} {'>=' if promote else '<'} required {policy.min_improvement:.4f} "
                       "(point estimate: no per-query outcomes for an interval)")
    else:
        promote = interval.low >= policy.min_improvement
        numbers.update({f"interval.{key}": value for key, value in interval.as_numbers().items()})
        reasons.append(f"{primary}: {challenger[primary]:.4f} vs champion {champion[primary]:.4f}, improvement "
                       f"{interval.describe()}; lower bound {interval.low:+.4f} "
                       f"{'>=' if promote else '<'} required {policy.min_improvement:.4f}")
    for metric, allowed in sorted(policy.guarded_metrics.items()):
        if metric not in champion or metric not in challenger:
            side = "champion" if metric not in champion else "challenger"
            reasons.append(f"{metric}: not compared (missing on the {side})")
            continue
        change = policy.improvement(metric, champion[metric], challenger[metric])
        numbers.update({f"challenger.{metric}": challenger[metric], f"champion.{metric}": champion[metric],
                        f"improvement.{metric}": change})
        if -change > allowed:
            promote = False
            reasons.append(f"{metric}: regression {-change:.4f} exceeds allowed {allowed:.4f} (blocks promotion)")
        else:
            reasons.append(f"{metric}: change {change:+.4f} within allowed regression {allowed:.4f}")
    return Decision(promote, reasons, numbers, primary, delta, interval)
