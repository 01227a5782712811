"""Real weights made small: SmolLM2 cut to its first decoder blocks (real weights, real tokenizer, seconds to
compress). Shared by the tests that need a real causal LM but not all 30 blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def cut_smollm2(src: Path, out: Path, blocks: int) -> Path:
    """Write SmolLM2 (`src`, the cached asset) cut to `blocks` decoder blocks into the new directory `out`."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = blocks
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
