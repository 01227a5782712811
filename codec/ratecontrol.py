"""Rate control: hit a target average bits/weight for a whole file, counting every byte.

Each coded tensor gets a rate curve bits/weight(level), measured on a seeded sample of its chunks with the
codec's integer tables (so it predicts the ANS size, not an entropy estimate). A single fractional level t
is shared by all tensors — equal λ is the equal-slope (RD-optimal) allocation under the normalized-MSE
objective of model-free compression — and a fraction of each tensor's columns sits one level higher to
reach t between integer levels. While encoding we re-solve t for the tensors not yet written against the
bytes actually written, so estimation error is absorbed by the remaining tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RateTargetError(ValueError):
    """The requested bits/weight cannot be reached with this codec for this model."""


@dataclass
class RateCurve:
    numel: int
    bits_per_weight: np.ndarray  # (n_levels,), non-decreasing in level

    def bits(self, t: float) -> float:
        """Total bits at fractional level t (a fraction t-floor(t) of columns one level up)."""
        lo = int(np.floor(t))
        hi = min(lo + 1, len(self.bits_per_weight) - 1)
        f = t - lo
        return self.numel * ((1 - f) * self.bits_per_weight[lo] + f * self.bits_per_weight[hi])


def monotone(curve: np.ndarray) -> np.ndarray:
    """Sample noise can make a measured curve dip; rate is non-decreasing in λ, so enforce it."""
    return np.maximum.accumulate(curve)


def solve_level(curves: list[RateCurve], budget_bits: float, n_levels: int) -> float:
    """Largest fractional level t in [0, n_levels-1] whose total bits fit the budget (bisection)."""
    if not curves:
        return float(n_levels - 1)

    def total(t: float) -> float:
        return sum(c.bits(t) for c in curves)

    lo, hi = 0.0, float(n_levels - 1)
    if total(lo) > budget_bits:
        raise RateTargetError("budget is below the lowest rate the codec reaches")
    if total(hi) <= budget_bits:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= budget_bits else (lo, mid)
    return lo


def column_levels(t: float, n_cols: int, importance: np.ndarray | None = None,
                  n_levels: int | None = None) -> np.ndarray:
    """Per-column levels for fractional t: round(f·n) columns at floor(t)+1, the rest at floor(t).

    Without importance the raised columns are spread evenly; with it (e.g. diag(H)) the most important
    columns are raised first."""
    base = int(np.floor(t))
    k = int(round((t - base) * n_cols))
    levels = np.full(n_cols, base, np.int64)
    if k:
        if importance is None:
            raised = np.floor(np.arange(k) * n_cols / k).astype(np.int64)
        else:
            raised = np.argsort(-importance, kind="stable")[:k]
        levels[raised] += 1
    if n_levels is not None:
        levels = np.minimum(levels, n_levels - 1)
    return levels.astype(np.uint8)
