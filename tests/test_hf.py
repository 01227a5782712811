"""`from_pretrained(bundle_dir)` through the registered quant_method "nwc" (codec/hf.py), checked in fresh processes.

The model is the real SmolLM2-135M-Instruct cut to its first two decoder blocks (embedding, norm and
tokenizer kept), compressed with its token embedding stored raw so the whole module takes well under a
minute; the 14 linear layers are NWC-coded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_models import cut_smollm2
from safetensors.torch import load_file

import codec.hf as hf
from codec import assets
from codec.container import FORMAT_VERSION, ContainerReader
from codec.pipeline import BUNDLE_FILE, compress_model, decompress_model

REPO = Path(__file__).resolve().parents[1]
KEEP_LAYERS = 2
BITS = 26.5  # the raw fp32 embedding is 80 % of the parameters; the linears get about 4.5 bits/weight
CORRUPT_TENSOR = "model.layers.1.mlp.down_proj.weight"
PROMPT = "The capital of France is"

LOAD_SCRIPT = r"""
import hashlib, json, sys, torch
if sys.argv[1] == "1":
    import codec.hf  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer
bundle, dense, saved, prompt = sys.argv[2:6]

def digests(model):
    return {k: hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            + f" {v.dtype} {tuple(v.shape)}" for k, v in model.state_dict().items()}

def generate(model, tok):
    ids = tok(prompt, return_tensors="pt")
    return tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0])

model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(bundle)
out = {"digests": digests(model), "generation": generate(model, tok), "is_quantized": bool(model.is_quantized),
       "config_keys": sorted(model.config.to_dict())}
if dense:
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    out["dense_generation"] = generate(ref, tok)
if saved:
    model.save_pretrained(saved)
print("RESULT " + json.dumps(out))
"""


def digest(t: torch.Tensor) -> str:  # the same as LOAD_SCRIPT's
    return (hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            + f" {t.dtype} {tuple(t.shape)}")


def run_load(bundle: Path, tmp: Path, with_import: bool = True, dense: Path | None = None,
             saved: Path | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`from_pretrained(bundle)` in a fresh interpreter; $TMPDIR is `tmp` so leftovers can be checked."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, "1" if with_import else "0", str(bundle), str(dense or ""),
         str(saved or ""), PROMPT],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
    return proc, result


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return cut_smollm2(assets.smollm2_dir(), tmp_path_factory.mktemp("smollm2-small"), KEEP_LAYERS)


@pytest.fixture(scope="module")
def bundle(small_model: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "bundle"
    compress_model(small_model, out, BITS, device="cpu", progress=False, include=lambda n: "embed_tokens" not in n)
    assert hf.write_quantization_config(out) is True
    return out


@pytest.fixture(scope="module")
def dense(bundle: Path, tmp_path_factory) -> Path:
    return decompress_model(bundle, tmp_path_factory.mktemp("hf-dense") / "dense", device="cpu", progress=False)


def test_write_quantization_config_keeps_every_key(bundle: Path, small_model: Path):
    original = json.loads((small_model / "config.json").read_text())
    cfg = json.loads((bundle / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == original and list(cfg) == list(original)  # values and key order
    with ContainerReader(bundle / BUNDLE_FILE) as r:
        codec_id = r.header.codec_id
    assert qc == {"quant_method": "nwc", "bundle_file": BUNDLE_FILE, "codec_id": codec_id,
                  "format_version": FORMAT_VERSION}
    text = (bundle / "config.json").read_text()
    # The source's text, byte for byte, plus one inserted entry that `nwc decompress` can take out again.
    assert text.replace(hf.config_marker(qc), "") == (small_model / "config.json").read_text()
    assert hf.write_quantization_config(bundle, codec_id) is True  # idempotent
    assert (bundle / "config.json").read_text() == text
    assert not list(bundle.glob("*.partial"))


@pytest.mark.parametrize("text", [
    '{"model_type": "synthetic"}\n',
    '{\n\t"model_type": "x",\n\t"n": [1, 2]\n}',
    '{"model_type": "x", "quantization_config": {"quant_method": "nwc", "codec_id": "old"}}\n',
])
def test_with_quantization_config(text: str):
    qc = hf.NWCConfig(codec_id="c").to_dict()
    new = hf.with_quantization_config(text, qc)
    cfg = json.loads(text)
    cfg.pop("quantization_config", None)
    assert json.loads(new) == {**cfg, "quantization_config": qc}
    assert list(json.loads(new))[-1] == "quantization_config"
    assert hf.with_quantization_config(new, qc) == new
    assert json.loads(hf.dense_config_text(new)) == cfg
    if "quantization_config" not in text:
        assert hf.dense_config_text(new) == text  # byte for byte
    foreign = '{"model_type": "x", "quantization_config": {"quant_method": "gptq"}}'
    assert hf.dense_config_text(foreign) == foreign


def test_strip_quantization_config_restores_the_source_config(bundle: Path, small_model: Path, tmp_path: Path):
    shutil.copy2(bundle / "config.json", tmp_path / "config.json")
    assert hf.strip_quantization_config(tmp_path) is True
    assert (tmp_path / "config.json").read_bytes() == (small_model / "config.json").read_bytes()
    assert hf.strip_quantization_config(tmp_path) is False


def test_write_quantization_config_leaves_foreign_configs_alone(tmp_path: Path):
    assert hf.write_quantization_config(tmp_path, "nwc-w128-d2-v1") is False  # no config.json (e.g. a CNN file)
    (tmp_path / "config.json").write_text('{"num_classes": 1000}')  # not a transformers config
    assert hf.write_quantization_config(tmp_path, "nwc-w128-d2-v1") is False
    foreign = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(foreign))
    assert hf.write_quantization_config(tmp_path, "nwc-w128-d2-v1") is False
    assert json.loads((tmp_path / "config.json").read_text()) == foreign


def test_config_and_registration():
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        AutoQuantizationConfig,
    )

    hf.register()
    hf.register()  # idempotent
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["nwc"] is hf.NWCConfig
    assert AUTO_QUANTIZER_MAPPING["nwc"] is hf.NWCHfQuantizer
    d = {"quant_method": "nwc", "bundle_file": "model.nwc", "codec_id": "c", "format_version": FORMAT_VERSION}
    cfg = AutoQuantizationConfig.from_dict(dict(d))
    assert isinstance(cfg, hf.NWCConfig) and cfg.to_dict() == d
    for bad in ({"bundle_file": "../model.nwc"}, {"bundle_file": ""}, {"format_version": FORMAT_VERSION + 1},
                {"format_version": "1"}):
        with pytest.raises(ValueError):
            hf.NWCConfig(**bad)


def test_nwc_config_cannot_quantize_a_dense_model(small_model: Path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(small_model, quantization_config=hf.NWCConfig())


def test_fresh_process_load_equals_decompress(bundle: Path, dense: Path, tmp_path: Path):
    saved = tmp_path / "saved"
    proc, res = run_load(bundle, tmp_path / "tmp", dense=dense, saved=saved)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert res is not None, proc.stdout[-2000:]
    want = {k: digest(v) for k, v in load_file(dense / "model.safetensors").items()}
    got = res["digests"]
    assert {k: got.get(k) for k in want} == want  # every decoded tensor, bit for bit
    assert set(got) - set(want) == {"lm_head.weight"}  # tied to the embedding, not stored
    assert got["lm_head.weight"] == want["model.embed_tokens.weight"]
    # Greedy generation works and matches the dense directory loaded the ordinary way.
    assert res["generation"].startswith(PROMPT) and len(res["generation"]) > len(PROMPT)
    assert res["generation"] == res["dense_generation"]
    # A plain dense model afterwards: not quantized, saves without the nwc config, temp files gone.
    assert res["is_quantized"] is False
    assert "quantization_config" not in res["config_keys"] and "transformers_weights" not in res["config_keys"]
    saved_cfg = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in saved_cfg and "transformers_weights" not in saved_cfg
    assert (saved / "model.safetensors").is_file()
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("nwc-load-")]


def test_corrupt_bundle_raises_naming_the_tensor(bundle: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    with ContainerReader(bad / BUNDLE_FILE) as r:
        e = r.entry(CORRUPT_TENSOR)
        assert e.method == "nwc"
    with open(bad / BUNDLE_FILE, "r+b") as f:
        f.seek(e.offset + e.length // 2)
        b = f.read(1)
        f.seek(e.offset + e.length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    proc, res = run_load(bad, tmp_path / "tmp")
    assert proc.returncode != 0 and res is None
    assert "CorruptTensorError" in proc.stderr
    assert f"tensor '{CORRUPT_TENSOR}': payload sha256 mismatch" in proc.stderr
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("nwc-load-")]


def test_without_the_import_loading_fails_loudly(bundle: Path, tmp_path: Path):
    proc, res = run_load(bundle, tmp_path / "tmp", with_import=False)
    assert proc.returncode != 0 and res is None  # never a model with random weights
    assert "Unknown quantization type, got nwc" in proc.stderr
    assert "OSError: Error no file named model.safetensors" in proc.stderr
