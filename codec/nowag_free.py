"""Data-free NoWag (no calibration text): every matrix coded with diag(H) = 1, any architecture.

source → for each shard, each tensor: NoWag-VQ (every float matrix of ≥ 4096 weights, embeddings included) or
NoWag-P (the same matrices but the embeddings and lm_head, which pruning leaves dense) or stored as is →
container → report. The calibrated path (codec.calibrated) is the one to use for causal LMs with text at hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from codec import __version__
from codec.calibrated import CalibOptions, LayerCoder
from codec.container import ContainerHeader, ContainerWriter, TensorRecord
from codec.nowag import PRUNE_METHODS, NoWagError, vq_dim
from codec.pipeline import (
    BUNDLE_FILE,
    EMBEDDING_NAMES,
    REPORT_FILE,
    CompressReport,
    TensorReport,
    copy_aux_files,
    nmse,
    peak_rss_mb,
)
from codec.progress import Meter, ProgressFn
from codec.source import open_source
from codec.tensors import dtype_name, to_bytes

MIN_CODED = 4096  # smaller tensors are stored as is (as in model-free NWC)
DATA_FREE = "none (data-free: diag(H) = 1)"


def codes(name: str, method: str, shape: tuple[int, ...], floating: bool) -> bool:
    """Whether the data-free path codes this tensor (else it is stored losslessly)."""
    if len(shape) != 2 or not floating or shape[0] * shape[1] < MIN_CODED:
        return False
    return method == "nowag-vq" or (name not in EMBEDDING_NAMES and "embed" not in name)


def compress_data_free(src: Path, out: Path, method: str, bits: float, opts: CalibOptions, progress: bool = True,
                       on_progress: ProgressFn | None = None) -> CompressReport:
    """NoWag-VQ at `bits` or NoWag-P (`opts.sparsity` / `opts.pattern`; `bits` ignored) without calibration."""
    if method not in ("nowag-vq", *PRUNE_METHODS) or method == "wanda":
        raise NoWagError(f"data-free compression is for nowag-vq and nowag-p, not {method} "
                         "(wanda and the others need --calib)")
    if method == "nowag-vq":
        vq_dim(bits)
    else:
        opts.prune_spec  # noqa: B018  (validates: a sparsity or a pattern is given)
    t0 = time.time()
    source = open_source(Path(src))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    coder = LayerCoder(method, bits, None, opts)
    attrs = {"source": source.root.name, "target_bits": f"{bits:g}", "method": method, "calibration": "none",
             "shards": json.dumps(source.shard_metadata)}
    if method in PRUNE_METHODS:
        attrs["pruning"] = opts.prune_spec.label
    reports: list[TensorReport] = []
    bar = Meter("compress", source.total_params, "w", progress, on_progress, desc=f"{method} data-free")
    with ContainerWriter(out / BUNDLE_FILE, ContainerHeader("", "", f"nwc {__version__}", attrs)) as writer:
        for shard, tensors in source.by_shard():
            for name, t in source.load(shard, [x.name for x in tensors]):
                err = None
                if codes(name, method, tuple(t.shape), t.dtype.is_floating_point):
                    w_hat, rec_method, meta, segs = coder.nowag(name, t, None)
                    err = nmse(t, w_hat)
                else:
                    rec_method, meta, segs = "raw", {}, {"data": to_bytes(t)}
                entry = writer.add(TensorRecord(name, tuple(t.shape), dtype_name(t.dtype), rec_method,
                                                {"file": shard.name, **meta}, segs))
                reports.append(TensorReport(name, list(t.shape), rec_method, t.numel(), entry.nbytes,
                                            8 * entry.nbytes / max(t.numel(), 1), err, None,
                                            t.shape[0] if t.ndim else 1))
                bar.update(t.numel(), name)
        bar.close()
    copy_aux_files(source, out)
    from codec.hf import write_quantization_config  # lazy: imports transformers

    write_quantization_config(out, "")
    file_bytes = (out / BUNDLE_FILE).stat().st_size
    report = CompressReport(
        str(src), "", "", bits, 8 * file_bytes / max(source.total_params, 1), file_bytes, source.total_params,
        sum(r.numel for r in reports if r.method != "raw"), time.time() - t0, peak_rss_mb(), "cpu", reports,
        method=method, calibration={"source": DATA_FREE, "sparsity": opts.sparsity, "pattern": opts.pattern},
    )
    (out / REPORT_FILE).write_text(report.to_json())
    return report
