"""`evaluate_pair`: original vs compressed model on real held-out text (SmolLM2, Wikipedia eval split)."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest

from codec import evaluate
from codec.evaluate import EvalReport, evaluate_pair, perplexity

SLICE = {"max_tokens": 1024, "window": 512, "max_new_tokens": 16}


def noisy_copy(src: Path, dst: Path, rel_std: float, seed: int = 0) -> Path:
    """Copy of the model in ``src`` with seeded Gaussian noise (std = ``rel_std`` x the matrix's std) added to
    every decoder-layer linear weight; everything else (embedding, norms, config, tokenizer) unchanged."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    state = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    layer_linear = re.compile(r"^model\.layers\.\d+\..*\.weight$")
    n = 0
    for name in sorted(state):
        w = state[name]
        if layer_linear.match(name) and w.ndim == 2:
            state[name] = w + torch.randn(w.shape, generator=gen, dtype=w.dtype) * (rel_std * w.std())
            n += 1
    assert n == 30 * 7, n  # q, k, v, o, gate, up, down in each of the 30 layers
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _check_report(r: EvalReport, scored: int) -> None:
    assert r.original.n_tokens == r.compressed.n_tokens == scored
    for m in (r.original, r.compressed):
        assert math.isfinite(m.ppl) and m.ppl == pytest.approx(math.exp(m.nll), rel=1e-12)
    assert 0.0 <= r.top1_agreement <= 1.0 and r.kl >= -1e-9
    d = r.to_dict()
    assert d["original"]["n_tokens"] == scored and set(d) >= {"protocol", "kl", "top1_agreement", "seconds"}


@pytest.mark.slow
def test_identity_pair_and_consistency_with_perplexity(smollm2_dir: Path, eval_text: str) -> None:
    r = evaluate_pair(smollm2_dir, smollm2_dir, eval_text, text_name="wiki_eval (test)", **SLICE)
    _check_report(r, scored=1022)  # 2 windows of 512, no BOS: first token of each unscored
    assert abs(r.kl) <= 1e-6
    assert r.top1_agreement == 1.0
    assert r.original.ppl == r.compressed.ppl
    assert r.generation_original == r.generation_compressed and "Paris" in r.generation_original
    for piece in ("wiki_eval (test)", "first 1024 tokens", "windows of 512", "no BOS", "1022 scored tokens",
                  "fp32 on cpu", "SmolLM2-135M-Instruct"):
        assert piece in r.protocol, (piece, r.protocol)
    # The shared window logic: perplexity() scores exactly the same tokens and gets the same number.
    ref = perplexity(smollm2_dir, eval_text, max_tokens=1024, window=512)
    assert ref.n_tokens == r.original.n_tokens
    assert r.original.ppl == pytest.approx(ref.ppl, rel=1e-5)


@pytest.mark.slow
def test_chunked_head_matches_full_logits(smollm2_dir: Path, eval_text: str, monkeypatch) -> None:
    """The chunked output head (original) and the model's own full logits (compressed) give the same
    distributions: the fallback path and the streaming path agree."""
    made = []

    class FullLogitsSecond(evaluate._Scorer):
        def __init__(self, model) -> None:
            super().__init__(model)
            made.append(self)
            if len(made) == 2:
                self.split = False

    monkeypatch.setattr(evaluate, "_Scorer", FullLogitsSecond)
    r = evaluate_pair(smollm2_dir, smollm2_dir, eval_text, max_tokens=300, window=150, max_new_tokens=1)
    assert [s.split for s in made] == [True, False]
    _check_report(r, scored=298)
    assert abs(r.kl) <= 1e-6 and r.top1_agreement == 1.0
    assert r.compressed.nll == pytest.approx(r.original.nll, rel=1e-5)


@pytest.mark.slow
def test_noisy_copies_degrade_monotonically(smollm2_dir: Path, eval_text: str, tmp_path: Path) -> None:
    reports = {}
    for rel_std in (0.05, 0.2):
        noisy = noisy_copy(smollm2_dir, tmp_path / f"noisy-{rel_std}", rel_std, seed=1234)
        reports[rel_std] = r = evaluate_pair(smollm2_dir, noisy, eval_text, text_name="wiki_eval", **SLICE)
        shutil.rmtree(noisy)
        _check_report(r, scored=1022)
        print(f"noise {rel_std}: ppl {r.original.ppl:.3f} -> {r.compressed.ppl:.3f}, KL {r.kl:.5f}, "
              f"top-1 {r.top1_agreement:.4f}, {r.seconds:.1f} s; {r.generation_compressed!r}")
        assert r.kl > 0 and r.top1_agreement < 1.0
        assert r.compressed.ppl > r.original.ppl
    small, large = reports[0.05], reports[0.2]
    assert small.original.ppl == large.original.ppl  # the same original, the same tokens
    assert large.kl > small.kl
    assert large.compressed.ppl > small.compressed.ppl
    assert large.top1_agreement < small.top1_agreement


def test_mismatched_vocab_and_non_causal_model_refused(smollm2_dir: Path, minilm_dir: Path) -> None:
    with pytest.raises(ValueError) as err:
        evaluate_pair(smollm2_dir, minilm_dir, "some text to score", max_tokens=8)
    msg = str(err.value)
    assert "vocabulary sizes differ (original 49152, compressed 30522)" in msg
    assert "not a causal language model (architectures: BertModel)" in msg
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        evaluate_pair(minilm_dir, smollm2_dir, "some text to score", max_tokens=8)


def test_tokenizer_mismatch_and_bundle_dir_refused(smollm2_dir: Path, tmp_path: Path) -> None:
    """Same config but another tokenizer is refused; a compressed bundle dir gets a clear hint."""
    import json

    other = tmp_path / "other-tok"
    other.mkdir()
    for f in smollm2_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, other / f.name)
    (other / "model.safetensors").symlink_to(smollm2_dir / "model.safetensors")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[1000:1002]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer vocabularies differ"):
        evaluate_pair(smollm2_dir, other, "Paris and London", max_tokens=8)

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy2(smollm2_dir / "config.json", bundle / "config.json")
    (bundle / "model.nwc").write_bytes(b"")
    with pytest.raises(ValueError, match="compressed bundle"):
        evaluate_pair(smollm2_dir, bundle, "text", max_tokens=8)
