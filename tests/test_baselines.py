"""Reference coders (RTN, ECSQ): exact round trips of real payloads, rates, and distortion against theory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from codec.baselines import (
    ecsq_at_rate,
    ecsq_decode,
    ecsq_encode,
    nmse,
    pack_codes,
    row_stats,
    rtn_decode,
    rtn_encode,
    unpack_codes,
)


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


def gap(bits_per_weight: float, d: float) -> float:
    """Effective gap to the Gaussian bound D(R) = 2^(-2R) at unit variance (NOTES §3)."""
    return bits_per_weight - 0.5 * math.log2(1.0 / d)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8, 12])
def test_pack_unpack(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001)
    data = pack_codes(codes, bits)
    assert len(data) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_codes(data, 1001, bits), codes)


@pytest.mark.parametrize(
    ("shape", "bits", "group"),
    [((256, 512), 4, 128), ((33, 300), 3, 128), ((7, 50), 2, 64), ((16, 130), 6, 32), ((5, 9), 8, 128)],
)
def test_rtn_round_trip(shape: tuple[int, int], bits: int, group: int) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05
    r = rtn_encode(w, bits, group)
    assert r.bits == 8 * len(r.payload)
    assert r.decoded.dtype == torch.float32 and r.decoded.shape == w.shape
    assert torch.equal(rtn_decode(r.payload, shape, bits, group), r.decoded)
    m, n = shape
    assert len(r.payload) == (m * n * bits + 7) // 8 + 4 * m * math.ceil(n / group)
    # every weight lies within half a step (plus fp16 rounding of scale/min) of its reconstruction
    assert float((w - r.decoded).abs().max()) <= float(w.abs().max()) * 2 / ((1 << bits) - 1)


def test_rtn_4bit_gaussian(gauss: torch.Tensor) -> None:
    r = rtn_encode(gauss, 4, 128)
    assert r.bits == gauss.numel() * (4 + 32 / 128)  # exactly 4.25 bits/weight
    d = nmse(gauss, r.decoded)
    # a uniform 16-level grid over a min/max range of ≈ ±2.7σ: Δ²/12 ≈ 0.01 σ²
    assert 0.005 < d < 0.02


def test_rtn_constant_and_zero_groups() -> None:
    w = torch.zeros(4, 200)
    w[1] = 3.0
    w[2, :100] = torch.linspace(-1, 1, 100)
    r = rtn_encode(w, 3, 128)
    assert torch.equal(rtn_decode(r.payload, (4, 200), 3, 128), r.decoded)
    assert torch.equal(r.decoded[0], w[0]) and torch.equal(r.decoded[1], w[1])


def test_ecsq_round_trip(gauss: torch.Tensor) -> None:
    w = gauss[:64, :200] * 0.02
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 5.0  # a far outlier widens the symbol range
    for step in (0.05, 0.3, 2.0):
        r = ecsq_encode(w, step)
        assert r.bits == 8 * len(r.payload)
        assert torch.equal(ecsq_decode(r.payload, (64, 200)), r.decoded)


def test_ecsq_all_zero_matrix() -> None:
    r = ecsq_encode(torch.zeros(8, 40), 0.1)
    assert torch.equal(ecsq_decode(r.payload, (8, 40)), torch.zeros(8, 40))


def test_ecsq_rejects_truncated_payload(gauss: torch.Tensor) -> None:
    r = ecsq_encode(gauss[:16], 0.2)
    with pytest.raises(ValueError):
        ecsq_decode(r.payload[:-3], (16, 512))


@pytest.mark.parametrize("target", [2.0, 3.5, 6.0])
def test_ecsq_hits_target_rate(gauss: torch.Tensor, target: float) -> None:
    r = ecsq_at_rate(gauss, target)
    assert abs(r.bits_per_weight - target) <= 0.05
    assert torch.equal(ecsq_decode(r.payload, tuple(gauss.shape)), r.decoded)


def test_ecsq_gap_to_gaussian_bound(gauss: torch.Tensor) -> None:
    r = ecsq_at_rate(gauss, 4.0)
    g = gap(r.bits_per_weight, nmse(gauss, r.decoded))
    # ideal ECSQ: 0.255 bit; plus side info (fp16 row scales, the pmf table) ≈ 0.05 bit at this size
    assert 0.15 <= g <= 0.40


def test_ecsq_beats_rtn_at_equal_bits(gauss: torch.Tensor) -> None:
    rtn = rtn_encode(gauss, 4, 128)
    ecsq = ecsq_at_rate(gauss, rtn.bits_per_weight)
    assert ecsq.bits <= rtn.bits * 1.01
    assert nmse(gauss, ecsq.decoded) < 0.8 * nmse(gauss, rtn.decoded)


def test_nmse_skips_constant_rows() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    w_hat = w.clone()
    w_hat[0, 0] += 0.5
    w_hat[1] += 1.0
    expected = (0.25 / 4) / 1.25
    assert nmse(w, w_hat) == pytest.approx(expected)
    assert row_stats(w, w_hat) == (pytest.approx(expected), 1)


def test_real_minilm_matrix() -> None:
    from codec.assets import minilm_dir

    name = "encoder.layer.0.attention.self.query.weight"
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        w = f.get_tensor(name)
    assert w.shape == (384, 384) and w.dtype == torch.float32
    rtn = rtn_encode(w, 3, 128)
    ecsq = ecsq_at_rate(w, 3.0)
    assert torch.equal(rtn_decode(rtn.payload, (384, 384), 3, 128), rtn.decoded)
    assert torch.equal(ecsq_decode(ecsq.payload, (384, 384)), ecsq.decoded)
    d_rtn, d_ecsq = nmse(w, rtn.decoded), nmse(w, ecsq.decoded)
    assert math.isfinite(d_rtn) and math.isfinite(d_ecsq)
    assert 0 < d_ecsq < 0.1 and 0 < d_rtn < 0.2
    assert abs(ecsq.bits_per_weight - 3.0) <= 0.05
