"""The block-by-block pipeline calls each decoder block exactly as the model does, for every supported family.

Real weights where the registry has them (SmolLM2: Llama); Gemma3's alternating sliding-window / full attention
and scaled embedding on a synthetic tiny Gemma3 with a real tokenizer (a unit test of the wiring, no quality
claim: docs/BENCHMARKS.md has the real Gemma-3-270m run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from real_models import cut_smollm2

from codec.calibrated import CalibOptions, CalibratedCompressor, _load, _materialize, compress_calibrated


def _tiny_gemma3(tok_dir: Path, out: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=32, sliding_window=16,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"], max_position_embeddings=512)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a missing norm or scale would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_gemma3(smollm2_dir: Path, tmp_path_factory) -> Path:
    return _tiny_gemma3(smollm2_dir, tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def small_llama3(smollm2_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2 cut to 2 real blocks."""
    return cut_smollm2(smollm2_dir, tmp_path_factory.mktemp("llama2blocks"), 2)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_inputs_reproduce_the_models_hidden_states(arch: str, small_llama3: Path, tiny_gemma3: Path,
                                                          tmp_path: Path):
    from transformers import AutoModelForCausalLM

    src = small_llama3 if arch == "llama" else tiny_gemma3
    # 64-token windows: longer than the tiny Gemma3's 16-token sliding window, so the mask matters
    comp = CalibratedCompressor(src, tmp_path / "out", 4.0, "gptq", CalibOptions(n_seq=2, seq_len=64), None, "cpu",
                                False, 0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        states = model(comp.cs.input_ids, output_hidden_states=True).hidden_states
    emb = _load(comp.source, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    hidden = comp.embed(emb)
    assert torch.allclose(hidden, states[0], atol=1e-5)
    kwargs = comp.block_kwargs(hidden)
    for i in range(comp.n_layers - 1):  # the last hidden state is taken after the final norm
        layer = comp.model.model.layers[i]
        _materialize(layer, f"model.layers.{i}.", comp.source, "cpu")
        with torch.no_grad():
            out = layer(hidden, **kwargs[i])
        hidden = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(hidden, states[i + 1], atol=1e-4, rtol=1e-4), (arch, i)
    if arch == "gemma3":  # a full causal mask would differ beyond the 16-token window
        assert not torch.equal(kwargs[0]["attention_mask"], kwargs[2]["attention_mask"])


def test_gemma3_compresses_with_calibration_to_the_target(tiny_gemma3: Path, tmp_path: Path):
    rep = compress_calibrated(tiny_gemma3, tmp_path / "b", 4.0, "nwc", CalibOptions(n_seq=4, seq_len=64,
                              finetune_epochs=1), device="cpu", progress=False)
    assert abs(rep.measured_bits - 4.0) <= 0.05
    names = {lr["name"] for lr in rep.layers}
    assert len(names) == 4 * 7 and all(0 <= lr["proxy_error"] < 0.2 for lr in rep.layers)
    from codec.verify import verify_bundle

    v = verify_bundle(tmp_path / "b", tiny_gemma3, None, eval_tokens=256, device="cpu")
    assert v.ok, v.summary()
