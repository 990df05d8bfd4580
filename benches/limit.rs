//! Micro-benchmark of admission: what a rate-limit check costs per request
//! (route bucket; client bucket including hashing the key header), and the
//! memory per tracked client key. Run: `cargo bench --bench limit`.

use std::hint::black_box;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use sluice::config::RateLimitPer;

#[path = "common.rs"]
mod common;
use common::{request_limiter, rss_kib, scale};

fn main() {
    let n = scale() * 5;
    let route = request_limiter(RateLimitPer::Route);
    let started = Instant::now();
    for _ in 0..n {
        black_box(route.check(0)).ok();
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("rate limit check, per route: {ns:.1} ns/request");

    let client = request_limiter(RateLimitPer::Client);
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
    let many = request_limiter(RateLimitPer::Client);
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
