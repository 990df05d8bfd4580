#!/usr/bin/env bash
# Installs the two LLM gateways the benchmark compares sluice with, pinned,
# under target/gateways/ (so a clean checkout does not carry them and
# `cargo clean` removes them):
#   - LiteLLM's proxy, PyPI `litellm[proxy]`, in a Python venv:
#       target/gateways/litellm-venv/bin/litellm
#   - Portkey's gateway, npm `@portkey-ai/gateway`, in an npm prefix:
#       target/gateways/portkey/node_modules/@portkey-ai/gateway/build/start-server.js
# Skips a gateway already installed at its pinned version. Prints one line per
# gateway and always exits 0: the benchmark skips a gateway that is missing.
# Environment: PYTHON (default python3; litellm wants 3.10 to 3.14), NODE and NPM
# (default node, npm; 18.14 or later).
set -euo pipefail

# The newest litellm whose [proxy] extra resolves on the registry reached here:
# 1.108.8 and later pin companion packages (litellm-enterprise 0.1.79.post2,
# litellm-proxy-extras 0.4.110.post1, litellm-proxy) that it does not have.
LITELLM_VERSION=1.108.7
PORTKEY_VERSION=1.15.2
# The gateway's dependency range lets npm pick @hono/node-server 1.14 and later,
# whose lightweight Response keeps the upstream fetch's immutable headers:
# every streamed answer then fails with a 500 "Something went wrong" and
# "TypeError: immutable" in the log (Portkey-AI/gateway issue 1389). Pinned
# back to the last release that copies them; @hono/node-ws 1.3 wants >= 1.19.
PORTKEY_OVERRIDES='"@hono/node-server": "1.13.8", "@hono/node-ws": "1.2.0"'

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD/target/gateways
VENV=$ROOT/litellm-venv
PORTKEY=$ROOT/portkey
PYTHON=${PYTHON:-python3}
NODE=${NODE:-node}
NPM=${NPM:-npm}
mkdir -p "$ROOT"

# A log's first error line (else its last line), as a reason.
reason() {
    local line
    line=$(grep -E '^ERROR|^npm (ERR!|error) |Error:' "$1" 2>/dev/null |
        grep -v -E 'complete log|(ERR!|error) code ' | head -n 1 || true)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 || true)
    printf '%s' "${line:0:300}"
}

litellm_version() {
    [ -x "$VENV/bin/litellm" ] || return 1
    # The proxy extra too: litellm's proxy server imports fastapi, uvicorn and backoff.
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
import fastapi, uvicorn, backoff, yaml  # noqa: F401  (the [proxy] extra)
print(m.version("litellm"))
EOF
}

install_litellm() {
    local log=$ROOT/litellm-install.log
    if [ "$(litellm_version || true)" = "$LITELLM_VERSION" ]; then
        echo "litellm $LITELLM_VERSION already installed at $VENV"
        return 0
    fi
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "could not install litellm: $PYTHON not found"
        return 0
    fi
    local start=$SECONDS
    {
        rm -rf "$VENV" &&
            "$PYTHON" -m venv "$VENV" &&
            "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip &&
            "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
                "litellm[proxy]==$LITELLM_VERSION"
    } >"$log" 2>&1 || {
        echo "could not install litellm: $(reason "$log") (log: $log)"
        return 0
    }
    local got
    got=$(litellm_version || true)
    if [ "$got" = "$LITELLM_VERSION" ]; then
        echo "litellm $LITELLM_VERSION installed at $VENV in $((SECONDS - start)) s"
    else
        echo "could not install litellm: got version '${got:-none}' (log: $log)"
    fi
}

portkey_manifest() {
    printf '{"private": true, "dependencies": {"@portkey-ai/gateway": "%s"}, "overrides": {%s}}\n' \
        "$PORTKEY_VERSION" "$PORTKEY_OVERRIDES"
}

portkey_version() {
    local pkg=$PORTKEY/node_modules/@portkey-ai/gateway
    [ -f "$pkg/build/start-server.js" ] || return 1
    # Installed with the overrides of this script, not an older one's.
    [ "$(cat "$PORTKEY/package.json" 2>/dev/null)" = "$(portkey_manifest)" ] || return 1
    "$NODE" -p "require('$pkg/package.json').version" 2>/dev/null
}

install_portkey() {
    local log=$ROOT/portkey-install.log
    if [ "$(portkey_version || true)" = "$PORTKEY_VERSION" ]; then
        echo "portkey $PORTKEY_VERSION already installed at $PORTKEY"
        return 0
    fi
    if ! command -v "$NODE" >/dev/null 2>&1 || ! command -v "$NPM" >/dev/null 2>&1; then
        echo "could not install portkey: node or npm not found"
        return 0
    fi
    local start=$SECONDS
    {
        rm -rf "$PORTKEY" && mkdir -p "$PORTKEY" &&
            portkey_manifest >"$PORTKEY/package.json" &&
            "$NPM" install --prefix "$PORTKEY" --no-audit --no-fund --loglevel=error
    } >"$log" 2>&1 || {
        echo "could not install portkey: $(reason "$log") (log: $log)"
        return 0
    }
    local got
    got=$(portkey_version || true)
    if [ "$got" = "$PORTKEY_VERSION" ]; then
        echo "portkey $PORTKEY_VERSION installed at $PORTKEY in $((SECONDS - start)) s"
    else
        echo "could not install portkey: got version '${got:-none}' (log: $log)"
    fi
}

install_litellm
install_portkey
exit 0
