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

// Through sluice: `shared = true` on `[routes.rate_limit]`.

/// A route limited to `rpm` with `burst`, shared through `redis` (or a
/// store nobody listens on) with these store lines.
fn shared_config(
    upstream: &str,
    store_url: &str,
    store_lines: &str,
    rpm: u32,
    burst: u32,
) -> String {
    format!(
        "[rate_limit_store]\nurl = \"{store_url}\"\n{store_lines}\n\n{}\n[routes.rate_limit]\nrequests_per_minute = {rpm}\nburst = {burst}\nshared = true\n",
        crate::support::one_route(upstream, "")
    )
}

/// How many of `n` requests sent one after another got a 200.
async fn admitted(url: &str, n: usize) -> (usize, Vec<u16>) {
    let mut ok = 0;
    let mut statuses = Vec::new();
    for _ in 0..n {
        let status = crate::support::get(url).await.0.status().as_u16();
        ok += usize::from(status == 200);
        statuses.push(status);
    }
    (ok, statuses)
}

/// Two sluice processes share 60 a minute with a burst of 3 through one
/// Redis: between them, the burst and no more (at one a second, a few
/// seconds' worth at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sluice_processes_share_one_limit() {
    let redis = Redis::start();
    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{}",
        shared_config(&mock.url(), &redis.url(), "timeout = \"200ms\"", 60, 3)
    );
    let a = crate::support::Process::start(&toml, &[]).await;
    let b = crate::support::Process::start(&toml, &[]).await;
    // Each connects in the background: wait until both have admitted once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let start = Instant::now();
    let (mut ok_a, mut ok_b) = (0, 0);
    while ok_a == 0 || ok_b == 0 {
        assert!(
            Instant::now() < deadline,
            "no admission from both within 5 s"
        );
        ok_a += admitted(&a.url("/x"), 1).await.0;
        ok_b += admitted(&b.url("/x"), 1).await.0;
    }
    let (more_a, _) = admitted(&a.url("/x"), 10).await;
    let (more_b, statuses) = admitted(&b.url("/x"), 10).await;
    let total = ok_a + ok_b + more_a + more_b;
    let allowed = 3 + start.elapsed().as_secs() as usize + 1;
    assert!(
        total <= allowed,
        "{total} admitted, at most {allowed}: {statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.contains("sluice:{all:0}"), "{keys}");
}

/// The store is away: `deny` answers 503 `rate_limit_store_unavailable`,
/// `allow` admits everything, `local-share` admits the local share
/// (limit / replicas); the degraded gauge reads 1; /readyz stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_store_a_shared_limit_does_what_on_error_says() {
    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    let nobody = format!("redis://127.0.0.1:{}/0", crate::support::refused_port());
    let deny = shared_config(&mock.url(), &nobody, "on_error = \"deny\"", 600, 10);
    let proxy = crate::support::Sidecar::start(&deny, &[]).await;
    let (res, body) = crate::support::get(&proxy.url("/x")).await;
    assert_eq!(res.status(), 503);
    assert!(String::from_utf8_lossy(&body).contains("rate_limit_store_unavailable"));
    let allow = shared_config(&mock.url(), &nobody, "on_error = \"allow\"", 60, 1);
    let proxy = crate::support::Sidecar::start(&allow, &[]).await;
    assert_eq!(admitted(&proxy.url("/x"), 5).await.0, 5);
    // 60 a minute, burst 4, shared by 2 replicas: this one admits 2 at once.
    let share = shared_config(&mock.url(), &nobody, "replicas = 2", 60, 4);
    let proxy = crate::support::Sidecar::start(&share, &[]).await;
    assert_eq!(admitted(&proxy.url("/x"), 5).await.0, 2);
    let metrics =
        String::from_utf8_lossy(&crate::support::get(&proxy.admin_url("/metrics")).await.1)
            .into_owned();
    assert_eq!(
        crate::support::metric(&metrics, "sluice_rate_limit_degraded"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        crate::support::metric(
            &metrics,
            r#"sluice_rate_limit_store_requests_total{op="charge",result="unavailable"}"#
        )
        .is_some_and(|n| n >= 5.0),
        "{metrics}"
    );
    assert_eq!(
        crate::support::get(&proxy.admin_url("/readyz"))
            .await
            .0
            .status(),
        200
    );
}
