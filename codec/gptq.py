"""GPTQ and RTN baselines for one linear layer, written for this project.

GPTQ: E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv 2210.17323 (2022), Algorithm 1. The layer is ``y = x Wᵀ`` with
``W`` m×n (out × in) and ``H = E[x xᵀ]`` (:mod:`codec.hessian`); GPTQ minimizes ``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` greedily,
one input column at a time, spreading each column's rounding error over the columns not yet quantized.

Quantization grid (both methods): asymmetric min/max per group of ``group`` consecutive input columns of a row
(in processing order, see ``act_order``): ``scale = (max − min) / (2^bits − 1)`` and ``zero = min``, both stored
as fp16, codes ``c = clamp(round((w − zero) / scale), 0, 2^bits − 1)``, ``ŵ = zero + scale · c`` (a group whose
scale is 0 stores codes 0). So ``zeros`` holds the fp16 group *minimum*, not an integer zero-point; the codes
and side info of :func:`rtn_quantize` are exactly those of :func:`codec.baselines.rtn_encode`.

Everything runs in float32 on W's device, deterministically (no random numbers, stable sorts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from codec.hessian import regularize

FP16_MAX = 65504.0
SIDE_BITS = 16  # each fp16 scale and fp16 zero, per group and row
PERM_BITS = 16  # each entry of the column order when act_order is used


@dataclass
class QuantizedLinear:
    """Codes and side info of a quantized m×n matrix.

    ``codes[:, j]`` is processing-order column j, i.e. original column ``perm[j]`` when ``perm`` is set (act
    order) and column j otherwise; group g covers processing-order columns ``[g·group, (g+1)·group)``.
    """

    codes: torch.Tensor  # uint8 (m, n), in processing order
    scales: torch.Tensor  # float16 (m, n_groups)
    zeros: torch.Tensor  # float16 (m, n_groups): the group minimum, ŵ = zeros + scales · codes
    perm: torch.Tensor | None  # int64 (n,): processing order → original column; None = identity
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group)

    def dequantize(self) -> torch.Tensor:
        """Float32 (m, n) in the ORIGINAL column order."""
        n = self.shape[1]
        gidx = torch.arange(n, device=self.codes.device) // self.group
        deq = _dequant(self.codes.to(torch.float32), self.scales.float()[:, gidx], self.zeros.float()[:, gidx])
        if self.perm is None:
            return deq
        out = torch.empty_like(deq)
        out[:, self.perm] = deq
        return out

    def payload_bits(self) -> int:
        """``m·n·bits`` + 16 bits per fp16 scale and per fp16 zero (``m·n_groups`` each) + ``16·n`` for perm."""
        m, n = self.shape
        bits = m * n * self.bits + 2 * SIDE_BITS * m * self.n_groups
        if self.perm is not None:
            bits += PERM_BITS * n
        return bits

    def bits_per_weight(self) -> float:
        m, n = self.shape
        return self.payload_bits() / (m * n)


# --------------------------------------------------------------------------- the grid

def _group_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) per row of ``x`` (m, k): min/max over the row."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp(0, FP16_MAX).to(torch.float16)
    zero = lo.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes (same shape as x) for float32 scale/zero broadcastable to x."""
    pos = scale > 0
    safe = torch.where(pos, scale, torch.ones_like(scale))
    c = torch.where(pos, torch.round((x - zero) / safe), torch.zeros_like(x))
    return c.clamp(0, (1 << bits) - 1)


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # One expression shared by the quantizers and dequantize(), so both give bit-identical values.
    return zero + scale * codes


def _check(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    if w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {tuple(w.shape)}")
    if not torch.is_floating_point(w):
        raise ValueError(f"expected floating-point weights, got {w.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8 (codes are uint8), got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    w = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain NaN or infinity")
    return w


# --------------------------------------------------------------------------- RTN

@torch.no_grad()
def rtn_quantize(w: torch.Tensor, bits: int, group: int = 128) -> QuantizedLinear:
    """Round-to-nearest on the asymmetric min/max grid per group of ``group`` consecutive input columns."""
    w = _check(w, bits, group)
    m, n = w.shape
    n_groups = math.ceil(n / group)
    codes = torch.empty(m, n, dtype=torch.uint8, device=w.device)
    scales = torch.empty(m, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    for g in range(n_groups):
        s, e = g * group, min((g + 1) * group, n)
        scales[:, g], zeros[:, g] = _group_params(w[:, s:e], bits)
        codes[:, s:e] = _codes(w[:, s:e], scales[:, g:g + 1].float(), zeros[:, g:g + 1].float(), bits).to(torch.uint8)
    return QuantizedLinear(codes=codes, scales=scales, zeros=zeros, perm=None, bits=bits, group=group)


# --------------------------------------------------------------------------- GPTQ

def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), the matrix GPTQ's updates read rows of."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"dampened H is not positive definite (Cholesky failed at column {int(info) - 1}); "
                         "increase damp")
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise ValueError("H⁻¹ is not numerically positive definite in float32; increase damp")
    return u


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group: int = 128,
    act_order: bool = False,
    block: int = 128,
    damp: float = 0.01,
) -> QuantizedLinear:
    """GPTQ (Frantar et al. 2022, Algorithm 1) on the same grid as :func:`rtn_quantize`.

    * ``H`` is regularized by :func:`codec.hessian.regularize` (``H/mean(diag H) + damp·I``; GPTQ adds
      ``damp·mean(diag H)``, the same up to a scale GPTQ is invariant to). Dead inputs (``diag(H) = 0``) get a
      unit diagonal and their weight columns are set to 0 before quantizing (they never reach the output).
    * ``U`` = upper Cholesky factor of ``H⁻¹``; column j's error ``(w_j − ŵ_j) / U[j, j]`` is fed to the
      remaining columns of its block at once and to the columns after the block in one lazy batch update per
      block of ``block`` columns.
    * Group parameters (min/max) are computed when the first column of a group is reached, from the *current*
      error-updated weights of the whole group, including the lazy updates still pending for columns after
      the block (the reference code reads the stale matrix there when a group does not start a block).
    * ``act_order``: columns are processed by decreasing ``diag(H)`` (stable: ties by index), and groups are
      consecutive in that order ("dynamic" groups: a group's columns need not be contiguous originally; we do not
      implement "static groups"). The order is stored as ``perm`` (16 bits per column in the payload).
    """
    w = _check(w, bits, group)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    m, n = w.shape
    if h.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for W of shape {tuple(w.shape)}, got {tuple(h.shape)}")
    h = h.detach().to(device=w.device, dtype=torch.float32)
    w = w.clone()
    w[:, torch.diagonal(h) == 0] = 0
    hr = regularize(h, damp)
    perm = None
    if act_order:
        perm = torch.sort(torch.diagonal(hr), descending=True, stable=True).indices
        w = w[:, perm]
        hr = hr[perm][:, perm]
    u = _inverse_cholesky_upper(hr)

    n_groups = math.ceil(n / group)
    codes = torch.empty(m, n, dtype=torch.uint8, device=w.device)
    scales = torch.empty(m, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    s32 = z32 = torch.empty(0)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % group == 0:
                ge = min(j + group, n)
                cur = w1[:, i:min(ge, i2) - i1]
                if ge > i2:  # the group runs past this block: apply the pending lazy update to its tail
                    tail = w[:, i2:ge] - err1[:, :i] @ u[i1:j, i2:ge]
                    cur = torch.cat([cur, tail], dim=1)
                g = j // group
                scales[:, g], zeros[:, g] = _group_params(cur, bits)
                s32, z32 = scales[:, g].float(), zeros[:, g].float()
            x = w1[:, i]
            c = _codes(x, s32, z32, bits)
            codes[:, j] = c.to(torch.uint8)
            e = (x - _dequant(c, s32, z32)) / u1[i, i]
            w1[:, i:] -= torch.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return QuantizedLinear(codes=codes, scales=scales, zeros=zeros, perm=perm, bits=bits, group=group)


# --------------------------------------------------------------------------- container records

def to_segments(q: QuantizedLinear) -> tuple[dict, dict[str, bytes]]:
    """(meta, segments) of a container record: bit-packed codes, fp16 scales and minima, int16 perm."""
    from codec.baselines import pack_codes

    m, n = q.shape
    meta = {"rows": m, "cols": n, "bits": q.bits, "group": q.group}
    segs = {
        "codes": pack_codes(q.codes.cpu().numpy(), q.bits),
        "scales": q.scales.cpu().numpy().astype("<f2").tobytes(),
        "zeros": q.zeros.cpu().numpy().astype("<f2").tobytes(),
    }
    if q.perm is not None:
        segs["perm"] = q.perm.cpu().numpy().astype("<i2").tobytes()
    return meta, segs


def from_segments(meta: dict, segs: dict[str, bytes]) -> QuantizedLinear:
    """Inverse of `to_segments`; every length is checked against rows, cols, bits and group."""
    from codec.baselines import unpack_codes

    m, n, bits, group = (int(meta[k]) for k in ("rows", "cols", "bits", "group"))
    if not (1 <= bits <= 8 and group >= 1 and m >= 0 and n >= 0):
        raise ValueError(f"bad fixed-length record parameters rows={m} cols={n} bits={bits} group={group}")
    n_groups = math.ceil(n / group)
    need = {"codes": math.ceil(m * n * bits / 8), "scales": 2 * m * n_groups, "zeros": 2 * m * n_groups}
    for k, size in need.items():
        if len(segs.get(k, b"")) != size:
            raise ValueError(f"segment {k!r} has {len(segs.get(k, b''))} bytes, expected {size}")
    perm = None
    if "perm" in segs:
        if len(segs["perm"]) != 2 * n:
            raise ValueError(f"segment 'perm' has {len(segs['perm'])} bytes, expected {2 * n}")
        perm = torch.from_numpy(np.frombuffer(segs["perm"], "<i2").astype(np.int64))
        if not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError("segment 'perm' is not a permutation of the columns")
    codes = torch.from_numpy(unpack_codes(segs["codes"], m * n, bits).astype(np.uint8).reshape(m, n))
    scales = torch.from_numpy(np.frombuffer(segs["scales"], "<f2").reshape(m, n_groups).copy())
    zeros = torch.from_numpy(np.frombuffer(segs["zeros"], "<f2").reshape(m, n_groups).copy())
    return QuantizedLinear(codes, scales, zeros, perm, bits, group)
