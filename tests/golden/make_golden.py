"""Regenerate the golden bitstream (run only when the default codec changes):

    .venv/bin/python tests/golden/make_golden.py

Input: a 64×48 slice of a real all-MiniLM-L6-v2 matrix (committed as golden_input.safetensors) coded with
the default registered codec at a mix of levels; commits the container plus the expected symbols and weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from codec.container import ContainerHeader, ContainerWriter, TensorRecord
from codec.registry import load_codec
from codec.tensor_codec import NWCTensorCodec

HERE = Path(__file__).parent


def main() -> None:
    inp = HERE / "golden_input.safetensors"
    if not inp.exists():
        from codec.assets import minilm_dir

        with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
            w = f.get_tensor("encoder.layer.0.attention.self.query.weight")[:64, :48].clone()
        save_file({"w": w}, str(inp))
    with safe_open(str(inp), framework="pt") as f:
        w = f.get_tensor("w")
    codec = load_codec()
    tc = NWCTensorCodec(codec, "cpu")
    prep = tc.prepare(w)
    levels = (np.arange(prep.cols) % tc.n_levels).astype(np.uint8)  # every level is exercised
    enc = tc.encode(prep, levels)
    header = ContainerHeader(codec.info.id, codec.info.sha256, "nwc golden", {})
    with ContainerWriter(HERE / "golden.nwc", header) as wr:
        wr.add(TensorRecord("w", tuple(w.shape), "float32", "nwc", {"rows": prep.rows, "cols": prep.cols},
                            {"scales": prep.scales.numpy().astype("<f2").tobytes(), "levels": enc.levels.tobytes(),
                             "ans": enc.ans, "escapes": enc.escapes}))
    save_file({"symbols": torch.from_numpy(enc.symbols), "weights": enc.decoded.contiguous()},
              str(HERE / "golden_expected.safetensors"))
    print(f"golden written with codec {codec.info.id} ({codec.info.sha256[:16]})")


if __name__ == "__main__":
    main()
