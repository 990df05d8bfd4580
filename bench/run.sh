#!/usr/bin/env bash
# The benchmark in one command: nginx from Debian and the LLM gateways
# (LiteLLM, Portkey) if missing, a release build, then the full run (about
# 30 minutes, 5 of them the soak). The results replace the generated section
# of BENCHMARKS.md, the charts (bench-*.svg) are written beside it, and the
# raw figures go to target/bench-results.json. Extra arguments go to
# sluice-bench (e.g. --soak 0, --seconds 5, --no-nginx, --baseline PATH; see
# --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench/install-nginx.sh || echo "running without nginx" >&2
# Prints one line per gateway and never fails: a gateway that cannot be
# installed is left out of the run, which says so.
bench/install-gateways.sh
cargo build --release --locked -p sluice -p sluice-bench
# --usage-off: a second sluice with usage reading off, to show what it costs.
# --shared-limit: the same request limit per process and in a redis-server
# (Debian's; installed by scripts/install-sdks.sh), to show what Redis costs.
# --trace: a sluice that traces every request to a local OTLP sink.
# --logs-off: sluice and nginx with their access logs off as well.
# --llm-layer: model routing, a token limit and usage injection against the
# plain route with the same requests.
# --gateways: LiteLLM and Portkey, as installed above.
command -v redis-server >/dev/null || { echo "needs redis-server (scripts/install-sdks.sh installs it)" >&2; exit 1; }
exec target/release/sluice-bench --usage-off --shared-limit --trace --logs-off --llm-layer --gateways \
    --out BENCHMARKS.md --json target/bench-results.json "$@"
