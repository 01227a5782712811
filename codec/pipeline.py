"""Model-free compression of a whole checkpoint: source → plan → encode → container → verify-able bundle.

A bundle is a directory: `model.nwc` (the container, every weight byte), the model's small files
(config, tokenizer, ...) copied verbatim, and `report.json`. Tensors stream shard by shard and one at a
time, so peak memory stays near one tensor plus the codec (two passes: plan, then encode).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from codec import __version__
from codec.chunking import as_matrix
from codec.container import (
    FOOTER_SIZE,
    ContainerHeader,
    ContainerReader,
    ContainerWriter,
    TensorRecord,
    table_row_bytes,
)
from codec.gptq import from_segments
from codec.nowag import prune_decode, vq_decode
from codec.progress import Meter, ProgressFn
from codec.ratecontrol import RateController, RateItem, column_levels, monotone
from codec.registry import CodecIntegrityError, LoadedCodec, load_codec
from codec.source import ModelSource, open_source, write_index
from codec.tensor_codec import NWCTensorCodec, TensorDecodeError
from codec.tensors import DTYPES, dtype_name, from_bytes, to_bytes

BUNDLE_FILE = "model.nwc"
REPORT_FILE = "report.json"
CURVE_SAMPLE_CHUNKS = 4096
# Per coded tensor: ANS final state (up to 8 bytes) and the 4-byte end sentinel.
ANS_OVERHEAD_BYTES = 12
HEADER_ESTIMATE = 1024  # preamble + header JSON; exact accounting happens as bytes are written
FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nmse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean over rows of row-MSE / row-variance (rows with zero variance skipped)."""
    w, w_hat = w.float().reshape(w.shape[0], -1), w_hat.float().reshape(w.shape[0], -1)
    var = w.var(dim=1, unbiased=False)
    mse = (w - w_hat).pow(2).mean(dim=1)
    keep = var > 0
    return float((mse[keep] / var[keep]).mean()) if keep.any() else 0.0


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    method: str
    numel: int
    bytes: int
    bits_per_weight: float
    nmse: float | None = None
    level: float | None = None
    rows: int = 0


@dataclass
class CompressReport:
    source: str
    codec_id: str
    codec_sha256: str
    target_bits: float
    measured_bits: float
    file_bytes: int
    total_params: int
    coded_params: int
    seconds: float
    peak_rss_mb: float
    device: str
    tensors: list[TensorReport] = field(default_factory=list)
    method: str = "nwc"
    calibration: dict | None = None  # source, sha256, sizes, seed (calibrated compression only)
    layers: list[dict] = field(default_factory=list)  # per-layer proxy error etc. (calibrated only)
    verification: dict | None = None  # codec.verify.VerifyReport of the fresh-process check

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CompressReport:
        d = json.loads(text)
        d["tensors"] = [TensorReport(**t) for t in d["tensors"]]
        return cls(**d)


@dataclass
class TensorPlan:
    name: str
    file: str
    method: str  # nwc | raw | alias
    numel: int
    fixed_bytes: int  # payload bytes that do not depend on the rate (raw data, side info)
    curve: np.ndarray | None = None  # bits/weight per level
    alias_of: str | None = None
    table_bytes: int = 0  # its row in the container's tensor table
    shape: tuple[int, ...] = ()
    dtype: str = ""
    digest: str = ""  # content digest: identical tensors (tied weights) are stored once

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curve"] = None if self.curve is None else [float(x) for x in self.curve]
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TensorPlan:
        curve = None if d["curve"] is None else np.asarray(d["curve"], np.float64)
        return cls(**{**d, "curve": curve, "shape": tuple(d["shape"])})


def record_stub(name: str, shape: tuple[int, ...], dtype: str, method: str, file: str,
                alias_of: str | None = None) -> TensorRecord:
    """The record a tensor will become, without payload: one place defines meta and segment names."""
    if method == "nwc":
        rows = shape[0]
        meta: dict = {"file": file, "rows": rows, "cols": int(np.prod(shape[1:]))}
        segments = dict.fromkeys(("scales", "levels", "ans", "escapes"), b"")
    elif method == "alias":
        meta, segments = {"file": file, "target": alias_of}, {}
    else:
        meta, segments = {"file": file}, {"data": b""}
    return TensorRecord(name, tuple(shape), dtype, method, meta, segments)


def default_method(dtype: str, shape: tuple[int, ...]) -> str:
    """Learned coding for float matrices with at least one full chunk; everything else stays lossless."""
    coded = dtype in FLOAT_DTYPES and len(shape) >= 2 and shape[0] >= 16 and np.prod(shape) >= 4096
    return "nwc" if coded else "raw"


def rate_curve(tc: NWCTensorCodec, chunks: torch.Tensor, rows: int, cols: int, seed: int) -> np.ndarray:
    """bits/weight of this tensor at every level, from a seeded sample of its chunks."""
    flat = chunks.reshape(-1, chunks.shape[-1])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(flat.shape[0], generator=g)[:CURVE_SAMPLE_CHUNKS]
    sample = flat[idx]
    L = tc.n_levels
    reps = sample.unsqueeze(0).expand(L, -1, -1).reshape(L * len(idx), 1, -1)
    levels = np.repeat(np.arange(L, dtype=np.uint8), len(idx))
    bits = tc.column_bits(reps, levels).reshape(L, len(idx)).mean(axis=1)
    return monotone(bits * flat.shape[0] / (rows * cols))


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(to_bytes(t)).hexdigest() + str(t.dtype) + str(tuple(t.shape))


def plan_tensors(source: ModelSource, shard: Path, tc: NWCTensorCodec, include: Callable[[str], bool] | None,
                 seed: int, first_index: int, on_tensor: Callable[[str], None] | None = None) -> list[TensorPlan]:
    """Plans of one shard's tensors, before aliases across shards are known (`resolve_aliases`). `first_index` is
    the shard's first tensor's position in the model, so a curve's sampling seed does not depend on who plans it.
    A tensor identical to an earlier one of this shard gets no curve (it becomes an alias)."""
    plans: list[TensorPlan] = []
    seen: set[str] = set()
    ts = [x for x in source.tensors if x.file == shard.name]
    for i, (name, t) in enumerate(source.load(shard, [x.name for x in ts])):
        digest = tensor_digest(t)
        method = default_method(ts[i].dtype, ts[i].shape)
        if include is not None and not include(name):
            method = "raw"
        if digest in seen:
            p = TensorPlan(name, shard.name, "alias", t.numel(), 0)
        elif method == "nwc":
            prep = tc.prepare(t)
            curve = rate_curve(tc, prep.chunks, prep.rows, prep.cols, seed + first_index + i)
            p = TensorPlan(name, shard.name, "nwc", t.numel(), 2 * prep.rows + prep.cols + ANS_OVERHEAD_BYTES, curve)
        else:
            p = TensorPlan(name, shard.name, "raw", t.numel(), t.numel() * t.element_size())
        p.shape, p.dtype, p.digest = tuple(ts[i].shape), ts[i].dtype, digest
        seen.add(digest)
        plans.append(p)
        if on_tensor is not None:
            on_tensor(name)
    return plans


def resolve_aliases(plans: list[TensorPlan], bits: float) -> list[TensorPlan]:
    """Tied weights stored twice, within or across shards: the first in model order is coded, every later tensor
    with the same content becomes an `alias` of it. Then each tensor's table row is sized for a file at `bits`."""
    first: dict[str, str] = {}
    file_size = int(bits * sum(p.numel for p in plans) / 8)
    for p in plans:
        if p.digest in first:
            p.method, p.alias_of, p.curve, p.fixed_bytes = "alias", first[p.digest], None, 0
        first.setdefault(p.digest, p.name)
        p.table_bytes = table_row_bytes(
            record_stub(p.name, p.shape, p.dtype, p.method, p.file, p.alias_of),
            file_size, int(p.fixed_bytes + (p.numel * bits / 8 if p.method == "nwc" else 0)),
        )
    return plans


def plan_model(source: ModelSource, tc: NWCTensorCodec, include: Callable[[str], bool] | None,
               seed: int, progress: bool, bits: float, on_progress: ProgressFn | None = None) -> list[TensorPlan]:
    bar = Meter("plan", len(source.tensors), "tensor", progress, on_progress)
    plans: list[TensorPlan] = []
    for shard, _ in source.by_shard():
        plans += plan_tensors(source, shard, tc, include, seed, len(plans), lambda name: bar.update(detail=name))
    bar.close()
    return resolve_aliases(plans, bits)


def rate_items(plans: list[TensorPlan]) -> list[RateItem]:
    return [RateItem(p.name, p.method == "nwc", p.numel, p.fixed_bytes, p.table_bytes, p.curve) for p in plans]


def copy_aux_files(source: ModelSource, out: Path) -> None:
    for f in source.aux_files:
        shutil.copy2(f, out / f.name)


def nwc_segments(scales: torch.Tensor, levels: np.ndarray, ans: bytes, escapes: bytes) -> dict[str, bytes]:
    """Payload of an `nwc` record (docs/FORMAT.md)."""
    return {"scales": scales.numpy().astype("<f2").tobytes(), "levels": levels.astype(np.uint8).tobytes(),
            "ans": ans, "escapes": escapes}


def encode_model_free(tc: NWCTensorCodec, t: torch.Tensor, level: float) -> tuple[torch.Tensor, dict[str, bytes],
                                                                                 np.ndarray]:
    """One tensor through the codec without calibration at a (fractional) level: Ŵ as a matrix, the `nwc` record's
    segments and the per-column levels."""
    prep = tc.prepare(t)
    enc = tc.encode(prep, column_levels(level, prep.cols, n_levels=tc.n_levels))
    return enc.decoded, nwc_segments(prep.scales, enc.levels, enc.ans, enc.escapes), enc.levels


def bundle_header(source: ModelSource, codec: LoadedCodec, bits: float) -> ContainerHeader:
    return ContainerHeader(
        codec.info.id, codec.info.sha256, f"nwc {__version__}",
        {"source": source.root.name, "target_bits": f"{bits:g}", "shards": json.dumps(source.shard_metadata)},
    )


def encode_tensors(source: ModelSource, shard: Path, tc: NWCTensorCodec, plans: dict[str, TensorPlan],
                   rc: RateController, writer: ContainerWriter, bar: Meter, base: int = 0) -> list[TensorReport]:
    """Code one shard's tensors into `writer`, in source order. Closed loop: before each tensor `rc` re-solves the
    level against what is already written (`writer.bytes_written - base`, and the table so far)."""
    reports: list[TensorReport] = []
    for name, t in source.load(shard, [x.name for x in source.tensors if x.file == shard.name]):
        p = plans[name]
        level = rc.advance(name, writer.bytes_written - base, writer.table_bytes)
        stub = record_stub(name, tuple(t.shape), dtype_name(t.dtype), p.method, shard.name, p.alias_of)
        err = None
        if p.method == "nwc":
            decoded, stub.segments, levels = encode_model_free(tc, t, level)
            err = nmse(as_matrix(t), decoded)
            level = float(levels.mean())
        elif p.method == "raw":
            stub.segments = {"data": to_bytes(t)}
        entry = writer.add(stub)
        reports.append(TensorReport(
            name, list(t.shape), p.method, t.numel(), entry.nbytes, 8 * entry.nbytes / max(t.numel(), 1),
            err, level, t.shape[0] if t.ndim else 1,
        ))
        bar.update(t.numel(), name)
    return reports


def finish_bundle(source: ModelSource, out: Path, codec: LoadedCodec, bits: float, src: Path | str, t0: float,
                  device: str, reports: list[TensorReport]) -> CompressReport:
    """After `out/model.nwc` is written: the model's small files, the quantization config and report.json."""
    copy_aux_files(source, out)
    from codec.hf import write_quantization_config  # lazy: imports transformers

    write_quantization_config(out, codec.info.id)
    file_bytes = (out / BUNDLE_FILE).stat().st_size
    total_params = source.total_params
    report = CompressReport(
        str(src), codec.info.id, codec.info.sha256, bits, 8 * file_bytes / max(total_params, 1), file_bytes,
        total_params, sum(r.numel for r in reports if r.method == "nwc"), time.time() - t0, peak_rss_mb(), device,
        reports,
    )
    (out / REPORT_FILE).write_text(report.to_json())
    return report


def compress_model(src: Path, out: Path, bits: float, codec_id: str | None = None, device: str = "auto",
                   progress: bool = True, include: Callable[[str], bool] | None = None,
                   seed: int = 0, on_progress: ProgressFn | None = None) -> CompressReport:
    """Compress every tensor of `src` into the bundle directory `out` at `bits` bits/weight on average,
    counting every byte of the container file against every parameter. `on_progress` receives plan and
    compress events (an exception it raises aborts the run and leaves no bundle). codec.shards does the same
    split by shard across processes."""
    t0 = time.time()
    source = open_source(Path(src))
    dev = resolve_device(device)
    codec = load_codec(codec_id)
    tc = NWCTensorCodec(codec, dev)
    plans = plan_model(source, tc, include, seed, progress, bits, on_progress)
    total_params = source.total_params
    rc = RateController(rate_items(plans), bits, total_params, tc.n_levels, HEADER_ESTIMATE, FOOTER_SIZE)
    rc.check(codec.info.id)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports: list[TensorReport] = []
    by_name = {p.name: p for p in plans}
    bar = Meter("compress", total_params, "w", progress, on_progress, desc=f"compress {bits:g} bpw")
    with ContainerWriter(out / BUNDLE_FILE, bundle_header(source, codec, bits)) as writer:
        for shard, _ in source.by_shard():
            reports += encode_tensors(source, shard, tc, by_name, rc, writer, bar)
        bar.close()
    return finish_bundle(source, out, codec, bits, src, t0, dev, reports)


def bundle_file(bundle: Path) -> Path:
    bundle = Path(bundle)
    return bundle / BUNDLE_FILE if bundle.is_dir() else bundle


class BundleDecoder:
    """Decodes records of one container; loads the codec only if an nwc record needs it."""

    def __init__(self, reader: ContainerReader, device: str = "auto") -> None:
        self.reader = reader
        self.device = resolve_device(device)
        self._tc: NWCTensorCodec | None = None

    def codec(self) -> NWCTensorCodec:
        if self._tc is None:
            h = self.reader.header
            loaded: LoadedCodec = load_codec(h.codec_id)
            if loaded.info.sha256 != h.codec_sha256:
                raise CodecIntegrityError(
                    f"bundle was written with codec {h.codec_id} sha256 {h.codec_sha256[:16]}…, "
                    f"but the registered one is {loaded.info.sha256[:16]}…"
                )
            self._tc = NWCTensorCodec(loaded, self.device)
        return self._tc

    def decode(self, rec: TensorRecord) -> torch.Tensor:
        if rec.method == "raw":
            return from_bytes(rec.segments["data"], rec.dtype, rec.shape)
        if rec.method == "alias":
            return self.decode(self.reader.read(str(rec.meta["target"])))
        if rec.method == "nwc":
            s = rec.segments
            w = self.codec().decode(rec.name, rec.shape, int(rec.meta["rows"]), int(rec.meta["cols"]),
                                    s["scales"], s["levels"], s["ans"], s["escapes"])
            return w.to(DTYPES[rec.dtype])
        if rec.method in ("rtn", "gptq", "nowag-vq", "pruned"):
            try:
                if rec.method == "nowag-vq":
                    w = vq_decode(rec.meta, rec.segments)
                elif rec.method == "pruned":
                    w = prune_decode(rec.meta, rec.segments, rec.dtype)
                else:
                    w = from_segments(rec.meta, rec.segments).dequantize()
                return w.reshape(rec.shape).to(DTYPES[rec.dtype])
            except (KeyError, ValueError, RuntimeError) as e:
                raise TensorDecodeError(rec.name, str(e)) from e
        raise ValueError(f"tensor {rec.name!r}: unknown method {rec.method!r}")


# Token embedding and output head of causal LMs: coded model-free by default, kept lossless on request.
EMBEDDING_NAMES = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def keep_embeddings(name: str) -> bool:
    """`include` predicate for compress_model/plan_model: everything but the embeddings is coded."""
    return name not in EMBEDDING_NAMES


def model_card(header: ContainerHeader) -> str:
    """README.md of a dense output: Hub-style front matter naming the base model, and how it was made."""
    a = header.attrs
    source = a.get("source", "unknown")
    how = f"method `{a.get('method', 'nwc')}`, target {a.get('target_bits', '?')} bits/weight"
    if header.codec_id:
        how += f", codec `{header.codec_id}`"
    if a.get("calibration_sha256"):
        how += f", calibration text sha256 `{a['calibration_sha256'][:16]}…`"
    return (f"---\nbase_model: {source}\ntags:\n- nwc\n- compressed\n---\n\n# {source}, NWC-compressed\n\n"
            f"Dense weights decoded from an NWC bundle ({how}). Loads with "
            f"`AutoModelForCausalLM.from_pretrained` like the original; the weights carry the compression error.\n")


def decompress_model(bundle: Path, out: Path, device: str = "auto", progress: bool = True,
                     shard_name: str | None = None, on_progress: ProgressFn | None = None) -> Path:
    """Write a dense model directory (safetensors shards + index + the bundle's small files) that
    transformers loads. Built in a temporary directory and moved into place only when complete."""
    bundle = Path(bundle)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    src_dir = bundle if bundle.is_dir() else bundle.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nwc-dense-", dir=out.parent))  # same filesystem: rename is atomic
    try:
        with ContainerReader(bundle_file(bundle)) as reader:
            dec = BundleDecoder(reader, device)
            header = reader.header
            shard_meta = json.loads(reader.header.attrs.get("shards", "{}"))
            weight_map: dict[str, str] = {}
            total = 0
            current: str | None = None
            tensors: dict[str, torch.Tensor] = {}

            def flush() -> None:
                if current is not None and tensors:
                    save_file(tensors, str(tmp / current), metadata=shard_meta.get(current) or {"format": "pt"})
                tensors.clear()

            n_params = sum(e.numel for e in reader.entries)
            bar = Meter("decompress", n_params, "w", progress, on_progress)
            flushed: set[str] = set()
            for rec in reader:
                file = shard_name or str(rec.meta.get("file", "model.safetensors"))
                if file != current and file in flushed:  # records of one shard were not contiguous
                    file = f"{Path(file).stem}-{len(flushed)}.safetensors"
                if file != current:
                    flush()
                    if current is not None:
                        flushed.add(current)
                    current = file
                t = dec.decode(rec)
                tensors[rec.name] = t.contiguous()
                weight_map[rec.name] = file
                total += t.numel() * t.element_size()
                bar.update(t.numel(), rec.name)
            flush()
            bar.close()
        write_index(tmp, weight_map, total)
        if bundle.is_dir():
            for f in src_dir.iterdir():
                if f.is_file() and f.name not in {BUNDLE_FILE, REPORT_FILE} and not f.name.endswith(".partial"):
                    shutil.copy2(f, tmp / f.name)
            from codec.hf import strip_quantization_config  # lazy: imports transformers

            strip_quantization_config(tmp)  # dense weights: no longer an nwc bundle
            (tmp / "README.md").write_text(model_card(header))
        tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary model directory
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
