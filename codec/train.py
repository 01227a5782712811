"""Training of the NWC codec on real weight chunks (`nwc train-codec`).

Data: every 2-D float matrix of the training checkpoints (never the model the RD benchmark evaluates),
row-normalized and cut into 16-weight chunks exactly as at compression time. A seeded 1 % of chunks is
held out for the validation loss. Each training sample gets a uniformly random rate level, so one model
learns the whole rate range.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from codec.chunking import CHUNK, as_matrix, row_scales, to_chunks
from codec.model import CodecConfig, NWCModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_chunks: int = 4096
    lr: float = 1e-3
    lr_final: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.01
    val_every: int = 250
    device: str = "cpu"


@dataclass
class TrainReport:
    codec: dict
    train: dict
    sources: list[str]
    n_train_chunks: int
    n_val_chunks: int
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)


def is_weight_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """Linear/conv weights worth training on: ≥2-D and at least one chunk tall."""
    return len(shape) >= 2 and shape[0] >= CHUNK and math.prod(shape[1:]) >= CHUNK and "position" not in name


def load_chunks(files: Iterable[Path], max_rows_per_matrix: int = 8192) -> torch.Tensor:
    """Row-normalized chunks of every weight matrix in the files. Very tall matrices (embeddings) are
    subsampled to `max_rows_per_matrix` rows so they do not dominate the training set."""
    out = []
    g = torch.Generator().manual_seed(1234)
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_slice(name)
                shape = tuple(t.get_shape())
                if not is_weight_matrix(name, shape) or sf.get_slice(name).get_dtype() not in {"F32", "F16", "BF16"}:
                    continue
                w = as_matrix(sf.get_tensor(name).float())
                if w.shape[0] > max_rows_per_matrix:
                    w = w[torch.randperm(w.shape[0], generator=g)[:max_rows_per_matrix].sort().values]
                wn = w / row_scales(w).float()[:, None]
                out.append(to_chunks(wn).reshape(-1, CHUNK))
    if not out:
        raise ValueError("no weight matrices found in the training files")
    return torch.cat(out)


@torch.no_grad()
def validate(model: NWCModel, val: torch.Tensor, levels: list[int]) -> dict:
    """Held-out loss at fixed levels with true rounding (the test-time behaviour), deterministic."""
    model.eval()
    res = {}
    for lvl in levels:
        level = torch.full((val.shape[0],), lvl, dtype=torch.long, device=val.device)
        y_hat = torch.round(model.analyze(val, level))
        x_hat = model.synthesize(y_hat, level)
        mse = (val - x_hat).pow(2).mean().item()
        bits = -torch.log2(model.density.likelihood(y_hat, level).clamp_min(1e-9)).sum(-1).mean().item() / CHUNK
        res[lvl] = {"bits": bits, "nmse": mse, "gap": bits - 0.5 * math.log2(val.pow(2).mean().item() / mse)}
    model.train()
    return res


def train_codec(
    files: list[Path], codec_cfg: CodecConfig, cfg: TrainConfig, progress: bool = True
) -> tuple[NWCModel, TrainReport]:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    chunks = load_chunks(files)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(chunks.shape[0], generator=g)
    n_val = max(1000, int(cfg.val_fraction * chunks.shape[0]))
    val, train = chunks[perm[:n_val]].to(device), chunks[perm[n_val:]].to(device)
    del chunks
    model = NWCModel(codec_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr_final)
    val_levels = list(range(0, codec_cfg.n_levels, 4))
    history = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train-codec", unit="step")
    for step in bar:
        idx = torch.randint(0, train.shape[0], (cfg.batch_chunks,), generator=g).to(device)
        level = torch.randint(0, codec_cfg.n_levels, (cfg.batch_chunks,), generator=g).to(device)
        loss, _, _ = model.loss(train[idx], level)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            v = validate(model, val, val_levels)
            mean_gap = sum(r["gap"] for r in v.values()) / len(v)
            history.append({"step": step + 1, "loss": loss.item(), "val_mean_gap": mean_gap, "val": v})
            bar.set_postfix(loss=f"{loss.item():.3f}", val_gap=f"{mean_gap:.3f}")
    report = TrainReport(
        codec=codec_cfg.to_dict(),
        train=asdict(cfg),
        sources=[f"{Path(f).parent.name}/{Path(f).name}" for f in files],
        n_train_chunks=int(train.shape[0]),
        n_val_chunks=int(n_val),
        seconds=time.time() - t0,
        device=str(device),
        history=history,
    )
    return model.cpu().eval(), report


def report_json(report: TrainReport) -> str:
    return json.dumps(asdict(report), indent=1)
