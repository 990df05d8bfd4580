//! Micro-benchmark of admission: what a rate-limit check costs per request
//! (route bucket; client bucket including hashing the key header), and the
//! memory per tracked client key. Run: `cargo bench --bench limit`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use http::{HeaderMap, HeaderName, HeaderValue};
use sluice::config::{RateLimitConfig, RateLimitPer};
use sluice::limit::Limiter;

/// The full run under `cargo bench`, a smoke run under `cargo test`.
fn scale() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        1_000
    }
}

fn limiter(per: RateLimitPer) -> Limiter {
    let config = RateLimitConfig {
        // High enough that every check is admitted: the cost of the common case.
        requests_per_minute: u32::MAX,
        burst: u32::MAX,
        per,
        client_key_header: HeaderName::from_static("authorization"),
        max_wait: Duration::ZERO,
        max_concurrent: 0,
    };
    Limiter::with_clock(&config, DefaultClock::default())
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n = scale() * 5;
    let route = limiter(RateLimitPer::Route);
    let started = Instant::now();
    for _ in 0..n {
        black_box(route.check(0)).ok();
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("rate limit check, per route: {ns:.1} ns/request");

    let client = limiter(RateLimitPer::Client);
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk-client-0123456789"),
    );
    let started = Instant::now();
    for _ in 0..n {
        let key = client.client_key(black_box(&headers));
        black_box(client.check(key)).ok();
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("rate limit check, per client (hash + lookup): {ns:.1} ns/request");

    let keys = scale();
    let many = limiter(RateLimitPer::Client);
    let before = rss_kib();
    for key in 1..=keys {
        many.check(key).ok();
    }
    let after = rss_kib();
    let per_key = (after.saturating_sub(before) * 1024) as f64 / keys as f64;
    println!(
        "memory: {keys} client keys tracked: +{} KiB RSS, {per_key:.0} bytes per key",
        after - before
    );
}
