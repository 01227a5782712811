"""Rate control: hit a target average bits/weight for a whole file, counting every byte.

Each coded tensor gets a rate curve bits/weight(level), measured on a seeded sample of its chunks with the
codec's integer tables (so it predicts the ANS size, not an entropy estimate). A single fractional level t
is shared by all tensors — equal λ is the equal-slope (RD-optimal) allocation under the normalized-MSE
objective of model-free compression — and a fraction of each tensor's columns sits one level higher to
reach t between integer levels. While encoding we re-solve t for the tensors not yet written against the
bytes actually written, so estimation error is absorbed by the remaining tensors.
"""

from __future__ import annotations

import numpy as np


class RateTargetError(ValueError):
    """The requested bits/weight cannot be reached with this codec for this model."""


def monotone(curve: np.ndarray) -> np.ndarray:
    """Sample noise can make a measured curve dip; rate is non-decreasing in λ, so enforce it."""
    return np.maximum.accumulate(curve)


class LevelSolver:
    """Vectorized solve of the shared fractional level over the tensors not yet encoded."""

    def __init__(self, curves: np.ndarray, numels: np.ndarray) -> None:
        self.curves, self.numels = curves, numels.astype(np.float64)

    def total(self, t: float, start: int) -> float:
        lo = int(np.floor(t))
        hi = min(lo + 1, self.curves.shape[1] - 1)
        f = t - lo
        c = self.curves[start:]
        return float(self.numels[start:] @ ((1 - f) * c[:, lo] + f * c[:, hi]))

    def solve(self, budget_bits: float, start: int = 0) -> float:
        L = self.curves.shape[1]
        if start >= len(self.curves):
            return float(L - 1)
        if self.total(0.0, start) > budget_bits:
            raise RateTargetError("the requested bits/weight is below the lowest rate this codec reaches")
        if self.total(L - 1, start) <= budget_bits:
            return float(L - 1)
        lo, hi = 0.0, float(L - 1)
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.total(mid, start) <= budget_bits else (lo, mid)
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
