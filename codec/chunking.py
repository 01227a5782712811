"""Chunking and normalization of weight matrices (NOTES §1).

A chunk is 16 consecutive *output rows of one input column*: we reshape Wᵀ (n×m) into rows of 16,
so every chunk lives in exactly one input column and inherits that column's rate level.
Rows are normalized by their RMS (stored as fp16 side info) so the codec always sees unit-scale data.
"""

from __future__ import annotations

import math

import torch

CHUNK = 16


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View any tensor with ndim >= 2 as (out, in): conv kernels (o, i, kh, kw) become (o, i·kh·kw)."""
    if t.ndim < 2:
        raise ValueError(f"expected a tensor with at least 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row RMS in fp16, the side info of normalization; all-zero rows get scale 1."""
    rms = w.float().pow(2).mean(dim=1).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    s = rms.to(torch.float16)
    # fp16 underflow/overflow would make the normalized rows explode; clamp into fp16's normal range.
    return s.float().clamp(6.2e-5, 6.5e4).to(torch.float16)


def n_chunks(rows: int) -> int:
    return math.ceil(rows / CHUNK)


def to_chunks(wn: torch.Tensor) -> torch.Tensor:
    """(m, n) normalized matrix -> (n, ceil(m/16), 16) chunks; the last chunk is zero-padded."""
    m, n = wn.shape
    pad = n_chunks(m) * CHUNK - m
    wt = wn.t()
    if pad:
        wt = torch.nn.functional.pad(wt, (0, pad))
    return wt.reshape(n, -1, CHUNK)


def from_chunks(chunks: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of to_chunks: (n, k, 16) -> (rows, n), dropping the padding."""
    n = chunks.shape[0]
    return chunks.reshape(n, -1)[:, :rows].t()
