"""GPTQ and RTN baselines: exact layout and payload, agreement with codec.baselines and with GPTQ's textbook
(OBS-update) form, and GPTQ beating RTN on the proxy error of real SmolLM2 layers with real calibration data.

SmolLM2's linear weights sit on a Q4_1 grid (4-bit, group 32; MODELS.md), so the real-layer claims are made at
3 bits, where the grid is coarser than the model's own. Measured on layers[3], group 128, H from 8 × 256 wiki
calibration tokens (the module constants):

* on the calibration data itself (the objective GPTQ minimizes): GPTQ / RTN ≈ 0.36 (down_proj) and 0.31
  (q_proj); with act order ≈ 0.29 and 0.20. Bound: 0.6.
* held out (H of 8 × 256 tokens of the evaluation text): q_proj 0.56 (act order 0.42). Bound: 0.8. down_proj
  (n = 1536 inputs, only 2048 calibration tokens) **overfits**: held out it is ≈ 1.9× WORSE than RTN (2.2× with
  act order); it needs far more tokens (≈ 0.90× RTN held out at 128 × 512) or a larger damp (≈ 0.99× at
  damp 1.0 with 2048 tokens). So no held-out claim is made for down_proj at this calibration size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.baselines import rtn_encode
from codec.calibration import load_calibration
from codec.gptq import QuantizedLinear, gptq_quantize, rtn_quantize
from codec.hessian import collect_hessians, proxy_error, regularize

GPTQ_OVER_RTN_BOUND = 0.6  # in sample
HELDOUT_BOUND = 0.8  # q_proj, held out
LAYER = 3
N_SEQ, SEQ_LEN = 8, 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _manual_dequant(q: QuantizedLinear) -> np.ndarray:
    """ŵ[:, perm[j]] = zeros[:, j // group] + scales[:, j // group] · codes[:, j], written independently in numpy."""
    codes = q.codes.numpy().astype(np.float32)
    m, n = codes.shape
    g = np.arange(n) // q.group
    deq = q.zeros.numpy().astype(np.float32)[:, g] + q.scales.numpy().astype(np.float32)[:, g] * codes
    out = np.empty_like(deq)
    perm = np.arange(n) if q.perm is None else q.perm.numpy()
    out[:, perm] = deq
    return out


def _check_layout(q: QuantizedLinear, m: int, n: int, bits: int, group: int, act_order: bool) -> None:
    n_groups = math.ceil(n / group)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (m, n)
    assert int(q.codes.max()) <= (1 << bits) - 1
    assert q.scales.dtype == q.zeros.dtype == torch.float16 and q.scales.shape == q.zeros.shape == (m, n_groups)
    assert (q.bits, q.group, q.n_groups, q.shape) == (bits, group, n_groups, (m, n))
    if act_order:
        assert q.perm is not None and q.perm.dtype == torch.int64
        assert torch.equal(torch.sort(q.perm).values, torch.arange(n))
    else:
        assert q.perm is None
    expected = m * n * bits + 2 * 16 * m * n_groups + (16 * n if act_order else 0)
    assert q.payload_bits() == expected
    assert q.bits_per_weight() == pytest.approx(expected / (m * n))
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (m, n)
    assert np.array_equal(deq.numpy(), _manual_dequant(q))


# --------------------------------------------------------------------------- synthetic checks

@pytest.mark.parametrize(("bits", "group", "n"), [(3, 128, 300), (4, 32, 256), (2, 64, 64), (8, 128, 130)])
def test_rtn_matches_reference_baseline(bits: int, group: int, n: int) -> None:
    w = torch.randn(40, n, generator=_gen(bits)) * 0.05
    q = rtn_quantize(w, bits, group)
    _check_layout(q, 40, n, bits, group, act_order=False)
    assert torch.equal(q.dequantize(), rtn_encode(w, bits, group).decoded)
    # Its payload matches codec.baselines' real byte payload (packed codes + fp16 scales + fp16 minimums).
    assert q.payload_bits() <= rtn_encode(w, bits, group).bits < q.payload_bits() + 8


def _correlated(n_tok: int, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(n_tok, n, generator=g) @ (torch.randn(n, n, generator=g) / n**0.5) + 0.2
    x[:, :4] *= 10
    return x


def test_gptq_with_identity_hessian_is_rtn() -> None:
    w = torch.randn(24, 200, generator=_gen(1))
    for bits in (2, 3, 4):
        g = gptq_quantize(w, torch.eye(200) * 3.0, bits, group=64)
        r = rtn_quantize(w, bits, group=64)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layout_and_lazy_blocks(act_order: bool) -> None:
    m, n = 32, 300
    x = _correlated(2000, n, seed=2)
    h = x.T @ x / x.shape[0]
    w = torch.randn(m, n, generator=_gen(3)) * 0.1
    q = gptq_quantize(w, h, 3, group=96, act_order=act_order)
    _check_layout(q, m, n, 3, 96, act_order)
    err = proxy_error(w, q.dequantize(), h)
    assert err < 0.8 * proxy_error(w, rtn_quantize(w, 3, 96).dequantize(), h)
    # Lazy batch updates are exact: other block sizes (groups crossing block edges, block 1 = no batching) give
    # the same result up to float32 rounding.
    for block in (1, 40, 1000):
        other = gptq_quantize(w, h, 3, group=96, act_order=act_order, block=block)
        assert float((other.codes != q.codes).float().mean()) < 0.01
        assert proxy_error(w, other.dequantize(), h) == pytest.approx(err, rel=0.02)
    # Deterministic.
    again = gptq_quantize(w, h, 3, group=96, act_order=act_order)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scales, q.scales)


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, act_order: bool) -> torch.Tensor:
    """GPTQ in its original OBS form (no Cholesky, no lazy batches), float64: after quantizing column j, update
    the remaining columns by ``−err/[H⁻¹]_jj · [H⁻¹]_j,:`` and remove j from H⁻¹ by the Schur complement."""
    w = w.double().clone()
    w[:, torch.diagonal(h) == 0] = 0
    hr = regularize(h.double(), 0.01)
    n = w.shape[1]
    perm = torch.sort(torch.diagonal(hr), descending=True, stable=True).indices if act_order else torch.arange(n)
    w, hr = w[:, perm], hr[perm][:, perm]
    hinv = torch.linalg.inv(hr)
    qmax = (1 << bits) - 1
    out = torch.empty_like(w)
    for j in range(n):
        if j % group == 0:
            blk = w[:, j:j + group]
            lo, hi = blk.amin(1), blk.amax(1)
            s = ((hi - lo) / qmax).to(torch.float16).double()
            z = lo.to(torch.float16).double()
        c = torch.where(s > 0, torch.round((w[:, j] - z) / torch.where(s > 0, s, 1)), 0).clamp(0, qmax)
        out[:, j] = z + s * c
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w[:, j:] -= torch.outer(err, hinv[j, j:])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    result = torch.empty_like(out)
    result[:, perm] = out
    return result


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_textbook_form(act_order: bool) -> None:
    m, n = 24, 200
    x = _correlated(1500, n, seed=6)
    x[:, 50] = 0  # one dead input
    h = x.T @ x / x.shape[0]
    w = torch.randn(m, n, generator=_gen(7)) * 0.1
    ref = _textbook_gptq(w, h, 3, 64, act_order)
    q = gptq_quantize(w, h, 3, group=64, act_order=act_order, block=48)  # groups straddle block edges
    deq = q.dequantize().double()
    assert float((deq != ref).float().mean()) < 0.005  # float32 vs float64 may flip a rare rounding tie
    assert proxy_error(w, q.dequantize(), h) == pytest.approx(proxy_error(w, ref, h), rel=1e-3)


def test_gptq_dead_columns() -> None:
    m, n = 16, 128
    x = _correlated(1000, n, seed=4)
    x[:, [0, 77]] = 0
    h = x.T @ x / x.shape[0]
    w = torch.randn(m, n, generator=_gen(5))
    for act_order in (False, True):
        q = gptq_quantize(w, h, 3, group=32, act_order=act_order)
        deq = q.dequantize()
        assert bool(torch.isfinite(deq).all())
        # The dead columns were zeroed (and receive no feedback), so they sit within half a step of 0.
        gidx = (torch.arange(n) if q.perm is None else torch.argsort(q.perm)) // 32
        step = q.scales.float()[:, gidx]
        assert bool((deq[:, [0, 77]].abs() <= step[:, [0, 77]] / 2 + 1e-7).all())
        assert proxy_error(w, deq, h) < proxy_error(w, rtn_quantize(w, 3, 32).dequantize(), h)
        if act_order:  # dead columns (diag 0 → 1 after regularization) sort by their unit diagonal, ties by index
            assert q.perm is not None and q.perm.tolist().index(0) < q.perm.tolist().index(77)


def test_gptq_rejects_bad_arguments() -> None:
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, 9)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(w, 0)
    with pytest.raises(ValueError, match="group"):
        gptq_quantize(w, h, 3, group=0)
    with pytest.raises(ValueError, match=r"H must be \(8, 8\)"):
        gptq_quantize(w, torch.eye(7), 3)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(8), 3)
    with pytest.raises(ValueError, match="NaN"):
        rtn_quantize(torch.full((2, 2), float("nan")), 3)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, 2 * torch.ones(8, 8) - torch.eye(8), 3)  # unit diagonal, eigenvalue −1
    with pytest.raises(ValueError, match="non-negative diagonal"):
        gptq_quantize(w, -torch.eye(8), 3)


# --------------------------------------------------------------------------- real layers

@pytest.fixture(scope="module")
def real_layers(smollm2_dir: Path, eval_text: str, tmp_path_factory) -> dict[str, tuple[torch.Tensor, ...]]:
    """(W, H calibration, H held out) of layers[3].mlp.down_proj and .self_attn.q_proj: H over 8 × 256 tokens of
    the wiki calibration text, and over 8 × 256 tokens of the evaluation text (passed as a user .txt file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    cal = load_calibration("wiki", tokenizer, n_seq=N_SEQ, seq_len=SEQ_LEN, seed=0)
    eval_file = tmp_path_factory.mktemp("heldout") / "wiki_eval.txt"
    eval_file.write_text(eval_text, encoding="utf-8")
    held = load_calibration(eval_file, tokenizer, n_seq=N_SEQ, seq_len=SEQ_LEN, seed=0)
    layer = model.model.layers[LAYER]
    mods = {"down_proj": layer.mlp.down_proj, "q_proj": layer.self_attn.q_proj}
    accs = collect_hessians(model, cal.input_ids, mods, batch_size=4, stop_after=layer)
    held_accs = collect_hessians(model, held.input_ids, mods, batch_size=4, stop_after=layer)
    assert all(acc.n_tokens == N_SEQ * SEQ_LEN for acc in [*accs.values(), *held_accs.values()])
    return {k: (mod.weight.detach().clone(), accs[k].hessian(), held_accs[k].hessian()) for k, mod in mods.items()}


def _three(w: torch.Tensor, h: torch.Tensor) -> tuple[QuantizedLinear, QuantizedLinear, QuantizedLinear]:
    return rtn_quantize(w, 3, 128), gptq_quantize(w, h, 3, 128), gptq_quantize(w, h, 3, 128, act_order=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["down_proj", "q_proj"])
def test_gptq_beats_rtn_on_real_layer_in_sample(real_layers, name: str) -> None:
    w, h, _ = real_layers[name]
    m, n = w.shape
    quantized = _three(w, h)
    for q, act in zip(quantized, (False, False, True), strict=True):
        _check_layout(q, m, n, 3, 128, act)
    e_rtn, e_gptq, e_act = (proxy_error(w, q.dequantize(), h) for q in quantized)
    print(f"{name} {tuple(w.shape)} 3-bit g128 proxy error (calibration H): RTN {e_rtn:.5f}, GPTQ {e_gptq:.5f} "
          f"({e_gptq / e_rtn:.3f}×), GPTQ act-order {e_act:.5f} ({e_act / e_rtn:.3f}×)")
    assert 0 < e_gptq < GPTQ_OVER_RTN_BOUND * e_rtn
    assert 0 < e_act < GPTQ_OVER_RTN_BOUND * e_rtn
    assert e_rtn < 0.2  # sanity: 3-bit RTN is a coarse but real approximation


@pytest.mark.slow
def test_gptq_beats_rtn_held_out(real_layers) -> None:
    for name in ("q_proj", "down_proj"):
        w, h, h_held = real_layers[name]
        e_rtn, e_gptq, e_act = (proxy_error(w, q.dequantize(), h_held) for q in _three(w, h))
        print(f"{name} {tuple(w.shape)} 3-bit g128 proxy error (held-out H): RTN {e_rtn:.5f}, GPTQ {e_gptq:.5f} "
              f"({e_gptq / e_rtn:.3f}×), GPTQ act-order {e_act:.5f} ({e_act / e_rtn:.3f}×)")
        if name == "q_proj":  # down_proj overfits 2048 tokens (module docstring): reported, not claimed
            assert 0 < e_gptq < HELDOUT_BOUND * e_rtn
            assert 0 < e_act < HELDOUT_BOUND * e_rtn
