"""Progress reporting: a terminal bar for the CLI and/or a callback for services (the worker turns it into job
progress and uses it as a cancellation point: an exception raised by the callback stops the run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Progress:
    stage: str  # "plan", "allocate", "compress", "decompress"
    done: int
    total: int
    unit: str = "w"  # "w" weights, "tensor", "block"
    detail: str = ""  # e.g. the tensor just written


ProgressFn = Callable[[Progress], None]


class Meter:
    """One counter, two outputs: a tqdm bar when `show`, `on_progress` events when given."""

    def __init__(self, stage: str, total: int, unit: str = "w", show: bool = False,
                 on_progress: ProgressFn | None = None, desc: str | None = None) -> None:
        self.stage, self.total, self.unit, self.done, self.fn = stage, total, unit, 0, on_progress
        self.bar = tqdm(total=total, disable=not show, desc=desc or stage, unit=unit, unit_scale=unit == "w")

    def update(self, n: int = 1, detail: str = "") -> None:
        self.done += n
        self.bar.update(n)
        if self.fn is not None:
            self.fn(Progress(self.stage, self.done, self.total, self.unit, detail))

    def close(self) -> None:
        self.bar.close()
