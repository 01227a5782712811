"""Rate allocation across layers from measured sensitivities (NOTES §3: "continuous rate allocation").

Inside one tensor, the coder spreads rate over columns by diag(H) with the same `equal_slope_offsets`. Across
tensors the Hessian alone does not say how much a layer's output error matters (q/k errors pass through a softmax,
v/o/down errors land on the residual stream, the residual grows with depth), so we measure it: on the *original*
model, one block at a time, add Gaussian noise shaped like codec error (σ·r_i per row, r_i the row std the codec
normalizes by) to one linear layer and record the block-output MSE it causes, per unit of normalized noise
variance. That is the layer's weight a_L in the objective Σ_L a_L · D_L · N_L (D_L the normalized distortion per
weight), whose equal-slope solution under D ∝ 2^(−2R) is R_L = R̄ + ½·log2(a_L / geomean a); one codec level is ¼
bit, so the level offset is 2·log2(a_L / geomean a) (rounded, clipped). The shared level itself stays with
`RateController`, so the whole-file budget is still met exactly.

Three currencies for a_L (off by default: all measured worse than one shared level, docs/BENCHMARKS.md
"allocation"):
- `relative`: block-output MSE over the mean square of the block output;
- `absolute`: block-output MSE as is;
- `kl`: `relative` times the block's propagation gain g_i — the KL divergence of the model's
  next-token distribution per unit of relative block-output error, measured by perturbing all linears of block
  i at once with codec-shaped noise and running the perturbed residual stream through the rest of the original
  model (one pass over the blocks carries one perturbed stream per block already passed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codec.blocks import run_block
from codec.chunking import row_scales

NOISE_STD = 2.0**-5  # normalized noise std: small enough for the linear regime, far above fp32 round-off
MAX_OFFSET = 8  # levels (±2 bits/weight), for columns and for layers
PROPAGATION_SEQS = 4  # calibration sequences carried by the perturbed streams of the "kl" mode
PROPAGATION_NOISE_STD = 2.0**-4  # all linears of a block at once; KL is second order, keep it above fp32 noise
NORMALIZATIONS = ("relative", "absolute")
MODES = ("kl", *NORMALIZATIONS)


class AllocationError(ValueError):
    """Bad allocation options."""


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    sensitivity: float  # block-output MSE per unit normalized weight-noise variance (see `normalization`)
    offset: int  # level offset relative to the shared level (1 level = ¼ bit/weight)


def equal_slope_offsets(weights: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Level offsets minimizing Σ a_i·D_i at a fixed mean rate when D ∝ 2^(−2R): R_i = R̄ + ½·log2(a_i / geomean a),
    and one level is ¼ bit, so offset_i = 2·strength·log2(a_i / geomean a), rounded, clipped to ±MAX_OFFSET."""
    logs = np.log2(np.maximum(np.asarray(weights, np.float64), 1e-30))
    off = np.round(2 * strength * (logs - logs.mean()))
    return np.clip(off, -MAX_OFFSET, MAX_OFFSET).astype(np.int64)


def _codec_noise(w: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """Gaussian noise shaped like codec error: std·r_i in row i (r_i the row std the codec normalizes by)."""
    return torch.randn(w.shape, generator=generator).to(w.device) * row_scales(w).float().to(w.device)[:, None] * std


@torch.no_grad()
def block_sensitivities(layer, modules: dict[str, torch.nn.Linear], hidden: torch.Tensor, clean: torch.Tensor,
                        kwargs: dict, batch: int, generator: torch.Generator,
                        normalization: str = "relative") -> dict[str, float]:
    """Sensitivity of the block output `clean = layer(hidden)` to codec-shaped noise in each of `modules`."""
    if normalization not in NORMALIZATIONS:
        raise AllocationError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    scale = float(clean.double().pow(2).mean()) if normalization == "relative" else 1.0
    out: dict[str, float] = {}
    for name, mod in modules.items():
        w = mod.weight.data
        saved = w.clone()
        w.add_(_codec_noise(w, generator, NOISE_STD))
        try:
            mse = float((run_block(layer, hidden, kwargs, batch) - clean).double().pow(2).mean())
        finally:
            w.copy_(saved)
        out[name] = mse / (NOISE_STD**2 * max(scale, 1e-30))
    return out


def level_offsets(sensitivities: dict[str, float], strength: float = 1.0) -> list[LayerSensitivity]:
    """Equal-slope level offsets of the layers from their sensitivities (`equal_slope_offsets`)."""
    if not strength >= 0:
        raise AllocationError(f"allocation strength must be ≥ 0, got {strength}")
    if not sensitivities:
        return []
    offsets = equal_slope_offsets(np.array(list(sensitivities.values())), strength)
    return [LayerSensitivity(n, a, int(o)) for (n, a), o in zip(sensitivities.items(), offsets, strict=True)]


@torch.no_grad()
def perturbed_output(layer, modules: dict[str, torch.nn.Linear], hidden: torch.Tensor, kwargs: dict, batch: int,
                     generator: torch.Generator, std: float = PROPAGATION_NOISE_STD) -> torch.Tensor:
    """The block's output with codec-shaped noise on all of `modules` at once (weights restored afterwards)."""
    saved = {n: m.weight.data.clone() for n, m in modules.items()}
    try:
        for m in modules.values():
            m.weight.data.add_(_codec_noise(m.weight.data, generator, std))
        return run_block(layer, hidden, kwargs, batch)
    finally:
        for n, m in modules.items():
            m.weight.data.copy_(saved[n])


def relative_mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).double().pow(2).mean() / ref.double().pow(2).mean().clamp_min(1e-30))


@torch.no_grad()
def mean_kl(logits_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_ref ‖ p), in float64 (the values are small differences of log-probabilities)."""
    lp = torch.log_softmax(logits_ref.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())
