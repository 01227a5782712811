"""NoWag — normalized weight and activation guided compression — and the Wanda pruning baseline, for one linear layer.

NoWag: L. Liu, A. Aggarwal, et al., "NoWag: A Unified Framework for Shape Preserving Compression of Large
Language Models", arXiv 2504.14569 (NOTES §2). The layer is ``y = x Wᵀ`` with ``W`` m×n (out × in) and
``diag(H)_j = E[x_j²]`` from the calibration inputs (``diag(H) = 1`` without calibration: data-free).

* Normalization: ``c_j = ‖W[:, j]‖₂``, then ``r_i = ‖(W / c)[i, :]‖₂``; ``W = diag(r) · W̄ · diag(c)``. Both norm
  vectors are stored in fp16 and ``W̄`` is computed with the fp16 values, so the decoder's ``diag(r) Ŵ̄ diag(c)``
  is exactly what the encoder measured. Objective in normalized space: ``Σ_ij diag(H)_j (W̄_ij − Ŵ̄_ij)²``.
* NoWag-VQ (:func:`vq_quantize`): each row of ``W̄`` cut into subvectors of ``d`` consecutive inputs, one
  codebook of ``2^k`` fp16 centroids per layer fitted by diag(H)-weighted k-means (k-means++ seeding, Lloyd
  iterations until the objective stops improving). Bits counted: ``k`` index bits per subvector + the codebook +
  the fp16 norms. Settings (:data:`VQ_DIM`): the paper's d = 6 at 2 bits; d = 4 at 3 bits and d = 3 at 4 bits (our
  choice: 12 index bits per subvector at every rate, so the codebook stays at 4096 entries and the same k-means
  cost); other rates take ``d = 12 / bits`` when that is an integer. ``k`` is the largest index width ≤ bits·d
  whose indices, codebook and norms fit the layer's budget (the nominal rate + 5 %): small layers get smaller
  codebooks instead of paying several bits per weight for a 4096-entry one.
* NoWag-P (:func:`nowag_scores` + :func:`prune_mask`): score ``W̄_ij² · diag(H)_j``; unstructured keeps the top
  ``(1 − s)`` of the whole matrix, N:M keeps the top N of every M consecutive inputs of a row; kept weights keep
  their original values (no update).
* Wanda (M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", arXiv 2306.11695): score ``|W_ij| · ‖X_j‖₂`` (``‖X_j‖₂ ∝ √diag(H)_j``), compared per output row for
  unstructured sparsity (the paper's per-output comparison group), N:M as above.

Pruned storage (:func:`prune_segments`): the kept values in the source dtype, row-major, and the mask
entropy-coded with constriction's ANS: unstructured as Bernoulli(kept fraction) per weight (≈ H(s) bits), N:M as
the index of each group's kept set among the C(M, N) possible ones, uniform (log2 C(M, N) bits per group: 0.646
bit/weight at 2:4, 0.766 at 4:8). A trailing group of fewer than M inputs (n not a multiple of M) is kept dense.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import combinations

import constriction
import numpy as np
import torch

from codec.baselines import pack_codes, unpack_codes

FP16_MAX = 65504.0
FP16_TINY = 6.104e-05  # smallest normal fp16: a zero norm is stored as this (its column or row is all zeros)
NORM_BITS = 16
# Index bits per subvector at the nominal rate: d = VQ_INDEX_BITS / bits (NOTES §2: d = 6 at 2 bits).
VQ_INDEX_BITS = 12
VQ_DIM = {2.0: 6, 3.0: 4, 4.0: 3}
VQ_RATE_SLACK = 0.05  # a layer's codebook and norms may take it this far above the nominal rate
SEED_PER_CENTROID = 16  # k-means++ seeds from at most this many subvectors per centroid
FIT_PER_CENTROID = 128  # k-means is fitted on at most this many subvectors per centroid (then all are assigned)
# Subvectors per distance block (chunk × 2^k floats): small enough to stay in cache; measured on 2 cores, 295k
# subvectors × 2048 centroids: 2.8 s at 16384, 0.8 s at 128–256.
ASSIGN_CHUNK = 256
PRUNE_METHODS = ("nowag-p", "wanda")


class NoWagError(ValueError):
    """Bad NoWag or pruning parameters (rate without a setting, sparsity out of range, bad N:M pattern)."""


# ----------------------------------------------------------------------------- normalization


@dataclass
class Normalized:
    w_bar: torch.Tensor  # float32 (m, n)
    rows: torch.Tensor  # float16 (m,)
    cols: torch.Tensor  # float16 (n,)

    def denormalize(self, w_bar: torch.Tensor) -> torch.Tensor:
        return self.rows.float()[:, None] * w_bar * self.cols.float()[None, :]


def _fp16_norm(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(FP16_TINY, FP16_MAX).to(torch.float16)


def normalize(w: torch.Tensor) -> Normalized:
    """Column L2 norms, then the row L2 norms of the column-normalized matrix (NOTES §2), both fp16."""
    w = w.float()
    cols = _fp16_norm(torch.linalg.vector_norm(w, dim=0))
    w1 = w / cols.float()[None, :]
    rows = _fp16_norm(torch.linalg.vector_norm(w1, dim=1))
    return Normalized(w1 / rows.float()[:, None], rows, cols)


def weighted_error(w_bar: torch.Tensor, w_bar_hat: torch.Tensor, hdiag: torch.Tensor) -> float:
    """NoWag's objective Σ_ij diag(H)_j (W̄_ij − Ŵ̄_ij)² (float64)."""
    return float((((w_bar - w_bar_hat).double() ** 2) * hdiag.double()[None, :]).sum())


# ----------------------------------------------------------------------------- NoWag-VQ


def vq_dim(bits: float) -> int:
    """Subvector length for a target rate: VQ_DIM, else 12 / bits when that is a whole number."""
    if bits in VQ_DIM:
        return VQ_DIM[bits]
    d = VQ_INDEX_BITS / bits
    if bits > 0 and abs(d - round(d)) < 1e-9 and round(d) >= 1:
        return round(d)
    raise NoWagError(f"nowag-vq has settings for bits in {sorted(VQ_DIM)} (or 12/bits whole: 1, 1.5, 2.4, 6, 12); "
                     f"got {bits:g}")


def index_bits(m: int, n: int, bits: float, d: int) -> int:
    """The largest index width k ≤ bits·d whose indices + codebook (2^k·d fp16) + norms fit (1 + VQ_RATE_SLACK)·
    bits·m·n: the nominal index rate when the side information is small (a 4096² layer at 2 bits: 2.02 bits, as
    the paper counts), a smaller codebook when it is not."""
    n_sub = m * math.ceil(n / d)
    budget = (1 + VQ_RATE_SLACK) * bits * m * n - NORM_BITS * (m + n)
    k = max(1, min(16, round(bits * d)))
    while k > 1 and n_sub * k + (1 << k) * d * 16 > budget:
        k -= 1
    return k


@dataclass
class VQResult:
    w_hat: torch.Tensor  # float32 (m, n): what the decoder reproduces
    norm: Normalized
    codebook: torch.Tensor  # float16 (2^k, d)
    indices: torch.Tensor  # int64 (m · ceil(n/d),)
    d: int
    k: int
    objective: list[float] = field(default_factory=list)  # weighted error per Lloyd iteration (fit sample)
    error: float = 0.0  # Σ diag(H)_j (W̄ − Ŵ̄)² of the whole layer with the stored (fp16) codebook

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in vq_segments(self)[1].values())


def _subvectors(w_bar: torch.Tensor, hdiag: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m·n/d, d) subvectors of the rows and their per-element weights (zero-padded columns weigh 0)."""
    m, n = w_bar.shape
    pad = -n % d
    x = torch.nn.functional.pad(w_bar, (0, pad))
    u = torch.nn.functional.pad(hdiag.float(), (0, pad))
    x = x.reshape(m, -1, d).reshape(-1, d)
    u = u.reshape(1, -1, d).expand(m, -1, d).reshape(-1, d)
    return x, u


def _assign(x: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each subvector under its weights: argmin_c Σ u (x − c)², and that distance."""
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    dist = torch.empty(x.shape[0], dtype=torch.float64)
    c2 = (c * c).T  # (d, K)
    for s in range(0, x.shape[0], ASSIGN_CHUNK):
        xs, us = x[s : s + ASSIGN_CHUNK], u[s : s + ASSIGN_CHUNK]
        # Σ u x² − 2 Σ u x c + Σ u c²; the first term does not change the argmin but is the distance's base
        dm = us @ c2 - 2 * (us * xs) @ c.T
        best, arg = dm.min(dim=1)
        idx[s : s + ASSIGN_CHUNK] = arg
        dist[s : s + ASSIGN_CHUNK] = (best + (us * xs * xs).sum(1)).double().clamp_min(0)
    return idx, dist


def _kmeans_pp(x: torch.Tensor, u: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding under the weighted distance (Arthur & Vassilvitskii 2007), on at most SEED_PER_CENTROID·k
    of the fit sample's points (the seeding is sequential in k: its cost is k · sample)."""
    if x.shape[0] > SEED_PER_CENTROID * k:
        keep = torch.randperm(x.shape[0], generator=gen)[: SEED_PER_CENTROID * k]
        x, u = x[keep], u[keep]
    n = x.shape[0]
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), generator=gen)]
    best = (u * (x - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        total = float(best.sum())
        if total <= 0:  # fewer distinct points than centroids: the rest repeat
            centers[i:] = centers[i - 1]
            break
        j = int(torch.multinomial(best.double() / total, 1, generator=gen))
        centers[i] = x[j]
        best = torch.minimum(best, (u * (x - centers[i]) ** 2).sum(1))
    return centers


def weighted_kmeans(x: torch.Tensor, u: torch.Tensor, k: int, max_iter: int, tol: float,
                    gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Centroids minimizing Σ_i Σ_e u_ie (x_ie − c_{a(i)e})² (Lloyd: assign, then per-coordinate weighted means;
    each step can only lower the objective). Returns the centroids and the objective after each assignment."""
    centers = _kmeans_pp(x, u, k, gen)
    history: list[float] = []
    for _ in range(max_iter):
        idx, dist = _assign(x, u, centers)
        history.append(float(dist.sum()))
        num = torch.zeros(k, x.shape[1]).index_add_(0, idx, u * x)
        den = torch.zeros(k, x.shape[1]).index_add_(0, idx, u)
        # an empty cluster, or a coordinate no member weighs, keeps its centroid value
        centers = torch.where(den > 0, num / den.clamp_min(1e-30), centers)
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
    return centers, history


def vq_quantize(w: torch.Tensor, hdiag: torch.Tensor | None, bits: float, *, max_iter: int = 25,
                tol: float = 1e-3, fit_per_centroid: int = FIT_PER_CENTROID, seed: int = 0) -> VQResult:
    """NoWag-VQ of one m×n matrix at `bits` bits/weight (indices, codebook and norms counted). The paper runs up
    to 100 Lloyd iterations on a GPU; on CPU the defaults stop at 25, or earlier once an iteration improves the
    objective by less than `tol` (relative), and fit on at most `fit_per_centroid` subvectors per centroid."""
    m, n = w.shape
    hdiag = torch.ones(n) if hdiag is None else hdiag.float().cpu().clamp_min(0)
    d = vq_dim(bits)
    k = index_bits(m, n, bits, d)
    norm = normalize(w.cpu())
    x, u = _subvectors(norm.w_bar, hdiag, d)
    gen = torch.Generator().manual_seed(seed)
    n_fit = min(x.shape[0], fit_per_centroid << k)
    fit = torch.randperm(x.shape[0], generator=gen)[:n_fit] if n_fit < x.shape[0] else slice(None)
    centers, history = weighted_kmeans(x[fit], u[fit], 1 << k, max_iter, tol, gen)
    codebook = centers.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    idx, dist = _assign(x, u, codebook.float())  # the assignment the stored codebook deserves
    w_bar_hat = _gather(codebook, idx, m, n, d)
    return VQResult(norm.denormalize(w_bar_hat), norm, codebook, idx, d, k, history, float(dist.sum()))


def _gather(codebook: torch.Tensor, idx: torch.Tensor, m: int, n: int, d: int) -> torch.Tensor:
    return codebook.float()[idx].reshape(m, -1)[:, :n]


def vq_segments(r: VQResult) -> tuple[dict, dict[str, bytes]]:
    """(meta, segments) of a container record."""
    m, n = r.w_hat.shape
    meta = {"rows": m, "cols": n, "d": r.d, "k": r.k}
    segs = {
        "rows": r.norm.rows.numpy().astype("<f2").tobytes(),
        "cols": r.norm.cols.numpy().astype("<f2").tobytes(),
        "codebook": r.codebook.numpy().astype("<f2").tobytes(),
        "indices": pack_codes(r.indices.numpy().astype(np.uint16), r.k),
    }
    return meta, segs


def _check_sizes(segs: dict[str, bytes], need: dict[str, int]) -> None:
    for key, size in need.items():
        got = len(segs.get(key, b""))
        if got != size:
            raise ValueError(f"segment {key!r} has {got} bytes, expected {size}")
    extra = set(segs) - set(need)
    if extra:
        raise ValueError(f"unexpected segments {sorted(extra)}")


def _meta_ints(meta: dict, keys: tuple[str, ...]) -> list[int]:
    try:
        vals = [int(meta[k]) for k in keys]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"record meta needs integer {', '.join(keys)}: {e}") from e
    if any(v < 0 for v in vals):
        raise ValueError(f"negative record parameter in {dict(zip(keys, vals, strict=True))}")
    return vals


def vq_decode(meta: dict, segs: dict[str, bytes]) -> torch.Tensor:
    """Float32 (rows, cols) from a nowag-vq record; every segment length is checked first."""
    m, n, d, k = _meta_ints(meta, ("rows", "cols", "d", "k"))
    if not (1 <= d <= 64 and 1 <= k <= 16):
        raise ValueError(f"bad nowag-vq parameters d={d} k={k}")
    n_sub = m * math.ceil(n / d)
    _check_sizes(segs, {"rows": 2 * m, "cols": 2 * n, "codebook": 2 * (1 << k) * d,
                        "indices": (n_sub * k + 7) // 8})
    rows = torch.from_numpy(np.frombuffer(segs["rows"], "<f2").copy())
    cols = torch.from_numpy(np.frombuffer(segs["cols"], "<f2").copy())
    codebook = torch.from_numpy(np.frombuffer(segs["codebook"], "<f2").reshape(1 << k, d).copy())
    idx = torch.from_numpy(unpack_codes(segs["indices"], n_sub, k).astype(np.int64))
    return Normalized(torch.empty(0), rows, cols).denormalize(_gather(codebook, idx, m, n, d))


# ----------------------------------------------------------------------------- pruning


@dataclass(frozen=True)
class PruneSpec:
    """Unstructured sparsity (fraction of weights removed) or an N:M pattern (N kept of every M inputs)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.n is None):
            raise NoWagError("give either a sparsity or an N:M pattern")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise NoWagError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.n is not None and not (self.m is not None and 1 <= self.n < self.m <= 16):
            raise NoWagError(f"an N:M pattern needs 1 ≤ N < M ≤ 16, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> PruneSpec:
        if pattern is not None:
            if sparsity is not None:
                raise NoWagError("give either --sparsity or --pattern, not both")
            mt = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
            if not mt:
                raise NoWagError(f"pattern must look like N:M (such as 2:4), got {pattern!r}")
            return cls(n=int(mt.group(1)), m=int(mt.group(2)))
        if sparsity is None:
            raise NoWagError("pruning needs --sparsity S (such as 0.5) or --pattern N:M (such as 2:4)")
        return cls(sparsity=float(sparsity))

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{self.sparsity:g} unstructured"


def nowag_scores(w: torch.Tensor, hdiag: torch.Tensor | None) -> torch.Tensor:
    """NoWag-P: W̄_ij² · diag(H)_j."""
    w_bar = normalize(w).w_bar
    return w_bar**2 if hdiag is None else w_bar**2 * hdiag.float().cpu()[None, :]


def wanda_scores(w: torch.Tensor, hdiag: torch.Tensor | None) -> torch.Tensor:
    """Wanda: |W_ij| · ‖X_j‖₂ (∝ √diag(H)_j)."""
    a = w.float().abs()
    return a if hdiag is None else a * hdiag.float().cpu().clamp_min(0).sqrt()[None, :]


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` highest scores along the last dimension (ties by position, deterministic)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        mask.scatter_(-1, order[..., :keep], True)
    return mask


def prune_mask(scores: torch.Tensor, spec: PruneSpec, per_row: bool = False) -> torch.Tensor:
    """Which weights stay: unstructured over the matrix (or per row with `per_row`, Wanda), or N:M per row."""
    rows, cols = scores.shape
    if spec.sparsity is not None:
        if per_row:
            return _top_mask(scores, round((1 - spec.sparsity) * cols))
        return _top_mask(scores.reshape(-1), round((1 - spec.sparsity) * rows * cols)).reshape(rows, cols)
    n, m = spec.n, spec.m
    whole = cols - cols % m
    mask = torch.ones(rows, cols, dtype=torch.bool)  # a trailing partial group stays dense
    mask[:, :whole] = _top_mask(scores[:, :whole].reshape(rows, -1, m), n).reshape(rows, whole)
    return mask


@dataclass
class Pruned:
    w_hat: torch.Tensor  # the source tensor with the pruned weights zeroed (source dtype)
    mask: torch.Tensor  # bool (m, n)
    spec: PruneSpec


def prune(w: torch.Tensor, hdiag: torch.Tensor | None, spec: PruneSpec, method: str) -> Pruned:
    """Prune one matrix (kept weights unchanged, in w's dtype) by NoWag-P or Wanda scores."""
    if method not in PRUNE_METHODS:
        raise NoWagError(f"unknown pruning method {method!r} ({', '.join(PRUNE_METHODS)})")
    scores = nowag_scores(w, hdiag) if method == "nowag-p" else wanda_scores(w, hdiag)
    mask = prune_mask(scores, spec, per_row=method == "wanda")
    return Pruned(torch.where(mask, w, torch.zeros((), dtype=w.dtype)), mask, spec)


_COMBOS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _combos(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(index → M-bit mask with N bits set, mask → index or −1) for the N:M kept sets."""
    if (n, m) not in _COMBOS:
        masks = np.array([sum(1 << i for i in c) for c in combinations(range(m), n)], dtype=np.int64)
        lookup = np.full(1 << m, -1, dtype=np.int64)
        lookup[masks] = np.arange(len(masks))
        _COMBOS[n, m] = masks, lookup
    return _COMBOS[n, m]


def _ans(symbols: np.ndarray, model) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _unans(data: bytes, count: int, model) -> np.ndarray:
    if len(data) % 4:
        raise ValueError("segment 'mask' is not a whole number of 32-bit words")
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, "<u4").astype(np.uint32))
    symbols = coder.decode(model, count)
    if not coder.is_empty():  # what the encoder wrote ends exactly after its last symbol
        raise ValueError("segment 'mask' does not decode to exactly the recorded number of symbols (truncated or "
                         "corrupt)")
    return symbols


def encode_mask(mask: torch.Tensor, spec: PruneSpec) -> tuple[dict, bytes]:
    """(meta, ANS words) of a mask: Bernoulli(kept fraction) per weight, or the N:M set index per group."""
    rows, cols = mask.shape
    if spec.n is None:
        kept, total = int(mask.sum()), mask.numel()
        meta = {"pattern": "unstructured", "kept": kept}
        if kept in (0, total):
            return meta, b""
        return meta, _ans(mask.reshape(-1).numpy(), constriction.stream.model.Bernoulli(kept / total, perfect=False))
    n, m = spec.n, spec.m
    whole = cols - cols % m
    bits = mask[:, :whole].reshape(-1, m).numpy().astype(np.int64) << np.arange(m)
    masks, lookup = _combos(n, m)
    index = lookup[bits.sum(1)]
    if (index < 0).any():
        raise ValueError(f"mask does not follow the {n}:{m} pattern")
    return {"pattern": f"{n}:{m}"}, _ans(index, constriction.stream.model.Uniform(len(masks)))


def decode_mask(meta: dict, data: bytes, rows: int, cols: int) -> torch.Tensor:
    pattern = meta.get("pattern")
    if pattern == "unstructured":
        (kept,) = _meta_ints(meta, ("kept",))
        total = rows * cols
        if kept > total:
            raise ValueError(f"{kept} kept weights in a {rows}×{cols} matrix")
        if kept in (0, total):
            if data:
                raise ValueError("segment 'mask' must be empty for an all-kept or all-pruned matrix")
            return torch.full((rows, cols), kept == total, dtype=torch.bool)
        bits = _unans(data, total, constriction.stream.model.Bernoulli(kept / total, perfect=False))
        mask = torch.from_numpy(bits.astype(bool)).reshape(rows, cols)
        if int(mask.sum()) != kept:
            raise ValueError(f"mask decodes to {int(mask.sum())} kept weights, the record says {kept}")
        return mask
    mt = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not mt:
        raise ValueError(f"unknown mask pattern {pattern!r}")
    spec = PruneSpec(n=int(mt.group(1)), m=int(mt.group(2)))
    n, m = spec.n, spec.m
    whole = cols - cols % m
    masks, _ = _combos(n, m)
    index = _unans(data, rows * whole // m, constriction.stream.model.Uniform(len(masks)))
    mask = torch.ones(rows, cols, dtype=torch.bool)
    groups = (masks[index][:, None] >> np.arange(m)) & 1
    mask[:, :whole] = torch.from_numpy(groups.astype(bool)).reshape(rows, whole)
    return mask


def prune_segments(p: Pruned) -> tuple[dict, dict[str, bytes]]:
    """(meta, segments): the mask, ANS-coded, and the kept values in the source dtype, row-major."""
    from codec.tensors import to_bytes

    rows, cols = p.mask.shape
    meta, words = encode_mask(p.mask, p.spec)
    return {"rows": rows, "cols": cols, **meta}, {"mask": words, "values": to_bytes(p.w_hat[p.mask])}


def prune_decode(meta: dict, segs: dict[str, bytes], dtype: str) -> torch.Tensor:
    """The dense (rows, cols) matrix of a pruned record, zeros where pruned, in `dtype`."""
    from codec.tensors import DTYPES, from_bytes

    rows, cols = _meta_ints(meta, ("rows", "cols"))
    if set(segs) != {"mask", "values"}:
        raise ValueError(f"a pruned record has segments mask and values, not {sorted(segs)}")
    mask = decode_mask(meta, segs["mask"], rows, cols)
    kept = int(mask.sum())
    values = from_bytes(segs["values"], dtype, (kept,))
    out = torch.zeros(rows, cols, dtype=DTYPES[dtype])
    out[mask] = values
    return out
