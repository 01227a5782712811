"""Rate–distortion benchmark on real held-out weights: NWC against RTN and ECSQ.

    .venv/bin/python -m bench.rd            # SmolLM2-135M-Instruct + all-MiniLM-L6-v2, targets 2..6
    .venv/bin/python -m bench.rd --quick    # MiniLM only, targets 3 and 5 (smoke test; docs untouched)

Matrices: every 2-D float matrix the NWC pipeline codes by default (≥ 16 rows, ≥ 4096 weights), restricted
for SmolLM2 to the decoder layers and the embedding. Neither model was used to train a codec.

* NWC: ``codec.pipeline.compress_model`` on the whole model directory (each call in a fresh process, so
  its peak RSS is its own), then ``decompress_model``; distortion is measured on the *decompressed* dense
  weights, bits from the container file: (file bytes − bytes of the records of tensors outside the
  matrix set) / weights in the set, so header, index and side info all count.
* RTN (bits 2..6, group 128) and ECSQ (target rates 2..6, best step per matrix) from ``codec.baselines``,
  real payloads, every payload decoded again and checked bit-exact; bits = Σ payload bits / Σ weights.

nmse = mean over all rows of the set of row-MSE / row-variance (= rows-weighted mean of per-matrix nmse);
distortion dB = 10·log10(nmse); effective gap to the Gaussian bound = R − ½·log2(1/nmse) (NOTES §3).
Results go to ``docs/BENCHMARKS.md`` between ``<!-- rd:begin -->`` and ``<!-- rd:end -->`` and to
``docs/rd.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from codec.baselines import ecsq_at_rate, ecsq_decode, row_stats, rtn_decode, rtn_encode
from codec.pipeline import default_method
from codec.source import ST_DTYPES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCH_MD = DOCS / "BENCHMARKS.md"
PLOT = DOCS / "rd.png"
BEGIN, END = "<!-- rd:begin -->", "<!-- rd:end -->"
TARGETS = (2, 3, 4, 5, 6)
QUICK_TARGETS = (3, 5)
RTN_GROUP = 128
SMOLLM2_CAVEAT = " ".join("""
SmolLM2-135M-Instruct ships only as a Q4_1 GGUF: every linear matrix already lies on an asymmetric
4-bit grid (groups of 32 along the input, scale + min) and the embedding on a Q8_0 grid. At ≥ 4
bits/weight (rows marked †) a coder can exploit that grid, so these numbers overstate what it would
achieve on full-precision weights; below 4 bits, and for the embedding, the grid is finer than the
target and the numbers are meaningful (MODELS.md).
""".split())
PROTOCOL = " ".join(f"""
Protocol: the matrices are every 2-D float matrix the NWC pipeline codes by default (≥ 16 rows, ≥
4096 weights); neither model was used to train a codec. **NWC**: `compress_model(model_dir, tmp,
target)` on the whole model (rate control spends the target over *all* parameters in the file, 1-D
tensors stored raw included, so NWC's bits/weight on the matrices alone is a little below its
target), then `decompress_model`; distortion is computed on the decompressed weights; bits = 8·(file
bytes − bytes of records outside the matrix set) / weights in the set, so container header, index
and side info all count. **RTN g{RTN_GROUP}**: asymmetric round-to-nearest, min/max per group of
{RTN_GROUP} along the input dimension, fp16 scale + fp16 min (32/{RTN_GROUP} bit/weight of side
info). **ECSQ**: per-row RMS scale (fp16), uniform step chosen per matrix by bisection to hit the
target rate, one empirical pmf per matrix stored in the payload, ANS-coded (constriction). Every
baseline payload was decoded again and checked bit-exact; bits = Σ payload bits / Σ weights. nmse =
mean over all rows of row-MSE / row-variance; distortion = 10·log10(nmse); gap = R − ½·log2(1/nmse),
the distance to the Gaussian rate–distortion bound D(R) = σ²·2^(−2R) (ideal ECSQ on Gaussian data:
0.255 bit; fixed-length grids 0.45–0.70 bit; heavy-tailed real weights can beat the Gaussian
figure).
""".split())


def log(msg: str) -> None:
    print(f"[rd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models and matrices

def coded_by_default(dtype: str, shape: tuple[int, ...]) -> bool:
    """The pipeline's own rule (``codec.pipeline.default_method``) restricted to 2-D matrices."""
    return len(shape) == 2 and default_method(dtype, shape) == "nwc"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    locate: Callable[[], Path]
    wanted: Callable[[str], bool]  # name filter on top of coded_by_default
    note: str


def _smollm2_dir() -> Path:
    from codec.assets import smollm2_dir

    return smollm2_dir()


def _minilm_dir() -> Path:
    from codec.assets import minilm_dir

    return minilm_dir()


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(
        "minilm", "all-MiniLM-L6-v2", _minilm_dir, lambda name: True,
        "fp32 BERT encoder (full precision: every row has distinct values); all 2-D matrices "
        "(word/position embeddings, attention, FFN, pooler)",
    ),
    "smollm2": ModelSpec(
        "smollm2", "SmolLM2-135M-Instruct", _smollm2_dir,
        lambda name: name == "model.embed_tokens.weight" or name.startswith("model.layers."),
        "Llama decoder, dequantized from Q4_1 (linears) / Q8_0 (embedding); all decoder-layer matrices "
        "+ the (tied) embedding",
    ),
}


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def matrix_names(model_dir: Path, spec: ModelSpec) -> list[str]:
    names = []
    for shard in shard_files(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = ST_DTYPES.get(sl.get_dtype(), "")
                if coded_by_default(dtype, tuple(sl.get_shape())) and spec.wanted(name):
                    names.append(name)
    return names


def iter_tensors(model_dir: Path, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in shard_files(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name in names:
                    yield name, f.get_tensor(name).float()


# --------------------------------------------------------------------------- results

@dataclass
class Point:
    """One (method, target) point aggregated over a model's matrix set."""

    method: str
    target: float
    bits: int = 0  # payload bits over the set
    weights: int = 0
    row_sum: float = 0.0  # Σ row-MSE / row-variance
    rows: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    file_bits: float | None = None  # NWC only: 8·file bytes / all params in the file
    report_nmse: float | None = None  # NWC only: what the encoder reported (cross-check)
    peak_rss_enc_mb: float | None = None
    peak_rss_dec_mb: float | None = None
    error: str | None = None

    @property
    def bpw(self) -> float:
        return self.bits / self.weights if self.weights else math.nan

    @property
    def nmse(self) -> float:
        return self.row_sum / self.rows if self.rows else math.nan

    @property
    def db(self) -> float:
        return 10 * math.log10(self.nmse) if self.nmse > 0 else -math.inf

    @property
    def gap(self) -> float:
        return self.bpw - 0.5 * math.log2(1 / self.nmse) if self.nmse > 0 else math.nan

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bpw=self.bpw, nmse=self.nmse, db=self.db, gap=self.gap)
        return d


@dataclass
class ModelResult:
    key: str
    title: str
    note: str
    n_matrices: int
    n_weights: int
    total_params: int
    points: list[Point] = field(default_factory=list)
    nwc_excluded: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- baselines

def run_baselines(model_dir: Path, names: list[str], targets: tuple[float, ...]) -> list[Point]:
    rtn = {b: Point("RTN g128", b) for b in targets}
    ecsq = {t: Point("ECSQ", t) for t in targets}
    for i, (name, w) in enumerate(iter_tensors(model_dir, set(names))):
        t0 = time.perf_counter()
        for b in targets:
            p = rtn[b]
            ts = time.perf_counter()
            r = rtn_encode(w, int(b), RTN_GROUP)
            te = time.perf_counter()
            if not torch.equal(rtn_decode(r.payload, tuple(w.shape), int(b), RTN_GROUP), r.decoded):
                raise AssertionError(f"RTN round trip failed on {name} at {b} bits")
            p.enc_s += te - ts
            p.dec_s += time.perf_counter() - te
            _accumulate(p, w, r.decoded, r.bits)
        for t in targets:
            p = ecsq[t]
            ts = time.perf_counter()
            r = ecsq_at_rate(w, float(t))
            te = time.perf_counter()
            if not torch.equal(ecsq_decode(r.payload, tuple(w.shape)), r.decoded):
                raise AssertionError(f"ECSQ round trip failed on {name} at {t} bits")
            p.enc_s += te - ts
            p.dec_s += time.perf_counter() - te
            _accumulate(p, w, r.decoded, r.bits)
        log(f"  baselines {i + 1}/{len(names)} {name} {tuple(w.shape)} {time.perf_counter() - t0:.1f}s")
    return list(rtn.values()) + list(ecsq.values())


def _accumulate(p: Point, w: torch.Tensor, w_hat: torch.Tensor, bits: int) -> None:
    s, n = row_stats(w, w_hat)
    p.bits += bits
    p.weights += w.numel()
    p.row_sum += s
    p.rows += n


# --------------------------------------------------------------------------- NWC (fresh process per call)

def _job_compress(src: str, out: str, bits: float, codec_id: str | None, names: list[str]):
    from codec.pipeline import compress_model

    keep = set(names)
    return compress_model(Path(src), Path(out), bits, codec_id=codec_id, device="cpu", progress=False,
                          include=keep.__contains__)


def _job_decompress(bundle: str, out: str) -> tuple[float, float]:
    from codec.pipeline import decompress_model

    t0 = time.perf_counter()
    decompress_model(Path(bundle), Path(out), device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_fresh_process(fn, *args):
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(fn, *args).result()


def run_nwc(model_dir: Path, names: list[str], target: float, codec_id: str | None,
            work: Path) -> tuple[Point, str | None, list[str]]:
    """(point, codec id, names of set matrices NWC did not code)."""
    p = Point("NWC", target)
    bundle, dense = work / f"bundle-{target:g}", work / f"dense-{target:g}"
    try:
        rep = _in_fresh_process(_job_compress, str(model_dir), str(bundle), float(target), codec_id, names)
        dec_s, dec_rss = _in_fresh_process(_job_decompress, str(bundle), str(dense))
    except Exception as e:  # a target the codec cannot reach, no registered codec, ...
        p.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"  NWC {target:g} failed: {p.error}")
        traceback.print_exc(file=sys.stderr)
        return p, None, []
    in_set = set(names)
    outside_bytes = sum(t.bytes for t in rep.tensors if t.name not in in_set)
    coded = {t.name for t in rep.tensors if t.method == "nwc"}
    p.bits = 8 * (rep.file_bytes - outside_bytes)
    p.file_bits = rep.measured_bits
    p.enc_s, p.dec_s = rep.seconds, dec_s
    p.peak_rss_enc_mb, p.peak_rss_dec_mb = rep.peak_rss_mb, dec_rss
    rows = sum(t.rows for t in rep.tensors if t.name in coded and t.nmse is not None)
    if rows:
        p.report_nmse = sum(t.nmse * t.rows for t in rep.tensors
                            if t.name in coded and t.nmse is not None) / rows
    decoded = dict(iter_tensors(dense, in_set))
    for name, w in iter_tensors(model_dir, in_set):
        _accumulate(p, w, decoded.pop(name), 0)
    p.weights = sum(t.numel for t in rep.tensors if t.name in in_set)
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(dense, ignore_errors=True)
    return p, rep.codec_id, sorted(in_set - coded)


# --------------------------------------------------------------------------- report

def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
        "python": platform.python_version(),
    }


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table(res: ModelResult, dagger_from: float | None) -> list[str]:
    lines = [
        "| method | target | bits/weight | nmse | distortion (dB) | gap to Gaussian D(R) (bit) "
        "| whole-file bits/weight |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"NWC": 0, "ECSQ": 1, "RTN g128": 2}
    for p in sorted(res.points, key=lambda q: (q.target, order.get(q.method, 9))):
        mark = " †" if dagger_from is not None and p.target >= dagger_from else ""
        target = f"{p.target:g}{mark}"
        if p.error:
            lines.append(f"| {p.method} | {target} | — | — | — | — | failed: {p.error} |")
            continue
        lines.append(
            f"| {p.method} | {target} | {p.bpw:.3f} | {p.nmse:.3e} | {p.db:.2f} | {p.gap:.3f} "
            f"| {_f(p.file_bits, '.3f')} |"
        )
    return lines


def throughput_table(results: list[ModelResult]) -> list[str]:
    """NWC: one row per (model, target). Baselines: one row per (model, method), over all targets."""
    lines = [
        "| model | method | target | weights | encode (weights/s) | decode (weights/s) "
        "| peak RSS compress (MB) | peak RSS decompress (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for p in res.points:
            if p.method == "NWC" and not p.error and p.enc_s > 0:
                lines.append(
                    f"| {res.title} | NWC | {p.target:g} | {p.weights:,} | {p.weights / p.enc_s:,.0f} "
                    f"| {p.weights / p.dec_s:,.0f} | {_f(p.peak_rss_enc_mb, ',.0f')} "
                    f"| {_f(p.peak_rss_dec_mb, ',.0f')} |"
                )
        for method in ("ECSQ", "RTN g128"):
            pts = [p for p in res.points if p.method == method and not p.error and p.enc_s > 0]
            if pts:
                w = sum(p.weights for p in pts)
                targets = ", ".join(f"{p.target:g}" for p in pts)
                lines.append(
                    f"| {res.title} | {method} | all ({targets}) | {pts[0].weights:,} "
                    f"| {w / sum(p.enc_s for p in pts):,.0f} | {w / sum(p.dec_s for p in pts):,.0f} | — | — |"
                )
    return lines


def _provenance(meta: dict) -> str:
    notes = []
    if meta.get("baselines_from"):
        notes.append(f"RTN/ECSQ points (and their timings) were reused from an earlier run "
                     f"(`--baselines-from {Path(meta['baselines_from']).name}`); they do not depend on the "
                     "codec.")
    js = meta.get("json")
    if js and Path(js).resolve().is_relative_to(ROOT):
        notes.append(f"Raw numbers: `{Path(js).resolve().relative_to(ROOT)}`.")
    return " ".join(notes)


def render(results: list[ModelResult], meta: dict) -> str:
    m = meta["machine"]
    out = [
        BEGIN,
        "## Rate–distortion on held-out real weights",
        "",
        f"Command: `{meta['command']}` (wall time {meta['seconds'] / 60:.1f} min).  ",
        f"Date: {meta['date']}.  ",
        f"Machine: {m['platform']}, {m['cpu']}, `os.cpu_count()` = {m['cpu_count']}, torch {m['torch']}, "
        f"Python {m['python']}, CUDA device: {m['cuda']}. Load average at start / end: "
        f"{meta['load_start']} / {meta['load_end']} (the cores were shared with other jobs: throughputs are "
        "lower bounds).  ",
        f"NWC codec: `{meta['codec_id']}` (sha256 `{meta['codec_sha256']}`), run on CPU."
        if any(p.method == "NWC" for r in results for p in r.points) else
        "**NWC was not run for this rendering** (baselines only, `--no-nwc`); run "
        "`.venv/bin/python -m bench.rd --codec ID` to add it.",
        "",
        PROTOCOL,
        "",
    ]
    for res in results:
        is_smol = res.key == "smollm2"
        out += [
            f"### {res.title}",
            "",
            f"{res.note}: {res.n_matrices} matrices, {res.n_weights:,} weights "
            f"({res.n_weights / res.total_params:.1%} of the model's {res.total_params:,} parameters).",
            "",
        ]
        if is_smol:
            out += [f"> **Caveat (≥ 4 bits, rows marked †).** {SMOLLM2_CAVEAT}", ""]
        if res.nwc_excluded:
            out += ["NWC stored these set matrices without its codec (counted in its bits): "
                    f"{', '.join(res.nwc_excluded)}.", ""]
        out += table(res, 4.0 if is_smol else None) + [""]
        nwc_checks = [p for p in res.points
                      if p.method == "NWC" and p.report_nmse is not None and not p.error]
        if nwc_checks:
            worst = max(abs(p.report_nmse / p.nmse - 1) for p in nwc_checks if p.nmse > 0)
            out += ["NWC's encoder-side nmse report agrees with the decompressed weights within "
                    f"{worst:.2%}.", ""]
    out += [
        "### Throughput (CPU)",
        "",
        "Encode = weights in the set / end-to-end seconds (NWC: `compress_model`, planning pass included, "
        "fresh process; baselines: `rtn_encode` / `ecsq_at_rate` including the step search). Decode = "
        "weights / seconds (NWC: `decompress_model` writing the dense safetensors directory, fresh process). "
        "Peak RSS is each fresh process's `ru_maxrss`. Baseline rows pool all targets (Python + numpy + "
        "constriction, one matrix at a time, in the benchmark process).",
        "",
        *throughput_table(results),
        "",
        "![rate–distortion](rd.png)",
        "",
        _provenance(meta),
        END,
    ]
    return "\n".join(out).replace("\n\n" + END, "\n" + END) + "\n"


def write_docs(section: str, path: Path = BENCH_MD) -> None:
    """Replace only the text between the rd markers (other sections belong to other benchmarks)."""
    from bench.report import replace_section

    body = section.split(BEGIN, 1)[-1].split(END, 1)[0].strip("\n")
    replace_section("rd", body, path)


def plot(results: list[ModelResult], path: Path = PLOT, codec_id: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.8), squeeze=False)
    styles = {"NWC": ("C0", "o"), "ECSQ": ("C1", "s"), "RTN g128": ("C2", "^")}
    for ax, res in zip(axes[0], results, strict=True):
        pts = [p for p in res.points if not p.error and p.nmse > 0]
        xs = [p.bpw for p in pts]
        lo, hi = (min(xs) - 0.3, max(xs) + 0.3) if xs else (1.5, 6.5)
        r = torch.linspace(lo, hi, 50)
        ax.plot(r, -20 * math.log10(2) * r, "k-", lw=1, label="Gaussian bound D(R)")
        ax.plot(r, -20 * math.log10(2) * (r - 0.255), "k:", lw=1, label="ideal ECSQ, Gaussian (+0.255 bit)")
        for method, (color, marker) in styles.items():
            mp_ = sorted((p for p in pts if p.method == method), key=lambda p: p.bpw)
            if mp_:
                label = f"NWC ({codec_id})" if method == "NWC" and codec_id else method
                ax.plot([p.bpw for p in mp_], [p.db for p in mp_], color=color, marker=marker, label=label)
        if res.key == "smollm2":
            ax.axvspan(4.0, hi, color="0.9", zorder=0)
            ax.text(4.05, 0.97, "† Q4_1-grid caveat", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8)
        ax.set_xlim(lo, hi)
        ax.set_title(res.title, fontsize=10)
        ax.set_xlabel("measured bits / weight")
        ax.set_ylabel("distortion 10·log10(nmse) (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

DERIVED = {"bpw", "nmse", "db", "gap"}


def save_json(path: Path, meta: dict, results: list[ModelResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "meta": meta,
        "results": [{**{k: v for k, v in asdict(r).items() if k != "points"},
                     "points": [p.to_dict() for p in r.points]} for r in results],
    }, indent=1, default=str))


def load_json(path: Path) -> tuple[dict, list[ModelResult]]:
    d = json.loads(Path(path).read_text())
    results = []
    for r in d["results"]:
        pts = [Point(**{k: v for k, v in p.items() if k not in DERIVED}) for p in r["points"]]
        results.append(ModelResult(**{**{k: v for k, v in r.items() if k != "points"}, "points": pts}))
    return d["meta"], results


def reusable_baselines(
    prev: list[ModelResult] | None, res: ModelResult, targets: tuple[float, ...]
) -> list[Point]:
    """RTN/ECSQ points of an earlier run on the same matrices and targets (codec-independent)."""
    for old in prev or []:
        if old.key == res.key and old.n_weights == res.n_weights and old.n_matrices == res.n_matrices:
            pts = [p for p in old.points if p.method != "NWC" and p.target in targets and not p.error]
            if {(p.method, p.target) for p in pts} == {(m, t) for m in ("RTN g128", "ECSQ") for t in targets}:
                return pts
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rd", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only, targets 3 and 5; docs are not written")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    ap.add_argument("--targets", nargs="+", type=float, default=None)
    ap.add_argument("--codec", default=None, help="codec id (default: the registry's default)")
    ap.add_argument("--no-nwc", action="store_true", help="baselines only")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/BENCHMARKS.md and docs/rd.png (default: yes, except with --quick)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--baselines-from", type=Path, default=None,
                    help="reuse RTN/ECSQ points of an earlier --json run (same matrices and targets)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only re-render docs/BENCHMARKS.md and docs/rd.png from an earlier --json run")
    args = ap.parse_args(argv)

    if args.from_json:
        meta, results = load_json(args.from_json)
        write_docs(render(results, meta))
        plot(results, codec_id=meta.get("codec_id"))
        log(f"re-rendered {BENCH_MD.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} from {args.from_json}")
        return 0

    models = args.models or (["minilm"] if args.quick else ["smollm2", "minilm"])
    targets = tuple(float(t) for t in (args.targets or (QUICK_TARGETS if args.quick else TARGETS)))
    write = (not args.quick) if args.docs is None else args.docs
    prev = load_json(args.baselines_from)[1] if args.baselines_from else None
    t_start = time.perf_counter()
    load_start = "{:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg())
    results: list[ModelResult] = []
    codec_id = None
    with tempfile.TemporaryDirectory(prefix="nwc-rd-") as tmp:
        for key in models:
            spec = MODELS[key]
            model_dir = spec.locate()
            names = matrix_names(model_dir, spec)
            n_weights, total = 0, 0
            for shard in shard_files(model_dir):
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        n = math.prod(f.get_slice(name).get_shape())
                        total += n
                        n_weights += n if name in names else 0
            res = ModelResult(key, spec.title, spec.note, len(names), n_weights, total)
            log(f"{spec.title}: {len(names)} matrices, {n_weights:,} weights")
            if not args.no_nwc:
                for t in targets:
                    log(f"  NWC target {t:g}")
                    p, cid, excluded = run_nwc(model_dir, names, t, args.codec, Path(tmp))
                    res.points.append(p)
                    codec_id = codec_id or cid
                    res.nwc_excluded = res.nwc_excluded or excluded
                    if not p.error:
                        log(f"  NWC {t:g}: {p.bpw:.3f} bpw nmse {p.nmse:.3e} gap {p.gap:.3f} "
                            f"enc {p.enc_s:.1f}s dec {p.dec_s:.1f}s")
            reused = reusable_baselines(prev, res, targets)
            if reused:
                log(f"  baselines reused from {args.baselines_from}")
            res.points += reused or run_baselines(model_dir, names, targets)
            results.append(res)
            for line in table(res, 4.0 if key == "smollm2" else None):
                print(line)

    codec_sha = "—"
    if codec_id:
        from codec.registry import codec_info

        codec_sha = codec_info(codec_id).sha256[:16] + "…"
    extra = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": f".venv/bin/python -m bench.rd {extra}".strip(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "codec_id": codec_id or "— (NWC not run)",
        "codec_sha256": codec_sha,
        "targets": list(targets),
        "seconds": time.perf_counter() - t_start,
        "load_start": load_start,
        "load_end": "{:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg()),
        "json": str(args.json) if args.json else None,
        "baselines_from": str(args.baselines_from) if args.baselines_from else None,
    }
    if args.json:
        save_json(args.json, meta, results)
    if write:
        write_docs(render(results, meta))
        plot(results, codec_id=meta.get("codec_id"))
        log(f"wrote {BENCH_MD.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    else:
        print(render(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
