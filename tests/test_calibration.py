"""Calibration windows: determinism, provenance hash, user files, and a clear error for every bad input.

Runs on the real SmolLM2 tokenizer and the real Wikipedia calibration text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from codec import assets
from codec.calibration import CalibrationError, CalibrationSet, load_calibration, tokenize_text


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def wiki_set(tokenizer) -> CalibrationSet:
    return load_calibration("wiki", tokenizer, n_seq=16, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def articles() -> list[str]:
    # A few real calibration articles (the first ones of the 80 % calibration part).
    return assets.wiki_articles()[:3]


def _windows_match(cal: CalibrationSet, tokens: torch.Tensor) -> bool:
    return all(torch.equal(cal.input_ids[i], tokens[o:o + cal.seq_len]) for i, o in enumerate(cal.offsets))


def test_wiki_deterministic_and_hashed(wiki_set: CalibrationSet, tokenizer, calib_text: str) -> None:
    cal = wiki_set
    assert cal.input_ids.dtype == torch.int64 and cal.input_ids.shape == (16, 128)
    assert (cal.n_seq, cal.seq_len, cal.n_tokens, cal.seed, cal.source) == (16, 128, 2048, 0, "wiki")
    again = load_calibration("wiki", tokenizer, n_seq=16, seq_len=128, seed=0)
    assert torch.equal(again.input_ids, cal.input_ids) and again.offsets == cal.offsets
    assert again.sha256 == cal.sha256 == hashlib.sha256(calib_text.encode("utf-8")).hexdigest()
    assert cal.sha256 == hashlib.sha256(assets.asset_path("wiki_calib").read_bytes()).hexdigest()
    # Every window is a real slice of the tokenized text; offsets are in range and not all the same.
    tokens = tokenize_text(calib_text, tokenizer)
    assert cal.n_text_tokens == tokens.numel() > 100_000
    assert all(0 <= o <= tokens.numel() - 128 for o in cal.offsets) and len(set(cal.offsets)) > 1
    assert _windows_match(cal, tokens)
    # The calibration text never contains evaluation text.
    assert assets.eval_text()[:2000] not in calib_text


def test_seed_changes_windows(tmp_path: Path, tokenizer, articles: list[str]) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(articles), encoding="utf-8")
    a = load_calibration(path, tokenizer, n_seq=8, seq_len=64, seed=0)
    b = load_calibration(path, tokenizer, n_seq=8, seq_len=64, seed=1)
    a2 = load_calibration(str(path), tokenizer, n_seq=8, seq_len=64, seed=0)
    assert torch.equal(a.input_ids, a2.input_ids) and a.offsets == a2.offsets
    assert a.offsets != b.offsets and not torch.equal(a.input_ids, b.input_ids)
    assert a.sha256 == b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # A prefix of the windows does not depend on how many are drawn (one generator stream).
    c = load_calibration(path, tokenizer, n_seq=3, seq_len=64, seed=0)
    assert c.offsets == a.offsets[:3]


def test_txt_and_jsonl_files(tmp_path: Path, tokenizer, articles: list[str]) -> None:
    txt = tmp_path / "calib.TXT"
    txt.write_text(articles[0], encoding="utf-8")
    cal = load_calibration(txt, tokenizer, n_seq=4, seq_len=32, seed=3)
    tokens = tokenize_text(articles[0], tokenizer)
    assert cal.source == str(txt.resolve()) and cal.n_text_tokens == tokens.numel()
    assert cal.input_ids.shape == (4, 32) and _windows_match(cal, tokens)

    jsonl = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": a, "id": i}) for i, a in enumerate(articles)]
    jsonl.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")  # blank line skipped
    cal = load_calibration(jsonl, tokenizer, n_seq=5, seq_len=48, seed=7)
    tokens = tokenize_text("\n\n".join(articles), tokenizer)
    assert cal.n_text_tokens == tokens.numel() and _windows_match(cal, tokens)
    assert cal.sha256 == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    # A text exactly seq_len tokens long gives windows at offset 0 only.
    exact = load_calibration(txt, tokenizer, n_seq=2, seq_len=cal_len(txt, tokenizer))
    assert exact.offsets == (0, 0)


def cal_len(path: Path, tokenizer) -> int:
    return tokenize_text(path.read_text(encoding="utf-8"), tokenizer).numel()


def _raises(match: str, source, tokenizer, **kw) -> CalibrationError:
    with pytest.raises(CalibrationError, match=match) as info:
        load_calibration(source, tokenizer, **kw)
    assert isinstance(info.value, ValueError)
    return info.value


def test_bad_inputs(tmp_path: Path, tokenizer) -> None:
    _raises(r"calibration file not found: .*nope\.txt", tmp_path / "nope.txt", tokenizer)
    _raises(r"not found: .*nope\.jsonl", str(tmp_path / "nope.jsonl"), tokenizer)
    pkl = tmp_path / "calib.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")  # a real pickle: refused by suffix, never opened
    _raises(r"unknown calibration source .*calib\.pkl.*'wiki'.*\.txt or \.jsonl", pkl, tokenizer)
    _raises(r"unknown calibration source 'wikipedia'", "wikipedia", tokenizer)
    (tmp_path / "dir.txt").mkdir()
    _raises(r"not a regular file", tmp_path / "dir.txt", tokenizer)
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 au lait".encode("latin-1"))
    _raises(r"not valid UTF-8", bad_utf8, tokenizer)

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": "unterminated\n', encoding="utf-8")
    _raises(r"bad\.jsonl line 2: not valid JSON", jsonl, tokenizer)
    jsonl.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n', encoding="utf-8")
    _raises(r'bad\.jsonl line 3: expected a JSON object with a string "text" field', jsonl, tokenizer)
    jsonl.write_text('{"text": 42}\n', encoding="utf-8")
    _raises(r'line 1: expected a JSON object with a string "text"', jsonl, tokenizer)
    jsonl.write_text('["text", "a list"]\n', encoding="utf-8")
    _raises(r'line 1: expected a JSON object', jsonl, tokenizer)

    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    n = cal_len(short, tokenizer)
    _raises(rf"too short: it has {n} tokens, fewer than seq_len=512", short, tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    _raises(r"too short: it has 0 tokens", empty, tokenizer, seq_len=1)

    for kw, what in (({"n_seq": 0}, "n_seq"), ({"seq_len": -1}, "seq_len"), ({"seed": -2}, "seed"),
                     ({"n_seq": 2.0}, "n_seq")):
        _raises(rf"{what} must be", short, tokenizer, **kw)
