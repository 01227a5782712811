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

PPL_RATIO_BOUND_6BPW = 1.10
EVAL_TOKENS = 4096

EVAL_SNIPPET = """
import json, sys
from pathlib import Path
from codec.assets import eval_text
from codec.evaluate import greedy_generate, perplexity
d = Path(sys.argv[1])
r = perplexity(d, eval_text(), max_tokens=int(sys.argv[2]), window=1024)
print(json.dumps({"ppl": r.ppl, "n": r.n_tokens, "gen": greedy_generate(d, max_new_tokens=8)}))
"""


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _eval_fresh(model_dir: Path) -> dict:
    return json.loads(_run("-c", EVAL_SNIPPET, str(model_dir), str(EVAL_TOKENS)).strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_compress_decompress_smollm2_6bpw(smollm2_dir: Path, tmp_path: Path):
    bundle, dense = tmp_path / "bundle", tmp_path / "dense"
    out = _run("-m", "codec.cli", "compress", str(smollm2_dir), "-o", str(bundle), "--bits", "6", "-q")
    assert "bits/weight" in out
    report = json.loads((bundle / "report.json").read_text())
    assert abs(report["measured_bits"] - 6) <= 0.05
    v = report["verification"]  # the CLI's own fresh-process check: load, generate, evaluate
    assert v["ok"] and v["causal_lm"] and v["generation"].strip(), v
    assert v["evaluation"]["compressed"]["ppl"] < PPL_RATIO_BOUND_6BPW * v["evaluation"]["original"]["ppl"]
    n_params = report["total_params"]
    assert abs(8 * (bundle / "model.nwc").stat().st_size / n_params - 6) <= 0.05
    _run("-m", "codec.cli", "decompress", str(bundle), "-o", str(dense), "-q")
    assert (dense / "config.json").exists() and list(dense.glob("*.safetensors"))

    original, compressed = _eval_fresh(smollm2_dir), _eval_fresh(dense)
    assert compressed["n"] == original["n"] > 3000
    assert compressed["ppl"] < PPL_RATIO_BOUND_6BPW * original["ppl"], (compressed, original)
    assert compressed["gen"].strip(), "the compressed model generates nothing"
