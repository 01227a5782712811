"""CLI end to end on a real small model: compress → decompress → transformers loads it in a fresh
process → perplexity on held-out real text stays within a stated bound of the original.

Bound at 6 bits/weight: perplexity ≤ 1.10 × the original's (measured: see docs/BENCHMARKS.md). SmolLM2's
linear weights sit on a Q4_1 grid (MODELS.md), so a 6-bit code re-quantizes an already 4-bit model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PPL_RATIO_BOUND_6BPW = 1.10
EVAL_TOKENS = 4096

def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_cli_compress_decompress_smollm2_6bpw(smollm2_dir: Path, tmp_path: Path):
    """The compressor's verification decodes the bundle, loads it with transformers, generates and evaluates both
    models in a fresh process; `nwc decompress` then gives the same dense tensors it evaluated."""
    from safetensors.torch import load_file

    bundle, verified, dense = tmp_path / "bundle", tmp_path / "verified", tmp_path / "dense"
    out = _run("-m", "codec.cli", "compress", str(smollm2_dir), "-o", str(bundle), "--bits", "6",
               "--eval-tokens", str(EVAL_TOKENS), "--dense", str(verified), "-q")
    assert "bits/weight" in out
    report = json.loads((bundle / "report.json").read_text())
    assert abs(report["measured_bits"] - 6) <= 0.05
    n_params = report["total_params"]
    assert abs(8 * (bundle / "model.nwc").stat().st_size / n_params - 6) <= 0.05
    v = report["verification"]
    assert v["ok"] and v["causal_lm"] and v["generation"].strip(), v
    original, compressed = v["evaluation"]["original"], v["evaluation"]["compressed"]
    assert compressed["n_tokens"] == original["n_tokens"] > 3000
    assert compressed["ppl"] < PPL_RATIO_BOUND_6BPW * original["ppl"], (compressed, original)

    _run("-m", "codec.cli", "decompress", str(bundle), "-o", str(dense), "-q")
    assert (dense / "config.json").exists()
    (a,), (b,) = (list(d.glob("*.safetensors")) for d in (dense, verified))
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
