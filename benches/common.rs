//! What the limit benchmarks share (`#[path]`-included: benches are one
//! file each).

use std::time::Duration;

use governor::clock::DefaultClock;
use http::HeaderName;
use sluice::config::{RateLimitConfig, RateLimitPer};
use sluice::limit::Limiter;

/// The full run under `cargo bench`, a smoke run under `cargo test`.
pub fn scale() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        1_000
    }
}

/// A request limiter that admits every check: the cost of the common case.
pub fn request_limiter(per: RateLimitPer) -> Limiter {
    let config = RateLimitConfig {
        requests_per_minute: u32::MAX,
        burst: u32::MAX,
        per,
        client_key_header: HeaderName::from_static("authorization"),
        max_wait: Duration::ZERO,
        max_concurrent: 0,
        shared: false,
    };
    Limiter::with_clock(&config, DefaultClock::default())
}

/// This process's resident memory, KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
