#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer; nightly Rust) for
# SECONDS each (default 60), one after another, and exits non-zero if any
# of them crashed: a panic, a failed check, a timeout or running out of
# memory.
#
#   scripts/fuzz.sh [SECONDS]
#
# Installs cargo-fuzz from crates.io when it is missing. Each target starts
# from its seeds in fuzz/corpus/TARGET (kept in git, never written) and from
# what earlier runs found in fuzz/scratch/TARGET (not in git), where new
# inputs go. A crash is saved in fuzz/artifacts/TARGET/; replay it with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs="${1:-60}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS per target, default 60]" >&2
    exit 2
fi

# cargo-fuzz builds with -Zsanitizer=address: nightly, or else stable
# with RUSTC_BOOTSTRAP=1 (its rust-std ships the ASan runtime too).
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=+nightly
else
    echo "fuzz.sh: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
    toolchain=+stable
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

# A target directory of its own (fuzz/target): the sanitizer flags would
# rebuild everything in the workspace's.
unset CARGO_TARGET_DIR

if [ "$toolchain" = +stable ]; then
    export RUSTC_BOOTSTRAP=1
fi

targets=(request_head chunked response_head config retry_hint scan)
listed="$(cargo "$toolchain" fuzz list | sort | tr '\n' ' ')"
wanted="$(printf '%s\n' "${targets[@]}" | sort | tr '\n' ' ')"
if [ "$listed" != "$wanted" ]; then
    echo "fuzz.sh: the targets in fuzz/Cargo.toml ($listed) are not the ones run here ($wanted)" >&2
    exit 1
fi

echo "== cargo fuzz build (all targets)"
start=$SECONDS
cargo "$toolchain" fuzz build
echo "built in $((SECONDS - start)) s"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/scratch/$t" "fuzz/artifacts/$t"
    log="fuzz/scratch/$t.log"
    echo "== fuzz $t for ${secs} s"
    # New inputs go to the first directory; the seeds are only read.
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a
    # bounded parser has no business near 2 GiB.
    if cargo "$toolchain" fuzz run "$t" "fuzz/scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
        cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
        echo "ok: ${runs:-?} inputs, ${cov:-cov: ?}, corpus $(find "fuzz/scratch/$t" -type f | wc -l) files"
    else
        echo "CRASH in $t; the fuzzer's report (all of it in $log):"
        # From the panic or the sanitizer's report on, without stack frames.
        awk '/panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer/ { on = 1 }
             on && !/^ +[0-9]+: |^ +at |^ +#[0-9]+ 0x/ { print }' "$log" | head -40
        grep -E '^(Test unit written|Failing input)' -A2 "$log" | tail -3 || true
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, ${secs} s each, no crash"
