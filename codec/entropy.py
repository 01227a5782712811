"""Entropy coding of latent symbols with constriction's ANS, driven only by integer probability tables.

The learned densities are tabulated ONCE per codec into integer PMFs (sum 2^PRECISION) and stored with
the codec weights; encoder and decoder both read those integers, never the float density, so bitstreams
decode bit-exactly across processes and machines (NOTES §4, "Determinism").

Symbols outside a table's support are coded as an ESCAPE symbol plus their raw int32 value in a side stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import constriction
import numpy as np
import torch

PRECISION = 24
TOTAL = 1 << PRECISION
MAX_HALF_SUPPORT = 4096
TAIL_MASS = 2.0**-20  # probability mass left outside the support (coded via ESCAPE)
# Pushed first, popped last: an ANS decoder that runs past its data keeps "decoding" the most likely symbol
# and still reports empty, so without this a stream too short for its shape would decode to garbage.
SENTINEL = np.frombuffer(b"NWC!", np.uint8).astype(np.int32)
_UNIFORM_BYTE = constriction.stream.model.Categorical(np.full(256, 1 / 256), perfect=False)


class EntropyCodingError(ValueError):
    """The bitstream does not decode to the expected number of symbols (corrupt or mismatched)."""


@dataclass
class CdfTables:
    """Integer PMFs per (level, channel): pmf[l, c, :size[l,c]] covers symbols lo[l,c] + k; index size[l,c]
    is ESCAPE. Unused entries are zero."""

    pmf: np.ndarray  # int64 (L, C, W)
    lo: np.ndarray  # int32 (L, C)
    size: np.ndarray  # int32 (L, C)
    _models: dict = field(default_factory=dict, repr=False)

    @property
    def n_levels(self) -> int:
        return self.pmf.shape[0]

    @property
    def channels(self) -> int:
        return self.pmf.shape[1]

    def model(self, level: int, channel: int):
        key = (level, channel)
        if key not in self._models:
            n = int(self.size[level, channel]) + 1
            # Exact multiples of 2^-24 summing to 1: constriction's quantization is a deterministic function of
            # these f64 values, so both sides build the identical model.
            probs = self.pmf[level, channel, :n].astype(np.float64) / TOTAL
            self._models[key] = constriction.stream.model.Categorical(probs, perfect=False)
        return self._models[key]

    def bits_table(self) -> np.ndarray:
        """-log2 p per (level, channel, index) as float64; ESCAPE additionally costs 32 raw bits."""
        with np.errstate(divide="ignore"):
            b = -np.log2(self.pmf.astype(np.float64) / TOTAL)
        for l_ in range(self.n_levels):
            for c in range(self.channels):
                b[l_, c, self.size[l_, c]] += 32
        return b

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "tables.pmf": torch.from_numpy(self.pmf.astype(np.int32)),
            "tables.lo": torch.from_numpy(self.lo.astype(np.int32)),
            "tables.size": torch.from_numpy(self.size.astype(np.int32)),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> CdfTables:
        pmf = t["tables.pmf"].numpy().astype(np.int64)
        lo, size = t["tables.lo"].numpy().astype(np.int32), t["tables.size"].numpy().astype(np.int32)
        if pmf.ndim != 3 or lo.shape != pmf.shape[:2] or size.shape != pmf.shape[:2]:
            raise ValueError("codec tables have inconsistent shapes")
        for l_ in range(pmf.shape[0]):
            for c in range(pmf.shape[1]):
                row = pmf[l_, c, : size[l_, c] + 1]
                if row.sum() != TOTAL or (row <= 0).any():
                    raise ValueError(f"codec table ({l_}, {c}) is not a valid integer pmf")
        return cls(pmf, lo, size)


def quantize_pmf(p: np.ndarray) -> np.ndarray:
    """Float pmf (including the escape entry) -> int64 pmf, every entry ≥ 1, summing exactly to TOTAL."""
    q = np.maximum(1, np.floor(p / p.sum() * TOTAL)).astype(np.int64)
    q[np.argmax(q)] += TOTAL - q.sum()
    return q


@torch.no_grad()
def tabulate(density, n_levels: int, channels: int) -> CdfTables:
    """Evaluate the learned CDF on the integer grid and keep the support holding all but TAIL_MASS."""
    grid = torch.arange(-MAX_HALF_SUPPORT, MAX_HALF_SUPPORT + 1, dtype=torch.float32)
    pts = grid.view(1, 1, -1).expand(n_levels, channels, -1)
    lower = density.logits(pts - 0.5, None).double()
    upper = density.logits(pts + 0.5, None).double()
    sign = -torch.sign(lower + upper)
    pmf = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).numpy()
    rows, los, sizes = [], np.zeros((n_levels, channels), np.int32), np.zeros((n_levels, channels), np.int32)
    for l_ in range(n_levels):
        for c in range(channels):
            p = pmf[l_, c]
            cdf = np.cumsum(p)
            a = int(np.searchsorted(cdf, TAIL_MASS / 2))
            b = int(np.searchsorted(cdf, cdf[-1] - TAIL_MASS / 2)) + 1
            b = max(b, a + 1)
            inside = p[a:b]
            escape = max(TAIL_MASS, 1.0 - inside.sum())
            rows.append(quantize_pmf(np.append(inside, escape)))
            los[l_, c], sizes[l_, c] = int(grid[a]), b - a
    width = max(len(r) for r in rows)
    table = np.zeros((n_levels, channels, width), np.int64)
    for i, r in enumerate(rows):
        table[i // channels, i % channels, : len(r)] = r
    return CdfTables(table, los, sizes)


def _indices(symbols: np.ndarray, lo: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    idx = symbols.astype(np.int64) - lo
    esc = (idx < 0) | (idx >= size)
    idx[esc] = size
    return idx.astype(np.int32), symbols[esc].astype(np.int32)


def groups(levels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Columns grouped by level, in the fixed order both coder sides use."""
    return [(int(lv), np.flatnonzero(levels == lv)) for lv in np.unique(levels)]


def encode_symbols(symbols: np.ndarray, levels: np.ndarray, tables: CdfTables) -> tuple[bytes, bytes]:
    """symbols: int32 (n_cols, k, C); levels: uint8 (n_cols,). Returns (ANS words, escaped int32 values).

    Order: for each level (ascending), for each channel, all its symbols column-major; one ANS stack,
    so we push the groups in reverse and the decoder pops them in forward order."""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(SENTINEL, _UNIFORM_BYTE)
    parts = []
    escapes = []
    for lv, cols in groups(levels):
        block = symbols[cols]
        for c in range(tables.channels):
            idx, esc = _indices(block[:, :, c].ravel(), int(tables.lo[lv, c]), int(tables.size[lv, c]))
            parts.append((lv, c, idx))
            escapes.append(esc)
    for lv, c, idx in reversed(parts):
        coder.encode_reverse(idx, tables.model(lv, c))
    words = coder.get_compressed().astype("<u4").tobytes()
    return words, np.concatenate(escapes).astype("<i4").tobytes() if escapes else b""


def decode_symbols(words: bytes, escapes: bytes, levels: np.ndarray, k: int, tables: CdfTables) -> np.ndarray:
    if len(words) % 4 or len(escapes) % 4:
        raise EntropyCodingError("ANS stream or escape stream length is not a multiple of 4 bytes")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, "<u4").astype(np.uint32))
    esc_values = np.frombuffer(escapes, "<i4")
    esc_pos = 0
    out = np.empty((len(levels), k, tables.channels), np.int32)
    for lv, cols in groups(levels):
        if lv >= tables.n_levels:
            raise EntropyCodingError(f"rate level {lv} is not in this codec (it has {tables.n_levels})")
        for c in range(tables.channels):
            n = len(cols) * k
            idx = coder.decode(tables.model(lv, c), n).astype(np.int64)
            size = int(tables.size[lv, c])
            sym = idx + int(tables.lo[lv, c])
            esc = np.flatnonzero(idx == size)
            if esc_pos + len(esc) > len(esc_values):
                raise EntropyCodingError("escape stream is shorter than the ANS stream requires")
            sym[esc] = esc_values[esc_pos : esc_pos + len(esc)]
            esc_pos += len(esc)
            out[cols, :, c] = sym.reshape(len(cols), k)
    if not np.array_equal(coder.decode(_UNIFORM_BYTE, len(SENTINEL)), SENTINEL):
        raise EntropyCodingError("bitstream is too short or damaged: its end sentinel does not decode")
    if esc_pos != len(esc_values) or not coder.is_empty():
        raise EntropyCodingError("bitstream has trailing data: it does not match the tensor's shape/levels")
    return out


def estimate_bits(symbols: np.ndarray, levels: np.ndarray, bits_table: np.ndarray, lo: np.ndarray,
                  size: np.ndarray) -> np.ndarray:
    """Exact ideal code length per column (bits), from the integer tables: what ANS will spend ± a word."""
    n, k, C = symbols.shape
    lv = levels.astype(np.int64)[:, None, None]
    ch = np.arange(C)[None, None, :]
    idx = symbols.astype(np.int64) - lo[lv, ch]
    sz = size[lv, ch]
    idx = np.where((idx < 0) | (idx >= sz), sz, idx)
    return bits_table[lv, ch, idx].sum(axis=(1, 2))
