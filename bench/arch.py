"""Decoder cost vs rate–distortion quality of the codec architecture (width × depth).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.arch [--steps 1500]

Trains each configuration briefly on the same data and seed (all-mpnet-base-v2 matrices), then measures the
held-out mean effective gap to the Gaussian bound over levels 0, 4, …, 24 and the decoder-only throughput
(weights/s, one CPU thread). Writes a table between `<!-- arch:begin -->` and `<!-- arch:end -->` in
docs/BENCHMARKS.md. Short training favours small models, so read it as a ranking at equal training cost.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

from bench.report import replace_section
from codec.assets import mpnet_dir
from codec.model import CodecConfig
from codec.train import TrainConfig, train_codec

CONFIGS = [(32, 1), (64, 2), (128, 2), (256, 3)]


def decoder_throughput(model, n_chunks: int = 1 << 16, reps: int = 3) -> float:
    y = torch.randint(-8, 8, (n_chunks, 16)).float()
    level = torch.full((n_chunks,), 12, dtype=torch.long)
    with torch.no_grad():
        model.synthesize(y, level)
        t = time.perf_counter()
        for _ in range(reps):
            model.synthesize(y, level)
    return reps * n_chunks * 16 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = sorted(mpnet_dir().glob("*.safetensors"))
    rows = []
    for width, depth in CONFIGS:
        cfg = CodecConfig(width=width, depth=depth)
        model, rep = train_codec(files, cfg, TrainConfig(steps=args.steps, val_every=args.steps), progress=False)
        params = sum(p.numel() for p in model.synthesis.parameters())
        macs = 16 * width + depth * width * width + width * 16
        rows.append((width, depth, params, macs, rep.history[-1]["val_mean_gap"], decoder_throughput(model),
                     rep.seconds))
        print(rows[-1], flush=True)
    lines = [
        "## Codec architecture: decoder cost vs rate–distortion",
        "",
        "Each width × depth trained with the same data, seed and step count; gap = held-out mean effective gap to "
        "the Gaussian bound over levels 0, 4, …, 24 (lower is better); decode = synthesis network only, 1 thread.",
        "",
        f"Command: `OMP_NUM_THREADS=1 python -m bench.arch --steps {args.steps}` — "
        f"{datetime.date.today()}, {platform.machine()} {platform.system()}, torch {torch.__version__}, 1 thread.",
        "",
        "| width | depth | decoder params | decoder MACs/chunk | held-out mean gap (bit) | decode weights/s "
        "| train s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, d, p, m, g, thr, s in rows:
        lines.append(f"| {w} | {d} | {p:,} | {m:,} | {g:.3f} | {thr / 1e6:.2f} M | {s:.0f} |")
    replace_section("arch", "\n".join(lines))
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
