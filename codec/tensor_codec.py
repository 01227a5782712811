"""NWC coding of one weight tensor: normalize → chunk → analysis → round → ANS, and back.

Record layout (method "nwc", see docs/FORMAT.md): segments `scales` (fp16 per row), `levels` (uint8 rate
level per input column), `ans` (u32 ANS words), `escapes` (i32 out-of-table symbols); meta `rows`, `cols`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codec.chunking import CHUNK, as_matrix, from_chunks, n_chunks, row_scales, to_chunks
from codec.entropy import decode_symbols, encode_symbols, estimate_bits
from codec.registry import LoadedCodec
from codec.tensors import dtype_name

BATCH_CHUNKS = 1 << 16


class TensorDecodeError(ValueError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"tensor {name!r}: {why}")
        self.tensor_name = name


@dataclass
class Prepared:
    """A matrix ready for coding: fp16 row scales and unit-scale chunks (n_cols, k, 16)."""

    shape: tuple[int, ...]
    dtype: str
    rows: int
    cols: int
    scales: torch.Tensor
    chunks: torch.Tensor


@dataclass
class EncodedTensor:
    symbols: np.ndarray  # int32 (n_cols, k, 16)
    levels: np.ndarray  # uint8 (n_cols,)
    ans: bytes
    escapes: bytes
    decoded: torch.Tensor  # float32 (rows, cols): what the decoder will reproduce

    @property
    def payload_bytes(self) -> int:
        return len(self.ans) + len(self.escapes) + self.levels.size + 2 * self.decoded.shape[0]


class NWCTensorCodec:
    def __init__(self, codec: LoadedCodec, device: str | torch.device = "cpu") -> None:
        self.codec = codec
        self.device = torch.device(device)
        self.model = codec.model.to(self.device)
        self.tables = codec.tables
        self.bits_table = codec.tables.bits_table()
        self.n_levels = codec.tables.n_levels

    def prepare(self, w: torch.Tensor) -> Prepared:
        m = as_matrix(w).float()
        scales = row_scales(m)
        chunks = to_chunks(m / scales.float()[:, None])
        return Prepared(tuple(w.shape), dtype_name(w.dtype), m.shape[0], m.shape[1], scales, chunks)

    @torch.no_grad()
    def symbols(self, chunks: torch.Tensor, levels: np.ndarray) -> np.ndarray:
        """Latent symbols for chunks (n_cols, k, 16) at per-column levels, in batches."""
        n, k, _ = chunks.shape
        flat = chunks.reshape(-1, CHUNK)
        lv = torch.from_numpy(np.repeat(levels.astype(np.int64), k))
        out = np.empty((n * k, CHUNK), np.int32)
        for s in range(0, n * k, BATCH_CHUNKS):
            x = flat[s : s + BATCH_CHUNKS].to(self.device)
            y = self.model.analyze(x, lv[s : s + BATCH_CHUNKS].to(self.device))
            out[s : s + BATCH_CHUNKS] = torch.round(y).clamp(-(2**30), 2**30).int().cpu().numpy()
        return out.reshape(n, k, CHUNK)

    @torch.no_grad()
    def reconstruct(self, symbols: np.ndarray, levels: np.ndarray) -> torch.Tensor:
        """Decoder network: symbols (n_cols, k, 16) -> normalized chunks, batched; always on self.device."""
        n, k, _ = symbols.shape
        flat = torch.from_numpy(symbols.reshape(-1, CHUNK))
        lv = torch.from_numpy(np.repeat(levels.astype(np.int64), k))
        out = torch.empty((n * k, CHUNK), dtype=torch.float32)
        for s in range(0, n * k, BATCH_CHUNKS):
            y = flat[s : s + BATCH_CHUNKS].to(self.device).float()
            out[s : s + BATCH_CHUNKS] = self.model.synthesize(y, lv[s : s + BATCH_CHUNKS].to(self.device)).cpu()
        return out.reshape(n, k, CHUNK)

    def column_bits(self, chunks: torch.Tensor, levels: np.ndarray) -> np.ndarray:
        """Ideal code length (bits) of each column at its level: exact up to the ANS flush."""
        levels = levels.astype(np.uint8)
        sym = self.symbols(chunks, levels)
        return estimate_bits(sym, levels, self.bits_table, self.tables.lo, self.tables.size)

    def encode(self, p: Prepared, levels: np.ndarray) -> EncodedTensor:
        if levels.shape != (p.cols,) or levels.max(initial=0) >= self.n_levels:
            raise ValueError(f"levels must be ({p.cols},) values below {self.n_levels}")
        levels = levels.astype(np.uint8)
        sym = self.symbols(p.chunks, levels)
        ans, esc = encode_symbols(sym, levels, self.tables)
        decoded = from_chunks(self.reconstruct(sym, levels), p.rows) * p.scales.float()[:, None]
        return EncodedTensor(sym, levels, ans, esc, decoded)

    def decode(self, name: str, shape: tuple[int, ...], rows: int, cols: int, scales: bytes, levels: bytes,
               ans: bytes, escapes: bytes) -> torch.Tensor:
        """Inverse of encode; returns float32 of `shape`. Every length is checked against the shape."""
        if rows * cols != int(np.prod(shape)) or len(shape) < 2 or shape[0] != rows:
            raise TensorDecodeError(name, f"rows×cols {rows}×{cols} does not match shape {shape}")
        if len(scales) != 2 * rows or len(levels) != cols:
            raise TensorDecodeError(name, "side info sizes do not match the shape")
        lv = np.frombuffer(levels, np.uint8)
        if lv.max(initial=0) >= self.n_levels:
            raise TensorDecodeError(name, f"rate level {lv.max()} is not in this codec")
        try:
            sym = decode_symbols(ans, escapes, lv, n_chunks(rows), self.tables)
        except ValueError as e:
            raise TensorDecodeError(name, str(e)) from e
        sc = torch.from_numpy(np.frombuffer(scales, "<f2").astype(np.float32))
        w = from_chunks(self.reconstruct(sym, lv), rows) * sc[:, None]
        return w.reshape(shape)
