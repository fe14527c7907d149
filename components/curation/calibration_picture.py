"""The calibration picture: where copies and distinct images fall, and what each threshold does.

Top: histograms of the copy scores (blue) and the distinct scores (red) over cosine. Bottom: recall
(blue), false-removal rate (red) and balanced precision (green) against the threshold, with the
chosen near-dedup threshold (solid black), the eval-dedup one (dotted black) and the hand-set
thresholds (dashed grey). Drawn with Pillow alone (no plotting library in the dependencies), so the
PNG is the same bytes on every machine: it is a DVC output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.curation.calibrate import CalibrationResult, ThresholdCurve
from components.storage.atomic import save_png_atomic

WIDTH, MARGIN_LEFT, MARGIN_RIGHT = 760, 56, 16
HIST_TOP, HIST_HEIGHT = 44, 130
CURVE_TOP, CURVE_HEIGHT = 210, 230
HEIGHT = CURVE_TOP + CURVE_HEIGHT + 60
BINS = 60
COPY_COLOUR, DISTINCT_COLOUR, PRECISION_COLOUR = (31, 119, 180), (214, 39, 40), (44, 160, 44)
INK, GRID, HAND_SET = (0, 0, 0), (225, 225, 225), (130, 130, 130)


def x_range(result: CalibrationResult) -> tuple[float, float]:
    """From a little below the 5th percentile of the distinct scores (and every threshold shown) up to 1.

    Where the distinct images are is where a threshold matters; copies scoring lower than that are
    missed at any useful threshold and are counted in the first histogram bin."""
    distinct = result.scores.distinct_scores  # (N,)
    marks = [result.near_dedup.point.threshold, result.eval_dedup.point.threshold,
             *(p.threshold for p in result.configured.values())]
    low = min(float(np.quantile(distinct, 0.05)), *marks) if distinct.size else min(marks, default=0.0)
    low = max(-1.0, np.floor(low * 20.0) / 20.0 - 0.05)  # a round tick below the lowest value
    return float(low), 1.0


class Axes:
    """Data -> pixel coordinates of one panel."""

    def __init__(self, top: int, height: int, x_lo: float, x_hi: float, y_hi: float = 1.0) -> None:
        self.top, self.height, self.x_lo, self.x_hi, self.y_hi = top, height, x_lo, x_hi, y_hi
        self.left, self.right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT

    def x(self, value: float) -> float:
        share = (min(max(value, self.x_lo), self.x_hi) - self.x_lo) / (self.x_hi - self.x_lo)
        return self.left + share * (self.right - self.left)

    def y(self, value: float) -> float:
        return self.top + self.height * (1.0 - min(max(value / self.y_hi, 0.0), 1.0))

    def frame(self, draw: ImageDraw.ImageDraw, y_label: str, y_ticks: bool = False) -> None:
        for tick in np.linspace(self.x_lo, self.x_hi, 6):
            draw.line((self.x(tick), self.top, self.x(tick), self.top + self.height), fill=GRID)
            draw.text((self.x(tick) - 14, self.top + self.height + 4), f"{tick:.2f}", fill=INK)
        for tick in (np.linspace(0.0, 1.0, 5) if y_ticks else []):
            draw.line((self.left, self.y(tick), self.right, self.y(tick)), fill=GRID)
            draw.text((self.left - 26, self.y(tick) - 6), f"{tick:.2f}", fill=INK)
        draw.rectangle((self.left, self.top, self.right, self.top + self.height), outline=INK)
        draw.text((4, self.top + self.height // 2 - 20), y_label, fill=INK)


def draw_histograms(draw: ImageDraw.ImageDraw, axes: Axes, result: CalibrationResult) -> None:
    edges = np.linspace(axes.x_lo, axes.x_hi, BINS + 1)  # (B + 1,)
    copies = np.histogram(np.clip(result.scores.copy_scores.ravel(), axes.x_lo, axes.x_hi), edges)[0]  # (B,)
    distinct = np.histogram(np.clip(result.scores.distinct_scores, axes.x_lo, axes.x_hi), edges)[0]  # (B,)
    shares = [counts / max(int(counts.sum()), 1) for counts in (copies, distinct)]
    # scaled to the bins right of the first: the first holds everything lower and may run off the top
    axes.y_hi = max(float(max(s[1:].max(initial=0.0) for s in shares)), 1e-9)
    for share, colour, inset in ((shares[1], DISTINCT_COLOUR, 0), (shares[0], COPY_COLOUR, 2)):
        for b in range(BINS):
            if share[b] > 0:
                draw.rectangle((axes.x(edges[b]) + inset, axes.y(share[b]), axes.x(edges[b + 1]) - inset,
                                axes.top + axes.height), outline=colour)


def draw_curve(draw: ImageDraw.ImageDraw, axes: Axes, thresholds: np.ndarray, values: np.ndarray,
               colour: tuple[int, int, int]) -> None:
    """A step curve: the value holds from one measured threshold to the next."""
    points: list[tuple[float, float]] = []
    for t, next_t, v in zip(thresholds, [*thresholds[1:], axes.x_hi], values, strict=True):
        if np.isnan(v) or next_t < axes.x_lo:
            continue
        points += [(axes.x(float(t)), axes.y(float(v))), (axes.x(float(next_t)), axes.y(float(v)))]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)


def draw_marker(draw: ImageDraw.ImageDraw, axes: Axes, threshold: float, colour: tuple[int, int, int],
                dash: int) -> None:
    """A vertical line at ``threshold``; ``dash`` > 0 draws it in dashes of that many pixels."""
    x = axes.x(threshold)
    bottom = axes.top + axes.height
    if dash <= 0:
        draw.line((x, axes.top, x, bottom), fill=colour, width=2)
        return
    for y in range(axes.top, bottom, 2 * dash):
        draw.line((x, y, x, min(y + dash, bottom)), fill=colour, width=2)


def calibration_picture(result: CalibrationResult, path: Path, title: str = "") -> Path:
    """The PNG described in the module docstring, written atomically."""
    x_lo, x_hi = x_range(result)
    canvas = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    near, evals = result.near_dedup, result.eval_dedup
    n, m = result.scores.copy_scores.shape
    draw.text((MARGIN_LEFT, 6), title or f"Threshold calibration: {n} sampled images, {n * m} planted copies",
              fill=INK)
    draw.text((MARGIN_LEFT, 22), f"near-dedup > {near.point.threshold:.4f}: recall {near.point.recall:.3f}, "
              f"false removal {near.point.false_removal:.3f}" + ("" if near.reached else " (target NOT reached)"),
              fill=INK)
    hist = Axes(HIST_TOP, HIST_HEIGHT, x_lo, x_hi)
    draw_histograms(draw, hist, result)
    hist.frame(draw, "share")
    draw.text((hist.left + 6, hist.top + 4), "planted copies", fill=COPY_COLOUR)
    draw.text((hist.left + 6, hist.top + 18), "nearest distinct image", fill=DISTINCT_COLOUR)
    draw.text((hist.left + 6, hist.top + 32), "(first bin: everything lower)", fill=HAND_SET)
    curve_axes = Axes(CURVE_TOP, CURVE_HEIGHT, x_lo, x_hi)
    curve_axes.frame(draw, "rate", y_ticks=True)
    curve: ThresholdCurve = result.curve
    for values, colour in ((curve.recall, COPY_COLOUR), (curve.false_removal, DISTINCT_COLOUR),
                           (curve.precision, PRECISION_COLOUR)):
        draw_curve(draw, curve_axes, curve.thresholds, values, colour)
    for point in result.configured.values():
        draw_marker(draw, curve_axes, point.threshold, HAND_SET, dash=6)
    draw_marker(draw, curve_axes, evals.point.threshold, INK, dash=2)
    draw_marker(draw, curve_axes, near.point.threshold, INK, dash=0)
    legend_y = CURVE_TOP + CURVE_HEIGHT + 22
    for i, (label, colour) in enumerate((("recall", COPY_COLOUR), ("false removal", DISTINCT_COLOUR),
                                         ("precision (balanced)", PRECISION_COLOUR),
                                         ("hand-set (dashed)", HAND_SET), ("chosen (solid / dotted: eval)", INK))):
        draw.text((MARGIN_LEFT + i * 140, legend_y), label, fill=colour)
    draw.text((WIDTH // 2 - 60, legend_y + 16), "cosine threshold (joined when above)", fill=INK)
    return save_png_atomic(canvas, path)


__all__ = ["calibration_picture"]
