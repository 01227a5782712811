"""Model quality vs measured bits/weight: NWC (model-free and calibrated), GPTQ, RTN.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.quality [--model smollm2|gemma3] [--targets 2 3 4 5 6]
        [--eval-tokens 4096] [--calib-seqs 16 --calib-len 256] [--methods nwc-free nwc nwc-ft gptq rtn]
        [--jobs 2] [--resume]

`--model smollm2` (SmolLM2-135M-Instruct, the evaluation model of MODELS.md) writes section `quality` and
docs/quality.png from runs/quality/; `--model gemma3` (Gemma-3-270m, the second architecture) writes section
`quality-gemma3` and docs/quality-gemma3.png from runs/quality-gemma3/.

Points run `--jobs` at a time; each finished point is saved at once to docs/data/quality-points.json (committed
with the docs; bundles go to runs/quality/), and `--resume` skips points already there (same method, target and
calibration), so a long run can be continued.

Each point: `nwc compress` in a fresh process (its report gives measured bits, seconds and peak RSS), `nwc
decompress`, then `evaluate_pair` against the original on the held-out Wikipedia slice (perplexity of both, KL of
the compressed model's next-token distribution from the original's, top-1 agreement). GPTQ/RTN are fixed-length:
`--bits B` means int(B) bits + group-128 fp16 scale/min, so they land at ≈ B + 0.27 measured; compare at equal
*measured* bits (the plot). Writes docs/BENCHMARKS.md (section `quality`) and docs/quality.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.report import replace_section
from codec.assets import eval_text, gemma3_dir, smollm2_dir
from codec.evaluate import EvalReport, evaluate_pair

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EvalModel:
    title: str
    source: Callable[[], Path]
    suffix: str  # of the runs folder, docs section and plot: "" for the main evaluation model
    bos: str  # how the protocol treats BOS (the evaluation adds one exactly when the tokenizer does)
    caveat: str  # where its weights come from, and what that means for the numbers

    def runs(self) -> Path:
        return ROOT / "runs" / f"quality{self.suffix}"

    def plot_path(self) -> Path:
        return ROOT / "docs" / f"quality{self.suffix}.png"

    def points_path(self, bench: str = "quality") -> Path:
        """Measured points are committed beside the docs (small JSON), so `--resume` and `--render-only` work from
        a fresh clone and a later sweep adds to the published one instead of starting over."""
        return ROOT / "docs" / "data" / f"{bench}{self.suffix}-points.json"


MODELS = {
    "smollm2": EvalModel(
        "SmolLM2-135M-Instruct", smollm2_dir, "", "no BOS (SmolLM2's tokenizer adds none)",
        "SmolLM2's linears are stored on a Q4_1 grid (MODELS.md): at ≥ 4 bits a method can re-find that grid, so "
        "≥ 4-bit numbers overstate what it would do on full-precision weights."),
    "gemma3": EvalModel(
        "Gemma-3-270m", gemma3_dir, "-gemma3", "BOS prepended to every window (Gemma's tokenizer adds one)",
        "Gemma-3-270m is converted from a Q4_K_M GGUF (MODELS.md): its linears lie on 4–6-bit k-quant grids, and "
        "63 % of its parameters are the 262k × 640 tied embedding, which has no Hessian: NWC codes it model-free "
        "inside the whole-file rate control, GPTQ and RTN round it at their bits."),
}
METHODS = {  # label -> extra CLI arguments
    "nwc-free": ["--method", "nwc"],
    "nwc": ["--method", "nwc", "--calib", "wiki"],
    "nwc-ft": ["--method", "nwc", "--calib", "wiki", "--finetune-epochs", "2"],
    "gptq": ["--method", "gptq", "--calib", "wiki"],
    "rtn": ["--method", "rtn", "--calib", "wiki"],
    "nowag-vq": ["--method", "nowag-vq", "--calib", "wiki"],
}


def accepts(variant: str, target: float) -> bool:
    """nowag-vq has settings only where 12 / bits is whole (2, 3, 4, 6 in a 2–6 sweep; docs/NOWAG.md)."""
    return variant != "nowag-vq" or abs(12 / target - round(12 / target)) < 1e-9


@dataclass
class Point:
    method: str
    target: float
    bits: float
    ppl: float
    ppl_fp: float
    kl: float
    top1: float
    compress_s: float
    peak_rss_mb: float
    generation: str
    measured: str  # UTC date of the run; a resumed sweep mixes dates, and the section says which


def measured_on(points: list[Point]) -> str:
    """One line naming the run dates of the points and the targets each date covers."""
    by: dict[str, list[Point]] = {}
    for p in points:
        by.setdefault(p.measured, []).append(p)
    return "Points measured on " + "; ".join(
        f"{d} ({len(ps)} points, targets {', '.join(f'{t:g}' for t in sorted({p.target for p in ps}))})"
        for d, ps in sorted(by.items())) + "."


def nwc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "codec.cli", *args], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def run_point(label: str, cli_args: list[str], target: float, args: argparse.Namespace, text: str,
              runs: Path) -> Point:
    """One point: `nwc compress` with `cli_args` at `target` bits, decompress, evaluate against the original."""
    report, ev = measure(runs / f"{label}-{target:g}", [*cli_args, "--bits", f"{target:g}"], args, text)
    return Point(label, target, report["measured_bits"], ev.compressed.ppl, ev.original.ppl, ev.kl,
                 ev.top1_agreement, report["seconds"], report["peak_rss_mb"], ev.generation_compressed,
                 f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}")


def measure(out: Path, cli_args: list[str], args: argparse.Namespace, text: str) -> tuple[dict, EvalReport]:
    """`nwc compress` with `cli_args` (plus the calibration size when calibrated) into `out`, decompress, evaluate
    against the original; returns the compressor's report and the evaluation."""
    shutil.rmtree(out, ignore_errors=True)
    extra = list(cli_args)
    if "--calib" in extra and "--calib-seqs" not in extra:  # a variant may choose its own calibration size
        extra += ["--calib-seqs", str(args.calib_seqs), "--calib-len", str(args.calib_len)]
    source = MODELS[args.model].source()
    nwc("compress", str(source), "-o", str(out / "bundle"), "-q", "--no-verify", "--no-dense-output", *extra)
    nwc("decompress", str(out / "bundle"), "-o", str(out / "dense"), "-q")
    report = json.loads((out / "bundle" / "report.json").read_text())
    ev = evaluate_pair(source, out / "dense", text, max_tokens=args.eval_tokens, window=1024,
                       text_name="held-out Wikipedia (codec.assets.eval_text)")
    shutil.rmtree(out / "dense")
    return report, ev


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=list(MODELS), default="smollm2", help="the real model to compress")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=1, help="points run at once (each is a few processes)")
    ap.add_argument("--resume", action="store_true", help="keep finished points of docs/data/*-points.json")
    ap.add_argument("--render-only", action="store_true", help="only redraw docs from docs/data/*-points.json")
    ap.add_argument("--redo", action="store_true",
                    help="measure the asked points again (replacing their saved values), keep the other saved ones")


def sweep(variants: dict[str, list[str]], targets: list[float], args: argparse.Namespace, runs: Path,
          saved: Path) -> list[Point]:
    """Every (variant, target) point, `args.jobs` at a time, compressed under `runs`; each finished point is saved to
    `saved` at once, and `--resume` / `--render-only` reuse the saved points of the same calibration and
    evaluation."""
    text = eval_text()
    runs.mkdir(parents=True, exist_ok=True)
    saved.parent.mkdir(parents=True, exist_ok=True)
    calib = {"calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "eval_tokens": args.eval_tokens}
    keep = (args.resume or args.redo or args.render_only) and saved.exists()
    old = json.loads(saved.read_text()) if keep else {"calib": calib, "points": []}
    points = [Point(**p) for p in old["points"]] if old.get("calib") == calib else []
    if args.redo and not args.render_only:
        asked = {(v, float(t)) for v in variants for t in targets}
        points = [p for p in points if (p.method, p.target) not in asked]
    have = {(p.method, p.target) for p in points}
    todo = [] if args.render_only else [(v, t) for t in targets for v in variants
                                        if (v, float(t)) not in have and accepts(v, t)]
    lock = threading.Lock()

    def one(vt: tuple[str, float]) -> None:
        p = run_point(vt[0], variants[vt[0]], vt[1], args, text, runs)
        with lock:
            points.append(p)
            saved.write_text(json.dumps({"calib": calib, "points": [asdict(x) for x in points]}, indent=1))
            print(asdict(p), flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, vt) for vt in todo]:
            f.result()
    return points


def protocol(args: argparse.Namespace) -> str:
    return (f"perplexity on the first {args.eval_tokens} tokens of the held-out Wikipedia text, non-overlapping "
            f"windows of 1024, {MODELS[args.model].bos}, fp32; KL and top-1 on the same tokens")


def provenance(module: str, args: argparse.Namespace, seconds: float) -> str:
    """The command, date and machine line a section starts with."""
    return (f"Command: `OMP_NUM_THREADS=1 python -m {module} {' '.join(sys.argv[1:])}` — "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, CPU only; "
            + ("table assembled from the saved points (`--render-only`)." if args.render_only
               else f"wall time {seconds / 60:.0f} min."))


def section_head(title: str, module: str, args: argparse.Namespace, seconds: float, method_text: str,
                 caveat: str | None, ppl_fp: float) -> list[str]:
    """The lines every model-quality section starts with: title, provenance, protocol, caveat, the FP line."""
    lines = [f"## {title}", "", provenance(module, args, seconds), "", f"Protocol: {protocol(args)}. {method_text}", ""]
    if caveat:
        lines += [f"> **Caveat.** {caveat}", ""]
    return [*lines, f"FP32 original: perplexity {ppl_fp:.3f}.", ""]


def render(points: list[Point], args: argparse.Namespace, seconds: float) -> str:
    fp = points[0].ppl_fp
    model = MODELS[args.model]
    lines = [
        *section_head(f"Model quality vs bits ({model.title})", "bench.quality", args, seconds,
                      "Calibration: built-in Wikipedia calibration split (first 80 % of articles), "
        f"{args.calib_seqs} sequences × {args.calib_len} tokens, seed 0. `nwc-free` = NWC without calibration "
        "(model-free); `nwc` = NWC with LDLQ feedback and Hessian water-filling of per-column rates; GPTQ/RTN: "
        "group 128, asymmetric, fp16 scale + min, embeddings RTN at the same bits; `nwc-ft` = `nwc` plus block "
        "fine-tuning (2 epochs; row scales of coded layers, weights not yet coded, norms); `nowag-vq` = NoWag vector "
        "quantization (docs/NOWAG.md; diag(H)-weighted k-means, d = 12 / bits, embedding coded data-free). "
        "Bits = 8 × container bytes / all parameters. Compress seconds are wall time on a shared 2-core machine "
        "running two points at once (indicative only). " + measured_on(points), model.caveat, fp),
        "| method | target | measured bits/weight | perplexity | Δ vs FP (%) | KL (nats/token) | top-1 agreement |"
        " compress s | peak RSS MB | greedy continuation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.target, p.method)):
        gen = p.generation.replace("\n", " ").replace("|", "/")[:40]
        delta = _num(100 * (p.ppl / fp - 1), "+", 1)
        lines.append(f"| {p.method} | {p.target:g} | {p.bits:.3f} | {_num(p.ppl)} | {delta} | "
                     f"{p.kl:.4f} | {100 * p.top1:.1f} % | {p.compress_s:.0f} | {p.peak_rss_mb:.0f} | {gen} |")
    lines += ["", f"![perplexity and KL vs measured bits]({model.plot_path().name})", "", *goals(points)]
    return "\n".join(lines)


GOALS = {4.0: 1.0, 3.0: 4.0}  # issue 4: calibrated NWC within +1 % of FP perplexity at 4 bits, +4 % at 3 bits


def goals(points: list[Point]) -> list[str]:
    """The issue's goals checked against the saved points: calibrated NWC (best of nwc, nwc-ft) at 4 and 3 bits,
    and NWC against every GPTQ point at equal or fewer measured bits/weight (GPTQ lands ≈ 0.29 above its target,
    so the NWC point at the same target is the fair comparison and also uses fewer bits)."""
    fp = points[0].ppl_fp
    nwc = [p for p in points if p.method in ("nwc", "nwc-ft")]
    out = ["**Goals** (computed from the points above):", ""]
    for target, limit in GOALS.items():
        at = [p for p in nwc if p.target == target]
        if not at:
            continue
        best = min(at, key=lambda p: p.ppl)
        delta = 100 * (best.ppl / fp - 1)
        out.append(f"- {target:g} bits: best calibrated NWC ({best.method}) {best.ppl:.3f} = {delta:+.1f} % vs FP; "
                   f"goal ≤ +{limit:g} %: **{'met' if delta <= limit else 'not met'}**.")
    for g in sorted((p for p in points if p.method == "gptq"), key=lambda p: p.bits):
        rivals = [p for p in nwc if p.bits <= g.bits + 1e-9]
        if not rivals:
            out.append(f"- GPTQ at {g.bits:.2f} bits: no calibrated NWC point at ≤ that rate.")
            continue
        r = max(rivals, key=lambda p: (p.bits, -p.ppl))
        verdict = "better" if r.ppl < g.ppl else "**worse**"
        out.append(f"- GPTQ {g.ppl:.4g} at {g.bits:.2f} bits vs {r.method} {r.ppl:.4g} at {r.bits:.2f} bits: NWC "
                   f"{verdict}.")
    by = {(p.method, p.target): p for p in points}
    for v in sorted((p for p in points if p.method == "nowag-vq"), key=lambda p: p.target):
        rivals = [by[m, v.target] for m in ("gptq", "nwc") if (m, v.target) in by]
        if rivals:
            out.append(f"- NoWag-VQ {v.ppl:.4g} at {v.bits:.2f} bits vs " + ", ".join(
                f"{r.method} {r.ppl:.4g} at {r.bits:.2f} bits" for r in rivals) + ".")
    return out


def _num(x: float, sign: str = "", decimals: int = 3) -> str:
    """Table numbers: fixed decimals, or three significant digits once they explode (2-bit baselines)."""
    return f"{x:{sign}.{decimals}f}" if abs(x) < 1e4 else f"{x:{sign}.3g}"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    fp = points[0].ppl_fp
    top = 30 * fp  # collapsed points (2-bit baselines reach 1e8) would flatten the rest: drawn on the edge
    for m in METHODS:
        ps = sorted((p for p in points if p.method == m), key=lambda p: p.bits)
        if ps:
            line = a.plot([p.bits for p in ps], [min(p.ppl, top) for p in ps], "o-", label=m)[0]
            off = [p for p in ps if p.ppl > top]
            a.plot([p.bits for p in off], [top] * len(off), "^", ms=11, color=line.get_color())
            b.plot([p.bits for p in ps], [p.kl for p in ps], "o-", label=m)
    a.axhline(fp, color="k", ls="--", label="FP32 original")
    a.set_ylim(fp * 0.9, top * 1.15)
    a.text(0.99, 0.99, f"▲ off scale (> {top:.0f}): see the table", transform=a.transAxes, ha="right", va="top",
           fontsize=8)
    a.set_yscale("log")
    b.set_yscale("log")
    for ax, t in ((a, "perplexity (held-out Wikipedia)"), (b, "KL(original ‖ compressed), nats/token")):
        ax.set_xlabel("measured bits / weight (whole file)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 4.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_sweep_args(ap)
    args = ap.parse_args()
    t0 = time.time()
    model = MODELS[args.model]
    points = sweep({m: METHODS[m] for m in args.methods}, args.targets, args, model.runs(), model.points_path())
    plot(points, model.plot_path())
    replace_section(f"quality{model.suffix}", render(points, args, time.time() - t0))


if __name__ == "__main__":
    main()
