"""Hessian statistics: accumulation, regularization, proxy error, importance levels, block LDL (+ LDLQ order)."""

from __future__ import annotations

import pytest
import torch

from codec.hessian import (
    HessianAccumulator,
    block_ldl,
    collect_hessians,
    dead_columns,
    ldlq,
    proxy_error,
    regularize,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(n_tok: int, n: int, seed: int = 0) -> torch.Tensor:
    """Correlated, non-centred activations with a few large-magnitude channels (as in LLMs)."""
    g = _gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(n_tok, n, generator=g, dtype=torch.float64) @ mix + 0.3
    x[:, :3] *= 20
    return x


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    x = _activations(4 * n, n, seed)
    return x.T @ x / x.shape[0]


# --------------------------------------------------------------------------- accumulator

def test_accumulator_matches_direct_over_uneven_batches() -> None:
    n = 48
    x = _activations(1000, n, seed=1)
    sizes = [1, 7, 100, 3, 489, 400]  # sums to 1000
    acc = HessianAccumulator(n)
    start = 0
    for i, b in enumerate(sizes):
        chunk = x[start:start + b]
        if i == 3:
            chunk = chunk.reshape(1, 3, n)  # leading dims are tokens
        if i == 5:
            chunk = chunk.reshape(8, 50, n).float()
        acc.add(chunk)
        start += b
    acc.add(torch.empty(0, n))  # an empty batch is a no-op
    assert acc.n_tokens == 1000
    xs = torch.cat([x[:600], x[600:].float().double()])  # the float32 batch as it was seen
    direct = (xs.T @ xs / 1000).float()
    h = acc.hessian()
    assert h.dtype == torch.float32 and h.shape == (n, n)
    torch.testing.assert_close(h, direct, rtol=1e-6, atol=0)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accumulator_accepts_half_inputs(dtype: torch.dtype) -> None:
    n = 32
    x = _activations(300, n, seed=2).to(dtype)
    acc = HessianAccumulator(n)
    for part in x.split(37):
        acc.add(part)
    xd = x.double()
    torch.testing.assert_close(acc.hessian(), (xd.T @ xd / 300).float(), rtol=1e-6, atol=0)


def test_accumulator_running_mean_is_stable_over_many_batches() -> None:
    n = 16
    x = _activations(64, n, seed=3) * 1e3
    acc = HessianAccumulator(n)
    for _ in range(2000):
        acc.add(x)
    assert acc.n_tokens == 128_000
    torch.testing.assert_close(acc.hessian(), (x.T @ x / 64).float(), rtol=1e-6, atol=0)


def test_accumulator_rejects_bad_input() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="no activations"):
        acc.hessian()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        acc.add(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="floating point"):
        acc.add(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or infinity"):
        acc.add(torch.full((2, 8), float("inf"), dtype=torch.float16))
    with pytest.raises(ValueError, match="n_features"):
        HessianAccumulator(0)
    assert acc.n_tokens == 0


def test_collect_hessians_hooks_and_early_stop() -> None:
    torch.manual_seed(0)
    first, second, never = torch.nn.Linear(12, 20), torch.nn.Linear(20, 6), torch.nn.Linear(6, 3)
    calls = []
    never.register_forward_pre_hook(lambda *_: calls.append(1))
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second, never)
    ids = torch.randn(10, 7, 12)  # stands in for (n_seq, seq_len) token ids
    accs = collect_hessians(model, ids, {"first": first, "second": second}, batch_size=3, stop_after=second)
    assert calls == [] and not first._forward_hooks and not second._forward_hooks  # stopped, hooks removed
    x1 = ids.reshape(-1, 12).double()
    x2 = torch.relu(first(ids)).reshape(-1, 20).double().detach()
    assert accs["first"].n_tokens == accs["second"].n_tokens == 70
    torch.testing.assert_close(accs["first"].hessian(), (x1.T @ x1 / 70).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accs["second"].hessian(), (x2.T @ x2 / 70).float(), rtol=1e-5, atol=1e-6)
    full = collect_hessians(model, ids, {"second": second}, batch_size=10)
    assert calls == [1]
    torch.testing.assert_close(full["second"].hessian(), accs["second"].hessian(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- regularize, proxy error

@pytest.mark.parametrize("damp", [0.0, 0.01, 0.1])
def test_regularize_mean_diag(damp: float) -> None:
    h = _spd(40).float()
    r = regularize(h, damp)
    assert r.dtype == torch.float32 and torch.equal(r, r.T)
    assert abs(float(torch.diagonal(r).double().mean()) - (1 + damp)) < 1e-6
    torch.testing.assert_close(r, (h.double() / torch.diagonal(h.double()).mean()).float()
                               + damp * torch.eye(40), rtol=1e-6, atol=1e-7)
    # Scale invariant.
    torch.testing.assert_close(regularize(h * 1e-6, damp), r, rtol=1e-5, atol=1e-7)


def test_regularize_dead_columns() -> None:
    n = 20
    x = _activations(200, n, seed=4)
    x[:, [5, 11]] = 0  # inputs never active on the calibration data
    h = (x.T @ x / 200).float()
    assert dead_columns(h).nonzero().flatten().tolist() == [5, 11]
    r = regularize(h, 0.01)
    assert abs(float(torch.diagonal(r).double().mean()) - 1.01) < 1e-6
    for j in (5, 11):
        assert float(r[j, j]) == pytest.approx(1.01)
        assert not bool(r[j].clone().index_fill_(0, torch.tensor([j]), 0).any())
    torch.linalg.cholesky(r)  # positive definite
    live = torch.ones(n, dtype=torch.bool)
    live[[5, 11]] = False
    hl = h[live][:, live]
    torch.testing.assert_close(r[live][:, live], regularize(hl, 0.01), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(regularize(torch.zeros(4, 4), 0.01), 1.01 * torch.eye(4))
    with pytest.raises(ValueError, match="square"):
        regularize(torch.zeros(3, 4))


def test_proxy_error_is_relative_output_error() -> None:
    n, m = 24, 10
    x = _activations(5000, n, seed=5)
    h = x.T @ x / x.shape[0]
    g = _gen(6)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    direct = float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert proxy_error(w, w_hat, h) == pytest.approx(direct, rel=1e-9)
    assert proxy_error(w.float(), w_hat.float(), h.float()) == pytest.approx(direct, rel=1e-5)
    assert proxy_error(w, w, h) == 0.0
    assert proxy_error(w, torch.zeros_like(w), h) == pytest.approx(1.0)
    assert proxy_error(torch.zeros(2, n), torch.zeros(2, n), h) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        proxy_error(w, w[:, :-1], h)


# --------------------------------------------------------------------------- block LDL and LDLQ

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_ldl_reconstructs(dtype: torch.dtype) -> None:
    n, b = 300, 128
    h = regularize(_spd(n, seed=8), 0.01).to(dtype)
    lower, d = block_ldl(h, block=b)
    assert lower.dtype == d.dtype == dtype and lower.shape == d.shape == (n, n)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close((lower.double() @ d.double() @ lower.double().T), h.double(), rtol=0,
                               atol=tol * float(h.abs().max()))
    bounds = [(0, 128), (128, 256), (256, 300)]
    block_id = torch.zeros(n, dtype=torch.long)
    for k, (s, e) in enumerate(bounds):
        block_id[s:e] = k
        assert torch.equal(lower[s:e, s:e], torch.eye(e - s, dtype=dtype))  # unit diagonal blocks
        dk = d[s:e, s:e].double()
        torch.testing.assert_close(dk, dk.T)
        assert float(torch.linalg.eigvalsh(dk).min()) > 0
    above = block_id[:, None] < block_id[None, :]  # row block < column block: strictly upper blocks
    off = block_id[:, None] != block_id[None, :]
    assert not bool(lower[above].any()), "L must be block-lower-triangular"
    assert not bool(d[off].any()), "D must be block-diagonal"
    assert bool(lower[~above & off].abs().gt(0).any())


def test_block_ldl_divisible_and_errors() -> None:
    h = regularize(_spd(256, seed=9), 0.01)
    lower, d = block_ldl(h, block=64)
    torch.testing.assert_close(lower @ d @ lower.T, h, rtol=0, atol=1e-10)
    lower1, d1 = block_ldl(h, block=1)  # ordinary LDLᵀ: D diagonal
    assert torch.equal(d1, torch.diag(torch.diagonal(d1)))
    with pytest.raises(ValueError, match="not positive definite"):
        block_ldl(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="block"):
        block_ldl(h, block=0)


def test_ldlq_feedback_order_and_loss_identity() -> None:
    """With H = L D Lᵀ and feedback from the last block to the first, the proxy loss is exactly the sum of the
    blocks' own D-weighted coding errors, and feedback beats plain rounding on a correlated H."""
    n, m, b = 200, 32, 64
    idx = torch.arange(n, dtype=torch.float64)
    h = regularize(0.95 ** (idx[:, None] - idx[None, :]).abs(), 0.01)  # AR(1) correlation between inputs
    w = torch.randn(m, n, generator=_gen(11), dtype=torch.float64)
    lower, d = block_ldl(h, block=b)
    step = 0.5

    def rtn(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return torch.round(x / step) * step

    w_hat, target = ldlq(w, lower, rtn, block=b)
    e = w - w_hat
    total = float(((e @ h) * e).sum())
    blocks = [(s, min(s + b, n)) for s in range(0, n, b)]
    per_block = sum(float(((target[:, s:e_] - w_hat[:, s:e_]) @ d[s:e_, s:e_] * (target[:, s:e_] - w_hat[:, s:e_]))
                          .sum()) for s, e_ in blocks)
    assert total == pytest.approx(per_block, rel=1e-9)
    # Within a block the block coder must exploit H itself (D_k is the block's conditional covariance), so scalar
    # rounding gains only with small blocks; with block 1 (D diagonal: GPTQ-like) feedback pays off clearly.
    plain = w - rtn(w, 0, n)
    plain_loss = float(((plain @ h) * plain).sum())
    lower1, _ = block_ldl(h, block=1)
    e1 = w - ldlq(w, lower1, rtn, block=1)[0]
    assert float(((e1 @ h) * e1).sum()) < 0.5 * plain_loss
    assert total < plain_loss
