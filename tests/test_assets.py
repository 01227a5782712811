"""The real assets load and behave as documented (no skips: these run on every CI run)."""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

import pytest

from codec import assets
from codec.evaluate import greedy_generate, perplexity


def test_smollm2_dir_is_a_plain_fp32_llama(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.5e6, n_params
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_smollm2_greedy_generation_knows_paris(smollm2_dir: Path) -> None:
    out = greedy_generate(smollm2_dir, "The capital of France is", max_new_tokens=8)
    assert "Paris" in out, out


def test_minilm_dir_loads(minilm_dir: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir)
    assert type(model).__name__ == "BertModel"
    assert abs(sum(p.numel() for p in model.parameters()) - 22.7e6) < 0.1e6


def test_wiki_split_is_deterministic_and_disjoint(calib_text: str, eval_text: str) -> None:
    digest = hashlib.sha256(calib_text.encode()).hexdigest()
    assert hashlib.sha256(assets.calib_text().encode()).hexdigest() == digest
    articles = assets.wiki_articles()
    assert len(articles) >= 90
    n_calib = int(len(articles) * assets.CALIB_FRACTION)
    assert calib_text == "\n".join(articles[:n_calib])
    assert eval_text == "\n".join(articles[n_calib:])
    calib_titles = {a.split("\n", 1)[0] for a in articles[:n_calib]}
    eval_titles = {a.split("\n", 1)[0] for a in articles[n_calib:]}
    assert calib_titles and eval_titles and not calib_titles & eval_titles
    assert eval_text[:1000] not in calib_text
    for text in (calib_text, eval_text):
        assert text.startswith(" = ") and "{{" not in text and "<ref" not in text and "[[" not in text


def test_wiki_parsing_is_reproducible() -> None:
    """A fresh parse of the dump gives exactly the cached articles (the cache is not hiding drift)."""
    wheel = assets.fetch_wheel(assets.GENSIM_WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        dump = assets._extract_member(wheel, assets.WIKI_MEMBER, Path(tmp) / "dump.xml.bz2")
        fresh = assets._parse_wiki_dump(dump)
    assert fresh == assets.wiki_articles()


@pytest.mark.slow
def test_smollm2_perplexity_on_eval_slice(smollm2_dir: Path, eval_text: str) -> None:
    result = perplexity(smollm2_dir, eval_text, max_tokens=8192, window=1024)
    assert result.n_tokens == 8184  # 8 windows of 1024, first token of each unscored (no BOS)
    assert math.isfinite(result.ppl) and 5 < result.ppl < 60, result
    assert "no BOS" in result.protocol
