"""Unit tests of the coding path: chunking, the ANS entropy coder with the shipped tables, NWCTensorCodec,
and bit-exact determinism across processes. Uses whichever codec the registry names as default."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from codec.chunking import CHUNK, as_matrix, from_chunks, n_chunks, row_scales, to_chunks
from codec.entropy import EntropyCodingError, decode_symbols, encode_symbols, estimate_bits
from codec.pipeline import nmse
from codec.ratecontrol import column_levels
from codec.registry import load_codec
from codec.tensor_codec import NWCTensorCodec, TensorDecodeError

REPO = Path(__file__).resolve().parent.parent
MATRIX = "encoder.layer.0.attention.self.query.weight"  # (384, 384) float32 in all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def loaded_codec():
    return load_codec()


@pytest.fixture(scope="module")
def tc(loaded_codec) -> NWCTensorCodec:
    return NWCTensorCodec(loaded_codec, "cpu")


@pytest.fixture(scope="module")
def weight(minilm_dir: Path) -> torch.Tensor:
    with safe_open(str(minilm_dir / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor(MATRIX)
    assert w.shape == (384, 384) and w.dtype == torch.float32
    return w


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("shape", [(16, 16), (37, 50), (1, 5), (49, 3), (100, 7)])
def test_chunks_round_trip_exactly(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    c = to_chunks(w)
    m, n = shape
    assert c.shape == (n, n_chunks(m), CHUNK) == (n, math.ceil(m / 16), 16)
    # Chunk (j, i) holds rows 16i..16i+15 of input column j, zero-padded past the last row.
    for j in (0, n - 1):
        for i in range(c.shape[1]):
            rows = w[16 * i : 16 * i + 16, j]
            assert torch.equal(c[j, i, : len(rows)], rows)
            assert not c[j, i, len(rows) :].any()
    back = from_chunks(c, m)
    assert back.shape == w.shape
    assert torch.equal(back, w)


def test_as_matrix_flattens_conv_kernels() -> None:
    k = torch.randn(8, 3, 3, 3)
    m = as_matrix(k)
    assert m.shape == (8, 27)
    assert torch.equal(m[5], k[5].reshape(-1))
    assert as_matrix(torch.zeros(4, 6)).shape == (4, 6)
    with pytest.raises(ValueError, match="at least 2 dims"):
        as_matrix(torch.zeros(7))


def test_row_scales_zero_rows_and_fp16() -> None:
    w = torch.randn(5, 40) * torch.tensor([1.0, 0.0, 3.0, 1e-3, 0.0])[:, None]
    s = row_scales(w)
    assert s.dtype == torch.float16 and s.shape == (5,)
    assert s[1].item() == 1.0 and s[4].item() == 1.0
    rms = w.pow(2).mean(dim=1).sqrt()
    for i in (0, 2, 3):
        assert s[i].item() == pytest.approx(rms[i].item(), rel=1e-3)
    assert torch.isfinite(w / s.float()[:, None]).all()


# ----------------------------------------------------------------------------- entropy coding


def _random_symbols(tables, levels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Symbols roughly in each level's support, with table edges and huge outliers that must ESCAPE."""
    rng = np.random.default_rng(seed)
    C = tables.channels
    spread = tables.size[levels.astype(np.int64)].astype(np.float64) / 8  # (n, C)
    sym = np.round(rng.standard_normal((len(levels), k, C)) * spread[:, None, :]).astype(np.int32)
    lv0, lv1 = int(levels[0]), int(levels[1])
    lo0, size0 = int(tables.lo[lv0, 0]), int(tables.size[lv0, 0])
    sym[0, 0, 0] = 10**6
    sym[1, 0, 3] = -(10**7)
    sym[0, 1, 0] = lo0  # first in-table symbol
    sym[0, 1, 1] = int(tables.lo[lv0, 1]) - 1  # just below channel 1's support: escape
    sym[0, 2, 0] = lo0 + size0 - 1  # last in-table symbol
    sym[0, 3, 0] = lo0 + size0  # just above: escape
    sym[1, 2, 2] = 2**30
    sym[1, 3, 5] = -(2**30)
    sym[-1, -1, -1] = int(tables.lo[lv1, C - 1]) - 12345
    return sym


@pytest.mark.parametrize("level_set", [(0,), (3, 9), (0, 7, 14, 27), (13, 20, 25)])
def test_entropy_round_trip_exact_with_escapes(loaded_codec, level_set: tuple[int, ...]) -> None:
    tables = loaded_codec.tables
    assert max(level_set) < tables.n_levels
    levels = np.array([level_set[i % len(level_set)] for i in range(23)], np.uint8)
    k = 5
    sym = _random_symbols(tables, levels, k, seed=len(level_set))
    ans, esc = encode_symbols(sym, levels, tables)
    assert len(ans) % 4 == 0 and len(esc) % 4 == 0
    assert len(esc) >= 4 * 6  # the outliers above went through the escape stream
    out = decode_symbols(ans, esc, levels, k, tables)
    assert out.dtype == np.int32 and out.shape == sym.shape
    np.testing.assert_array_equal(out, sym)

    bits = estimate_bits(sym, levels, tables.bits_table(), tables.lo, tables.size)
    assert bits.shape == (len(levels),)
    actual = 8 * len(ans) + 8 * len(esc)
    assert abs(bits.sum() - actual) <= 64 + 0.01 * actual


@pytest.fixture(scope="module")
def coded_stream(loaded_codec):
    tables = loaded_codec.tables
    levels = np.array([2, 5, 5, 11, 17, 2, 23, 8, 11, 11, 0, 27], np.uint8)
    k = 6
    sym = _random_symbols(tables, levels, k, seed=7)
    ans, esc = encode_symbols(sym, levels, tables)
    return sym, levels, k, ans, esc


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99, -4])
def test_truncated_ans_stream_raises(loaded_codec, coded_stream, keep: float) -> None:
    _, levels, k, ans, esc = coded_stream
    cut = len(ans) + keep if keep < 0 else int(len(ans) * keep) // 4 * 4
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans[:cut], esc, levels, k, loaded_codec.tables)


def test_every_word_truncation_raises(loaded_codec, coded_stream) -> None:
    _, levels, k, ans, esc = coded_stream
    for cut in range(0, len(ans), 4):
        with pytest.raises(EntropyCodingError):
            decode_symbols(ans[:cut], esc, levels, k, loaded_codec.tables)
    with pytest.raises(EntropyCodingError, match="multiple of 4"):
        decode_symbols(ans[:-1], esc, levels, k, loaded_codec.tables)


def test_damaged_escape_stream_raises(loaded_codec, coded_stream) -> None:
    _, levels, k, ans, esc = coded_stream
    assert esc
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc[:-4], levels, k, loaded_codec.tables)
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc + b"\0\0\0\0", levels, k, loaded_codec.tables)
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc[:-2], levels, k, loaded_codec.tables)


def test_lower_levels_or_fewer_symbols_raise(loaded_codec, coded_stream) -> None:
    """Decoding with levels/shape that need FEWER bits than were written leaves data over: detected."""
    _, levels, k, ans, esc = coded_stream
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc, np.zeros_like(levels), k, loaded_codec.tables)
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc, levels, k - 1, loaded_codec.tables)
    with pytest.raises(EntropyCodingError):
        decode_symbols(ans, esc, levels[:-1], k, loaded_codec.tables)
    with pytest.raises(EntropyCodingError, match="not in this codec"):
        decode_symbols(ans, esc, np.full_like(levels, loaded_codec.tables.n_levels), k, loaded_codec.tables)


def test_higher_levels_or_missing_leading_words_raise(loaded_codec) -> None:
    # Like real latents: every symbol inside its table (no escapes, so the escape count cannot catch it).
    tables = loaded_codec.tables
    rng = np.random.default_rng(11)
    levels = np.array([2, 5, 5, 11, 17, 2, 23, 8, 11, 11, 0, 20], np.uint8)
    k = 6
    sym = np.round(rng.standard_normal((len(levels), k, tables.channels)) * 3).astype(np.int32)
    lo = tables.lo[levels][:, None, :]
    sym = np.clip(sym, lo, lo + tables.size[levels][:, None, :] - 1).astype(np.int32)
    ans, esc = encode_symbols(sym, levels, tables)
    assert esc == b""
    np.testing.assert_array_equal(decode_symbols(ans, esc, levels, k, tables), sym)
    raised = levels.copy()
    raised[3] += 1
    failures = []
    for what, args in [
        ("one column one level up", (ans, esc, raised, k)),
        ("all levels max", (ans, esc, np.full_like(levels, loaded_codec.tables.n_levels - 1), k)),
        ("one extra chunk per column", (ans, esc, levels, k + 1)),
        ("first ANS word dropped", (ans[4:], esc, levels, k)),
    ]:
        try:
            decode_symbols(*args, loaded_codec.tables)
        except EntropyCodingError:
            continue
        failures.append(what)
    assert not failures, f"decoded silently: {failures}"


# ----------------------------------------------------------------------------- NWCTensorCodec


def _decode(tc: NWCTensorCodec, p, enc, name: str = "w") -> torch.Tensor:
    return tc.decode(name, p.shape, p.rows, p.cols, p.scales.numpy().astype("<f2").tobytes(),
                     enc.levels.tobytes(), enc.ans, enc.escapes)


def test_tensor_codec_decode_matches_encoder_prediction(tc, weight) -> None:
    p = tc.prepare(weight)
    assert (p.rows, p.cols) == (384, 384) and p.chunks.shape == (384, 24, 16)
    levels = column_levels(9.4, p.cols, n_levels=tc.n_levels)  # mixed levels 9 and 10
    assert set(np.unique(levels)) == {9, 10}
    enc = tc.encode(p, levels)
    out = _decode(tc, p, enc)
    assert out.dtype == torch.float32 and out.shape == weight.shape
    assert torch.equal(out, enc.decoded)  # bit-exact: the encoder's reconstruction is the decoder's
    assert 0 < nmse(weight, out) < 0.05
    assert enc.payload_bytes == len(enc.ans) + len(enc.escapes) + p.cols + 2 * p.rows


def test_tensor_codec_rate_distortion_monotone(tc, weight) -> None:
    p = tc.prepare(weight)
    errs, sizes = [], []
    for lv in (4, 12, 20):
        enc = tc.encode(p, np.full(p.cols, lv, np.uint8))
        errs.append(nmse(weight, _decode(tc, p, enc)))
        sizes.append(enc.payload_bytes)
    assert errs[0] > errs[1] > errs[2] > 0, errs
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_tensor_codec_conv_and_odd_rows(tc) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 8, 3, 3, generator=g) * 0.05  # 40 rows: the last chunk is padded
    p = tc.prepare(w)
    assert (p.rows, p.cols) == (40, 72)
    enc = tc.encode(p, np.full(p.cols, 12, np.uint8))
    out = _decode(tc, p, enc)
    assert out.shape == w.shape and torch.equal(out, enc.decoded.reshape(w.shape))
    assert nmse(w, out) < 0.01


def test_tensor_codec_rejects_inconsistent_records(tc, weight) -> None:
    p = tc.prepare(weight)
    enc = tc.encode(p, np.full(p.cols, 6, np.uint8))
    scales = p.scales.numpy().astype("<f2").tobytes()
    lv = enc.levels.tobytes()
    bad = [
        ((384, 383), 384, 384, scales, lv, enc.ans, enc.escapes),  # shape disagrees with rows x cols
        (p.shape, p.rows, p.cols, scales[:-2], lv, enc.ans, enc.escapes),  # side info too short
        (p.shape, p.rows, p.cols, scales, lv[:-1], enc.ans, enc.escapes),
        (p.shape, p.rows, p.cols, scales, bytes([tc.n_levels]) * p.cols, enc.ans, enc.escapes),
        (p.shape, p.rows, p.cols, scales, lv, enc.ans[: len(enc.ans) // 2], enc.escapes),  # truncated
    ]
    for args in bad:
        with pytest.raises(TensorDecodeError) as ei:
            tc.decode("layer.q", *args)
        assert ei.value.tensor_name == "layer.q" and "layer.q" in str(ei.value)
    with pytest.raises(ValueError):
        tc.encode(p, np.full(p.cols, tc.n_levels, np.uint8))
    with pytest.raises(ValueError):
        tc.encode(p, np.full(p.cols - 1, 3, np.uint8))


# ----------------------------------------------------------------------------- determinism across processes

_SNIPPET = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np, torch
from safetensors import safe_open
from codec.ratecontrol import column_levels
from codec.registry import load_codec
from codec.tensor_codec import NWCTensorCodec

mode, model_file, name, stream = sys.argv[1:5]
tc = NWCTensorCodec(load_codec(), "cpu")
with safe_open(model_file, framework="pt") as f:
    w = f.get_tensor(name)
p = tc.prepare(w)
if mode == "encode":
    enc = tc.encode(p, column_levels(7.6, p.cols, n_levels=tc.n_levels))
    Path(stream).write_text(json.dumps({
        "scales": p.scales.numpy().astype("<f2").tobytes().hex(), "levels": enc.levels.tobytes().hex(),
        "ans": enc.ans.hex(), "escapes": enc.escapes.hex()}))
    decoded = enc.decoded.contiguous().numpy().tobytes()
    print(json.dumps({"ans": hashlib.sha256(enc.ans + enc.escapes).hexdigest(),
                      "decoded": hashlib.sha256(decoded).hexdigest(), "threads": torch.get_num_threads()}))
else:
    s = {k: bytes.fromhex(v) for k, v in json.loads(Path(stream).read_text()).items()}
    out = tc.decode(name, p.shape, p.rows, p.cols, s["scales"], s["levels"], s["ans"], s["escapes"])
    print(json.dumps({"decoded": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()}))
"""


def _run_snippet(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _SNIPPET, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bitstreams_identical_across_processes(minilm_dir: Path, tmp_path: Path) -> None:
    model = str(minilm_dir / "model.safetensors")
    a = _run_snippet("encode", model, MATRIX, str(tmp_path / "a.json"))
    b = _run_snippet("encode", model, MATRIX, str(tmp_path / "b.json"))
    assert a["threads"] == b["threads"] == 1
    assert a["ans"] == b["ans"]
    assert a["decoded"] == b["decoded"]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    c = _run_snippet("decode", model, MATRIX, str(tmp_path / "a.json"))
    assert c["decoded"] == a["decoded"]  # a third process reproduces the encoder's weights bit-exactly
    assert a["ans"] != hashlib.sha256(b"").hexdigest()
