#!/usr/bin/env bash
# Quickstart: set up, compress SmolLM2-135M-Instruct to ~4 bits/weight, decompress it to a dense
# Hugging Face directory, and compare the result with the original.
# Caveat: SmolLM2's linear weights come from a Q4_1 GGUF (already on a 4-bit grid); see MODELS notes.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
PY=.venv/bin/python
NWC=.venv/bin/nwc

SMOL=$("$PY" -m codec.assets path smollm2)
mkdir -p runs
rm -rf runs/smollm2-4bit runs/smollm2-4bit-dense  # our own outputs from an earlier run

"$NWC" compress "$SMOL" -o runs/smollm2-4bit --bits 4
"$NWC" decompress runs/smollm2-4bit -o runs/smollm2-4bit-dense
"$NWC" inspect runs/smollm2-4bit | tail
"$PY" -m codec.assets compare "$SMOL" runs/smollm2-4bit-dense --bundle runs/smollm2-4bit
