"""Rate allocation across layers from measured sensitivities (NOTES §3: "continuous rate allocation").

Inside one tensor, `water_filling_offsets` spreads rate over columns by diag(H). Across tensors the Hessian alone
does not say how much a layer's output error matters (q/k errors pass through a softmax, v/o/down errors land on
the residual stream, the residual grows with depth), so we measure it: on the *original* model, one block at a
time, add Gaussian noise shaped like codec error (σ·r_i per row, r_i the row std the codec normalizes by) to one
linear layer and record the block-output MSE it causes, per unit of normalized noise variance. That is the layer's
weight a_L in the objective Σ_L a_L · D_L · N_L (D_L the normalized distortion per weight), whose equal-slope
solution under D ∝ 2^(−2R) is R_L = R̄ + ½·log2(a_L / geomean a); one codec level is ¼ bit, so the level offset
is 2·log2(a_L / geomean a) (rounded, clipped). The shared level itself stays with `RateController`, so the
whole-file budget is still met exactly.

Three currencies for a_L, measured in docs/CALIBRATION.md ("Rate across layers"):
- `relative`: block-output MSE over the mean square of the block output;
- `absolute`: block-output MSE as is;
- `kl` (default): `relative` times the block's propagation gain g_i — the KL divergence of the model's
  next-token distribution per unit of relative block-output error, measured by perturbing all linears of block
  i at once with codec-shaped noise and running the perturbed residual stream through the rest of the original
  model (one pass over the blocks carries one perturbed stream per block already passed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from codec.chunking import row_scales

NOISE_STD = 2.0**-5  # normalized noise std: small enough for the linear regime, far above fp32 round-off
MAX_OFFSET = 8  # levels (±2 bits/weight), like the per-column offsets
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


def _run(layer, hidden: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], batch):
        r = layer(hidden[s : s + batch], **kwargs)
        out[s : s + batch] = r[0] if isinstance(r, tuple) else r
    return out


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
        noise = torch.randn(w.shape, generator=generator).to(w.device) * row_scales(w).float().to(w.device)[:, None]
        saved = w.clone()
        w.add_(noise * NOISE_STD)
        try:
            mse = float((_run(layer, hidden, kwargs, batch) - clean).double().pow(2).mean())
        finally:
            w.copy_(saved)
        out[name] = mse / (NOISE_STD**2 * max(scale, 1e-30))
    return out


def level_offsets(sensitivities: dict[str, float], strength: float = 1.0) -> list[LayerSensitivity]:
    """Equal-slope level offsets, 2·strength·log2(a / geomean a), rounded and clipped to ±MAX_OFFSET."""
    if not strength >= 0:
        raise AllocationError(f"allocation strength must be ≥ 0, got {strength}")
    if not sensitivities:
        return []
    logs = {n: math.log2(max(a, 1e-30)) for n, a in sensitivities.items()}
    mean = sum(logs.values()) / len(logs)
    return [LayerSensitivity(n, a, int(max(-MAX_OFFSET, min(MAX_OFFSET, round(2 * strength * (logs[n] - mean))))))
            for n, a in sensitivities.items()]


@torch.no_grad()
def perturbed_output(layer, modules: dict[str, torch.nn.Linear], hidden: torch.Tensor, kwargs: dict, batch: int,
                     generator: torch.Generator, std: float = PROPAGATION_NOISE_STD) -> torch.Tensor:
    """The block's output with codec-shaped noise on all of `modules` at once (weights restored afterwards)."""
    saved = {n: m.weight.data.clone() for n, m in modules.items()}
    try:
        for m in modules.values():
            w = m.weight.data
            w.add_(torch.randn(w.shape, generator=generator).to(w.device) * row_scales(w).float().to(w.device)[:, None]
                   * std)
        return _run(layer, hidden, kwargs, batch)
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
