//! The shared bucket store (SPEC §11) against a real `redis-server`: two
//! replicas draw on one quota, a flushed script cache costs nothing, a
//! paused or absent Redis never holds a call past `timeout`, and only a
//! hash of the client key is stored. (The store is not wired to routes
//! yet: these drive `sluice::store` directly.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::store::{Store, StoreConfig, StoreError};

use crate::support::redis::Redis;

fn config(redis: &Redis, timeout_ms: u64) -> StoreConfig {
    StoreConfig {
        url: redis.url(),
        password: None,
        key_prefix: "sluice-test".into(),
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// A store that has connected (within 5 s).
async fn connected(config: &StoreConfig) -> Arc<Store> {
    let store = Store::start(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_connected() {
        assert!(Instant::now() < deadline, "no connection within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store
}

/// Two replicas sharing 600 a minute (10 a second) with a burst of 5 admit
/// at most burst + elapsed × rate between them, and about that many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_quota() {
    let redis = Redis::start();
    let cfg = config(&redis, 250);
    let (a, b) = (connected(&cfg).await, connected(&cfg).await);
    let start = Instant::now();
    let mut admitted = 0u64;
    while start.elapsed() < Duration::from_millis(1500) {
        for s in [&a, &b] {
            if s.charge("r", 0, 600, 5, 1).await.unwrap().is_ok() {
                admitted += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let most = 5.0 + elapsed * 10.0 + 1.0;
    assert!(
        (admitted as f64) <= most,
        "{admitted} admitted in {elapsed:.2} s"
    );
    assert!(
        admitted >= 12,
        "{admitted} admitted in {elapsed:.2} s: the quota was not used"
    );
    // A refusal says how long until the next one fits (at most 100 ms here).
    let wait = loop {
        if let Err(w) = a.charge("r", 0, 600, 5, 1).await.unwrap() {
            break w;
        }
    };
    assert!(wait <= Duration::from_millis(100), "{wait:?}");
}

/// `SCRIPT FLUSH` between calls: the script is loaded again, no call fails.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_without_a_failure() {
    let redis = Redis::start();
    let store = connected(&config(&redis, 500)).await;
    for i in 0..20 {
        if i % 5 == 0 {
            assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
        }
        assert!(
            store.charge("flush", 1, 6_000_000, 1_000, 1).await.is_ok(),
            "call {i}"
        );
    }
}

/// A paused Redis (`CLIENT PAUSE`) costs a call its `timeout`, no more; a
/// stopped one answers `Unavailable` or `Timeout` as fast; a Redis
/// started again is used again, by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_absent_redis_never_holds_a_call_past_its_timeout() {
    let mut redis = Redis::start();
    let store = connected(&config(&redis, 50)).await;
    assert_eq!(store.charge("slow", 1, 600, 5, 1).await, Ok(Ok(())));
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "1000", "ALL"]).trim(), "OK");
    let t = Instant::now();
    assert_eq!(
        store.charge("slow", 1, 600, 5, 1).await,
        Err(StoreError::Timeout)
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(400),
        "{took:?}"
    );
    redis.stop();
    for _ in 0..5 {
        let t = Instant::now();
        let got = store.charge("slow", 1, 600, 5, 1).await;
        assert!(got.is_err(), "{got:?}");
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
    let _again = Redis::start_on(redis.port);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if store.charge("slow", 1, 600, 5, 1).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "not used again within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sluice starts before Redis: calls are refused at once until it is up.
#[tokio::test]
async fn a_store_made_before_redis_is_up_connects_later() {
    let port = crate::support::refused_port();
    let cfg = StoreConfig {
        url: format!("redis://127.0.0.1:{port}/0"),
        password: None,
        key_prefix: "sluice-test".into(),
        timeout: Duration::from_millis(100),
    };
    let store = Store::start(&cfg).unwrap();
    let t = Instant::now();
    assert_eq!(
        store.charge("late", 1, 600, 5, 1).await,
        Err(StoreError::Unavailable)
    );
    assert!(t.elapsed() < Duration::from_millis(50));
    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.charge("late", 1, 600, 5, 1).await != Ok(Ok(())) {
        assert!(Instant::now() < deadline, "not connected within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Buckets of different keys are independent; Redis holds only the key's
/// hash (as hex), under the prefix, with a TTL.
#[tokio::test]
async fn keys_are_independent_hashed_and_expire() {
    let redis = Redis::start();
    let store = connected(&config(&redis, 500)).await;
    assert_eq!(store.charge("c", 0xabc, 60, 1, 1).await, Ok(Ok(())));
    assert!(store.charge("c", 0xabc, 60, 1, 1).await.unwrap().is_err());
    assert_eq!(store.charge("c", 0xdef, 60, 1, 1).await, Ok(Ok(())));
    let keys = redis.cli(&["KEYS", "*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["sluice-test:{c:abc}", "sluice-test:{c:def}"]);
    let ttl: i64 = redis
        .cli(&["PTTL", "sluice-test:{c:abc}"])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 2_000 + 1_000, "{ttl}");
}
