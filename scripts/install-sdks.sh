#!/usr/bin/env bash
# Install the official openai SDKs used by the end-to-end SDK tests:
#   - Python: a venv at <repo>/.venv with tests/sdk/requirements.txt
#   - Node:   tests/sdk/node/node_modules from package-lock.json (npm ci)
# Idempotent; safe to run from any directory. Prints one line per step.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="$repo_root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "install-sdks: creating venv at .venv"
    python3 -m venv "$venv"
else
    echo "install-sdks: venv .venv already present"
fi

echo "install-sdks: pip install -r tests/sdk/requirements.txt"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt

echo "install-sdks: npm ci in tests/sdk/node"
(cd tests/sdk/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
