"""Calibration token windows for calibration-guided compression (NOTES §1, step 1).

A calibration set is ``n_seq`` windows of ``seq_len`` tokens drawn from one text:

* ``"wiki"``: the built-in text, :func:`codec.assets.calib_text` (the first 80 % of the Wikipedia articles; the
  last 20 % are reserved for evaluation and never calibrate);
* a ``.txt`` file (UTF-8), used as is;
* a ``.jsonl`` file (UTF-8), one JSON object per line with a string field ``"text"``; the texts are joined by
  blank lines (``"\\n\\n"``, as the built-in text joins its articles). Blank lines are skipped.

Nothing else is read (no pickles, no other formats). The whole text is tokenized once with
``add_special_tokens=False``; then ``n_seq`` window offsets are drawn uniformly from ``0 … n_tokens − seq_len``
(with replacement, so windows may overlap) by a ``torch.Generator`` seeded with ``seed``. The result depends only
on (text, tokenizer, n_seq, seq_len, seed).

``sha256`` identifies the text: the hash of the file's raw bytes for a user file, and of the UTF-8 bytes of the
built-in text (which are the bytes of ``wiki_calib.txt``) for ``"wiki"``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUILTIN_SOURCES = ("wiki",)
SUFFIXES = (".txt", ".jsonl")
JSONL_SEPARATOR = "\n\n"


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message names the problem (and the file/line)."""


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """``n_seq`` token windows of ``seq_len`` tokens each, and where they came from."""

    input_ids: torch.Tensor  # int64 (n_seq, seq_len)
    source: str  # "wiki" or the resolved path of the user file
    sha256: str  # sha256 (hex) of the raw calibration text bytes
    seed: int
    n_text_tokens: int  # tokens in the whole text the windows were drawn from
    offsets: tuple[int, ...]  # start token of each window in that text

    @property
    def n_seq(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CalibrationError(f"calibration file not found: {path}")
    if not path.is_file():
        raise CalibrationError(f"calibration source is not a regular file: {path}")
    return path.read_bytes()


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {path} is not valid UTF-8 (byte {exc.start})") from None


def _jsonl_text(text: str, path: Path) -> str:
    parts: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f'{path} line {lineno}: expected a JSON object with a string "text" field')
        parts.append(obj["text"])
    return JSONL_SEPARATOR.join(parts)


def read_calibration_text(source: str | Path) -> tuple[str, str, str]:
    """(text, source label, sha256 of the raw bytes) for ``"wiki"`` or a ``.txt`` / ``.jsonl`` path."""
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        from codec import assets

        text = assets.calib_text()
        return text, source, hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CalibrationError(
            f"unknown calibration source {str(source)!r}: use 'wiki' or a file ending in {' or '.join(SUFFIXES)}"
        )
    raw = _read_bytes(path)
    text = _decode(raw, path)
    if suffix == ".jsonl":
        text = _jsonl_text(text, path)
    return text, str(path.resolve()), hashlib.sha256(raw).hexdigest()


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens) as int64 (N,)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one by default (Gemma), else None (Llama/SmolLM2 tokenizers)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def draw_windows(tokens: torch.Tensor, n_seq: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows int64 (n_seq, seq_len), offsets int64 (n_seq,)) at seeded uniform offsets."""
    n_offsets = tokens.numel() - seq_len + 1
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, n_offsets, (n_seq,), generator=gen, dtype=torch.int64)
    index = offsets[:, None] + torch.arange(seq_len, dtype=torch.int64)[None, :]
    return tokens[index], offsets


def load_calibration(
    source: str | Path, tokenizer, n_seq: int = 128, seq_len: int = 512, seed: int = 0
) -> CalibrationSet:
    """Draw ``n_seq`` seeded windows of ``seq_len`` tokens from ``source`` (see the module docstring)."""
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or n_seq < 1:
        raise CalibrationError(f"n_seq must be a positive integer, got {n_seq!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise CalibrationError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CalibrationError(f"seed must be a non-negative integer, got {seed!r}")
    text, label, digest = read_calibration_text(source)
    tokens = tokenize_text(text, tokenizer)
    if tokens.numel() < seq_len:
        raise CalibrationError(
            f"calibration text {label} is too short: it has {tokens.numel()} tokens, fewer than seq_len={seq_len}"
        )
    bos = bos_id(tokenizer)
    if bos is not None and seq_len < 2:
        raise CalibrationError("seq_len must be ≥ 2 for a model whose inputs start with BOS")
    windows, offsets = draw_windows(tokens, n_seq, seq_len - (bos is not None), seed)
    if bos is not None:  # the model is trained on BOS-led sequences (Gemma): calibrate on what it will see
        windows = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.int64), windows], dim=1)
    return CalibrationSet(
        input_ids=windows.contiguous(),
        source=label,
        sha256=digest,
        seed=seed,
        n_text_tokens=int(tokens.numel()),
        offsets=tuple(int(o) for o in offsets),
    )
