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


def monotone(curve: np.ndarray) -> np.ndarray:
    """Sample noise can make a measured curve dip; rate is non-decreasing in λ, so enforce it."""
    return np.maximum.accumulate(curve)


class LevelSolver:
    """Vectorized solve of the shared fractional level over the tensors not yet encoded. Tensor i codes at
    level clip(t + offsets[i], 0, L−1): the offsets carry a cross-layer allocation (codec.allocation)."""

    def __init__(self, curves: np.ndarray, numels: np.ndarray, offsets: np.ndarray | None = None) -> None:
        self.curves, self.numels = curves, numels.astype(np.float64)
        self.offsets = np.zeros(len(curves)) if offsets is None else offsets.astype(np.float64)

    def level(self, t: float, i: int) -> float:
        return float(np.clip(t + self.offsets[i], 0, self.curves.shape[1] - 1))

    def rates(self, t: float, start: int = 0) -> np.ndarray:
        """bits/weight of each tensor from `start` on at shared level t (linear between integer levels)."""
        L = self.curves.shape[1]
        lv = np.clip(t + self.offsets[start:], 0, L - 1)
        lo = np.floor(lv).astype(np.int64)
        hi = np.minimum(lo + 1, L - 1)
        f = lv - lo
        c = self.curves[start:]
        rows = np.arange(len(c))
        return (1 - f) * c[rows, lo] + f * c[rows, hi]

    def total(self, t: float, start: int) -> float:
        return float(self.numels[start:] @ self.rates(t, start))

    def solve(self, budget_bits: float, start: int = 0) -> float:
        L = self.curves.shape[1]
        if start >= len(self.curves):
            return float(L - 1)
        # t's range must let every tensor reach both ends whatever its offset
        lo = float(-np.max(self.offsets[start:], initial=0.0).clip(min=0))
        hi = float(L - 1 - np.min(self.offsets[start:], initial=0.0).clip(max=0))
        if self.total(lo, start) > budget_bits:
            raise RateTargetError("the requested bits/weight is below the lowest rate this codec reaches")
        if self.total(hi, start) <= budget_bits:
            return hi
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


@dataclass
class RateItem:
    """What rate control knows of one tensor before it is encoded."""

    name: str
    coded: bool  # learned coding with a rate curve; otherwise a fixed number of bytes
    numel: int
    fixed_bytes: int  # payload bytes independent of the rate (raw data, side info, ANS flush)
    table_bytes: int  # its row in the container's tensor table
    curve: np.ndarray | None = None  # bits/weight per level (coded tensors)


class RateController:
    """Spends a whole-file byte budget over tensors encoded in a fixed order.

    Before each tensor is written, `advance` re-solves the shared level for the coded tensors not yet
    written against the bytes already on disk, so sampling error in the curves is absorbed downstream."""

    def __init__(self, items: list[RateItem], bits: float, total_params: int, n_levels: int,
                 header_bytes: int, footer_bytes: int) -> None:
        self.items = {it.name: it for it in items}
        coded = [it for it in items if it.coded]
        self._coded_index = {it.name: i for i, it in enumerate(coded)}
        self.solver = LevelSolver(
            np.stack([it.curve for it in coded]) if coded else np.zeros((0, n_levels)),
            np.array([it.numel for it in coded]),
        )
        self.bits, self.total_params, self.n_levels = bits, total_params, n_levels
        self.budget_bytes = bits * total_params / 8
        self._pending = sum(it.fixed_bytes + it.table_bytes for it in items) + footer_bytes
        self._fixed_total = self._pending + header_bytes

    @classmethod
    def for_budget(cls, items: list[RateItem], budget_bytes: float, n_levels: int) -> RateController:
        """A controller for a part of a file (one shard's records and table rows) that must fit `budget_bytes`;
        callers pass the bytes of that part only to `advance`."""
        numel = max(sum(it.numel for it in items), 1)
        return cls(items, 8 * budget_bytes / numel, numel, n_levels, 0, 0)

    def initial_level(self) -> float:
        """The shared level before any tensor is written, the header counted as `header_bytes`."""
        return self.solver.solve(8 * (self.budget_bytes - self._fixed_total))

    def predicted_bytes(self, t: float) -> dict[str, float]:
        """Each tensor's bytes in the file at shared level t: payload and table row."""
        coded = dict(zip(self._coded_index, self.solver.numels * self.solver.rates(t) / 8, strict=True))
        return {n: it.fixed_bytes + it.table_bytes + coded.get(n, 0.0) for n, it in self.items.items()}

    def feasible_range(self) -> tuple[float, float]:
        """Lowest and highest whole-file bits/weight this codec can reach for these tensors."""
        lo = (8 * self._fixed_total + self.solver.total(0, 0)) / self.total_params
        hi = (8 * self._fixed_total + self.solver.total(self.n_levels - 1, 0)) / self.total_params
        return lo, hi

    def check(self, codec_id: str) -> None:
        lo, hi = self.feasible_range()
        if not lo <= self.bits <= hi:
            raise RateTargetError(
                f"--bits {self.bits:g} is outside what codec {codec_id} reaches for this model: "
                f"{lo:.2f} to {hi:.2f} bits/weight (lossless tensors and side info included)"
            )

    def set_offsets(self, offsets: dict[str, float]) -> None:
        """Per-tensor level offsets (cross-layer allocation); tensors not named keep 0. Set before encoding."""
        for name, off in offsets.items():
            self.solver.offsets[self._coded_index[name]] = off

    def advance(self, name: str, bytes_written: int, table_bytes_written: int) -> float | None:
        """Call once per tensor, in encode order, before writing it: the level for a coded tensor."""
        it = self.items[name]
        self._pending -= it.fixed_bytes + it.table_bytes
        if not it.coded:
            return None
        this = it.fixed_bytes + it.table_bytes
        spare = self.budget_bytes - bytes_written - table_bytes_written - self._pending - this
        i = self._coded_index[name]
        return self.solver.level(self.solver.solve(8 * spare, i), i)
