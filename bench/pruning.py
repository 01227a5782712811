"""NoWag-P against Wanda on the evaluation model: 50 % unstructured, 2:4 and 4:8, same calibration.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.pruning [--model smollm2|gemma3] [--patterns 0.5 2:4 4:8]
        [--methods nowag-p wanda nowag-p-free] [--eval-tokens 4096] [--calib-seqs 16 --calib-len 256] [--resume]

Each point: `nwc compress --method M (--sparsity S | --pattern N:M)` in a fresh process, `nwc decompress`, then
`evaluate_pair` against the original on the held-out Wikipedia slice, as bench.quality does. `nowag-p-free` is
NoWag-P without calibration (diag(H) = 1). Writes section `pruning` of docs/BENCHMARKS.md, with the published
trend it is checked against (NOTES §2: NoWag-P ≈ Wanda, better at 4:8 and above; Llama-2-7B 2:4 Wiki2 ppl 11.14 vs
Wanda 11.35).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.quality import MODELS, measure, section_head
from bench.report import replace_section
from codec.assets import eval_text

VARIANTS = {  # label -> CLI arguments besides the pattern
    "nowag-p": ["--method", "nowag-p", "--calib", "wiki"],
    "wanda": ["--method", "wanda", "--calib", "wiki"],
    "nowag-p-free": ["--method", "nowag-p"],
}


@dataclass
class PrunePoint:
    method: str
    pattern: str  # "0.5" (unstructured sparsity) or "N:M"
    bits: float
    ppl: float
    ppl_fp: float
    kl: float
    top1: float
    compress_s: float


def pattern_args(pattern: str) -> list[str]:
    return ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]


def run(label: str, pattern: str, args: argparse.Namespace, text: str, runs: Path) -> PrunePoint:
    report, ev = measure(runs / f"{label}-{pattern.replace(':', 'of')}", [*VARIANTS[label], *pattern_args(pattern)],
                         args, text)
    return PrunePoint(label, pattern, report["measured_bits"], ev.compressed.ppl, ev.original.ppl, ev.kl,
                      ev.top1_agreement, report["seconds"])


def label_of(pattern: str) -> str:
    return pattern if ":" in pattern else f"{100 * float(pattern):g} % unstructured"


def render(points: list[PrunePoint], args: argparse.Namespace, seconds: float) -> str:
    fp = points[0].ppl_fp
    model = MODELS[args.model]
    lines = [
        *section_head(f"Pruning: NoWag-P vs Wanda ({model.title})", "bench.pruning", args, seconds,
                      f"Calibration (nowag-p, wanda): built-in Wikipedia split, {args.calib_seqs} × "
        f"{args.calib_len} tokens, seed 0, statistics of the already-pruned blocks upstream (docs/NOWAG.md). "
        "Decoder linears are pruned; embeddings, lm_head and norms stay dense. Kept weights keep their values (no "
        "update). Bits = 8 × container bytes / all parameters (kept values in the source dtype + the ANS-coded "
        "mask).", model.caveat, fp),
        "| pattern | method | perplexity | Δ vs FP (%) | KL (nats/token) | top-1 agreement | bits/weight "
        "| compress s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(args.patterns)}
    for p in sorted(points, key=lambda p: (order.get(p.pattern, 99), p.method)):
        lines.append(f"| {label_of(p.pattern)} | {p.method} | {p.ppl:.3f} | {100 * (p.ppl / fp - 1):+.1f} | "
                     f"{p.kl:.4f} | {100 * p.top1:.1f} % | {p.bits:.2f} | {p.compress_s:.0f} |")
    lines += ["", *trend(points)]
    return "\n".join(lines)


def trend(points: list[PrunePoint]) -> list[str]:
    """The published trend (NoWag-P ≈ Wanda, better at 4:8 and above), checked pattern by pattern."""
    out = ["**Published trend vs here** (NoWag paper, NOTES §2: NoWag-P ≈ Wanda, ahead at 4:8 and above):", ""]
    by = {(p.method, p.pattern): p for p in points}
    for pattern in sorted({p.pattern for p in points}):
        a, b = by.get(("nowag-p", pattern)), by.get(("wanda", pattern))
        if a is None or b is None:
            continue
        rel = 100 * (a.ppl / b.ppl - 1)
        verdict = "NoWag-P better" if rel < -1 else "Wanda better" if rel > 1 else "about equal (within 1 %)"
        out.append(f"- {label_of(pattern)}: NoWag-P {a.ppl:.3f} vs Wanda {b.ppl:.3f} ({rel:+.1f} %): {verdict}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--patterns", nargs="+", default=["0.5", "2:4", "4:8"])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--resume", action="store_true", help="keep finished points of docs/data/pruning*-points.json")
    ap.add_argument("--render-only", action="store_true", help="only redraw the section from the saved points")
    args = ap.parse_args()
    t0 = time.time()
    model = MODELS[args.model]
    runs = model.runs().parent / f"pruning{model.suffix}"
    runs.mkdir(parents=True, exist_ok=True)
    saved = model.points_path("pruning")
    saved.parent.mkdir(parents=True, exist_ok=True)
    setup = {"calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "eval_tokens": args.eval_tokens}
    old = json.loads(saved.read_text()) if (args.resume or args.render_only) and saved.exists() else {}
    points = [PrunePoint(**p) for p in old.get("points", [])] if old.get("setup") == setup else []
    have = {(p.method, p.pattern) for p in points}
    text = eval_text()
    for pattern in [] if args.render_only else args.patterns:
        for m in args.methods:
            if (m, pattern) in have:
                continue
            points.append(run(m, pattern, args, text, runs))
            saved.write_text(json.dumps({"setup": setup, "points": [asdict(p) for p in points]}, indent=1))
            print(asdict(points[-1]), flush=True)
    replace_section(f"pruning{model.suffix}", render(points, args, time.time() - t0))


if __name__ == "__main__":
    main()
