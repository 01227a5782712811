"""Whole-model quality checks on real text: perplexity and greedy generation.

Protocol (also recorded in every :class:`PerplexityResult`): the model directory's own tokenizer encodes
the whole text without special tokens; the first ``max_tokens`` tokens are cut into non-overlapping
windows of ``window`` tokens (the last one may be shorter). A BOS token is prepended to every window
only when the tokenizer adds one by default (Gemma does; SmolLM2 does not). Every token of a window is
predicted from the tokens before it in the same window, so without BOS the first token of each window
is not scored (8,192 tokens in windows of 1,024 score 8,184 tokens); with BOS every token is scored.
ppl = exp(total NLL / scored tokens), model in fp32.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one text slice; ``nll`` is the mean NLL per scored token (nats)."""

    ppl: float
    nll: float
    n_tokens: int
    window: int
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(model_dir: Path, device: str) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return tokenizer, model


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def perplexity(
    model_dir: Path,
    text: str,
    max_tokens: int = 16384,
    window: int = 1024,
    device: str = "cpu",
) -> PerplexityResult:
    """Perplexity of the model in ``model_dir`` on the first ``max_tokens`` tokens of ``text``.

    See the module docstring for the exact protocol; it is also returned in ``protocol``.
    """
    import torch
    import torch.nn.functional as F

    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    tokenizer, model = _load(Path(model_dir), device)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    bos = _bos_id(tokenizer)
    total_nll = 0.0
    scored = 0
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            inputs = ([bos] if bos is not None else []) + chunk
            if len(inputs) < 2:
                continue
            x = torch.tensor([inputs], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            nll = F.cross_entropy(logits, x[0, 1:], reduction="sum")
            total_nll += float(nll.double())
            scored += len(inputs) - 1
    if scored == 0:
        raise ValueError("text too short: no token to score")
    mean = total_nll / scored
    protocol = (
        f"tokenizer of {Path(model_dir).name} without special tokens; first {len(ids)} tokens "
        f"(max_tokens={max_tokens}); non-overlapping windows of {window}; "
        + ("BOS prepended to every window, all tokens scored" if bos is not None
           else "no BOS, first token of each window unscored")
        + f"; {scored} scored tokens; fp32 on {device}"
    )
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_tokens=scored, window=window, protocol=protocol)


def greedy_generate(
    model_dir: Path,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 16,
    device: str = "cpu",
) -> str:
    """Greedy continuation of ``prompt`` (only the newly generated text, special tokens dropped)."""
    import torch

    tokenizer, model = _load(Path(model_dir), device)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
