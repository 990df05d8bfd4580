#!/usr/bin/env bash
# Install the official openai SDKs used by the end-to-end SDK tests:
#   - Python: a venv at <repo>/.venv with tests/sdk/requirements.txt
#   - Node:   tests/sdk/node/node_modules from package-lock.json (npm ci)
# and the real components tests start themselves: redis-server (the shared
# limit store's tests) and prometheus with promtool (the observability
# checks), from Debian's packages.
# Idempotent; safe to run from any directory. Prints one line per step.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# The interpreters themselves: on a fresh Debian machine, installed from
# Debian's packages when we are root, or through sudo where it asks for no
# password (never a prompt: CI has no terminal); otherwise a clear line on
# what to install.
missing=()
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3 python3-venv)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# promtool and prometheus (scripts/check-observability.sh): both in Debian's
# prometheus, installed without its recommends (the node exporter, a daemon
# of its own) and only when one of the two is missing.
prometheus=()
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || prometheus=(prometheus)
if [ $((${#missing[@]} + ${#prometheus[@]})) -gt 0 ]; then
    as_root=()
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        as_root=(sudo -n)
    fi
    if ! command -v apt-get >/dev/null 2>&1 || { [ "$(id -u)" != 0 ] && [ ${#as_root[@]} -eq 0 ]; }; then
        hints=()
        [ ${#missing[@]} -eq 0 ] || hints+=("apt-get install ${missing[*]}")
        [ ${#prometheus[@]} -eq 0 ] || hints+=("apt-get install --no-install-recommends prometheus")
        all=("${missing[@]}" "${prometheus[@]}")
        echo "install-sdks: missing ${all[*]} (Debian, as root: $(printf '%s; ' "${hints[@]}" | sed 's/; $//'))" >&2
        exit 1
    fi
    apt_install() {
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }
    "${as_root[@]}" apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install-sdks: apt-get install ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    if [ ${#prometheus[@]} -gt 0 ]; then
        echo "install-sdks: apt-get install --no-install-recommends prometheus"
        apt_install --no-install-recommends prometheus
        # Where invoke-rc.d may start services (no policy-rc.d forbidding
        # it), the package starts its daemon on :9090: stop it. The checks
        # run their own prometheus on a free port.
        if [ -x /etc/init.d/prometheus ] && "${as_root[@]}" /etc/init.d/prometheus status >/dev/null 2>&1; then
            echo "install-sdks: stopping the prometheus daemon the package started"
            "${as_root[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        fi
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
