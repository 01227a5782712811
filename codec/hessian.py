"""Second-order statistics of a linear layer's input, for calibration-guided compression (NOTES §1).

Notation: a linear layer has ``W`` of shape m×n (out × in) and computes ``y = x Wᵀ``. For an input
distribution x, the expected output error of a perturbed ``Ŵ`` is ``E‖(W−Ŵ)x‖² = tr((W−Ŵ) H (W−Ŵ)ᵀ)`` with
``H = E[x xᵀ]`` (n×n). This module accumulates H, regularizes it, computes the proxy error, and the block LDL
factorization that LDLQ error feedback (QuIP#, NWC) uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class HessianAccumulator:
    """Running ``E[x xᵀ]`` over all tokens of the activations passed to :meth:`add`.

    The state is kept in float64 as a running mean: after a batch of b tokens with ``S = Σ xᵀx``,
    ``H ← H·N/(N+b) + S/(N+b)``, so H stays O(‖x‖²) however many batches are added (no growing sum).
    """

    def __init__(self, n_features: int, device: torch.device | str | None = None) -> None:
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self.n_features = n_features
        self._h = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self._n = 0

    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return self._h.device

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add activations ``x`` of shape (..., n_features) (any float dtype); every leading index is a token."""
        if not torch.is_floating_point(x):
            raise ValueError(f"activations must be floating point, got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.n_features:
            raise ValueError(f"activations must have shape (..., {self.n_features}), got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.n_features).to(device=self._h.device, dtype=torch.float64)
        b = x.shape[0]
        if b == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("activations contain NaN or infinity")
        total = self._n + b
        self._h.mul_(self._n / total).addmm_(x.T, x, alpha=1.0 / total)
        self._n = total

    def hessian(self) -> torch.Tensor:
        """``E[x xᵀ]`` as float32 (n, n), exactly symmetric."""
        if self._n == 0:
            raise ValueError("no activations were added")
        h = 0.5 * (self._h + self._h.T)
        return h.to(torch.float32)


def _square(h: torch.Tensor, name: str = "H") -> None:
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(h.shape)}")


def dead_columns(h: torch.Tensor) -> torch.Tensor:
    """Boolean (n,): inputs whose ``diag(H)`` is 0 (never active on the calibration data)."""
    _square(h)
    return torch.diagonal(h) == 0


@torch.no_grad()
def regularize(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``H / mean(diag H) + damp·I`` (NOTES §1), symmetrized, in H's dtype.

    Dead inputs (``diag(H) = 0``) get a unit diagonal so the result is positive definite, as GPTQ does; unlike
    GPTQ (which writes 1 in H's raw scale before computing the mean) the 1 is written in the *normalized* scale,
    i.e. the mean is taken over the live diagonal, so the result does not depend on H's overall scale. Either
    way ``mean(diag(result)) = 1 + damp``. Their rows/columns are zeroed (they already are for a PSD H); the
    matching weight columns should be zeroed too (they never affect the output). An all-zero H gives
    ``(1 + damp)·I``.
    """
    _square(h)
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    hd = h.detach().to(torch.float64)
    hd = 0.5 * (hd + hd.T)
    diag = torch.diagonal(hd)
    if bool((diag < 0).any()) or not bool(torch.isfinite(hd).all()):
        raise ValueError("H must be finite with a non-negative diagonal")
    dead = diag == 0
    live = ~dead
    out = torch.zeros_like(hd)
    if bool(live.any()):
        out = hd / diag[live].mean()
        out[dead, :] = 0
        out[:, dead] = 0
    idx = torch.arange(h.shape[0], device=h.device)
    out[idx[dead], idx[dead]] = 1.0
    out[idx, idx] += damp
    return out.to(h.dtype)


@torch.no_grad()
def proxy_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W−Ŵ) H (W−Ŵ)ᵀ) / tr(W H Wᵀ)``: output error relative to output energy (float64 arithmetic).

    Returns 0.0 when both traces are 0 and ``inf`` when only the denominator is.
    """
    _square(h)
    if w.shape != w_hat.shape or w.ndim != 2 or w.shape[1] != h.shape[0]:
        raise ValueError(f"shapes do not match: W {tuple(w.shape)}, Ŵ {tuple(w_hat.shape)}, H {tuple(h.shape)}")
    hd = h.detach().to(torch.float64)
    wd = w.detach().to(device=hd.device, dtype=torch.float64)
    e = wd - w_hat.detach().to(device=hd.device, dtype=torch.float64)
    num = float(((e @ hd) * e).sum())
    den = float(((wd @ hd) * wd).sum())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    return [(s, min(s + block, n)) for s in range(0, n, block)]


@torch.no_grad()
def block_ldl(h: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL factorization ``H = L D Lᵀ`` (as in QuIP#'s ``block_LDL``), computed in float64.

    Blocks are the consecutive index ranges ``[0, block), [block, 2·block), …`` (the last one may be shorter).
    Returns, in H's dtype and device:

    * ``L`` (n, n): unit block-**lower**-triangular: ``L[s:e, s:e] = I`` on every diagonal block, zero above it;
    * ``D`` (n, n): block-diagonal, symmetric positive definite blocks ``D[s:e, s:e]``, zero elsewhere.

    From the Cholesky factor ``H = C Cᵀ``: ``L[:, s:e] = C[:, s:e] C[s:e, s:e]⁻¹`` and
    ``D[s:e, s:e] = C[s:e, s:e] C[s:e, s:e]ᵀ``.

    Feedback order (LDLQ; NOTES §1, step 3): with this convention the error feedback runs from the **last
    block to the first**. For ``E = W − Ŵ``, ``tr(E H Eᵀ) = Σ_k (E L)[:, k] D_k (E L)[:, k]ᵀ`` and
    ``(E L)[:, s:e] = E[:, s:e] + E[:, e:] L[e:, s:e]``; so coding block k (after every block right of it) from
    ``W' = W[:, s:e] + (W[:, e:] − Ŵ[:, e:]) L[e:, s:e]`` makes ``(E L)[:, s:e] = W' − Ŵ[:, s:e]``, the block's own
    coding error, and the total proxy loss is ``Σ_k tr((W'_k − Ŵ_k) D_k (W'_k − Ŵ_k)ᵀ)`` (see :func:`ldlq`).
    GPTQ's first-to-last order corresponds to the transposed convention ``H = Lᵀ D L``.

    Raises ValueError if H is not positive definite (regularize it first).
    """
    _square(h)
    n = h.shape[0]
    hd = h.detach().to(torch.float64)
    hd = 0.5 * (hd + hd.T)
    c, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        raise ValueError(f"H is not positive definite (Cholesky failed at column {int(info) - 1}); regularize it")
    lower = torch.zeros_like(hd)
    d = torch.zeros_like(hd)
    for s, e in _blocks(n, block):
        ckk = c[s:e, s:e]
        # L[:, s:e] = C[:, s:e] · C_kk⁻¹  (rows above s are zero in C, so they stay zero)
        lower[s:, s:e] = torch.linalg.solve_triangular(ckk, c[s:, s:e], upper=False, left=False)
        lower[s:e, s:e] = torch.eye(e - s, dtype=hd.dtype, device=hd.device)  # exact unit diagonal block
        d[s:e, s:e] = ckk @ ckk.T
    return lower.to(h.dtype), d.to(h.dtype)


@torch.no_grad()
def ldlq(
    w: torch.Tensor,
    lower: torch.Tensor,
    quantize_block: Callable[[torch.Tensor, int, int], torch.Tensor],
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDLQ error feedback with ``L`` from :func:`block_ldl` (same ``block``), last block first.

    For each block ``[s, e)`` from the last to the first: ``W' = W[:, s:e] + (W[:, e:] − Ŵ[:, e:]) L[e:, s:e]``,
    then ``Ŵ[:, s:e] = quantize_block(W', s, e)`` (any coder: RTN, the NWC codec, …). Returns (Ŵ, W'), where
    ``W'`` holds every block's feedback-corrected target, so ``W' − Ŵ`` is the per-block coding error whose
    ``D``-weighted energy is the proxy loss. Arithmetic in W's dtype (use float32 or float64).
    """
    m, n = w.shape
    if lower.shape != (n, n):
        raise ValueError(f"L must be ({n}, {n}), got {tuple(lower.shape)}")
    lower = lower.to(device=w.device, dtype=w.dtype)
    w_hat = torch.zeros_like(w)
    target = torch.zeros_like(w)
    for s, e in reversed(_blocks(n, block)):
        wk = w[:, s:e] + (w[:, e:] - w_hat[:, e:]) @ lower[e:, s:e]
        qk = quantize_block(wk, s, e)
        if qk.shape != wk.shape:
            raise ValueError(f"quantize_block returned shape {tuple(qk.shape)} for a block of {tuple(wk.shape)}")
        target[:, s:e] = wk
        w_hat[:, s:e] = qk.to(w.dtype)
    return w_hat, target


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed activation has been seen."""


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    modules: dict[str, torch.nn.Linear],
    batch_size: int = 4,
    stop_after: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    kwargs: dict | None = None,
) -> dict[str, HessianAccumulator]:
    """``E[x xᵀ]`` of the input of each module in ``modules``, over every token of ``input_ids`` (n_seq, seq_len).

    Forward hooks record each module's first positional input while ``model`` runs on batches of ``batch_size``
    sequences. ``stop_after`` (e.g. the decoder layer holding the modules) ends each forward pass right after
    that module has run, so the rest of the model is not computed. Accumulators live on ``device`` (default:
    the device of each module's weight). ``kwargs`` go to every forward call (e.g. a decoder block's position
    embeddings and mask when ``model`` is one block and ``input_ids`` its hidden states). Hooks are removed even on
    error.
    """
    accs = {
        name: HessianAccumulator(mod.in_features, device=device if device is not None else mod.weight.device)
        for name, mod in modules.items()
    }

    def record(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple, _out: object) -> None:
            accs[name].add(inputs[0])

        return hook

    def stop(*_: object) -> None:
        raise _StopForward

    hooks = [mod.register_forward_hook(record(name)) for name, mod in modules.items()]
    if stop_after is not None:
        hooks.append(stop_after.register_forward_hook(stop))
    param = next(model.parameters(), None)
    target = param.device if param is not None else torch.device("cpu")
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i:i + batch_size].to(target), **(kwargs or {}))
            except _StopForward:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return accs
