"""Model-free compression split by safetensors shard, so that several processes can share one model:

    plan_shard     (one per shard, anywhere)  each tensor's rate curve and content digest → ShardPlan (JSON)
    allocate       (once, over all plans)     aliases across shards, the whole file's level and bytes → ShardBudget
    encode_shard   (one per shard, anywhere)  the shard's tensors into a shard container, closed loop on its budget
    merge_shards   (once)                     the shard containers' records, in source order, into one bundle

It reuses codec.pipeline's planning and encoding loops, so a merged bundle has the layout of `compress_model`'s:
the same records, table, header and small files. Only the rate control differs: `compress_model` re-solves the
level against the whole file as it writes, here each shard re-solves against its own budget (the budgets add up to
the file's), so a shard's estimation error is absorbed inside that shard and errors do not add up across shards.

A unit needs only its own shard file (`open_source(shard_file)` is enough) and the ShardSpec the coordinator
derived from the whole model; the results are plain JSON and container files. No web or worker imports here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from codec.container import FOOTER_SIZE, ContainerHeader, ContainerReader, ContainerWriter, prefix_size
from codec.pipeline import (
    BUNDLE_FILE,
    CompressReport,
    TensorPlan,
    TensorReport,
    encode_tensors,
    finish_bundle,
    plan_tensors,
    rate_items,
    resolve_aliases,
)
from codec.progress import Meter, ProgressFn
from codec.ratecontrol import RateController
from codec.registry import LoadedCodec
from codec.source import ModelSource
from codec.tensor_codec import NWCTensorCodec

__all__ = ["ShardSpec", "ShardPlan", "ShardBudget", "ShardPart", "ShardError", "shard_specs", "plan_shard",
           "allocate", "encode_shard", "merge_shards"]


class ShardError(ValueError):
    """Shard results that do not fit together (missing, out of order, from another codec or model)."""


@dataclass(frozen=True)
class ShardSpec:
    """What a unit must know of the whole model to work on one shard."""

    index: int  # position of the shard in source order
    file: str  # shard file name (records keep it in meta.file)
    first_index: int  # position of the shard's first tensor in the model (seeds its rate curves)
    numel: int  # parameters in the shard (progress weights)


def shard_specs(source: ModelSource) -> list[ShardSpec]:
    specs, first = [], 0
    for i, (shard, ts) in enumerate(source.by_shard()):
        specs.append(ShardSpec(i, shard.name, first, sum(t.numel for t in ts)))
        first += len(ts)
    return specs


@dataclass
class ShardPlan:
    index: int
    file: str
    tensors: list[TensorPlan]

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "file": self.file, "tensors": [t.to_dict() for t in self.tensors]})

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        d = json.loads(text)
        return cls(d["index"], d["file"], [TensorPlan.from_dict(t) for t in d["tensors"]])


@dataclass
class ShardBudget:
    """One shard's share of the file: its tensors' final plans (aliases resolved, table rows sized for the merged
    file), the shared level the allocation found, and the bytes its records and table rows may take."""

    index: int
    file: str
    level: float
    budget_bytes: float
    tensors: list[TensorPlan]

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "file": self.file, "level": self.level,
                           "budget_bytes": self.budget_bytes, "tensors": [t.to_dict() for t in self.tensors]})

    @classmethod
    def from_json(cls, text: str) -> ShardBudget:
        d = json.loads(text)
        return cls(d["index"], d["file"], d["level"], d["budget_bytes"],
                   [TensorPlan.from_dict(t) for t in d["tensors"]])


@dataclass
class ShardPart:
    """An encoded shard: a container of its records (read by merge_shards) and their reports."""

    index: int
    path: Path
    reports: list[TensorReport]

    def reports_json(self) -> list[dict]:
        return [asdict(r) for r in self.reports]


def _shard_path(source: ModelSource, file: str) -> Path:
    for p in source.shards:
        if p.name == file:
            return p
    raise ShardError(f"shard {file} is not in {source.root}")


def plan_shard(source: ModelSource, spec: ShardSpec, tc: NWCTensorCodec, seed: int = 0,
               include: Callable[[str], bool] | None = None, on_progress: ProgressFn | None = None) -> ShardPlan:
    """The TensorPlans of one shard, each with its content digest. `source` holds at least that shard (the whole
    model or `open_source(shard_file)`)."""
    shard = _shard_path(source, spec.file)
    bar = Meter("plan", sum(1 for t in source.tensors if t.file == spec.file), "tensor", False, on_progress)
    plans = plan_tensors(source, shard, tc, include, seed, spec.first_index, lambda name: bar.update(detail=name))
    bar.close()
    return ShardPlan(spec.index, spec.file, plans)


def allocate(shard_plans: Iterable[ShardPlan], bits: float, header: ContainerHeader, n_levels: int
             ) -> dict[str, ShardBudget]:
    """Aliases across shards, then the model-level rate allocation over all curves for the merged file (`header`
    is its header: every byte of it counts), split into one byte budget per shard (keyed by shard file)."""
    shard_plans = sorted(shard_plans, key=lambda sp: sp.index)
    if [sp.index for sp in shard_plans] != list(range(len(shard_plans))):
        raise ShardError(f"plans of shards {[sp.index for sp in shard_plans]}, expected 0..{len(shard_plans) - 1}")
    plans = resolve_aliases([p for sp in shard_plans for p in sp.tensors], bits)
    total_params = sum(p.numel for p in plans)
    rc = RateController(rate_items(plans), bits, total_params, n_levels, prefix_size(header), FOOTER_SIZE)
    rc.check(header.codec_id)
    level = rc.initial_level()
    predicted = rc.predicted_bytes(level)
    return {sp.file: ShardBudget(sp.index, sp.file, level, sum(predicted[p.name] for p in sp.tensors), sp.tensors)
            for sp in shard_plans}


def encode_shard(source: ModelSource, budget: ShardBudget, tc: NWCTensorCodec, out: Path,
                 on_progress: ProgressFn | None = None) -> ShardPart:
    """Code one shard's tensors into the shard container `out`, closed loop against the shard's byte budget."""
    shard = _shard_path(source, budget.file)
    plans = {p.name: p for p in budget.tensors}
    rc = RateController.for_budget(rate_items(budget.tensors), budget.budget_bytes, tc.n_levels)
    info = tc.codec.info
    header = ContainerHeader(info.id, info.sha256, "nwc shard", {"shard": budget.file, "index": str(budget.index)})
    bar = Meter("compress", sum(p.numel for p in budget.tensors), "w", False, on_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ContainerWriter(out, header) as writer:
        reports = encode_tensors(source, shard, tc, plans, rc, writer, bar, base=writer.prefix_bytes)
    bar.close()
    return ShardPart(budget.index, out, reports)


def merge_shards(parts: Iterable[ShardPart], out: Path, header: ContainerHeader, source: ModelSource,
                 codec: LoadedCodec, bits: float, device: str, started: float | None = None) -> CompressReport:
    """Stream the shard containers' records, in source order and one at a time, into `out/model.nwc`, then write
    the model's small files, quantization config and report.json as `compress_model` does."""
    t0 = time.time() if started is None else started
    parts = sorted(parts, key=lambda part: part.index)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expected = [t.name for t in source.tensors]
    written: list[str] = []
    with ContainerWriter(out / BUNDLE_FILE, header) as writer:
        for part in parts:
            with ContainerReader(part.path) as reader:
                if (reader.header.codec_id, reader.header.codec_sha256) != (header.codec_id, header.codec_sha256):
                    raise ShardError(f"shard part {part.path.name} was coded with codec {reader.header.codec_id}")
                for rec in reader:
                    writer.add(rec)
                    written.append(rec.name)
        if written != expected:
            missing = sorted(set(expected) - set(written))[:5]
            raise ShardError(f"shard parts hold {len(written)} tensors, the model {len(expected)} "
                             f"(missing {missing}, or out of source order)")
    reports = [r for part in parts for r in part.reports]
    return finish_bundle(source, out, codec, bits, source.root, t0, device, reports)
