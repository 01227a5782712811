"""Calibration-guided compression of Hugging Face causal LMs, one decoder block at a time (NOTES §1).

source → calibration tokens → embeddings → for each block: load it alone from the shards, accumulate each
linear layer's Hessian E[x xᵀ] on the block's (already compressed-upstream) inputs, code the layers in the
order v, q, k, o, up, gate, down (each group sees the inputs produced by the layers coded before it), then
run the compressed block to produce the next block's inputs → container. The whole model never sits in
memory: one block plus the calibration activations.

Methods share everything but the layer coder:
- `nwc`: the learned codec with LDLQ error feedback (block LDL of H, last block of columns first) and
  continuous per-column rate allocation by diag(H) (reverse water-filling, NOTES §3); whole-file rate
  control exactly as model-free compression (embeddings and lm_head are coded model-free).
- `gptq`: GPTQ (Frantar et al. 2022) at integer bits, group 128; embeddings RTN at the same bits.
- `rtn`: round-to-nearest, group 128, everything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec.calibration import CalibrationSet, load_calibration
from codec.chunking import from_chunks, row_scales, to_chunks
from codec.container import FOOTER_SIZE, ContainerHeader, ContainerWriter, TensorRecord
from codec.entropy import encode_symbols
from codec.gptq import QuantizedLinear, gptq_quantize, rtn_quantize, to_segments
from codec.hessian import HessianAccumulator, block_ldl, proxy_error, regularize
from codec.pipeline import (
    BUNDLE_FILE,
    HEADER_ESTIMATE,
    REPORT_FILE,
    CompressReport,
    TensorReport,
    copy_aux_files,
    nmse,
    nwc_segments,
    peak_rss_mb,
    plan_model,
    rate_items,
    resolve_device,
)
from codec.ratecontrol import RateController, column_levels
from codec.registry import load_codec
from codec.source import ModelSource, open_source
from codec.tensor_codec import NWCTensorCodec
from codec.tensors import to_bytes

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
# Coding order inside a block (NOTES §1); modules of one group share their input, hence one Hessian.
GROUPS = (("self_attn.v_proj", "self_attn.q_proj", "self_attn.k_proj"), ("self_attn.o_proj",),
          ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))
LDL_BLOCK = 128
GROUP_SIZE = 128
MAX_LEVEL_OFFSET = 8  # per-column rate allocation: at most ±2 bits/weight around the tensor's level


class CalibratedError(ValueError):
    """The model cannot be compressed with calibration (unsupported architecture, bad options)."""


@dataclass(frozen=True)
class CalibOptions:
    source: str = "wiki"  # "wiki" (built-in) or a .txt / .jsonl file
    n_seq: int = 32
    seq_len: int = 512
    seed: int = 0
    batch: int = 4
    act_order: bool = False  # GPTQ only
    damp: float = 0.01


@dataclass
class LayerReport:
    name: str
    proxy_error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs
    nmse: float
    bits_per_weight: float
    seconds: float


class _Stop(Exception):
    """Raised by a hook once the activation it needs has been captured."""


def _check_model(src: Path, method: str, bits: float) -> object:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    archs = set(getattr(config, "architectures", None) or [])
    if not archs & SUPPORTED_ARCHITECTURES:
        raise CalibratedError(
            f"calibrated compression supports {sorted(SUPPORTED_ARCHITECTURES)}, this model is {sorted(archs) or '?'}"
            "; use model-free compression (no --calib) for it"
        )
    if method in ("gptq", "rtn") and not (2 <= bits < 9):
        raise CalibratedError(f"--method {method} needs 2 ≤ --bits < 9 (integer bits + group side info)")
    return config


def _load(source: ModelSource, names: list[str]) -> dict[str, torch.Tensor]:
    """Just these tensors, from whichever shards hold them."""
    where = {t.name: t.file for t in source.tensors}
    shards = {s.name: s for s in source.shards}
    out: dict[str, torch.Tensor] = {}
    for file in sorted({where[n] for n in names}):
        out.update(source.load(shards[file], [n for n in names if where[n] == file]))
    return out


def _materialize(module: torch.nn.Module, prefix: str, source: ModelSource, device: str) -> None:
    """Allocate a meta-device module and fill it from the shards (only its own tensors are read)."""
    module.to_empty(device=device)
    names = [n for n, _ in module.state_dict().items()]
    tensors = _load(source, [prefix + n for n in names])
    module.load_state_dict({n: tensors[prefix + n].float() for n in names})


def encode_order(source: ModelSource, n_layers: int) -> list[str]:
    """Embedding, then each block (its linears in GROUPS order, then its other tensors), then the rest."""
    names = [t.name for t in source.tensors]
    order = [n for n in names if n == "model.embed_tokens.weight"]
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        linears = [f"{prefix}{m}.weight" for g in GROUPS for m in g]
        order += [n for n in linears if n in names]
        order += [n for n in names if n.startswith(prefix) and n not in linears]
    seen = set(order)
    return order + [n for n in names if n not in seen]


class LayerCoder:
    """Codes one linear layer given its Hessian; returns Ŵ and the container record."""

    def __init__(self, method: str, bits: float, tc: NWCTensorCodec | None, opts: CalibOptions) -> None:
        self.method, self.bits, self.tc, self.opts = method, bits, tc, opts

    def fixed_length(self, w: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, QuantizedLinear]:
        b = int(self.bits)
        if self.method == "gptq" and h is not None:
            q = gptq_quantize(w, h, b, GROUP_SIZE, act_order=self.opts.act_order, damp=self.opts.damp)
        else:
            q = rtn_quantize(w, b, GROUP_SIZE)
        return q.dequantize(), q

    def nwc(self, w: torch.Tensor, h: torch.Tensor, level: float,
            feedback: bool = True) -> tuple[torch.Tensor, dict, np.ndarray]:
        """LDLQ through the codec with per-column levels from diag(H) (feedback=False: plain coding)."""
        tc = self.tc
        assert tc is not None
        m, n = w.shape
        hr = regularize(h, self.opts.damp)
        levels = column_levels(level, n, importance=torch.diagonal(hr).numpy(), n_levels=tc.n_levels)
        levels = np.clip(levels.astype(np.int64) + water_filling_offsets(torch.diagonal(hr)), 0,
                         tc.n_levels - 1).astype(np.uint8)
        scales = row_scales(w)
        sc = scales.float()[:, None]
        lower = block_ldl(hr.double(), LDL_BLOCK)[0].float() if feedback else torch.zeros(n, n)
        symbols = np.empty((n, math.ceil(m / 16), 16), np.int32)
        w_hat = torch.zeros_like(w)
        for s in reversed(range(0, n, LDL_BLOCK)):
            e = min(s + LDL_BLOCK, n)
            target = w[:, s:e] + (w[:, e:] - w_hat[:, e:]) @ lower[e:, s:e]
            sym = tc.symbols(to_chunks(target / sc), levels[s:e])
            symbols[s:e] = sym
            w_hat[:, s:e] = from_chunks(tc.reconstruct(sym, levels[s:e]), m) * sc
        ans, esc = encode_symbols(symbols, levels, tc.tables)
        return w_hat, nwc_segments(scales, levels, ans, esc), levels


def water_filling_offsets(diag: torch.Tensor) -> np.ndarray:
    """Per-column level offsets for Hessian-weighted MSE: R_j = R̄ + ½·log2(H_jj / geomean H), and one level is
    ¼ bit, so offset_j = 2·log2(H_jj / geomean); centred so the mean rate is unchanged, clipped to ±8 levels."""
    d = diag.double().clamp_min(1e-12)
    off = 2 * torch.log2(d / torch.exp(torch.log(d).mean()))
    off = torch.round(off - off.mean()).clamp(-MAX_LEVEL_OFFSET, MAX_LEVEL_OFFSET)
    return off.to(torch.int64).numpy()


@torch.no_grad()
def _group_hessian(layer, module, hidden: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    """E[x xᵀ] of `module`'s input when `layer` runs on `hidden` (stopping right after `module`)."""
    acc = HessianAccumulator(module.in_features)

    def hook(_m, args):
        acc.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for s in range(0, hidden.shape[0], batch):
            try:
                layer(hidden[s : s + batch], **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc.hessian()


@torch.no_grad()
def _run_layer(layer, hidden: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], batch):
        r = layer(hidden[s : s + batch], **kwargs)
        out[s : s + batch] = r[0] if isinstance(r, tuple) else r
    return out


def compress_calibrated(src: Path, out: Path, bits: float, method: str = "nwc", calib: CalibOptions | None = None,
                        codec_id: str | None = None, device: str = "auto", progress: bool = True,
                        seed: int = 0) -> CompressReport:
    """Compress a causal LM with calibration data into the bundle directory `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    calib = calib or CalibOptions()
    if method not in ("nwc", "gptq", "rtn"):
        raise CalibratedError(f"unknown method {method!r} (nwc, gptq, rtn)")
    src = Path(src)
    config = _check_model(src, method, bits)
    dev = resolve_device(device)
    source = open_source(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    cs: CalibrationSet = load_calibration(calib.source, tokenizer, calib.n_seq, calib.seq_len, calib.seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_layers = config.num_hidden_layers

    tc = NWCTensorCodec(load_codec(codec_id), dev) if method == "nwc" else None
    coder = LayerCoder(method, bits, tc, calib)
    order = encode_order(source, n_layers)
    controller = None
    if tc is not None:
        plans = {p.name: p for p in plan_model(source, tc, None, seed, progress, bits)}
        controller = RateController(rate_items([plans[n] for n in order]), bits, source.total_params,
                                    tc.n_levels, HEADER_ESTIMATE, FOOTER_SIZE)
        controller.check(tc.codec.info.id)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = tc.codec.info if tc else None
    header = ContainerHeader(
        info.id if info else "", info.sha256 if info else "", "nwc calibrated",
        {"source": source.root.name, "target_bits": f"{bits:g}", "method": method,
         "calibration_sha256": cs.sha256, "shards": json.dumps(source.shard_metadata)},
    )
    by_name = {t.name: t for t in source.tensors}
    reports: list[TensorReport] = []
    layer_reports: list[LayerReport] = []
    written: set[str] = set()
    bar = tqdm(total=source.total_params, disable=not progress, desc=f"{method} {bits:g} bpw", unit="w",
               unit_scale=True)

    with ContainerWriter(out / BUNDLE_FILE, header) as writer:

        def write(name: str, w_orig: torch.Tensor, record_fn, h: torch.Tensor | None = None) -> torch.Tensor:
            """Code one tensor (record_fn(level) -> (Ŵ or None, method, meta, segments)) and write it."""
            t1 = time.time()
            level = controller.advance(name, writer.bytes_written, writer.table_bytes) if controller else None
            w_hat, rec_method, meta, segs = record_fn(level)
            st = by_name[name]
            meta = {"file": st.file, **meta}
            entry = writer.add(TensorRecord(name, st.shape, st.dtype, rec_method, meta, segs))
            err = None if w_hat is None else nmse(w_orig.reshape(w_orig.shape[0], -1), w_hat)
            reports.append(TensorReport(name, list(st.shape), rec_method, st.numel, entry.nbytes,
                                        8 * entry.nbytes / max(st.numel, 1), err,
                                        None if level is None else float(level), st.shape[0] if st.shape else 1))
            if h is not None and w_hat is not None:
                layer_reports.append(LayerReport(name, proxy_error(w_orig, w_hat, h), err,
                                                 8 * entry.nbytes / st.numel, time.time() - t1))
            written.add(name)
            bar.update(st.numel)
            return w_hat

        def model_free(name: str, w: torch.Tensor):
            """Embedding / lm_head: no Hessian. NWC codes it model-free, GPTQ/RTN round it."""
            def fn(level):
                if method == "nwc":
                    prep = tc.prepare(w)
                    enc = tc.encode(prep, column_levels(level, prep.cols, n_levels=tc.n_levels))
                    segs = nwc_segments(prep.scales, enc.levels, enc.ans, enc.escapes)
                    return enc.decoded, "nwc", {"rows": prep.rows, "cols": prep.cols}, segs
                w_hat, q = coder.fixed_length(w.float(), None)
                meta, segs = to_segments(q)
                return w_hat, "rtn", meta, segs
            return write(name, w, fn)

        def raw(name: str, t: torch.Tensor):
            return write(name, t, lambda _lv: (None, "raw", {}, {"data": to_bytes(t)}))

        # Embeddings and calibration activations.
        emb_name = "model.embed_tokens.weight"
        emb = _load(source, [emb_name])[emb_name]
        model_free(emb_name, emb)
        hidden = torch.nn.functional.embedding(cs.input_ids, emb.float()).to(dev)
        del emb
        rotary = type(model.model.rotary_emb)(config=config).to(dev)
        pos = torch.arange(cs.seq_len, device=dev)[None]
        kwargs = {"position_embeddings": rotary(hidden[:1], pos), "position_ids": pos, "attention_mask": None}

        for i in range(n_layers):
            prefix = f"model.layers.{i}."
            layer = model.model.layers[i]
            _materialize(layer, prefix, source, dev)
            for group in GROUPS:
                modules = [layer.get_submodule(m) for m in group]
                h = _group_hessian(layer, modules[0], hidden, kwargs, calib.batch).cpu()
                for mname, mod in zip(group, modules, strict=True):
                    name = f"{prefix}{mname}.weight"
                    w = mod.weight.detach().cpu().clone()

                    def fn(level, w=w, h=h):
                        if method == "nwc":
                            w_hat, segs, _ = coder.nwc(w, h, level)
                            return w_hat, "nwc", {"rows": w.shape[0], "cols": w.shape[1]}, segs
                        w_hat, q = coder.fixed_length(w, h)
                        meta, segs = to_segments(q)
                        return w_hat, method, meta, segs

                    w_hat = write(name, w, fn, h)
                    mod.weight.data.copy_(w_hat.to(mod.weight.dtype))
            for name in [n for n in order if n.startswith(prefix) and n not in written]:
                raw(name, _load(source, [name])[name])
            hidden = _run_layer(layer, hidden, kwargs, calib.batch)
            layer.to("meta")  # free the block

        for name in [n for n in order if n not in written]:
            t = _load(source, [name])[name]
            if method != "nwc" and t.ndim == 2 and t.dtype.is_floating_point and t.numel() >= 4096:
                model_free(name, t)
            elif method == "nwc" and controller.items[name].coded:
                model_free(name, t)
            else:
                raw(name, t)
        bar.close()

    copy_aux_files(source, out)
    file_bytes = (out / BUNDLE_FILE).stat().st_size
    report = CompressReport(
        str(src), info.id if info else "", info.sha256 if info else "", bits, 8 * file_bytes / source.total_params,
        file_bytes, source.total_params, sum(r.numel for r in reports if r.method != "raw"), time.time() - t0,
        peak_rss_mb(), dev, reports, method=method,
        calibration={"source": cs.source, "sha256": cs.sha256, "n_seq": cs.n_seq, "seq_len": cs.seq_len,
                     "seed": cs.seed, "damp": calib.damp, "act_order": calib.act_order},
        layers=[asdict(lr) for lr in layer_reports],
    )
    (out / REPORT_FILE).write_text(report.to_json())
    return report
