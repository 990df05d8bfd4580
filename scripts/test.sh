#!/usr/bin/env bash
# Runs every test: unit, integration, and the end-to-end tests with the
# official openai SDKs (installed here into .venv and tests/sdk/node), a
# smoke run of the benchmark harness (bench/), and the observability checks
# (deploy/prometheus, deploy/grafana: scripts/check-observability.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-sdks.sh
cargo test --locked --workspace --all-targets "$@"
# The alert rules, dashboard and metric names against the sluice cargo test built.
scripts/check-observability.sh target/debug/sluice
