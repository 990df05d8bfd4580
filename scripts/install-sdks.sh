#!/usr/bin/env bash
# Install the official openai SDKs used by the end-to-end SDK tests:
#   - Python: a venv at <repo>/.venv with tests/sdk/requirements.txt
#   - Node:   tests/sdk/node/node_modules from package-lock.json (npm ci)
# and the real components tests start themselves: redis-server (the shared
# limit store's tests), from Debian's package.
# Idempotent; safe to run from any directory. Prints one line per step.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# The interpreters themselves: on a fresh Debian machine, installed from
# Debian's packages when we are root; otherwise a clear line on what to install.
missing=()
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3 python3-venv)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install-sdks: apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "install-sdks: missing ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

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
