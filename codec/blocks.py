"""Running one decoder block on calibration activations (shared by calibrated compression and allocation)."""

from __future__ import annotations

import torch


def forward(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's hidden-state output (HF decoder layers return a tensor or a tuple led by it)."""
    r = layer(x, **kwargs)
    return r[0] if isinstance(r, tuple) else r


@torch.no_grad()
def run_block(layer, hidden: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    """`layer` over all sequences of `hidden`, `batch` sequences at a time."""
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], batch):
        out[s : s + batch] = forward(layer, hidden[s : s + batch], kwargs)
    return out
