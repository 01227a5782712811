"""Calibration size: calibrated NWC with more calibration text than bench.quality's 16 × 256 tokens.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.calib_size [--model smollm2] [--targets 3 4]
        [--sizes 16x256 32x512 128x512] [--jobs 1] [--resume]

`nwc compress --calib` defaults to 32 × 512 tokens, bench.quality measures at 16 × 256 (the paper calibrates on
128 × 2048 + 128 × 2048 for fine-tuning validation; NOTES §1), so this sweep says what the default and a larger set
buy. Same points, protocol and saving as bench.quality (`sweep`); writes section `calib-size` of
docs/BENCHMARKS.md and its points to docs/data/calib_size-points.json.
"""

from __future__ import annotations

import argparse
import time

from bench.quality import MODELS, ROOT, Point, add_sweep_args, section_head, sweep
from bench.report import replace_section


def size_of(label: str) -> tuple[int, int]:
    """'32x512' -> (32 sequences, 512 tokens each)."""
    seqs, length = label.split("x")
    return int(seqs), int(length)


def variant_args(label: str) -> list[str]:
    seqs, length = size_of(label)
    return ["--method", "nwc", "--calib", "wiki", "--calib-seqs", str(seqs), "--calib-len", str(length)]


def render(points: list[Point], args: argparse.Namespace, seconds: float) -> str:
    fp = points[0].ppl_fp
    lines = [
        *section_head(f"Calibration size (calibrated NWC, {MODELS[args.model].title})", "bench.calib_size", args,
                      seconds, "Calibrated NWC (LDLQ feedback, Hessian water-filling of column rates, no block "
                      "fine-tuning), built-in Wikipedia calibration split, seed 0; only the number and length of "
                      "the calibration sequences change. Compress seconds are wall time on a shared 2-core "
                      "machine (indicative only).", MODELS[args.model].caveat, fp),
        "| calibration | tokens | target | measured bits/weight | perplexity | Δ vs FP (%) | KL (nats/token) "
        "| top-1 agreement | compress s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.target, size_of(p.method.removeprefix("nwc-")))):
        seqs, length = size_of(p.method.removeprefix("nwc-"))
        lines.append(f"| {seqs} × {length} | {seqs * length} | {p.target:g} | {p.bits:.3f} | {p.ppl:.3f} | "
                     f"{100 * (p.ppl / fp - 1):+.1f} | {p.kl:.4f} | {100 * p.top1:.1f} % | {p.compress_s:.0f} | "
                     f"{p.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 4.0])
    ap.add_argument("--sizes", nargs="+", default=["16x256", "32x512", "128x512"],
                    help="calibration sets as SEQUENCESxTOKENS")
    add_sweep_args(ap)
    args = ap.parse_args()
    t0 = time.time()
    model = MODELS[args.model]
    variants = {f"nwc-{s}": variant_args(s) for s in args.sizes}
    points = sweep(variants, args.targets, args, ROOT / "runs" / f"calib_size{model.suffix}",
                   model.points_path("calib_size"))
    replace_section(f"calib-size{model.suffix}", render(points, args, time.time() - t0))


if __name__ == "__main__":
    main()
