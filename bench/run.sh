#!/usr/bin/env bash
# The benchmark in one command: nginx from Debian if missing, a release
# build, then the full run (about 10 minutes, 5 of them the soak). The
# results replace the generated section of BENCHMARKS.md; the raw figures
# go to target/bench-results.json. Extra arguments go to sluice-bench
# (e.g. --soak 0, --seconds 5, --no-nginx; see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench/install-nginx.sh || echo "running without nginx" >&2
cargo build --release --locked -p sluice -p sluice-bench
# --usage-off: a second sluice with usage reading off, to show what it costs.
# --shared-limit: the same request limit per process and in a redis-server
# (Debian's; installed by scripts/install-sdks.sh), to show what Redis costs.
# --trace: a sluice that traces every request to a local OTLP sink.
command -v redis-server >/dev/null || { echo "needs redis-server (scripts/install-sdks.sh installs it)" >&2; exit 1; }
exec target/release/sluice-bench --usage-off --shared-limit --trace --out BENCHMARKS.md --json target/bench-results.json "$@"
