"""The NWC model: rate-level-conditioned analysis/synthesis transforms and a learned factorized prior.

Differences from the paper's codec (NOTES §1), chosen for a CPU-trainable, variable-rate product:
- One model for all rates: the paper's six λ-specific codecs and its four quality-level embeddings are
  folded into `n_levels` rate levels, λ_l = λ_0·2^(l/2) (≈ 0.25 bit apart). A column's importance simply
  raises its level, so rate allocation is continuous instead of 4 fixed levels (NOTES §3).
- The transforms are residual around the identity with a per-level latent gain, and their last layers
  start at zero: an untrained model is exactly entropy-coded uniform scalar quantization (ECSQ) with the
  rate-optimal step for λ_l, and training can only move it away from that baseline where it helps.
- The prior is one deep factorized density (Ballé et al. 2018, appendix 6.1) per (level, latent channel).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from codec.chunking import CHUNK


@dataclass(frozen=True)
class CodecConfig:
    width: int = 128
    depth: int = 2
    n_levels: int = 28
    lambda0: float = 4.0  # λ of level 0; λ_l = lambda0 · 2^(l/2)
    latent: int = CHUNK

    def lambdas(self) -> torch.Tensor:
        return self.lambda0 * 2.0 ** (torch.arange(self.n_levels, dtype=torch.float64) / 2)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def ecsq_step(lam: torch.Tensor) -> torch.Tensor:
    """High-rate optimal uniform step for loss λ·D + R on unit-variance data: Δ² = 6/(λ ln 2)."""
    return torch.sqrt(6.0 / (lam * math.log(2.0)))


class GatedResidual(nn.Module):
    """x + out(blocks(in(x))) where each block is h + ReLU(LN(Linear(h))) gated by a per-level vector."""

    def __init__(self, dim: int, width: int, depth: int, n_levels: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.gates = nn.Embedding(n_levels, width)
        self.out = nn.Linear(width, dim)
        nn.init.ones_(self.gates.weight)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        gate = self.gates(level)
        h = self.inp(x)
        for lin, norm in zip(self.blocks, self.norms, strict=True):
            h = (h + F.relu(norm(lin(h)))) * gate
        return x + self.out(h)


class FactorizedDensity(nn.Module):
    """Deep factorized CDF c(x) = sigmoid(f(x)), f monotone, one per (level, channel).

    Filters (1, 3, 3, 3, 1) as in Ballé et al. 2018. Parameters are gathered per sample's level.
    """

    def __init__(self, n_levels: int, channels: int, init_scale: torch.Tensor, filters=(3, 3, 3)) -> None:
        super().__init__()
        dims = (1, *filters, 1)
        self.n_levels, self.channels = n_levels, channels
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        # init_scale[l]: the latent spread at level l, so that the initial density is roughly right.
        scale = init_scale.float().view(n_levels, 1, 1, 1) ** (1 / (len(dims) - 1))
        for i in range(len(dims) - 1):
            init = torch.log(torch.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(init.expand(n_levels, channels, dims[i + 1], dims[i]).clone()))
            self.biases.append(nn.Parameter(torch.rand(n_levels, channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(n_levels, channels, dims[i + 1], 1)))

    def logits(self, x: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C) values; level: (B,) level per row, or None when x is (L, C, P) over all levels."""
        if level is None:
            h = x.unsqueeze(-2)  # (L, C, 1, P)

            def take(p: torch.Tensor) -> torch.Tensor:
                return p
        else:
            h = x.unsqueeze(-1).unsqueeze(-1)  # (B, C, 1, 1)

            def take(p: torch.Tensor) -> torch.Tensor:
                return p[level]
        for i, (m, b) in enumerate(zip(self.matrices, self.biases, strict=True)):
            h = torch.matmul(F.softplus(take(m)), h) + take(b)
            if i < len(self.factors):
                h = h + torch.tanh(take(self.factors[i])) * torch.tanh(h)
        return h.squeeze(-2) if level is None else h.reshape(x.shape)

    def likelihood(self, y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        lower = self.logits(y - 0.5, level)
        upper = self.logits(y + 0.5, level)
        sign = -torch.sign(lower + upper).detach()  # evaluate in the tail where sigmoid is accurate
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))


class NWCModel(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        L, C = config.n_levels, config.latent
        step = ecsq_step(config.lambdas()).float()
        # Latent gain per (level, channel): starts at 1/step so that rounding the latent is ECSQ.
        self.log_gain = nn.Parameter((-torch.log(step)).view(L, 1).expand(L, C).clone())
        self.log_gain_dec = nn.Parameter(torch.log(step).view(L, 1).expand(L, C).clone())
        self.analysis = GatedResidual(C, config.width, config.depth, L)
        self.synthesis = GatedResidual(C, config.width, config.depth, L)
        self.density = FactorizedDensity(L, C, init_scale=1 / step)
        self.register_buffer("lambdas", config.lambdas().float(), persistent=False)

    def analyze(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self.analysis(x, level) * torch.exp(self.log_gain[level])

    def synthesize(self, y_hat: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self.synthesis(y_hat * torch.exp(self.log_gain_dec[level]), level)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: returns (x_hat, bits per chunk). Rate through additive uniform noise,
        distortion through straight-through rounding (Minnen & Singh 2020 found this mix works best)."""
        y = self.analyze(x, level)
        noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        bits = -torch.log2(self.density.likelihood(noisy, level).clamp_min(1e-9)).sum(-1)
        y_hat = y + (torch.round(y) - y).detach()
        return self.synthesize(y_hat, level), bits

    def loss(self, x: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_hat, bits = self(x, level)
        mse = (x - x_hat).pow(2).mean(-1)
        loss = (self.lambdas[level] * mse + bits / x.shape[-1]).mean()
        return loss, mse, bits / x.shape[-1]
