"""Rate across layers: calibrated NWC with each `--allocation` mode, on SmolLM2-135M-Instruct (or `--model gemma3`).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.allocation [--model smollm2] [--targets 3] [--jobs 2] [--resume]

Same points, protocol and saving as bench.quality (`sweep`), one variant per allocation mode and strength
(codec/allocation.py); writes docs/BENCHMARKS.md (section `allocation`, `allocation-gemma3` for Gemma).
"""

from __future__ import annotations

import argparse
import time

from bench.quality import MODELS, ROOT, Point, add_sweep_args, section_head, sweep
from bench.report import replace_section

CALIB = ["--method", "nwc", "--calib", "wiki"]
VARIANTS = {  # label -> (allocation, strength)
    "none": ("none", 1.0),
    "relative": ("relative", 1.0),
    "relative-0.5": ("relative", 0.5),
    "absolute": ("absolute", 1.0),
    "kl": ("kl", 1.0),
    "kl-0.5": ("kl", 0.5),
}


def render(points: list[Point], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        *section_head(f"Rate across layers (`--allocation`, {MODELS[args.model].title})", "bench.allocation", args,
                      seconds, f"Calibrated NWC ({args.calib_seqs} × {args.calib_len} calibration tokens, "
        "no fine-tuning); each mode shifts every linear layer's level by 2·strength·log2(a_L / geomean a) for its "
        "measured sensitivity a_L (codec/allocation.py); `none` gives every tensor one shared level.", None,
                      points[0].ppl_fp),
        "| allocation | strength | target | measured bits/weight | perplexity | KL (nats/token) | top-1 agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.target, p.ppl)):
        mode, strength = VARIANTS[p.method]
        shown = "–" if mode == "none" else f"{strength:g}"
        lines.append(f"| {mode} | {shown} | {p.target:g} | {p.bits:.3f} | {p.ppl:.3f} | {p.kl:.4f} | "
                     f"{100 * p.top1:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_sweep_args(ap)
    args = ap.parse_args()
    t0 = time.time()
    variants = {v: [*CALIB, "--allocation", VARIANTS[v][0], "--allocation-strength", f"{VARIANTS[v][1]:g}"]
                for v in args.variants}
    model = MODELS[args.model]
    points = sweep(variants, args.targets, args, ROOT / "runs" / f"allocation{model.suffix}",
                   model.points_path("allocation"))
    replace_section(f"allocation{model.suffix}", render(points, args, time.time() - t0))


if __name__ == "__main__":
    main()
