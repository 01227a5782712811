#!/usr/bin/env bash
# The service in embedded mode: set up (idempotent), then `nwc serve` — SQLite, a local object directory and a
# local worker under NWC_DATA_DIR (default ~/.local/share/nwc), API on http://127.0.0.1:8000 (docs at /docs).
# The first start creates tenant "local" and prints its API key (also written to NWC_DATA_DIR/local-api-key).
# Extra arguments go to `nwc serve` (--host, --port, --no-worker). Ctrl-C stops the API and the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nwc serve "$@"
