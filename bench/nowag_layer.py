"""NoWag-VQ on one real matrix: index width, measured bits, weighted error, Lloyd iterations and time per rate.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.nowag_layer

SmolLM2 layer 3 `down_proj` (576 × 1536, fp32), diag(H) uniform in [0.1, 1.1) (seed 0), default vq_quantize
settings. Writes section `nowag-layer` of docs/NOWAG.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bench.quality import provenance
from bench.report import replace_section
from codec.assets import smollm2_dir
from codec.nowag import normalize, vq_quantize, weighted_error

DOC = Path(__file__).resolve().parent.parent / "docs" / "NOWAG.md"
TENSOR = "model.layers.3.mlp.down_proj.weight"


def main() -> None:
    args = argparse.ArgumentParser().parse_args()
    args.render_only = False
    t0 = time.time()
    with safe_open(str(smollm2_dir() / "model.safetensors"), "pt") as f:
        w = f.get_tensor(TENSOR).float()
    h = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
    base = weighted_error(normalize(w).w_bar, torch.zeros_like(w), h)
    rows = []
    for bits in (2.0, 3.0, 4.0):
        t = time.time()
        r = vq_quantize(w, h, bits)
        rows.append(f"| {bits:g} | {r.d} | {r.k} | {8 * r.nbytes / w.numel():.3f} | {r.error / base:.4f} | "
                    f"{len(r.objective)} | {time.time() - t:.1f} s |")
    body = "\n".join([
        f"One {w.shape[0]} × {w.shape[1]} matrix (SmolLM2 `{TENSOR}`, fp32), diag(H) uniform in [0.1, 1.1) (seed "
        "0), default settings; relative error = `Σ diag(H)(W̄ − Ŵ̄)² / Σ diag(H) W̄²`.",
        "",
        provenance("bench.nowag_layer", args, time.time() - t0),
        "",
        "| target | d | k | measured bits/weight | relative weighted error | Lloyd iterations | time |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    replace_section("nowag-layer", body, DOC)


if __name__ == "__main__":
    main()
