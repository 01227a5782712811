"""Whole-model quality checks on real text: perplexity, original-vs-compressed comparison, greedy generation.

Protocol (also recorded in every :class:`PerplexityResult` and :class:`EvalReport`): the model directory's own
tokenizer (for a comparison: the original model's) encodes the whole text without special tokens; the first
``max_tokens`` tokens are cut into non-overlapping windows of ``window`` tokens (the last one may be shorter).
A BOS token is prepended to every window only when the tokenizer adds one by default (Gemma does; SmolLM2 does
not). Every token of a window is predicted from the tokens before it in the same window, so without BOS the
first token of each window is not scored (8,192 tokens in windows of 1,024 score 8,184 tokens); with BOS every
token is scored. ppl = exp(total NLL / scored tokens), model in fp32.

:func:`evaluate_pair` runs the original and the compressed model on exactly the same windows and scored
positions and reports, besides both perplexities, the mean per-token KL(P_original || P_compressed) in nats and
the fraction of positions where both models' most likely next token agree, plus a greedy continuation of a
prompt by each model. It streams: one window at a time, and within a window the output head and the
log-softmax run over chunks of positions, so no full window of logits is ever held (see ``_Scorer``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codec.calibration import bos_id

# Positions per chunk of logits: this many bytes of fp32 logits per model at a time (49152-token vocab: 170).
_CHUNK_BYTES = 32 << 20


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


@dataclass(frozen=True)
class ModelEval:
    """One model's score in an :class:`EvalReport`: ``nll`` is the mean NLL per scored token (nats)."""

    ppl: float
    nll: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    """Original vs compressed model on the same scored tokens (see :func:`evaluate_pair`).

    ``kl`` is the mean over scored positions of KL(P_original || P_compressed) of the next-token
    distributions, in nats; ``top1_agreement`` the fraction of scored positions where both argmaxes agree.
    """

    protocol: str
    original: ModelEval
    compressed: ModelEval
    kl: float
    top1_agreement: float
    generation_prompt: str
    generation_original: str
    generation_compressed: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A short human-readable summary (what ``nwc eval`` prints)."""
        o, c = self.original, self.compressed
        return "\n".join([
            f"protocol: {self.protocol}",
            f"perplexity  original {o.ppl:.4f}  compressed {c.ppl:.4f}  "
            f"(x{c.ppl / o.ppl:.4f}; NLL {o.nll:.5f} -> {c.nll:.5f} nats/token, {o.n_tokens} tokens)",
            f"KL(original || compressed) {self.kl:.6f} nats/token; top-1 agreement {100 * self.top1_agreement:.2f} %",
            f"greedy {self.generation_prompt!r}",
            f"  original:   {self.generation_original!r}",
            f"  compressed: {self.generation_compressed!r}",
            f"{self.seconds:.1f} s",
        ])


# --------------------------------------------------------------------------- shared pieces

def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load_tokenizer(model_dir: Path) -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _load_model(model_dir: Path, device: str) -> Any:
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def _load(model_dir: Path, device: str) -> tuple[Any, Any]:
    return _load_tokenizer(model_dir), _load_model(model_dir, device)


def _token_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` ids of ``text``, encoded without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]


def _windows(ids: list[int], window: int, bos: int | None) -> Iterator[list[int]]:
    """Model inputs of the protocol: non-overlapping windows of ``window`` ids, ``bos`` prepended if given.

    Inputs shorter than 2 tokens (nothing to score) are skipped; each input scores ``len(input) - 1`` tokens.
    """
    if window < 1:
        raise ValueError("window must be at least 1 token")
    for start in range(0, len(ids), window):
        inputs = ([bos] if bos is not None else []) + ids[start : start + window]
        if len(inputs) >= 2:
            yield inputs


def _protocol(tokenizer_of: str, n_ids: int, max_tokens: int, window: int, bos: int | None, scored: int,
              device: str) -> str:
    return (
        f"tokenizer of {tokenizer_of} without special tokens; first {n_ids} tokens "
        f"(max_tokens={max_tokens}); non-overlapping windows of {window}; "
        + ("BOS prepended to every window, all tokens scored" if bos is not None
           else "no BOS, first token of each window unscored")
        + f"; {scored} scored tokens; fp32 on {device}"
    )


def _generate(tokenizer: Any, model: Any, prompt: str, max_new_tokens: int, device: str) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- single model

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
    ids = _token_ids(tokenizer, text, max_tokens)
    bos = bos_id(tokenizer)
    total_nll = 0.0
    scored = 0
    with torch.inference_mode():
        for inputs in _windows(ids, window, bos):
            x = torch.tensor([inputs], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            nll = F.cross_entropy(logits, x[0, 1:], reduction="sum")
            total_nll += float(nll.double())
            scored += len(inputs) - 1
    if scored == 0:
        raise ValueError("text too short: no token to score")
    mean = total_nll / scored
    protocol = _protocol(Path(model_dir).name, len(ids), max_tokens, window, bos, scored, device)
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_tokens=scored, window=window, protocol=protocol)


def greedy_generate(
    model_dir: Path,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 16,
    device: str = "cpu",
) -> str:
    """Greedy continuation of ``prompt`` (only the newly generated text, special tokens dropped)."""
    tokenizer, model = _load(Path(model_dir), device)
    return _generate(tokenizer, model, prompt, max_new_tokens, device)


# --------------------------------------------------------------------------- original vs compressed

def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def _read_config(model_dir: Path, role: str) -> Any:
    """The model's transformers config, after checking the directory holds a loadable causal LM."""
    _offline()
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise ValueError(f"{role} model {model_dir} is not a directory")
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not has_weights and (model_dir / "model.nwc").is_file():
        raise ValueError(f"{role} model {model_dir} is a compressed bundle (model.nwc), not a dense model "
                         f"directory: run `nwc decompress {model_dir} -o DENSE` and evaluate DENSE")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # any failure means "not a transformers model directory"
        raise ValueError(f"{role} model {model_dir} has no readable transformers config: {exc}") from exc


def _not_causal_reason(config: Any) -> str | None:
    archs = list(getattr(config, "architectures", None) or [])
    causal = _causal_lm_classes()
    if archs:
        if any(a in causal or a.endswith("ForCausalLM") for a in archs):
            return None
        return f"not a causal language model (architectures: {', '.join(archs)})"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    return f"not a causal language model (model_type {config.model_type!r}, no architectures)"


def _check_comparable(original_dir: Path, compressed_dir: Path) -> tuple[Any, Any]:
    """Refuse (ValueError) unless both directories hold causal LMs with the same vocabulary; return configs."""
    configs = (_read_config(original_dir, "original"), _read_config(compressed_dir, "compressed"))
    problems = []
    for role, path, config in zip(("original", "compressed"), (original_dir, compressed_dir), configs, strict=True):
        reason = _not_causal_reason(config)
        if reason:
            problems.append(f"{role} model {path} is {reason}")
    vocab = [getattr(c.get_text_config(), "vocab_size", None) for c in configs]
    if vocab[0] != vocab[1]:
        problems.append(f"vocabulary sizes differ (original {vocab[0]}, compressed {vocab[1]})")
    if problems:
        raise ValueError(f"cannot compare {compressed_dir} with {original_dir}: " + "; ".join(problems))
    return configs


def _check_tokenizers(orig_tok: Any, comp_tok: Any, ids: list[int], text: str, max_tokens: int,
                      original_dir: Path, compressed_dir: Path) -> None:
    """Refuse unless the compressed model's tokenizer is the original's (same vocab, BOS rule, same ids)."""
    problem = None
    if orig_tok.get_vocab() != comp_tok.get_vocab():
        problem = f"tokenizer vocabularies differ ({len(orig_tok)} vs {len(comp_tok)} tokens)"
    elif bos_id(orig_tok) != bos_id(comp_tok):
        problem = f"BOS rules differ ({bos_id(orig_tok)} vs {bos_id(comp_tok)})"
    elif _token_ids(comp_tok, text, max_tokens) != ids:
        problem = "the two tokenizers encode the evaluation text differently"
    if problem:
        raise ValueError(f"cannot compare {compressed_dir} with {original_dir}: {problem}")


class _Scorer:
    """Next-token log-probabilities of one model for one window, a chunk of positions at a time.

    The decoder runs once per window (its hidden states are small: window x d); the output head and the
    log-softmax then run on ``chunk`` positions at a time, so at most ``chunk x vocab`` logits exist. This
    relies on ``logits = head(decoder(x))`` (with Gemma-style final soft-capping applied when configured);
    that is checked against the model's own forward on the first window, and if it does not hold the full
    window of logits is computed by the model and only the log-softmax is chunked.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        usable = self.decoder is not None and self.decoder is not model and self.head is not None
        self.split: bool | None = None if usable else False
        self._hidden: Any = None
        self._logits: Any = None

    def _head(self, hidden: Any) -> Any:
        import torch

        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def start(self, x: Any) -> None:
        """Run the model on one window ``x`` (shape 1 x T)."""
        import torch

        if self.split is None:  # first window: does head(decoder(x)) reproduce the model's logits?
            probe = x[:, :16]
            want = self.model(input_ids=probe, use_cache=False).logits[0].float()
            try:
                got = self._head(self.decoder(input_ids=probe, use_cache=False).last_hidden_state[0])
                self.split = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-3)
            except Exception:  # an architecture this split does not fit: use the model's own logits
                self.split = False
        self._hidden = self._logits = None
        if self.split:
            self._hidden = self.decoder(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
        else:
            self._logits = self.model(input_ids=x, use_cache=False).logits[0, :-1].float()

    def log_probs(self, lo: int, hi: int) -> Any:
        """log P(next token) at positions ``lo:hi`` of the current window (fp32, (hi - lo) x vocab)."""
        import torch

        logits = self._head(self._hidden[lo:hi]) if self.split else self._logits[lo:hi]
        return torch.log_softmax(logits, dim=-1)

    def finish(self) -> None:
        self._hidden = self._logits = None


def evaluate_pair(
    original_dir: Path,
    compressed_dir: Path,
    text: str,
    max_tokens: int = 16384,
    window: int = 2048,
    device: str = "cpu",
    prompt: str = "The capital of France is",
    max_new_tokens: int = 32,
    text_name: str = "caller-supplied text",
) -> EvalReport:
    """Compare a (decompressed, dense) model directory with its original on the same real text.

    Both models score exactly the same tokens: the original model's tokenizer encodes ``text`` once, the first
    ``max_tokens`` tokens are cut into the windows of :func:`perplexity` (``window`` is capped at the models'
    ``max_position_embeddings``, one less when a BOS is prepended). Window by window the original and then the
    compressed model run, and per scored position we accumulate each model's NLL,
    KL(P_original || P_compressed) and whether the argmaxes agree. Then each model greedily continues
    ``prompt`` (``max_new_tokens`` tokens). ``text_name`` describes the text source in the protocol string.

    Raises ValueError when either directory is not a causal LM, or when vocabularies or tokenizers differ.
    """
    import torch

    t0 = time.perf_counter()
    original_dir, compressed_dir = Path(original_dir), Path(compressed_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = _check_comparable(original_dir, compressed_dir)
    tokenizer = _load_tokenizer(original_dir)
    ids = _token_ids(tokenizer, text, max_tokens)
    _check_tokenizers(tokenizer, _load_tokenizer(compressed_dir), ids, text, max_tokens,
                      original_dir, compressed_dir)
    bos = bos_id(tokenizer)
    max_pos = [getattr(c.get_text_config(), "max_position_embeddings", None) for c in configs]
    limits = [m - (1 if bos is not None else 0) for m in max_pos if m]
    requested = window
    window = min([window, *limits])
    if window < 2:
        raise ValueError("window must be at least 2 tokens")

    models = (_load_model(original_dir, device), _load_model(compressed_dir, device))
    scorers = [_Scorer(m) for m in models]
    vocab = configs[0].get_text_config().vocab_size
    chunk = max(1, _CHUNK_BYTES // (4 * vocab))
    nll = [0.0, 0.0]
    kl = 0.0
    agree = 0
    scored = 0
    with torch.inference_mode():
        for inputs in _windows(ids, window, bos):
            x = torch.tensor([inputs], device=device)
            targets = x[0, 1:]
            for s in scorers:
                s.start(x)
            for lo in range(0, len(targets), chunk):
                hi = min(lo + chunk, len(targets))
                tgt = targets[lo:hi, None]
                lp_o = scorers[0].log_probs(lo, hi)
                lp_c = scorers[1].log_probs(lo, hi)
                nll[0] -= float(lp_o.gather(1, tgt).double().sum())
                nll[1] -= float(lp_c.gather(1, tgt).double().sum())
                kl += float((lp_o.exp() * (lp_o - lp_c)).sum(dim=-1).double().sum())
                agree += int((lp_o.argmax(dim=-1) == lp_c.argmax(dim=-1)).sum())
                del lp_o, lp_c
            for s in scorers:
                s.finish()
            scored += len(targets)
    if scored == 0:
        raise ValueError("text too short: no token to score")

    generations = [_generate(tokenizer, m, prompt, max_new_tokens, device) for m in models]
    del models, scorers
    capped = f" (requested {requested}, capped by max_position_embeddings)" if window != requested else ""
    protocol = (f"text: {text_name}; "
                + _protocol(f"{original_dir.name} (original)", len(ids), max_tokens, window, bos, scored, device)
                + f"{capped}; both models on the same windows and positions; KL(original || compressed) "
                f"and top-1 agreement averaged over the scored positions; greedy generation of "
                f"{max_new_tokens} new tokens")
    means = [n / scored for n in nll]
    evals = [ModelEval(ppl=math.exp(m), nll=m, n_tokens=scored) for m in means]
    return EvalReport(protocol=protocol, original=evals[0], compressed=evals[1], kl=kl / scored,
                      top1_agreement=agree / scored, generation_prompt=prompt,
                      generation_original=generations[0], generation_compressed=generations[1],
                      seconds=time.perf_counter() - t0)
