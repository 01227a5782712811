"""Verification of a finished bundle in a fresh process: decode → load → generate → evaluate.

Artifacts that do not load are the most common complaint about compression tools (NOTES §4), so a compression
run is only "done" once a separate Python process — no state shared with the compressor — has decoded every
tensor and, for causal language models, loaded the dense model with transformers, generated text and measured
perplexity, KL and top-1 agreement against the original on held-out text.

    python -m codec.verify BUNDLE [--original SRC] [--dense DIR] [--eval-tokens N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

CAUSAL_LM_SUFFIX = "ForCausalLM"


@dataclass
class VerifyReport:
    ok: bool
    stage: str  # the last stage reached: decode | load | generate | evaluate | done
    error: str | None
    seconds: float
    causal_lm: bool
    generation: str | None = None
    evaluation: dict | None = None  # codec.evaluate.EvalReport.to_dict()

    def summary(self) -> str:
        if not self.ok:
            return f"verification FAILED at {self.stage}: {self.error}"
        if self.evaluation is None:
            return f"verified in a fresh process: every tensor decodes ({self.seconds:.0f} s)"
        e = self.evaluation
        return (f"verified in a fresh process: ppl {e['original']['ppl']:.3f} → {e['compressed']['ppl']:.3f}, "
                f"KL {e['kl']:.4f} nats/token, top-1 {100 * e['top1_agreement']:.1f} %, "
                f"generation {self.generation!r} ({self.seconds:.0f} s)")


def is_causal_lm(model_dir: Path) -> bool:
    cfg = model_dir / "config.json"
    if not cfg.exists():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith(CAUSAL_LM_SUFFIX) for a in archs)


def verify_bundle(bundle: Path, original: Path | None = None, dense: Path | None = None, eval_tokens: int = 2048,
                  device: str = "cpu") -> VerifyReport:
    """Run the checks in this process (use `verify_in_fresh_process` from a compressor)."""
    from codec.pipeline import decompress_model

    t0 = time.time()
    bundle = Path(bundle)
    causal = bundle.is_dir() and is_causal_lm(bundle)
    stage = "decode"
    with tempfile.TemporaryDirectory(prefix="nwc-verify-") as tmp:
        try:
            out = Path(dense) if dense else Path(tmp) / "dense"
            decompress_model(bundle, out, device=device, progress=False)
            if not causal:
                return VerifyReport(True, "done", None, time.time() - t0, False)
            stage = "load"
            from codec.evaluate import evaluate_pair, greedy_generate

            stage = "generate"
            generation = greedy_generate(out, max_new_tokens=16, device=device)
            evaluation = None
            if original is not None:
                stage = "evaluate"
                from codec.assets import eval_text

                evaluation = evaluate_pair(Path(original), out, eval_text(), max_tokens=eval_tokens, window=1024,
                                           device=device, text_name="held-out Wikipedia (codec.assets.eval_text)")
                evaluation = evaluation.to_dict()
            return VerifyReport(True, "done", None, time.time() - t0, True, generation, evaluation)
        except Exception as e:  # the report carries the failure; the caller decides the exit code
            return VerifyReport(False, stage, f"{type(e).__name__}: {e}", time.time() - t0, causal)


def verify_in_fresh_process(bundle: Path, original: Path | None = None, dense: Path | None = None,
                            eval_tokens: int = 2048, device: str = "cpu", timeout: float = 3600,
                            poll: Callable[[float], None] | None = None,
                            poll_interval: float = 0.5) -> VerifyReport:
    """`verify_bundle` in a new Python process; a crash of that process is a failed verification too.

    `poll(elapsed_seconds)` is called every `poll_interval` while the verifier runs (a service renews its lease
    and reports progress there); an exception it raises kills the verifier and propagates."""
    with tempfile.TemporaryDirectory(prefix="nwc-verify-") as tmp:
        result, log = Path(tmp) / "verify.json", Path(tmp) / "verify.log"
        cmd = [sys.executable, "-m", "codec.verify", str(bundle), "--json", str(result),
               "--eval-tokens", str(eval_tokens), "--device", device]
        if original is not None:
            cmd += ["--original", str(original)]
        if dense is not None:
            cmd += ["--dense", str(dense)]
        t0 = time.time()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        proc.wait(poll_interval)
                        break
                    except subprocess.TimeoutExpired:
                        elapsed = time.time() - t0
                        if elapsed > timeout:
                            return VerifyReport(False, "timeout", f"verification exceeded {timeout:.0f} s", elapsed,
                                                False)
                        if poll is not None:
                            poll(elapsed)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if not result.exists():
            tail = log.read_text(errors="replace")[-2000:]
            return VerifyReport(False, "process", f"verifier exited {proc.returncode}: {tail}", time.time() - t0,
                                False)
        return VerifyReport(**json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codec.verify", description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--original", type=Path, default=None)
    ap.add_argument("--dense", type=Path, default=None, help="keep the decoded dense model here")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        rep = verify_bundle(args.bundle, args.original, args.dense, args.eval_tokens, args.device)
    except Exception as e:  # noqa: BLE001 - never die without a report
        rep = VerifyReport(False, "verifier", "".join(traceback.format_exception_only(e)).strip(), 0.0, False)
    if args.json:
        args.json.write_text(json.dumps(asdict(rep)))
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
