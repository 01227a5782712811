"""Calibration-guided compression of Hugging Face causal LMs, one decoder block at a time (NOTES §1).

source → calibration tokens → embeddings → for each block: load it alone from the shards, accumulate each
linear layer's Hessian E[x xᵀ] on the block's (already compressed-upstream) inputs, code the layers in the
order v, q, k, o, up, gate, down (each group sees the inputs produced by the layers coded before it), then
run the compressed block to produce the next block's inputs → container. The whole model never sits in
memory: one block plus the calibration activations.

Block fine-tuning (NOTES §1 step 4, `CalibOptions.finetune_epochs > 0`, every method): a second activation stream
runs the calibration inputs through the *original* blocks, giving each block's target outputs. After each group
is coded, the block is trained (Adam, MSE) on the compressed-path inputs towards those targets; trainable are
the weights not yet coded and every tensor the container stores losslessly (RMSNorm weights, biases), while
coded weights stay frozen at the values the decoder reproduces. Early stopping on the last calibration
sequences (held out) keeps the best state; the layers still to be coded are then coded from their fine-tuned
values, and the norms are written from the fine-tuned block.

Methods share everything but the layer coder:
- `nwc`: the learned codec with LDLQ error feedback (block LDL of H, last block of columns first) and
  continuous per-column rate allocation by diag(H) (reverse water-filling, NOTES §3); whole-file rate
  control exactly as model-free compression (embeddings and lm_head are coded model-free).
- `gptq`: GPTQ (Frantar et al. 2022) at integer bits, group 128; embeddings RTN at the same bits.
- `rtn`: round-to-nearest, group 128, everything.
- `nowag-vq`: NoWag vector quantization of the linears with this pipeline's diag(H) (codec.nowag); the
  embedding and an untied lm_head are coded the same way data-free (diag(H) = 1).
- `nowag-p` / `wanda`: NoWag-P or Wanda pruning of the linears (`CalibOptions.sparsity` or `.pattern`); the
  embedding, lm_head and norms stay as they are (the papers prune the decoder linears only). No rate target.

Unlike the NoWag paper, which takes each layer's statistics from the original model, every method here sees the
inputs of the already-compressed blocks upstream (sequential, as GPTQ and Wanda's code do): one data path.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

from codec.allocation import (
    MODES,
    PROPAGATION_SEQS,
    block_sensitivities,
    equal_slope_offsets,
    level_offsets,
    mean_kl,
    perturbed_output,
    relative_mse,
)
from codec.blocks import forward, run_block
from codec.calibration import CalibrationSet, load_calibration
from codec.chunking import from_chunks, row_scales, to_chunks
from codec.container import (
    FOOTER_SIZE,
    ContainerHeader,
    ContainerReader,
    ContainerWriter,
    TensorRecord,
    table_row_bytes,
)
from codec.entropy import encode_symbols
from codec.gptq import QuantizedLinear, gptq_quantize, rtn_quantize, to_segments
from codec.hessian import block_ldl, collect_hessians, ldlq, proxy_error, regularize
from codec.nowag import PRUNE_METHODS, NoWagError, PruneSpec, prune, prune_segments, vq_dim, vq_quantize, vq_segments
from codec.pipeline import (
    BUNDLE_FILE,
    HEADER_ESTIMATE,
    REPORT_FILE,
    BundleDecoder,
    CompressReport,
    TensorReport,
    copy_aux_files,
    encode_model_free,
    keep_embeddings,
    nmse,
    nwc_segments,
    peak_rss_mb,
    plan_model,
    rate_items,
    resolve_device,
)
from codec.progress import Meter, ProgressFn
from codec.ratecontrol import RateController, column_levels
from codec.registry import load_codec
from codec.source import ModelSource, open_source
from codec.tensor_codec import NWCTensorCodec
from codec.tensors import parse_dtype, to_bytes

METHODS = ("nwc", "gptq", "rtn", "nowag-vq", *PRUNE_METHODS)
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM"}
# Coding order inside a block (NOTES §1); modules of one group share their input, hence one Hessian.
GROUPS = (("self_attn.v_proj", "self_attn.q_proj", "self_attn.k_proj"), ("self_attn.o_proj",),
          ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))
LDL_BLOCK = 128
GROUP_SIZE = 128


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
    # Block fine-tuning after each coded group (0: off): Adam on the MSE to the original block's outputs, batches
    # of `finetune_batch` sequences, early stopping on the last `finetune_val_fraction` of the sequences. lr and
    # batch measured on SmolLM2 at 3 bits with 16 × 256 calibration tokens (docstring of `finetune_block`).
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    finetune_val_fraction: float = 0.25
    finetune_batch: int = 1
    # nwc: rate across layers by measured sensitivity ("kl" | "relative" | "absolute", "none": one shared level),
    # offsets scaled by `allocation_strength` (codec.allocation; measured in docs/CALIBRATION.md)
    allocation: str = "none"
    code_embeddings: bool = True  # False: embeddings and lm_head stored losslessly (paid for by the linears)
    allocation_strength: float = 1.0
    # nowag-p / wanda: unstructured sparsity (fraction removed) or an N:M pattern such as "2:4"
    sparsity: float | None = None
    pattern: str | None = None
    vq_iters: int = 25  # nowag-vq: Lloyd iterations at most (codec.nowag.vq_quantize)

    @property
    def prune_spec(self) -> PruneSpec:
        return PruneSpec.parse(self.sparsity, self.pattern)

    def __post_init__(self) -> None:
        if self.sparsity is not None or self.pattern is not None:
            try:
                self.prune_spec  # noqa: B018  (validates)
            except NoWagError as e:
                raise CalibratedError(str(e)) from None
        if self.vq_iters < 1:
            raise CalibratedError(f"vq_iters must be ≥ 1, got {self.vq_iters}")
        if self.allocation not in ("none", *MODES):
            raise CalibratedError(f"allocation must be one of none, {', '.join(MODES)}; got {self.allocation!r}")
        if not self.allocation_strength >= 0:
            raise CalibratedError(f"allocation_strength must be ≥ 0, got {self.allocation_strength}")
        if self.finetune_epochs < 0:
            raise CalibratedError(f"finetune_epochs must be ≥ 0, got {self.finetune_epochs}")
        if self.finetune_epochs > 0:
            if not 0 < self.finetune_val_fraction < 1:
                raise CalibratedError(f"finetune_val_fraction must be in (0, 1), got {self.finetune_val_fraction}")
            if not self.finetune_lr > 0:
                raise CalibratedError(f"finetune_lr must be > 0, got {self.finetune_lr}")
            if self.finetune_batch < 1:
                raise CalibratedError(f"finetune_batch must be ≥ 1, got {self.finetune_batch}")
            if self.n_seq < 2:
                raise CalibratedError("block fine-tuning needs ≥ 2 calibration sequences (train + held out)")


@dataclass
class LayerReport:
    name: str
    proxy_error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs
    nmse: float
    bits_per_weight: float
    seconds: float
    # On the last layer of each group when block fine-tuning is on: the block's held-out MSE to the original
    # block's outputs right after this group was coded (val_before) and after fine-tuning (val_after, the best
    # epoch; equal to val_before when no epoch improved), epochs run, seconds.
    finetune: dict | None = None
    # nwc with cross-layer allocation: measured sensitivity and the level offset it gave (codec.allocation)
    sensitivity: float | None = None
    level_offset: int | None = None


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
    if method == "nowag-vq":
        try:
            vq_dim(bits)
        except NoWagError as e:
            raise CalibratedError(str(e)) from None
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

    def nowag(self, name: str, w: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, str, dict, dict]:
        """nowag-vq, nowag-p or wanda on one matrix with diag(H) (None: data-free) → (Ŵ, record method, meta,
        segments). Pruning keeps w's dtype: pass the source-dtype tensor."""
        hdiag = None if h is None else torch.diagonal(h).cpu()
        if self.method == "nowag-vq":
            seed = (self.opts.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)
            r = vq_quantize(w.float(), hdiag, self.bits, max_iter=self.opts.vq_iters, seed=seed)
            return (r.w_hat, "nowag-vq", *vq_segments(r))
        p = prune(w, hdiag, self.opts.prune_spec, self.method)
        return (p.w_hat.float(), "pruned", *prune_segments(p))

    def nwc(self, w: torch.Tensor, h: torch.Tensor, level: float,
            feedback: bool = True) -> tuple[torch.Tensor, dict, np.ndarray]:
        """LDLQ through the codec with per-column levels from diag(H) (feedback=False: plain coding)."""
        tc = self.tc
        assert tc is not None
        m, n = w.shape
        hr = regularize(h, self.opts.damp)
        levels = column_levels(level, n, importance=torch.diagonal(hr).numpy(), n_levels=tc.n_levels)
        # reverse water-filling over columns for the Hessian-weighted MSE (NOTES §3)
        levels = np.clip(levels.astype(np.int64) + equal_slope_offsets(torch.diagonal(hr).numpy()), 0,
                         tc.n_levels - 1).astype(np.uint8)
        scales = row_scales(w)
        sc = scales.float()[:, None]
        lower = block_ldl(hr.double(), LDL_BLOCK)[0].float() if feedback else torch.zeros(n, n)
        symbols = np.empty((n, math.ceil(m / 16), 16), np.int32)

        def code(target: torch.Tensor, s: int, e: int) -> torch.Tensor:
            symbols[s:e] = tc.symbols(to_chunks(target / sc), levels[s:e])
            return from_chunks(tc.reconstruct(symbols[s:e], levels[s:e]), m) * sc

        w_hat, _ = ldlq(w, lower, code, LDL_BLOCK)
        ans, esc = encode_symbols(symbols, levels, tc.tables)
        return w_hat, nwc_segments(scales, levels, ans, esc), levels


def causal_mask(n: int, window: int | None, device: str) -> torch.Tensor:
    """Additive (1, 1, n, n) mask: query i sees keys j ≤ i, and only i − j < window with a sliding window."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    mask = torch.zeros(n, n, device=device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def _mse(layer, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, batch: int) -> float:
    """Mean squared error of `layer(hidden)` to `target` over every element (float64 accumulation)."""
    total = 0.0
    for s in range(0, hidden.shape[0], batch):
        total += float(((forward(layer, hidden[s : s + batch], kwargs) - target[s : s + batch]) ** 2)
                       .sum(dtype=torch.float64))
    return total / max(target.numel(), 1)


def finetune_block(layer, params: list[torch.nn.Parameter], hidden: torch.Tensor, target: torch.Tensor,
                   kwargs: dict, opts: CalibOptions, generator: torch.Generator) -> dict:
    """Train `params` of `layer` (Adam, MSE of layer(hidden) to target) for up to `opts.finetune_epochs` epochs on
    the first sequences, early stopping on the last `finetune_val_fraction` of them; leaves the best state (by
    held-out MSE, the untrained one included) in place. Other parameters are frozen. Shuffling uses `generator`,
    so the result is deterministic.

    Measured on SmolLM2-135M at 3 bits (16 × 256 wiki tokens: 12 train + 4 held-out sequences, ppl on 4096 held-out
    tokens): lr 1e-3 with batches of 1 sequence (12 Adam steps per epoch) beats batches of 4 (3 steps: the paper's
    3e-6 for 64 steps/epoch moves nothing here; 3e-3 at batch 4 stops after one worse epoch); NWC ppl 20.47 → 19.62
    (1 epoch), 19.37 (2), 19.56 (5); GPTQ 99.5 → 51.4 (1), 47.8 (2), 48.0 (5). Mean held-out gain per stage at 2
    epochs: NWC 0.2 % (after v/q/k), 2.7 % (o), 3.0 % (up/gate), 0.1 % (down: norms only); GPTQ 11.7 %, 1.8 %,
    1.8 %, 0.5 %."""
    t0 = time.time()
    n = hidden.shape[0]
    n_val = min(max(1, round(n * opts.finetune_val_fraction)), n - 1)
    n_train = n - n_val
    batch = opts.finetune_batch
    h_tr, t_tr, h_va, t_va = hidden[:n_train], target[:n_train], hidden[n_train:], target[n_train:]
    before = best = _mse(layer, h_va, t_va, kwargs, opts.batch)
    best_state = [p.detach().clone() for p in params]
    epochs = 0
    if params:
        trainable = {id(p) for p in params}
        for p in layer.parameters():
            p.requires_grad_(id(p) in trainable)
        opt = torch.optim.Adam(params, lr=opts.finetune_lr)
        try:
            for _ in range(opts.finetune_epochs):
                perm = torch.randperm(n_train, generator=generator).to(hidden.device)
                with torch.enable_grad():
                    for s in range(0, n_train, batch):
                        idx = perm[s : s + batch]
                        loss = torch.nn.functional.mse_loss(forward(layer, h_tr[idx], kwargs), t_tr[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                epochs += 1
                val = _mse(layer, h_va, t_va, kwargs, opts.batch)
                if not val < best:
                    break
                best, best_state = val, [p.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, b in zip(params, best_state, strict=True):
                    p.copy_(b)
            for p in layer.parameters():
                p.requires_grad_(False)
                p.grad = None
    return {"val_before": before, "val_after": best, "epochs": epochs, "train_seqs": n_train, "val_seqs": n_val,
            "seconds": time.time() - t0}


class BlockCheckpoints:
    """Finished units of work (embedding, each block, the tail) kept under `out/.nwc-work/` as small containers
    plus their reports, so a re-run after a crash skips them. A different source, target, method, codec or
    calibration invalidates them (fingerprint)."""

    def __init__(self, out: Path, fingerprint: dict) -> None:
        self.dir = out / ".nwc-work"
        self.state_file = self.dir / "state.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if state.get("fingerprint") != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            state = {"fingerprint": fingerprint, "done": {}}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = state
        self._records: dict[str, TensorRecord] = {}
        for key in state["done"]:
            with ContainerReader(self.dir / f"{key}.nwc") as r:
                self._records.update({rec.name: rec for rec in r})

    def done(self, key: str) -> bool:
        return key in self.state["done"]

    def record(self, name: str) -> TensorRecord | None:
        return self._records.get(name)

    def reports(self, name: str) -> tuple[dict, dict | None]:
        for key in self.state["done"].values():
            if name in key["tensors"]:
                return key["tensors"][name], key["layers"].get(name)
        raise KeyError(name)

    def save(self, key: str, records: list[TensorRecord], tensors: list[TensorReport],
             layers: list[LayerReport]) -> None:
        with ContainerWriter(self.dir / f"{key}.nwc", ContainerHeader("", "", "nwc checkpoint", {})) as w:
            for rec in records:
                w.add(rec)
        self.state["done"][key] = {"tensors": {t.name: asdict(t) for t in tensors},
                                   "layers": {lr.name: asdict(lr) for lr in layers}}
        self._write_state()  # the block counts as done only once both files are complete

    def get(self, key: str):
        """A value computed once per run (e.g. the rate allocation), or None."""
        return self.state.get("extra", {}).get(key)

    def put(self, key: str, value) -> None:
        self.state.setdefault("extra", {})[key] = value
        self._write_state()

    def _write_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class CalibratedCompressor:
    """One run of calibrated compression; see the module docstring for the data path."""

    def __init__(self, src: Path, out: Path, bits: float, method: str, calib: CalibOptions, codec_id: str | None,
                 device: str, progress: bool, seed: int, on_progress: ProgressFn | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if method not in METHODS:
            raise CalibratedError(f"unknown method {method!r} ({', '.join(METHODS)})")
        if method in PRUNE_METHODS and calib.sparsity is None and calib.pattern is None:
            raise CalibratedError(f"--method {method} needs --sparsity S (such as 0.5) or --pattern N:M (such as 2:4)")
        if method not in PRUNE_METHODS and (calib.sparsity is not None or calib.pattern is not None):
            raise CalibratedError(f"--sparsity and --pattern are for nowag-p and wanda, not {method}")
        self.src, self.out, self.bits, self.method, self.calib = Path(src), Path(out), bits, method, calib
        self.config = _check_model(self.src, method, bits)
        self.dev = resolve_device(device)
        self.source = open_source(self.src)
        tokenizer = AutoTokenizer.from_pretrained(self.src)
        self.cs: CalibrationSet = load_calibration(calib.source, tokenizer, calib.n_seq, calib.seq_len, calib.seed)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        self.n_layers = self.config.num_hidden_layers
        self.tc = NWCTensorCodec(load_codec(codec_id), self.dev) if method == "nwc" else None
        self.coder = LayerCoder(method, bits, self.tc, calib)
        self.order = encode_order(self.source, self.n_layers)
        self.controller: RateController | None = None
        if self.tc is not None:
            include = None if calib.code_embeddings else keep_embeddings
            plans = {p.name: p for p in plan_model(self.source, self.tc, include, seed, progress, bits, on_progress)}
            self.controller = RateController(rate_items([plans[n] for n in self.order]), bits,
                                             self.source.total_params, self.tc.n_levels, HEADER_ESTIMATE, FOOTER_SIZE)
            self.controller.check(self.tc.codec.info.id)
        self.info = self.tc.codec.info if self.tc else None
        self.by_name = {t.name: t for t in self.source.tensors}
        self.progress, self.on_progress, self.on_checkpoint = progress, on_progress, on_checkpoint
        # No local path in it: a job redelivered to another worker (another download directory) resumes too.
        fingerprint = {"source": self.source.fingerprint(), "bits": bits, "method": method,
                       # the text by its sha256 (below), not its path: an uploaded text resumes on another worker
                       "calib": {**asdict(calib), "source": "wiki" if calib.source == "wiki" else "file"},
                       "calib_sha256": self.cs.sha256, "codec": self.info.sha256 if self.info else "", "seed": seed,
                       "tensors": [(t.name, list(t.shape), t.dtype) for t in self.source.tensors]}
        fingerprint = json.loads(json.dumps(fingerprint))  # as state.json stores it (tuples become lists)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = BlockCheckpoints(self.out, fingerprint)
        self.reports: list[TensorReport] = []
        self.layer_reports: list[LayerReport] = []
        self.written: set[str] = set()
        self._unit: tuple[list[TensorRecord], list[TensorReport], list[LayerReport]] = ([], [], [])
        self._staged_bytes = self._staged_table = 0
        self.allocation: dict[str, dict] = {}  # layer name -> {"sensitivity", "level_offset"} (nwc)

    # -- writing one tensor

    def write(self, name: str, w_orig: torch.Tensor, record_fn, h: torch.Tensor | None = None) -> torch.Tensor | None:
        """Code one tensor (record_fn(level) -> (Ŵ or None, method, meta, segments)) and stage it; a tensor of a
        checkpointed unit is staged from its checkpoint instead (same bytes, so the same bundle). Staged records
        reach the file at the end of their unit, after block fine-tuning may have rewritten their row scales;
        rate control counts them as written."""
        t1 = time.time()
        level = None
        if self.controller:
            level = self.controller.advance(name, self.writer.bytes_written + self._staged_bytes,
                                            self.writer.table_bytes + self._staged_table)
        st = self.by_name[name]
        saved = self.ckpt.record(name)
        if saved is not None:
            rec = saved
            tr_d, lr_d = self.ckpt.reports(name)
            tr, lr = TensorReport(**tr_d), LayerReport(**lr_d) if lr_d else None
            w_hat = None if saved.method == "raw" else self.decoder.decode(saved).float()
        else:
            w_hat, rec_method, meta, segs = record_fn(level)
            rec = TensorRecord(name, st.shape, st.dtype, rec_method, {"file": st.file, **meta}, segs)
            nbytes = sum(len(b) for b in segs.values())
            err = None if w_hat is None else nmse(w_orig.reshape(w_orig.shape[0], -1), w_hat)
            bpw = 8 * nbytes / max(st.numel, 1)
            tr = TensorReport(name, list(st.shape), rec_method, st.numel, nbytes, bpw, err,
                              None if level is None else float(level), st.shape[0] if st.shape else 1)
            lr = None
            if h is not None and w_hat is not None:
                lr = LayerReport(name, proxy_error(w_orig, w_hat, h), err, bpw, time.time() - t1,
                                 **self.allocation.get(name, {}))
        self._stage(rec, tr, lr)
        self.written.add(name)
        self.bar.update(st.numel, name)
        return w_hat

    def _stage(self, rec: TensorRecord, tr: TensorReport, lr: LayerReport | None) -> None:
        self._unit[0].append(rec)
        self._unit[1].append(tr)
        if lr is not None:
            self._unit[2].append(lr)
        self._staged_bytes += tr.bytes
        self._staged_table += table_row_bytes(rec, self.writer.bytes_written + self._staged_bytes, tr.bytes)

    def end_unit(self, key: str) -> None:
        """Write the unit's staged records and checkpoint the unit (once)."""
        records, tensors, layers = self._unit
        for rec in records:
            self.writer.add(rec)
        self.reports += tensors
        self.layer_reports += layers
        if not self.ckpt.done(key):
            self.ckpt.save(key, records, tensors, layers)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.ckpt.dir)
        self._unit = ([], [], [])
        self._staged_bytes = self._staged_table = 0

    def model_free(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """Embedding / lm_head: no Hessian. NWC codes it model-free, GPTQ/RTN round it; lossless on request."""
        if not self.calib.code_embeddings or self.method in PRUNE_METHODS:
            return self.raw(name, w)
        def fn(level):
            if self.method == "nowag-vq":
                return self.coder.nowag(name, w, None)
            if self.method == "nwc":
                decoded, segs, _ = encode_model_free(self.tc, w, level)
                return decoded, "nwc", {"rows": decoded.shape[0], "cols": decoded.shape[1]}, segs
            w_hat, q = self.coder.fixed_length(w.float(), None)
            meta, segs = to_segments(q)
            return w_hat, "rtn", meta, segs
        return self.write(name, w, fn)

    def raw(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Store `t` losslessly; returns what the decoder will reproduce (the checkpointed value on resume)."""
        saved = self.ckpt.record(name)
        self.write(name, t, lambda _lv: (None, "raw", {}, {"data": to_bytes(t)}))
        return t if saved is None else self.decoder.decode(saved)

    def linear(self, name: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.controller is not None and not self.controller.items[name].coded:
            return self.raw(name, w)  # too small for the codec (< 4096 weights): stored as is, like model-free
        def fn(level):
            if self.method == "nwc":
                w_hat, segs, _ = self.coder.nwc(w, h, level)
                return w_hat, "nwc", {"rows": w.shape[0], "cols": w.shape[1]}, segs
            if self.method in ("nowag-vq", *PRUNE_METHODS):
                return self.coder.nowag(name, w.to(parse_dtype(self.by_name[name].dtype)), h)
            w_hat, q = self.coder.fixed_length(w, h)
            meta, segs = to_segments(q)
            return w_hat, self.method, meta, segs
        return self.write(name, w, fn, h)

    # -- how a decoder block is called

    def embed(self, weight: torch.Tensor) -> torch.Tensor:
        """Block 0's input for the calibration ids, with the model's own embedding scale (Gemma: √d)."""
        scale = float(getattr(self.model.model.embed_tokens, "scalar_embed_scale", 1.0))
        return (torch.nn.functional.embedding(self.cs.input_ids, weight.float()) * scale).to(self.dev)

    def block_kwargs(self, like: torch.Tensor) -> list[dict]:
        """Per block: rotary position embeddings and an explicit causal mask for its attention type (Gemma3
        alternates sliding-window and full attention, each with its own rotary base)."""
        n = self.cs.seq_len
        rotary = type(self.model.model.rotary_emb)(config=self.config).to(self.dev)
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.n_layers)
        pos = torch.arange(n, device=self.dev)[None]
        by_type = {}
        for t in sorted(set(types)):
            window = getattr(self.config, "sliding_window", None) if t == "sliding_attention" else None
            by_type[t] = {"position_embeddings": rotary(like[:1], pos, t) if per_type else rotary(like[:1], pos),
                          "position_ids": pos, "attention_mask": causal_mask(n, window, self.dev)}
        return [by_type[t] for t in types[: self.n_layers]]

    # -- cross-layer rate allocation (nwc)

    def allocate(self, hidden: torch.Tensor, block_kwargs: list[dict]) -> None:
        """Measure every linear layer's sensitivity on the original model (one pass over the blocks) and hand the
        resulting level offsets to rate control; kept in the checkpoint state so a resumed run reuses them."""
        calib = self.calib
        if self.controller is None or calib.allocation == "none":
            return
        saved = self.ckpt.get("allocation")
        if saved is None:
            mode = calib.allocation
            n_prop = min(hidden.shape[0], PROPAGATION_SEQS)
            meter = Meter("allocate", self.n_layers, "block", False, self.on_progress)
            sens: dict[str, float] = {}
            block_of: dict[str, int] = {}
            births: list[float] = []  # relative block-output error each perturbed stream started with
            streams: list[torch.Tensor] = []  # one residual stream per block, perturbed at that block
            for i in range(self.n_layers):
                prefix, kwargs = f"model.layers.{i}.", block_kwargs[i]
                layer = self.model.model.layers[i]
                _materialize(layer, prefix, self.source, self.dev)
                layer.requires_grad_(False)
                clean = run_block(layer, hidden, kwargs, calib.batch)
                mods = {f"{prefix}{m}.weight": layer.get_submodule(m) for g in GROUPS for m in g
                        if self.controller.items[f"{prefix}{m}.weight"].coded}
                gen = torch.Generator().manual_seed(calib.seed * 1_000_003 + i)
                sens.update(block_sensitivities(layer, mods, hidden, clean, kwargs, calib.batch, gen,
                                                "absolute" if mode == "absolute" else "relative"))
                if mode == "kl":
                    block_of.update(dict.fromkeys(mods, i))
                    streams = [run_block(layer, x, kwargs, calib.batch) for x in streams]
                    noisy = perturbed_output(layer, mods, hidden[:n_prop], kwargs, calib.batch, gen)
                    births.append(relative_mse(noisy, clean[:n_prop]))
                    streams.append(noisy)
                hidden = clean
                layer.to("meta")
                meter.update(detail=prefix)
            if mode == "kl":
                gains = [kl / max(b, 1e-30) for kl, b in zip(self._stream_kl(hidden[:n_prop], streams), births,
                                                              strict=True)]
                sens = {n: a * gains[block_of[n]] for n, a in sens.items()}
            saved = [asdict(x) for x in level_offsets(sens, calib.allocation_strength)]
            self.ckpt.put("allocation", saved)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.ckpt.dir)
        self.allocation = {x["name"]: {"sensitivity": x["sensitivity"], "level_offset": x["offset"]} for x in saved}
        self.controller.set_offsets({x["name"]: x["offset"] for x in saved})

    @torch.no_grad()
    def _stream_kl(self, clean: torch.Tensor, streams: list[torch.Tensor]) -> list[float]:
        """Mean next-token KL of each perturbed last-block output from the clean one (final norm + lm_head of
        the original model, one sequence at a time to bound the logits' memory)."""
        norm = self.model.model.norm
        _materialize(norm, "model.norm.", self.source, self.dev)
        head_name = "lm_head.weight" if "lm_head.weight" in self.by_name else "model.embed_tokens.weight"
        head = _load(self.source, [head_name])[head_name].float().to(self.dev)
        cap = getattr(self.config, "final_logit_softcapping", None)

        def logits(x: torch.Tensor) -> torch.Tensor:
            z = norm(x) @ head.T
            return torch.tanh(z / cap) * cap if cap else z

        ref = [logits(clean[s : s + 1]) for s in range(clean.shape[0])]
        out = [sum(mean_kl(ref[s], logits(x[s : s + 1])) for s in range(x.shape[0])) / x.shape[0] for x in streams]
        norm.to("meta")
        return out

    # -- row scales of coded nwc layers, trained by block fine-tuning

    def apply_gains(self, prefix: str, modules: dict[str, torch.nn.Linear]) -> None:
        """Fold the trained per-row gains into the staged records' fp16 row scales and set each module's weight
        to exactly what the decoder reproduces from the rewritten record."""
        records = self._unit[0]
        for mname, mod in modules.items():
            gain = mod.parametrizations.weight[0].gain.detach().cpu().float()
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            name = f"{prefix}{mname}.weight"
            i = next(j for j, r in enumerate(records) if r.name == name)
            scales = torch.from_numpy(np.frombuffer(records[i].segments["scales"], "<f2").astype(np.float32))
            new = (scales * gain).numpy().astype("<f2").tobytes()
            records[i] = replace(records[i], segments={**records[i].segments, "scales": new})
            w_hat = self.decoder.decode(records[i]).to(parse_dtype(self.by_name[name].dtype)).float()
            mod.weight.data.copy_(w_hat.reshape(mod.weight.shape).to(mod.weight.device))

    # -- the block loop

    def run(self) -> CompressReport:
        t0 = time.time()
        source, calib, dev = self.source, self.calib, self.dev
        info = self.info
        header = ContainerHeader(
            info.id if info else "", info.sha256 if info else "", "nwc calibrated",
            {"source": source.root.name, "target_bits": f"{self.bits:g}", "method": self.method,
             **({"pruning": calib.prune_spec.label} if self.method in PRUNE_METHODS else {}),
             "calibration_sha256": self.cs.sha256, "shards": json.dumps(source.shard_metadata)},
        )
        self.bar = Meter("compress", source.total_params, "w", self.progress, self.on_progress,
                         desc=f"{self.method} {self.bits:g} bpw")
        with ContainerWriter(self.out / BUNDLE_FILE, header) as self.writer:
            self.decoder = BundleDecoder(_NoReader(header), dev)
            emb_name = "model.embed_tokens.weight"
            emb = _load(source, [emb_name])[emb_name]
            orig_hidden = self.embed(emb)
            block_kwargs = self.block_kwargs(orig_hidden)
            self.allocate(orig_hidden, block_kwargs)  # before the first tensor: the offsets shape the shared level
            emb_hat = self.model_free(emb_name, emb)
            self.end_unit("embed")
            if emb_hat is not None:  # blocks see the embedding the decoder reproduces
                emb = emb_hat.to(parse_dtype(self.by_name[emb_name].dtype)).reshape(emb.shape)
            hidden = self.embed(emb)
            del emb

            finetune = calib.finetune_epochs > 0
            tune_scales = finetune and self.method == "nwc"
            if not finetune:
                orig_hidden = None  # the original model's activations are needed only as fine-tuning targets
            for i in range(self.n_layers):
                key, prefix = f"layer-{i:03d}", f"model.layers.{i}."
                layer, kwargs = self.model.model.layers[i], block_kwargs[i]
                _materialize(layer, prefix, source, dev)
                layer.requires_grad_(False)
                resumed = self.ckpt.done(key)
                target = run_block(layer, orig_hidden, kwargs, calib.batch) if finetune else None
                gen = torch.Generator().manual_seed(calib.seed * 1_000_003 + i)
                coded: set[str] = set()
                gained: dict[str, torch.nn.Linear] = {}
                for group in GROUPS:
                    modules = [layer.get_submodule(m) for m in group]
                    h = None if resumed else collect_hessians(
                        layer, hidden, {"in": modules[0]}, calib.batch, stop_after=modules[0], kwargs=kwargs,
                    )["in"].hessian().cpu()
                    for mname, mod in zip(group, modules, strict=True):
                        name = f"{prefix}{mname}.weight"
                        w_hat = self.linear(name, mod.weight.detach().cpu().clone(), h)
                        # exactly what the decoder reproduces (the source dtype), for the next layers' inputs
                        w_hat = w_hat.to(parse_dtype(self.by_name[name].dtype)).float()
                        mod.weight.data.copy_(w_hat.reshape(mod.weight.shape))
                        coded.add(f"{mname}.weight")
                        if tune_scales and not resumed and self.controller.items[name].coded:
                            parametrize.register_parametrization(mod, "weight", _RowGain(mod.out_features, dev))
                            gained[mname] = mod
                    if finetune and not resumed:
                        # trainable: row gains of coded layers, weights not yet coded, norms and biases
                        params = [p for n, p in layer.named_parameters()
                                  if n not in coded and not n.endswith("parametrizations.weight.original")]
                        ft = finetune_block(layer, params, hidden, target, kwargs, calib, gen)
                        names = {f"{prefix}{m}.weight" for m in group}
                        coded_here = [lr for lr in self._unit[2] if lr.name in names]
                        if coded_here:  # on the group's last coded layer
                            coded_here[-1].finetune = ft
                if gained:
                    self.apply_gains(prefix, gained)
                # the block's other tensors (norms, biases) from the block as it stands (fine-tuned), in the
                # source dtype; the block then runs with exactly the values the decoder reproduces
                state = dict(layer.named_parameters())
                for name in [n for n in self.order if n.startswith(prefix) and n not in self.written]:
                    param = state.get(name[len(prefix):])
                    if param is None:
                        self.raw(name, _load(source, [name])[name])
                        continue
                    t = self.raw(name, param.detach().cpu().to(parse_dtype(self.by_name[name].dtype)))
                    param.data.copy_(t.to(param.dtype).reshape(param.shape))
                self.end_unit(key)
                hidden = run_block(layer, hidden, kwargs, calib.batch)
                orig_hidden = target
                layer.to("meta")  # free the block

            for name in [n for n in self.order if n not in self.written]:
                t = _load(source, [name])[name]
                coded = (self.controller.items[name].coded if self.controller
                         else t.ndim == 2 and t.dtype.is_floating_point and t.numel() >= 4096)
                if coded:
                    self.model_free(name, t)
                else:
                    self.raw(name, t)
            self.end_unit("tail")
            self.bar.close()

        copy_aux_files(source, self.out)
        from codec.hf import write_quantization_config  # lazy: imports transformers

        write_quantization_config(self.out, info.id if info else "")
        self.ckpt.clear()
        file_bytes = (self.out / BUNDLE_FILE).stat().st_size
        cs = self.cs
        report = CompressReport(
            str(self.src), info.id if info else "", info.sha256 if info else "", self.bits,
            8 * file_bytes / source.total_params, file_bytes, source.total_params,
            sum(r.numel for r in self.reports if r.method != "raw"), time.time() - t0, peak_rss_mb(), dev,
            self.reports, method=self.method,
            calibration={"source": cs.source, "sha256": cs.sha256, "n_seq": cs.n_seq, "seq_len": cs.seq_len,
                         "seed": cs.seed, "damp": calib.damp, "act_order": calib.act_order,
                         "finetune_epochs": calib.finetune_epochs, "finetune_lr": calib.finetune_lr,
                         "finetune_val_fraction": calib.finetune_val_fraction,
                         "finetune_batch": calib.finetune_batch, "sparsity": calib.sparsity,
                         "pattern": calib.pattern},
            layers=[asdict(lr) for lr in self.layer_reports],
        )
        (self.out / REPORT_FILE).write_text(report.to_json())
        return report


class _RowGain(torch.nn.Module):
    """weight ← diag(gain)·weight: fine-tuning a coded nwc layer's fp16 row scales without touching its symbols."""

    def __init__(self, rows: int, device: str) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(rows, device=device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.gain[:, None]


class _NoReader:
    """BundleDecoder needs only the header (codec id and sha256) to decode records taken from checkpoints."""

    def __init__(self, header: ContainerHeader) -> None:
        self.header = header

    def read(self, name: str) -> TensorRecord:
        raise KeyError(f"alias {name!r} cannot be resolved outside a bundle")


def compress_calibrated(src: Path, out: Path, bits: float, method: str = "nwc", calib: CalibOptions | None = None,
                        codec_id: str | None = None, device: str = "auto", progress: bool = True,
                        seed: int = 0, on_progress: ProgressFn | None = None,
                        on_checkpoint: Callable[[Path], None] | None = None) -> CompressReport:
    """Compress a causal LM with calibration data into the bundle directory `out`. Re-running the same command
    after a crash resumes from the last finished block and produces an identical bundle (also from another
    directory holding the same source). `on_progress` gets allocate/plan/compress events (an exception it raises
    stops the run); `on_checkpoint(work_dir)` is called after each unit is checkpointed under `out/.nwc-work`,
    so a service can mirror that directory to durable storage and restore it before a re-run."""
    return CalibratedCompressor(src, out, bits, method, calib or CalibOptions(), codec_id, device, progress,
                                seed, on_progress, on_checkpoint).run()
