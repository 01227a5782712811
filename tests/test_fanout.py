"""Model-free compression fanned out per safetensors shard (codec/shards.py, worker/fanout.py) on a real model:
SmolLM2 cut to 3 blocks, saved as 3 shards with its embedding also stored as `lm_head.weight` in the last shard
(tied weights stored twice, split across shards).

    test_shard_units_merge_into_one_bundle      codec only: plan → allocate → encode (any order) → merge
    test_embedded_fanout_*                      2 `nwc worker` processes (SQLite + filesystem broker + local store)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from real_models import cut_smollm2
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from test_worker import (  # noqa: F401  (embedded: a pytest fixture)
    Deployment,
    check_artifacts,
    create_job,
    embedded,
    enqueue,
    events,
    get_job,
    kill_group,
    seed_model,
    wait_job,
    wait_tidied,
)

from api.db.models import JobEvent, JobState
from api.storage import read_all
from codec.container import ContainerReader
from codec.pipeline import BUNDLE_FILE, REPORT_FILE, BundleDecoder, CompressReport, bundle_header, decompress_model
from codec.registry import load_codec
from codec.shards import (
    ShardBudget,
    ShardPart,
    ShardPlan,
    allocate,
    encode_shard,
    merge_shards,
    plan_shard,
    shard_specs,
)
from codec.source import open_source
from codec.tensor_codec import NWCTensorCodec

BITS = 2.5  # of the whole file; the alias holds 28 M of the 67 M parameters, so coded tensors get ~4.3 bits
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def write_shards(src: Path, out: Path) -> Path:
    """`src` (one model.safetensors) re-saved as 3 shards + index: the embedding, blocks 0-1, the rest and a copy of
    the embedding as lm_head.weight (how some checkpoints store tied weights)."""
    tensors = load_file(str(src / "model.safetensors"))
    tensors[HEAD] = tensors[EMBED].clone()

    def shard_of(name: str) -> int:
        if name == EMBED:
            return 1
        if name.startswith("model.layers.") and int(name.split(".")[2]) < 2:
            return 2
        return 3

    out.mkdir(parents=True)
    weight_map = {}
    for k in (1, 2, 3):
        file = f"model-0000{k}-of-00003.safetensors"
        part = {n: t for n, t in tensors.items() if shard_of(n) == k}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def sharded_llama(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sharded-llama")
    return write_shards(cut_smollm2(smollm2_dir, tmp / "cut", 3), tmp / "SmolLM2-3blocks-3shards")


def _decoded(container: Path) -> dict[str, torch.Tensor]:
    """Every tensor a container decodes to (aliases to a record of another container are left out)."""
    out = {}
    with ContainerReader(container) as r:
        dec = BundleDecoder(r, "cpu")
        for rec in r:
            if rec.method != "alias" or str(rec.meta["target"]) in r:
                out[rec.name] = dec.decode(rec)
    return out


def test_shard_units_merge_into_one_bundle(sharded_llama: Path, tmp_path: Path) -> None:
    """Each unit sees only its own shard file (as a helper worker would); plans and budgets travel as JSON;
    shards are encoded out of order. The merged bundle meets the target for the whole file, has every tensor,
    decodes (`decompress_model`) to exactly what the shard containers decode to, and stores the tied weights once."""
    t0 = time.monotonic()
    source = open_source(sharded_llama)
    specs = shard_specs(source)
    assert [s.file for s in specs] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    codec = load_codec(None)
    tc = NWCTensorCodec(codec, "cpu")
    alone = {s.file: open_source(sharded_llama / s.file) for s in specs}  # one shard file each

    plans = [ShardPlan.from_json(plan_shard(alone[s.file], s, tc, seed=0).to_json()) for s in reversed(specs)]
    by_file = {p.file: p for p in plans}
    head = next(t for t in by_file[specs[2].file].tensors if t.name == HEAD)
    assert head.method == "nwc" and head.digest  # the shard alone cannot know it is a copy
    header = bundle_header(source, codec, BITS)
    budgets = allocate(plans, BITS, header, tc.n_levels)
    budgets = {f: ShardBudget.from_json(b.to_json()) for f, b in budgets.items()}
    head = next(t for t in budgets[specs[2].file].tensors if t.name == HEAD)
    assert head.method == "alias" and head.alias_of == EMBED and head.curve is None
    total = BITS * source.total_params / 8
    assert sum(b.budget_bytes for b in budgets.values()) == pytest.approx(total, abs=4096)

    order = [1, 2, 0]
    random.Random(0).shuffle(order)
    parts: list[ShardPart] = []
    for i in order:
        b = budgets[specs[i].file]
        parts.append(encode_shard(alone[b.file], b, tc, tmp_path / "parts" / f"{i}.nwc"))
        size = parts[-1].path.stat().st_size
        with ContainerReader(parts[-1].path) as r:
            overhead = r.entries[0].offset + 56  # the shard container's own header and footer
        assert abs(size - overhead - b.budget_bytes) < 0.002 * b.budget_bytes + 64, (i, size, b.budget_bytes)

    report = merge_shards(parts, tmp_path / "bundle", header, source, codec, BITS, "cpu")
    bundle = tmp_path / "bundle"
    size = (bundle / BUNDLE_FILE).stat().st_size
    assert abs(8 * size / source.total_params - BITS) <= 0.05, 8 * size / source.total_params
    assert report.file_bytes == size and report.total_params == source.total_params
    assert CompressReport.from_json((bundle / REPORT_FILE).read_text()).measured_bits == report.measured_bits
    assert (bundle / "config.json").exists() and (bundle / "tokenizer.json").exists()
    assert [t.name for t in report.tensors] == [t.name for t in source.tensors]
    methods = {t.name: t.method for t in report.tensors}
    assert methods[EMBED] == "nwc" and methods[HEAD] == "alias"
    assert sum(m == "nwc" for m in methods.values()) == 22  # 7 linears per block and the embedding

    with ContainerReader(bundle / BUNDLE_FILE) as r:  # records are copied byte for byte
        shas = {e.name: e.sha256 for e in r.entries}
    assert set(shas) == {t.name for t in source.tensors}
    for part in parts:
        with ContainerReader(part.path) as r:
            assert all(shas[e.name] == e.sha256 for e in r.entries)

    dense = decompress_model(bundle, tmp_path / "dense", device="cpu", progress=False)
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded_llama / "model.safetensors.index.json").read_text())["weight_map"]
    decoded: dict[str, torch.Tensor] = {}
    for spec in specs:
        with safe_open(str(dense / spec.file), framework="pt") as f:
            decoded.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(decoded) == {t.name for t in source.tensors}
    for part in parts:
        for name, w in _decoded(part.path).items():
            assert torch.equal(decoded[name], w), name
    assert torch.equal(decoded[HEAD], decoded[EMBED])
    print(f"shard units: {time.monotonic() - t0:.0f} s, {8 * size / source.total_params:.4f} bits/weight")


# ----------------------------------------------------------------------------- worker fan-out (embedded mode)

JOB_OPTIONS = {"eval_tokens": 64, "outputs": ["bundle", "report"]}


def start_workers(dep: Deployment, names: list[str], timeout: float = 120) -> None:
    """Start `nwc worker`s and wait until each says it is ready (consuming), so units can go to any of them."""
    procs = [dep.start_worker(name) for name in names]
    deadline = time.monotonic() + timeout
    while not all(f"{n}@" in _ready(dep) for n in names):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), dep.logs()
        time.sleep(0.2)


def _ready(dep: Deployment) -> str:
    return "\n".join(line for f in dep.log_dir.glob("worker-*.log")
                     for line in f.read_text(errors="replace").splitlines() if line.endswith(" ready."))


def compress_event(dep: Deployment, job_id: str) -> dict:
    with dep.sf() as s:
        return s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.stage == "compress",
                                                     JobEvent.message == "compressed")).one()


def check_bundle(dep: Deployment, job_id: str, model_dir: Path, tmp: Path) -> dict:
    """The published bundle: verified in a fresh process by the job, at the target, every tensor, checksums ok."""
    arts = check_artifacts(dep, job_id)
    report = json.loads(read_all(dep.store, arts["report.json"].key))
    assert report["verification"]["ok"], report["verification"]
    source = open_source(model_dir)
    container = tmp / "model.nwc"
    container.write_bytes(read_all(dep.store, arts["bundle/model.nwc"].key))
    assert abs(8 * container.stat().st_size / source.total_params - BITS) <= 0.05
    assert report["measured_bits"] == pytest.approx(8 * container.stat().st_size / source.total_params)
    with ContainerReader(container) as r:
        assert [e.name for e in r.entries] == [t.name for t in source.tensors] and not r.verify()
        assert r.entry(HEAD).method == "alias" and r.entry(EMBED).method == "nwc"
    wait_tidied(dep, f"tenants/{arts['report.json'].tenant_id}/jobs/{job_id}/work/")
    return report


def test_embedded_fanout_runs_units_on_both_workers(embedded: Deployment, sharded_llama: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """SQLite + filesystem broker + local store, 2 workers: the model-free job on the 3-shard model fans out; its
    coordinator and the other worker both run units; the merged bundle meets the target and verifies."""
    dep = embedded
    t0 = time.monotonic()
    tenant, model = seed_model(dep, sharded_llama, "SmolLM2-3blocks-3shards")
    job_id = create_job(dep, tenant, model, "nwc", BITS, JOB_OPTIONS)
    start_workers(dep, ["w1", "w2"])
    enqueue(dep, job_id)
    job = wait_job(dep, job_id, {JobState.SUCCEEDED})
    assert job.attempts == 1 and job.progress == 1.0
    fan = compress_event(dep, job_id)["fanout"]
    assert fan["shards"] == 3 and {n.split("@")[0] for n in fan["workers"]} == {"w1", "w2"}, fan
    assert sum(fan["units"]["plan"].values()) == 3 and sum(fan["units"]["encode"].values()) == 3, fan
    check_bundle(dep, job_id, sharded_llama, tmp_path)
    print(f"fan-out job: {time.monotonic() - t0:.0f} s; units {fan['units']}")


def test_embedded_fanout_survives_a_killed_helper(embedded: Deployment, sharded_llama: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    """The worker that is not the coordinator is SIGKILLed (whole process group) while it runs a unit: its claim
    goes stale, the coordinator runs that unit itself, and the job succeeds in its first attempt."""
    dep = embedded
    t0 = time.monotonic()
    tenant, model = seed_model(dep, sharded_llama, "SmolLM2-3blocks-3shards")
    job_id = create_job(dep, tenant, model, "nwc", BITS, JOB_OPTIONS)
    start_workers(dep, ["w1", "w2"])
    procs = dict(zip(["w1", "w2"], dep.workers, strict=True))
    enqueue(dep, job_id)
    owner = wait_job(dep, job_id, {JobState.RUNNING}).lease_owner
    group = os.getpgid(int(owner.split("/")[1]))  # host/pid/…: pid of the pool process running the coordinator
    (helper,) = [n for n, p in procs.items() if p.pid != group]
    prefix = f"tenants/{tenant}/jobs/{job_id}/work/shards/"
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert time.monotonic() < deadline and get_job(dep, job_id).state == JobState.RUNNING, dep.logs()
        for obj in dep.store.list_objects(prefix):
            if obj.key.endswith(".claim"):
                try:
                    claim = json.loads(read_all(dep.store, obj.key))
                except Exception:  # replaced while read
                    continue
                if claim["node"].startswith(f"{helper}@") and not claim["done"]:
                    victim = claim
        time.sleep(0.05)
    kill_group(procs[helper])
    assert procs[helper].returncode == -signal.SIGKILL
    unit = f"{victim['phase']} unit {victim['index']}"

    job = wait_job(dep, job_id, {JobState.SUCCEEDED})
    assert job.attempts == 1
    msgs = [m for _, _, m in events(dep, job_id)]
    assert any(m.startswith(f"{unit}: claim of {helper}@") and m.endswith("running it here") for m in msgs), msgs
    fan = compress_event(dep, job_id)["fanout"]
    assert fan["coordinator"].startswith(f"{'w1' if helper == 'w2' else 'w2'}@"), fan
    check_bundle(dep, job_id, sharded_llama, tmp_path)
    print(f"killed {helper} in {unit}; job {time.monotonic() - t0:.0f} s; units {fan['units']}")
