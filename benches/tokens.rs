//! Micro-benchmark of the token limit: what a request pays to be charged its
//! estimate and settled with its actual count (route bucket; client bucket
//! including hashing the key header), next to the request limiter's check;
//! the memory per tracked client key and the eviction sweep.
//! Run: `cargo bench --bench tokens`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use sluice::config::{Estimate, RateLimitPer, TokenLimitConfig};
use sluice::tokens::{Cell, TokenLimiter};

#[path = "common.rs"]
mod common;
use common::{request_limiter, rss_kib, scale};

/// One token a nanosecond, ten seconds' burst: every charge is admitted, and
/// each one (1,000 tokens, a microsecond) is still ahead of the clock when it
/// is settled (10 tokens), so the refund takes its compare-and-swap path.
const TPM: u64 = 60_000_000_000;
const ESTIMATE: u64 = 1_000;
const ACTUAL: u64 = 10;

fn tokens(per: RateLimitPer) -> TokenLimiter {
    TokenLimiter::without_eviction(&TokenLimitConfig {
        tokens_per_minute: TPM,
        burst: TPM / 6,
        per,
        client_key_header: HeaderName::from_static("authorization"),
        max_wait: Duration::ZERO,
        estimate: Estimate::default(),
        shared: false,
    })
}

/// ns per call of `op`, over `n` calls on each of `threads` threads.
fn per_op(n: u64, threads: u64, op: impl Fn() + Send + Sync) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| (0..n).for_each(|_| op()));
        }
    });
    started.elapsed().as_nanos() as f64 / n as f64
}

/// Charges and settles once, with one clock read as the proxy does (the
/// request's end reads the clock anyway, for its duration); panics on a
/// refusal (the figures would be of the wrong path).
fn charge_settle(l: &TokenLimiter, key: u64) {
    let now = tokio::time::Instant::now();
    let charge = l.check_at(key, black_box(ESTIMATE), now).expect("admitted");
    charge.settle_at(black_box(ACTUAL), now);
}

fn main() {
    let n = scale() * 5;
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk-client-0123456789"),
    );

    let route = request_limiter(RateLimitPer::Route);
    let ns = per_op(n, 1, || {
        black_box(route.check(0)).ok();
    });
    println!("request limit check, per route: {ns:.1} ns/request");
    let client = request_limiter(RateLimitPer::Client);
    let ns = per_op(n, 1, || {
        let key = client.client_key(black_box(&headers));
        black_box(client.check(key)).ok();
    });
    println!("request limit check, per client (hash + lookup): {ns:.1} ns/request");

    let route = tokens(RateLimitPer::Route);
    let ns = per_op(n, 1, || charge_settle(&route, 0));
    println!("token limit check + settle, per route: {ns:.1} ns/request");
    let ns = per_op(n, 2, || charge_settle(&route, 0));
    println!("token limit check + settle, per route, 2 threads on one bucket: {ns:.1} ns/request on each");
    // Where the time goes: the clock read, and the cell.
    let ns = per_op(n, 1, || {
        black_box(tokio::time::Instant::now());
    });
    println!("  of which the clock, tokio::time::Instant::now(): {ns:.1} ns/read");
    let now = tokio::time::Instant::now();
    let cell = Cell::new(TPM, TPM / 6, now);
    let ns = per_op(n, 1, || {
        cell.try_charge(black_box(ESTIMATE), now).expect("admitted");
        cell.settle(ESTIMATE, black_box(ACTUAL), now);
    });
    println!("  of which the cell, try_charge + settle at a given now: {ns:.1} ns/request");
    let client = tokens(RateLimitPer::Client);
    let ns = per_op(n, 1, || {
        let key = client.client_key(black_box(&headers));
        charge_settle(&client, key);
    });
    println!("token limit check + settle, per client (hash + lookup): {ns:.1} ns/request");
    let ns = per_op(n, 2, || {
        let key = client.client_key(black_box(&headers));
        charge_settle(&client, key);
    });
    println!(
        "token limit check + settle, per client, 2 threads on one key: {ns:.1} ns/request on each"
    );

    let keys = scale();
    let many = Arc::new(tokens(RateLimitPer::Client));
    let before = rss_kib();
    for key in 1..=keys {
        charge_settle(&many, key);
    }
    let after = rss_kib();
    let per_key = (after.saturating_sub(before) * 1024) as f64 / keys as f64;
    println!(
        "memory: {keys} client keys tracked: +{} KiB RSS, {per_key:.0} bytes per key",
        after.saturating_sub(before)
    );
    // Every bucket was left 10 ns ahead: all full again by now.
    std::thread::sleep(Duration::from_millis(1));
    let started = Instant::now();
    many.evict_stale();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(many.tracked_keys(), 0);
    println!("evict_stale over {keys} full buckets: {ms:.2} ms (the key map is locked that long)");
}
