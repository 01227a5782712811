"""NoWag-VQ, NoWag-P and Wanda (codec/nowag.py) on real SmolLM2 weights and real calibration statistics, their
container records, and the compress paths (calibrated and data-free) that use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_models import cut_smollm2
from safetensors import safe_open

from codec.calibrated import CalibOptions, CalibratedError, compress_calibrated
from codec.container import ContainerReader
from codec.nowag import (
    NoWagError,
    PruneSpec,
    decode_mask,
    encode_mask,
    index_bits,
    normalize,
    prune,
    prune_decode,
    prune_segments,
    vq_decode,
    vq_quantize,
    vq_segments,
    weighted_error,
)
from codec.pipeline import BundleDecoder
from codec.tensor_codec import TensorDecodeError


@pytest.fixture(scope="module")
def real(smollm2_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 2's o_proj weight (576×576) and diag(H) of its input on 4 real calibration sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codec.calibration import load_calibration

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cs = load_calibration("wiki", AutoTokenizer.from_pretrained(smollm2_dir), n_seq=4, seq_len=128, seed=0)
    mod = model.model.layers[2].self_attn.o_proj
    acc: list[torch.Tensor] = []
    handle = mod.register_forward_pre_hook(lambda _m, a: acc.append((a[0].reshape(-1, a[0].shape[-1]) ** 2).mean(0)))
    with torch.no_grad():
        model(cs.input_ids)
    handle.remove()
    return mod.weight.detach().clone(), acc[0]


def test_normalization_is_exact_with_the_stored_norms(real):
    w, _ = real
    nz = normalize(w)
    assert nz.rows.dtype == nz.cols.dtype == torch.float16
    torch.testing.assert_close(nz.denormalize(nz.w_bar), w, rtol=1e-5, atol=1e-7)
    # columns of W / c have unit norm before the row step (up to fp16 rounding of c)
    col = torch.linalg.vector_norm(w / nz.cols.float(), dim=0)
    assert torch.allclose(col, torch.ones_like(col), atol=2e-3)
    assert torch.allclose(torch.linalg.vector_norm(nz.w_bar, dim=1), torch.ones(w.shape[0]), atol=1e-3)  # fp16 r


def test_weighted_kmeans_objective_decreases_and_record_round_trips(real):
    w, hdiag = real
    r = vq_quantize(w, hdiag, 3.0, max_iter=8, tol=0.0)
    assert len(r.objective) == 8
    assert all(b <= a * (1 + 1e-6) for a, b in zip(r.objective, r.objective[1:], strict=False)), r.objective
    assert r.objective[-1] < 0.9 * r.objective[0]
    # bits: k index bits per d = 4 weights, the fp16 codebook and norms; under the 3-bit budget
    m, n = w.shape
    assert r.d == 4 and r.k == index_bits(m, n, 3.0, 4) and 8 * r.nbytes <= 1.05 * 3.0 * m * n
    meta, segs = vq_segments(r)
    assert torch.equal(vq_decode(meta, segs), r.w_hat)  # the decoder reproduces what the encoder measured
    # the weighted objective is what the error field reports, and better than unweighted coding on it
    nz = normalize(w)
    w_bar_hat = r.w_hat / nz.rows.float()[:, None] / nz.cols.float()[None, :]
    assert weighted_error(nz.w_bar, w_bar_hat, hdiag) == pytest.approx(r.error, rel=1e-3)
    flat = vq_quantize(w, None, 3.0, max_iter=8, tol=0.0)
    flat_bar = flat.w_hat / nz.rows.float()[:, None] / nz.cols.float()[None, :]
    assert r.error < weighted_error(nz.w_bar, flat_bar, hdiag)


def test_vq_rates_and_refusals():
    assert [index_bits(4096, 4096, b, d) for b, d in ((2, 6), (3, 4), (4, 3))] == [12, 12, 12]
    assert index_bits(576, 576, 2.0, 6) < 12  # a small layer cannot pay for a 4096-entry codebook
    with pytest.raises(NoWagError, match="settings for bits"):
        vq_quantize(torch.randn(64, 64), None, 2.5)


@pytest.mark.parametrize("spec", [PruneSpec(sparsity=0.5), PruneSpec(n=2, m=4), PruneSpec(n=4, m=8)],
                         ids=lambda s: s.label)
@pytest.mark.parametrize("method", ["nowag-p", "wanda"])
def test_pruning_keeps_exactly_the_pattern_and_the_mask_round_trips(real, spec: PruneSpec, method: str):
    w, hdiag = real
    p = prune(w, hdiag, spec, method)
    m, n = w.shape
    if spec.sparsity is not None:
        per_row = p.mask.sum(1)
        assert int(p.mask.sum()) == m * n // 2
        if method == "wanda":  # per output row
            assert bool((per_row == n // 2).all())
    else:
        groups = p.mask.reshape(m, -1, spec.m).sum(-1)
        assert bool((groups == spec.n).all())
    assert torch.equal(p.w_hat[p.mask], w[p.mask]) and not p.w_hat[~p.mask].any()  # kept weights unchanged
    meta, segs = prune_segments(p)
    assert torch.equal(decode_mask(meta, segs["mask"], m, n), p.mask)
    assert torch.equal(prune_decode(meta, segs, "float32"), p.w_hat)
    bits = 8 * len(segs["mask"]) / (m * n)
    assert bits < {"0.5 unstructured": 1.01, "2:4": 0.66, "4:8": 0.78}[spec.label]


def test_scores_differ_between_nowag_p_and_wanda(real):
    w, hdiag = real
    a = prune(w, hdiag, PruneSpec(sparsity=0.5), "nowag-p").mask
    b = prune(w, hdiag, PruneSpec(sparsity=0.5), "wanda").mask
    assert 0 < int((a ^ b).sum()) < a.numel() // 4  # related criteria, not the same one


def test_prune_spec_parsing():
    assert PruneSpec.parse(pattern="2:4") == PruneSpec(n=2, m=4)
    assert PruneSpec.parse(sparsity=0.5).label == "0.5 unstructured"
    for kw, msg in [({}, "needs --sparsity"), ({"sparsity": 0.5, "pattern": "2:4"}, "not both"),
                    ({"pattern": "4:2"}, "1 ≤ N < M"), ({"pattern": "2-4"}, "N:M"), ({"sparsity": 1.0}, r"\[0, 1\)")]:
        with pytest.raises(NoWagError, match=msg):
            PruneSpec.parse(**kw)


def test_malformed_records_are_refused():
    w = torch.randn(64, 96)
    meta, segs = vq_segments(vq_quantize(w, None, 4.0, max_iter=2))
    with pytest.raises(ValueError, match="segment 'indices'"):
        vq_decode(meta, {**segs, "indices": segs["indices"][:-1]})
    with pytest.raises(ValueError, match="integer"):
        vq_decode({**meta, "k": "x"}, segs)
    p = prune(w, None, PruneSpec(n=2, m=4), "nowag-p")
    meta, segs = prune_segments(p)
    with pytest.raises(ValueError, match="raw payload"):
        prune_decode(meta, {**segs, "values": segs["values"][:-4]}, "float32")
    with pytest.raises(ValueError, match="pattern"):
        prune_decode({**meta, "pattern": "x"}, segs, "float32")
    um, uw = encode_mask(prune(w, None, PruneSpec(sparsity=0.25), "nowag-p").mask, PruneSpec(sparsity=0.25))
    with pytest.raises(ValueError, match="kept|exactly the recorded"):
        decode_mask({**um, "kept": um["kept"] + 1}, uw, 64, 96)


@pytest.fixture(scope="module")
def one_block(smollm2_dir: Path, tmp_path_factory) -> Path:
    return cut_smollm2(smollm2_dir, tmp_path_factory.mktemp("one-block"), 1)


@pytest.mark.parametrize(("method", "bits", "extra"), [("nowag-vq", 2.0, {"vq_iters": 3}),
                                                       ("nowag-p", 0.0, {"pattern": "2:4"}),
                                                       ("wanda", 0.0, {"sparsity": 0.5})])
def test_calibrated_pipeline_writes_decodable_bundles(one_block: Path, tmp_path: Path, method: str, bits: float,
                                                      extra: dict):
    opts = CalibOptions(n_seq=2, seq_len=64, code_embeddings=False, **extra)
    rep = compress_calibrated(one_block, tmp_path / "b", bits, method, opts, device="cpu", progress=False)
    assert rep.method == method and len(rep.layers) == 7
    record = "nowag-vq" if method == "nowag-vq" else "pruned"
    with ContainerReader(tmp_path / "b" / "model.nwc") as r:
        dec = BundleDecoder(r, "cpu")
        coded = [rec for rec in r if rec.method == record]
        assert len(coded) == 7 and all(rec.name.startswith("model.layers.0.") for rec in coded)
        for rec in coded:
            t = dec.decode(rec)
            assert tuple(t.shape) == tuple(rec.shape)
            if record == "pruned":
                assert abs(float((t == 0).float().mean()) - 0.5) < 0.01
        assert r.header.attrs["method"] == method
        if record == "pruned":
            assert r.header.attrs["pruning"] == opts.prune_spec.label
            bad = next(iter(coded))
            broken = type(bad)(bad.name, bad.shape, bad.dtype, bad.method, bad.meta,
                               {**bad.segments, "mask": bad.segments["mask"][:4]})
            with pytest.raises(TensorDecodeError, match=bad.name):
                dec.decode(broken)


def test_method_options_are_checked(one_block: Path, tmp_path: Path):
    for method, bits, extra, msg in [("nowag-p", 0.0, {}, "needs --sparsity"),
                                     ("nwc", 4.0, {"sparsity": 0.5}, "for nowag-p and wanda"),
                                     ("nowag-vq", 2.5, {}, "settings for bits"),
                                     ("nowag-x", 4.0, {}, "unknown method")]:
        with pytest.raises(CalibratedError, match=msg):
            compress_calibrated(one_block, tmp_path / "x", bits, method, CalibOptions(n_seq=2, seq_len=64, **extra),
                                device="cpu", progress=False)


def test_cli_data_free_pruning_and_refusals(one_block: Path, tmp_path: Path):
    """`nwc compress SRC -o OUT --method nowag-p --pattern 2:4` without --calib: diag(H) = 1, every matrix but the
    embedding pruned 2:4, verified in a fresh process; wrong flag combinations exit 2 with the reason."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "codec.cli", "compress", str(one_block), *args],
                              capture_output=True, text=True, timeout=600)

    r = run("-o", str(tmp_path / "p"), "--method", "nowag-p", "--pattern", "2:4", "--eval-tokens", "128", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2:4)" in r.stdout
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["method"] == "nowag-p" and rep["calibration"]["source"].startswith("none")
    assert rep["verification"]["ok"], rep["verification"]
    pruned = {t["name"] for t in rep["tensors"] if t["method"] == "pruned"}
    assert len(pruned) == 7 and "model.embed_tokens.weight" not in pruned
    with safe_open(str(tmp_path / "p-dense" / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert bool(((down.reshape(down.shape[0], -1, 4) != 0).sum(-1) <= 2).all())

    for args, msg in [(["--method", "nowag-p"], "needs --sparsity"),
                      (["--method", "nowag-p", "--bits", "4", "--sparsity", "0.5"], "not --bits"),
                      (["--method", "wanda", "--sparsity", "0.5"], "needs calibration"),
                      (["--method", "nowag-vq"], "needs --bits")]:
        r = run("-o", str(tmp_path / "bad"), *args, "-q")
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


# ----------------------------------------------------------------------------- the same choices in the API


def test_api_job_bodies_for_nowag_and_wanda():
    from pydantic import ValidationError

    from api.schemas.jobs import JobCreate
    from worker.options import InvalidJobOptions, JobOptions

    mid = "mdl_" + "0" * 32
    vq = JobCreate.model_validate({"model_id": mid, "method": "nowag-vq", "target_bits": 2})
    assert vq.calibration == "wiki"  # calibrated by default, as the other calibrated methods
    free = JobCreate.model_validate({"model_id": mid, "method": "nowag-p", "calibration": "none",
                                     "tuning": {"pattern": "2:4"}})
    assert free.target_bits is None and free.tuning.pattern == "2:4"
    wanda = JobCreate.model_validate({"model_id": mid, "method": "wanda", "tuning": {"sparsity": 0.5}})
    assert wanda.calibration == "wiki"
    for body, msg in [
        ({"method": "nowag-vq", "target_bits": 2.5}, "12 / bits whole"),
        ({"method": "nowag-p", "target_bits": 4, "tuning": {"sparsity": 0.5}}, "not target_bits"),
        ({"method": "nowag-p"}, "exactly one of tuning.sparsity"),
        ({"method": "wanda", "tuning": {"sparsity": 0.5, "pattern": "2:4"}}, "exactly one of"),
        ({"method": "wanda", "calibration": "none", "tuning": {"pattern": "2:4"}}, "needs calibration text"),
        ({"method": "nwc", "target_bits": 4, "tuning": {"sparsity": 0.5}}, "not nwc"),
        ({"method": "nwc"}, "needs target_bits"),
        ({"method": "nowag-p", "tuning": {"pattern": "4:2"}}, "N:M with 1 ≤ N < M"),
        ({"method": "nowag-p", "tuning": {"sparsity": 1.0}}, "less than 1"),
    ]:
        with pytest.raises(ValidationError, match=msg):
            JobCreate.model_validate({"model_id": mid, **body})

    # the worker reads what the API stored (options: calibration + the tuning fields)
    o = JobOptions.parse("nowag-p", None, {"calibration": "none", "pattern": "2:4"})
    assert o.bits is None and o.pattern == "2:4" and not o.calibrated
    assert JobOptions.parse("nowag-vq", 3, {"calibration": "wiki"}).bits == 3.0
    for method, bits, opts, msg in [("wanda", None, {"calibration": "none", "sparsity": 0.5}, "needs calibration"),
                                    ("nowag-p", 4, {"sparsity": 0.5}, "no target bits"),
                                    ("nowag-p", None, {}, "exactly one of"),
                                    ("rtn", 4, {"calibration": "wiki", "pattern": "2:4"}, "not rtn")]:
        with pytest.raises(InvalidJobOptions, match=msg):
            JobOptions.parse(method, bits, opts)
