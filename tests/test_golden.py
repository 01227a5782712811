"""A committed bitstream decodes to the committed symbols (exactly) and weights on any machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from codec.container import ContainerReader
from codec.entropy import decode_symbols
from codec.pipeline import BundleDecoder
from codec.registry import load_codec

GOLDEN = Path(__file__).parent / "golden"


def test_golden_bitstream_decodes_exactly():
    with ContainerReader(GOLDEN / "golden.nwc") as r:
        codec = load_codec(r.header.codec_id)
        assert codec.info.sha256 == r.header.codec_sha256, (
            "the default codec changed: regenerate with `python tests/golden/make_golden.py`"
        )
        rec = r.read("w")
        with safe_open(str(GOLDEN / "golden_expected.safetensors"), framework="pt") as f:
            want_symbols, want_weights = f.get_tensor("symbols").numpy(), f.get_tensor("weights")
        levels = np.frombuffer(rec.segments["levels"], np.uint8)
        assert len(np.unique(levels)) > 10  # the golden exercises many tables
        symbols = decode_symbols(rec.segments["ans"], rec.segments["escapes"], levels, want_symbols.shape[1],
                                 codec.tables)
        np.testing.assert_array_equal(symbols, want_symbols)
        weights = BundleDecoder(r, "cpu").decode(rec)
        # Entropy decoding is integer-exact; the synthesis network is float32 (see docs/FORMAT.md).
        torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
