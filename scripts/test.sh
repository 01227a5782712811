#!/usr/bin/env bash
# Run the checks CI runs: set-up (idempotent), lint, then the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_assets.py -k wiki`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -x "$@"
