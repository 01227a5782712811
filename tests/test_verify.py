"""Fresh-process verification: a good bundle passes, a bundle that cannot load is reported as failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from synthetic_model import write_synthetic_model

from codec.pipeline import compress_model
from codec.verify import verify_in_fresh_process


def test_non_lm_bundle_is_verified_by_decoding(tmp_path: Path):
    src = write_synthetic_model(tmp_path / "src")
    compress_model(src, tmp_path / "b", 4.0, device="cpu", progress=False)
    rep = verify_in_fresh_process(tmp_path / "b", src, dense=tmp_path / "dense")
    assert rep.ok and rep.stage == "done" and not rep.causal_lm, rep
    assert (tmp_path / "dense" / "model.safetensors").exists()


def test_poll_runs_while_verifying_and_can_stop_it(tmp_path: Path):
    """The poll hook is called while the verifier runs; raising from it kills the child and propagates."""
    import pytest

    src = write_synthetic_model(tmp_path / "src")
    compress_model(src, tmp_path / "b", 4.0, device="cpu", progress=False)
    polls: list[float] = []
    rep = verify_in_fresh_process(tmp_path / "b", src, poll=polls.append, poll_interval=0.05)
    assert rep.ok and polls and polls == sorted(polls)

    class Cancelled(Exception):
        pass

    def cancel(elapsed: float) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        verify_in_fresh_process(tmp_path / "b", src, dense=tmp_path / "dense", poll=cancel, poll_interval=0.05)
    assert not (tmp_path / "dense").exists()  # stopped before the decoded model was moved into place
    timed_out = verify_in_fresh_process(tmp_path / "b", src, timeout=0.01, poll_interval=0.05)
    assert not timed_out.ok and timed_out.stage == "timeout"


def test_bundle_that_does_not_load_fails_verification(tmp_path: Path):
    src = write_synthetic_model(tmp_path / "src")
    compress_model(src, tmp_path / "b", 4.0, device="cpu", progress=False)
    # Claim the weights are a Llama: transformers cannot build that model from these tensors.
    (tmp_path / "b" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 256}))
    rep = verify_in_fresh_process(tmp_path / "b", None)
    assert not rep.ok and rep.causal_lm and rep.stage in ("load", "generate"), rep
    assert rep.error


def test_cli_compress_fails_with_exit_3_when_verification_fails(tmp_path: Path):
    src = write_synthetic_model(tmp_path / "src")
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    res = subprocess.run([sys.executable, "-m", "codec.cli", "compress", str(src), "-o", str(tmp_path / "b"),
                          "--bits", "4", "-q"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "verification FAILED" in res.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["verification"]["ok"] is False
