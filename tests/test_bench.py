"""The benchmark scripts' bookkeeping: sections render from the committed points (docs/data) with every field
filled in, and a resumed sweep keeps, skips or re-measures exactly the points it should."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench import calib_size, pruning, quality
from bench.quality import MODELS, Point

UNFILLED = re.compile(r"\{[A-Za-z_][\w.]*\}")  # a placeholder left by a string that lost its f-prefix


def sweep_args(**kw) -> argparse.Namespace:
    base = dict(model="smollm2", eval_tokens=4096, calib_seqs=16, calib_len=256, jobs=1, resume=False,
                render_only=True, redo=False, patterns=["0.5", "2:4", "4:8"])
    return argparse.Namespace(**{**base, **kw})


def saved_points(bench: str) -> list[dict]:
    return json.loads(MODELS["smollm2"].points_path(bench).read_text())["points"]


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]


@pytest.mark.parametrize("bench", ["quality", "calib_size"])
def test_quality_sections_render_every_point(bench: str) -> None:
    points = [Point(**p) for p in saved_points(bench)]
    render = quality.render if bench == "quality" else calib_size.render
    text = render(points, sweep_args(), 0.0)
    assert not UNFILLED.search(text), UNFILLED.search(text)
    assert len(table_rows(text)) == len(points)
    assert "Protocol: perplexity on the first 4096 tokens" in text and "FP32 original: perplexity 13.148." in text
    if bench == "quality":
        assert "Points measured on " in text and "**Goals**" in text


def test_pruning_section_renders_every_point() -> None:
    points = [pruning.PrunePoint(**p) for p in saved_points("pruning")]
    text = pruning.render(points, sweep_args(), 0.0)
    assert not UNFILLED.search(text), UNFILLED.search(text)
    assert "16 × 256 tokens" in text
    assert len([r for r in table_rows(text) if r.count("|") == 9]) == len(points)


def test_resume_and_redo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume measures only the missing points; --redo re-measures the asked ones and keeps the others."""
    old = Point("a", 3.0, 3.0, 20.0, 13.0, 0.5, 0.6, 1.0, 1.0, "x", "2026-01-01")
    saved = tmp_path / "points.json"
    calib = {"calib_seqs": 16, "calib_len": 256, "eval_tokens": 4096}
    saved.write_text(json.dumps({"calib": calib, "points": [asdict(old), asdict(replace(old, method="b"))]}))
    measured: list[tuple[str, float]] = []

    def fake_point(label, cli_args, target, args, text, runs) -> Point:
        measured.append((label, target))
        return replace(old, method=label, target=target, ppl=19.0, measured="2026-12-04")

    monkeypatch.setattr(quality, "run_point", fake_point)
    monkeypatch.setattr(quality, "eval_text", lambda: "text")
    variants = {"a": [], "b": []}

    got = quality.sweep(variants, [3.0, 4.0], sweep_args(render_only=False, resume=True), tmp_path, saved)
    assert sorted(measured) == [("a", 4.0), ("b", 4.0)]
    assert {(p.method, p.target, p.ppl) for p in got} >= {("a", 3.0, 20.0), ("b", 3.0, 20.0)}

    measured.clear()
    got = quality.sweep({"a": []}, [3.0], sweep_args(render_only=False, redo=True), tmp_path, saved)
    assert measured == [("a", 3.0)]
    by = {(p.method, p.target): p for p in got}
    assert by["a", 3.0].ppl == 19.0 and by["b", 3.0].ppl == 20.0 and len(got) == 4
    assert json.loads(saved.read_text())["points"] == [asdict(p) for p in got]
