"""Reference coders for one 2-D weight matrix, with real byte payloads, to benchmark NWC against.

* **RTN** (round-to-nearest): asymmetric min/max quantization per group of ``group`` consecutive weights
  along the input dimension (rows of ``W`` are outputs), fp16 scale and fp16 minimum per group, fixed-length
  codes bit-packed. This is the fixed-length grid family of NOTES §3 (0.45–0.70 bit above the Gaussian
  rate–distortion bound).
* **ECSQ** (entropy-coded scalar quantization): per-row RMS scale (fp16), one uniform step for the whole
  matrix, symbols ``round(W / (scale·step))`` ANS-coded (constriction) with one empirical integer pmf per
  matrix stored in the payload. Ideal ECSQ sits 0.255 bit above the bound at high rate (NOTES §3).

Every ``*_encode`` returns :class:`BaselineResult` whose ``payload`` the matching ``*_decode`` turns back into
exactly ``decoded`` (bit-identical float32), and ``bits = 8·len(payload)`` counts everything the decoder needs
except the shape (and, for RTN, ``bits``/``group``), which a container would store once per tensor.

ECSQ payload layout (little-endian)::

    step f32 | lo i32 | K u32 | scales f16[m] | pmf u32[K] (sums to 2^PRECISION) | ANS words u32[...]

RTN payload layout::

    codes (m·n codes of ``bits`` bits, row-major, LSB-first bit packing, zero-padded to a byte)
    | scales f16[m·G] | minimums f16[m·G]        (G = ceil(n / group), row-major)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from codec.chunking import row_scales
from codec.entropy import TOTAL, quantize_pmf

FP16_MAX = 65504.0
_ECSQ_HEADER = struct.Struct("<fiI")
MAX_ECSQ_SYMBOLS = 1 << 20  # bound on the pmf table (K ≤ 2^20 entries) the step search may produce


@dataclass
class BaselineResult:
    decoded: torch.Tensor  # float32 (m, n), exactly what the decoder reproduces from payload
    payload: bytes
    bits: int  # 8 * len(payload)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.decoded.numel()


def _matrix(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    return w.detach().to(torch.float32).cpu().contiguous()


def _result(decoded: torch.Tensor, payload: bytes) -> BaselineResult:
    return BaselineResult(decoded=decoded, payload=payload, bits=8 * len(payload))


# --------------------------------------------------------------------------- metric

def nmse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean over rows of (row MSE / row variance); rows with zero variance are skipped."""
    w = w.detach().double().reshape(w.shape[0], -1)
    w_hat = w_hat.detach().double().reshape(w.shape[0], -1)
    var = w.var(dim=1, unbiased=False)
    mse = (w - w_hat).pow(2).mean(dim=1)
    keep = var > 0
    if not bool(keep.any()):
        return 0.0
    return float((mse[keep] / var[keep]).mean())


def row_stats(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, int]:
    """(Σ over rows with nonzero variance of row-MSE/row-variance, number of such rows): for aggregating."""
    w = w.detach().double().reshape(w.shape[0], -1)
    w_hat = w_hat.detach().double().reshape(w.shape[0], -1)
    var = w.var(dim=1, unbiased=False)
    mse = (w - w_hat).pow(2).mean(dim=1)
    keep = var > 0
    return float((mse[keep] / var[keep]).sum()), int(keep.sum())


# --------------------------------------------------------------------------- bit packing

def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned codes < 2^bits -> bytes, each code's bits LSB first, all concatenated, zero-padded."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    c = np.ascontiguousarray(codes, dtype=np.uint16).reshape(-1)
    if bits == 8:
        return c.astype(np.uint8).tobytes()
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as uint16."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf[:count].astype(np.uint16)
    planes = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1, dtype=np.uint16)


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# --------------------------------------------------------------------------- RTN

def _groups(n: int, group: int) -> int:
    if group < 1:
        raise ValueError(f"group must be ≥ 1, got {group}")
    return math.ceil(n / group)


def _rtn_dequant(
    codes: torch.Tensor, scale16: torch.Tensor, min16: torch.Tensor, n: int, group: int
) -> torch.Tensor:
    """codes (m, n) -> float32 (m, n) = code·scale + min of its group (identical on both sides)."""
    m = codes.shape[0]
    idx = torch.arange(n) // group
    s = scale16.float().reshape(m, -1)[:, idx]
    z = min16.float().reshape(m, -1)[:, idx]
    return codes.float() * s + z


def rtn_encode(w: torch.Tensor, bits: int, group: int = 128) -> BaselineResult:
    """Asymmetric round-to-nearest, min/max per group of ``group`` weights along the input dimension."""
    w = _matrix(w)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    m, n = w.shape
    g = _groups(n, group)
    pad = g * group - n
    wp = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1) if pad else w  # edge padding keeps min/max
    blocks = wp.reshape(m, g, group)
    lo, hi = blocks.amin(dim=2), blocks.amax(dim=2)
    qmax = (1 << bits) - 1
    scale16 = ((hi - lo) / qmax).clamp(0, FP16_MAX).to(torch.float16)
    min16 = lo.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    idx = torch.arange(n) // group
    s = scale16.float()[:, idx]
    z = min16.float()[:, idx]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round((w - z) / safe), torch.zeros_like(w)).clamp(0, qmax)
    codes = codes.to(torch.int32)
    payload = (
        pack_codes(codes.numpy(), bits)
        + scale16.numpy().astype("<f2").tobytes()
        + min16.numpy().astype("<f2").tobytes()
    )
    return _result(_rtn_dequant(codes, scale16, min16, n, group), payload)


def rtn_decode(payload: bytes, shape: tuple[int, int], bits: int, group: int = 128) -> torch.Tensor:
    m, n = shape
    g = _groups(n, group)
    code_len = _packed_len(m * n, bits)
    if len(payload) != code_len + 4 * m * g:
        raise ValueError(f"RTN payload has {len(payload)} bytes, expected {code_len + 4 * m * g}")
    mv = memoryview(payload)
    codes = torch.from_numpy(unpack_codes(mv[:code_len], m * n, bits).astype(np.int32)).reshape(m, n)
    sides = np.frombuffer(mv[code_len:], dtype="<f2").astype(np.float16)
    scale16 = torch.from_numpy(sides[: m * g].copy()).reshape(m, g)
    min16 = torch.from_numpy(sides[m * g:].copy()).reshape(m, g)
    return _rtn_dequant(codes, scale16, min16, n, group)


# --------------------------------------------------------------------------- ECSQ

def _ecsq_symbols(w: torch.Tensor, scales: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols int64 (m, n), per-row quantizer step float32 (m, 1))."""
    delta = scales.float()[:, None] * torch.tensor(step, dtype=torch.float32)
    return torch.round(w / delta).to(torch.int64), delta


def _pmf(sym: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """(lo, counts int64 over lo..hi, integer pmf summing to TOTAL)."""
    lo, hi = int(sym.min()), int(sym.max())
    counts = torch.bincount((sym - lo).reshape(-1), minlength=hi - lo + 1).numpy().astype(np.int64)
    return lo, counts, quantize_pmf(counts.astype(np.float64))


def _ecsq_estimate_bits(m: int, counts: np.ndarray, pmf: np.ndarray) -> float:
    """Payload bits predicted from the integer pmf (the ANS stream is within a word or two of this)."""
    side = 8 * (_ECSQ_HEADER.size + 2 * m + 4 * len(pmf))
    if len(pmf) == 1:
        return side
    code = float((counts * -np.log2(pmf / TOTAL)).sum())
    return side + 32 * math.ceil(code / 32)


def _model(pmf: np.ndarray):
    return constriction.stream.model.Categorical(pmf.astype(np.float64) / TOTAL, perfect=False)


def ecsq_encode(w: torch.Tensor, step: float) -> BaselineResult:
    """Uniform scalar quantization with step ``step·rms(row)``, ANS-coded with one pmf per matrix."""
    w = _matrix(w)
    m, n = w.shape
    if m * n == 0:
        raise ValueError("cannot code an empty matrix")
    step = float(np.float32(step))
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be positive and finite, got {step}")
    scales = row_scales(w)
    sym, delta = _ecsq_symbols(w, scales, step)
    span = int(sym.max()) - int(sym.min()) + 1
    if span > MAX_ECSQ_SYMBOLS:
        raise ValueError(f"step {step} spans {span} symbols (> {MAX_ECSQ_SYMBOLS}); use a larger step")
    lo, _, pmf = _pmf(sym)
    words = b""
    if len(pmf) > 1:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse((sym.reshape(-1) - lo).numpy().astype(np.int32), _model(pmf))
        words = coder.get_compressed().astype("<u4").tobytes()
    payload = (
        _ECSQ_HEADER.pack(step, lo, len(pmf))
        + scales.numpy().astype("<f2").tobytes()
        + pmf.astype("<u4").tobytes()
        + words
    )
    return _result(sym.float() * delta, payload)


def ecsq_decode(payload: bytes, shape: tuple[int, int]) -> torch.Tensor:
    m, n = shape
    mv = memoryview(payload)
    if len(payload) < _ECSQ_HEADER.size + 2 * m:
        raise ValueError("ECSQ payload is too short")
    step, lo, k = _ECSQ_HEADER.unpack_from(mv, 0)
    off = _ECSQ_HEADER.size
    scales = torch.from_numpy(np.frombuffer(mv[off: off + 2 * m], dtype="<f2").astype(np.float16))
    off += 2 * m
    pmf = np.frombuffer(mv[off: off + 4 * k], dtype="<u4").astype(np.int64)
    off += 4 * k
    if len(pmf) != k or k < 1 or pmf.sum() != TOTAL or (pmf <= 0).any():
        raise ValueError("ECSQ payload holds an invalid pmf table")
    rest = mv[off:]
    if len(rest) % 4:
        raise ValueError("ECSQ ANS stream length is not a multiple of 4 bytes")
    if k == 1:
        idx = np.zeros(m * n, dtype=np.int32)
    else:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(rest, dtype="<u4").astype(np.uint32))
        idx = coder.decode(_model(pmf), m * n)
    sym = torch.from_numpy(idx.astype(np.int64) + lo).reshape(m, n)
    delta = scales.float()[:, None] * torch.tensor(step, dtype=torch.float32)
    return sym.float() * delta


def ecsq_at_rate(
    w: torch.Tensor, target_bpw: float, tol: float = 0.002, max_iter: int = 40
) -> BaselineResult:
    """ECSQ with the step that brings the measured payload bits/weight closest to ``target_bpw``.

    Safeguarded bisection on log2(step): the rate falls by ≈ 1 bit per doubling of the step, so a secant
    step is tried inside the bracket and plain bisection is used whenever it would leave it. Rates are
    predicted from the integer pmf (exact to a word), and the final choice is encoded for real.
    """
    w = _matrix(w)
    m, n = w.shape
    numel = m * n
    scales = row_scales(w)
    cache: dict[float, float] = {}

    def rate(log_step: float) -> float:
        if log_step not in cache:
            sym, _ = _ecsq_symbols(w, scales, 2.0**log_step)
            lo, hi = int(sym.min()), int(sym.max())
            if hi - lo + 1 > MAX_ECSQ_SYMBOLS:
                cache[log_step] = math.inf
            else:
                _, counts, pmf = _pmf(sym)
                cache[log_step] = _ecsq_estimate_bits(m, counts, pmf) / numel
        return cache[log_step]

    # High-rate guess: R ≈ h(W/rms) − log2(step), h ≤ 2.05 bit for unit variance (Gaussian).
    x0 = 2.05 - target_bpw
    r0 = rate(x0)
    step_dir = 1.0 if r0 > target_bpw else -1.0
    a, ra = x0, r0
    b, rb = x0, r0
    for _ in range(30):  # expand until the target is bracketed
        b = a + step_dir
        rb = rate(b)
        if (rb - target_bpw) * (ra - target_bpw) <= 0:
            break
        a, ra = b, rb
    else:
        raise ValueError(f"cannot reach {target_bpw} bits/weight with ECSQ on a {m}×{n} matrix")
    lo_x, hi_x = (a, b) if a < b else (b, a)  # rate(lo_x) ≥ target ≥ rate(hi_x)
    r_lo, r_hi = (ra, rb) if a < b else (rb, ra)
    for _ in range(max_iter):
        if abs(r_lo - target_bpw) <= tol or abs(r_hi - target_bpw) <= tol or hi_x - lo_x < 1e-7:
            break
        x = lo_x + (hi_x - lo_x) / 2
        if math.isfinite(r_lo) and r_lo != r_hi:
            xs = lo_x + (r_lo - target_bpw) / (r_lo - r_hi) * (hi_x - lo_x)  # secant (regula falsi)
            if lo_x + 0.05 * (hi_x - lo_x) < xs < hi_x - 0.05 * (hi_x - lo_x):
                x = xs
        r = rate(x)
        if r >= target_bpw:
            lo_x, r_lo = x, r
        else:
            hi_x, r_hi = x, r
    best = min((lo_x, hi_x), key=lambda x: abs(cache[x] - target_bpw))
    return ecsq_encode(w, float(np.float32(2.0**best)))


__all__ = [
    "BaselineResult",
    "ecsq_at_rate",
    "ecsq_decode",
    "ecsq_encode",
    "nmse",
    "pack_codes",
    "row_stats",
    "rtn_decode",
    "rtn_encode",
    "unpack_codes",
]
