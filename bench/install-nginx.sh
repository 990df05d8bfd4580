#!/usr/bin/env bash
# Installs Debian's nginx for the comparison, if it is missing, and stops
# the service the package starts (the benchmark runs its own nginx).
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx is not installed; install it (Debian: apt-get install nginx-light) to compare" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
service nginx stop >/dev/null 2>&1 || true
