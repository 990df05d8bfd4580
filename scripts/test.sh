#!/usr/bin/env bash
# Runs every test: unit, integration, and the end-to-end tests with the
# official openai SDKs (installed here into .venv and tests/sdk/node), and a
# smoke run of the benchmark harness (bench/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-sdks.sh
cargo test --locked --workspace --all-targets "$@"
