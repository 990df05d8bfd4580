//! The shared bucket store (SPEC §11) against a real `redis-server`: two
//! replicas draw on one quota, a flushed script cache costs nothing, a
//! paused or absent Redis never holds a call past `timeout`, and only a
//! hash of the client key is stored. The first tests drive `sluice::store`
//! directly; the others go through sluice processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::store::{Kind, Store, StoreConfig, StoreError};

use crate::support::redis::{Cluster, Redis};

fn config(redis: &Redis, timeout_ms: u64) -> StoreConfig {
    StoreConfig {
        key_prefix: "sluice-test".into(),
        timeout: Duration::from_millis(timeout_ms),
        ..StoreConfig::new(redis.url())
    }
}

/// A store with metrics of its own.
fn start(config: &StoreConfig) -> Arc<Store> {
    let metrics = Arc::new(sluice::metrics::Metrics::default());
    Store::start(config, metrics.store())
}

/// A store that has connected (within 5 s).
async fn connected(config: &StoreConfig) -> Arc<Store> {
    let store = start(config);
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
            if s.charge(Kind::Requests, "r", 0, 600, 5, 1)
                .await
                .unwrap()
                .is_ok()
            {
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
        if let Err(refused) = a.charge(Kind::Requests, "r", 0, 600, 5, 1).await.unwrap() {
            break refused.wait;
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
            store
                .charge(Kind::Requests, "flush", 1, 6_000_000, 1_000, 1)
                .await
                .is_ok(),
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
    assert!(store
        .charge(Kind::Requests, "slow", 1, 600, 5, 1)
        .await
        .is_ok_and(|v| v.is_ok()));
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "1000", "ALL"]).trim(), "OK");
    let t = Instant::now();
    assert_eq!(
        store.charge(Kind::Requests, "slow", 1, 600, 5, 1).await,
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
        let got = store.charge(Kind::Requests, "slow", 1, 600, 5, 1).await;
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
        if store
            .charge(Kind::Requests, "slow", 1, 600, 5, 1)
            .await
            .is_ok()
        {
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
        timeout: Duration::from_millis(100),
        ..StoreConfig::new(format!("redis://127.0.0.1:{port}/0"))
    };
    let store = start(&cfg);
    let t = Instant::now();
    assert_eq!(
        store.charge(Kind::Requests, "late", 1, 600, 5, 1).await,
        Err(StoreError::Unavailable)
    );
    assert!(t.elapsed() < Duration::from_millis(50));
    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store
        .charge(Kind::Requests, "late", 1, 600, 5, 1)
        .await
        .is_ok_and(|v| v.is_ok())
    {
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
    assert!(store
        .charge(Kind::Requests, "c", 0xabc, 60, 1, 1)
        .await
        .is_ok_and(|v| v.is_ok()));
    assert!(store
        .charge(Kind::Requests, "c", 0xabc, 60, 1, 1)
        .await
        .unwrap()
        .is_err());
    assert!(store
        .charge(Kind::Requests, "c", 0xdef, 60, 1, 1)
        .await
        .is_ok_and(|v| v.is_ok()));
    let keys = redis.cli(&["KEYS", "*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["sluice-test:rq:{c:abc}", "sluice-test:rq:{c:def}"]);
    let ttl: i64 = redis
        .cli(&["PTTL", "sluice-test:rq:{c:abc}"])
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
        // deny: nothing is admitted locally before the connection is made.
        shared_config(
            &mock.url(),
            &redis.url(),
            "timeout = \"200ms\"\non_error = \"deny\"",
            60,
            3
        )
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
    assert!(keys.contains("sluice:rq:{all:0}"), "{keys}");
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

/// A metric of a sluice process (0 when absent).
async fn scrape(p: &crate::support::Process, series: &str) -> f64 {
    let url = format!("http://{}/metrics", p.admin.expect("an admin listener"));
    let text = crate::support::get(&url).await.1;
    crate::support::metric(&String::from_utf8_lossy(&text), series).unwrap_or(0.0)
}

/// One GET: its status and how long it took.
async fn timed(url: &str) -> (u16, Duration) {
    let t = Instant::now();
    let status = crate::support::get(url).await.0.status().as_u16();
    (status, t.elapsed())
}

fn process_toml(upstream: &str, store_url: &str, store_lines: &str, route: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [rate_limit_store]\nurl = \"{store_url}\"\n{store_lines}\n\n{}\n{route}\n",
        crate::support::one_route(upstream, "")
    )
}

/// Two sluices under load through a Redis that is flushed, paused, stopped
/// and started again:
/// - `SCRIPT FLUSH` mid-load fails no request;
/// - paused (`CLIENT PAUSE`), admission waits `timeout` and no more;
/// - stopped, every request is answered within `timeout` plus normal
///   latency, each process admits about limit / replicas, the degraded
///   gauge reads 1 and /readyz stays 200;
/// - started again, shared limiting resumes within about a second;
/// - each process logs the loss once and the recovery once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_paused_stopped_and_back_under_load() {
    let mut redis = Redis::start();
    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    // 10 a second with a burst of 10, shared by 2: locally 5 a second, burst 5.
    let route = "[routes.rate_limit]\nrequests_per_minute = 600\nburst = 10\nshared = true\n";
    let lines = "timeout = \"50ms\"\nreplicas = 2\non_error = \"local-share\"";
    let toml = process_toml(&mock.url(), &redis.url(), lines, route);
    let a = crate::support::Process::start(&toml, &[]).await;
    let b = crate::support::Process::start(&toml, &[]).await;
    let (ua, ub) = (a.url("/x"), b.url("/x"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape(
        &a,
        r#"sluice_rate_limit_store_requests_total{op="charge",result="ok"}"#,
    )
    .await
        == 0.0
        || scrape(
            &b,
            r#"sluice_rate_limit_store_requests_total{op="charge",result="ok"}"#,
        )
        .await
            == 0.0
    {
        assert!(Instant::now() < deadline, "both not connected within 5 s");
        timed(&ua).await;
        timed(&ub).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Flushed between requests: 200 or 429, never an error.
    for i in 0..30 {
        if i % 10 == 5 {
            assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
        }
        let url = if i % 2 == 0 { &ua } else { &ub };
        let (status, _) = timed(url).await;
        assert!(status == 200 || status == 429, "request {i}: {status}");
    }
    for p in [&a, &b] {
        let errors = scrape(
            p,
            r#"sluice_rate_limit_store_requests_total{op="charge",result="error"}"#,
        )
        .await;
        assert_eq!(errors, 0.0, "a flushed script failed a call");
        let count = scrape(
            p,
            r#"sluice_rate_limit_store_duration_seconds_count{op="charge"}"#,
        )
        .await;
        assert!(count >= 15.0, "calls timed: {count}");
    }

    // Paused: each admission waits the 50 ms timeout, then local-share decides.
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).trim(), "OK");
    for _ in 0..4 {
        let (status, took) = timed(&ua).await;
        assert!(status == 200 || status == 429, "{status}");
        assert!(took < Duration::from_millis(50 + 450), "paused: {took:?}");
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;

    // Stopped: each process on its own share.
    redis.stop();
    // The local buckets fill (5 a second, burst 5) while nothing is sent.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    let (mut ok_a, mut ok_b, mut slowest) = (0, 0, Duration::ZERO);
    while start.elapsed() < Duration::from_secs(1) {
        for (url, ok) in [(&ua, &mut ok_a), (&ub, &mut ok_b)] {
            let (status, took) = timed(url).await;
            assert!(status == 200 || status == 429, "{status}");
            *ok += usize::from(status == 200);
            slowest = slowest.max(took);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(
        slowest < Duration::from_millis(50 + 450),
        "slowest {slowest:?}"
    );
    // The burst of 5 and 5 a second: about 10 each in a second, never the
    // whole limit (10 + 10) each.
    let most = (5.0 + 5.0 * secs + 1.0) as usize;
    for (name, ok) in [("a", ok_a), ("b", ok_b)] {
        assert!(
            (4..=most).contains(&ok),
            "{name} admitted {ok} in {secs:.2} s (most {most})"
        );
    }
    for p in [&a, &b] {
        assert_eq!(scrape(p, "sluice_rate_limit_degraded").await, 1.0);
        let url = format!("http://{}/readyz", p.admin.unwrap());
        assert_eq!(crate::support::get(&url).await.0.status(), 200);
    }

    // Back on the same port: shared again within about a second.
    let redis = Redis::start_on(redis.port);
    let back = Instant::now();
    let mut resumed = [None, None];
    while resumed.iter().any(Option::is_none) {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not resumed within 5 s"
        );
        for (i, (url, p)) in [(&ua, &a), (&ub, &b)].into_iter().enumerate() {
            if resumed[i].is_none() {
                timed(url).await;
                if scrape(p, "sluice_rate_limit_degraded").await == 0.0 {
                    resumed[i] = Some(back.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for took in resumed.into_iter().flatten() {
        assert!(took < Duration::from_millis(3000), "resumed after {took:?}");
    }
    assert!(
        redis.keys().iter().any(|k| k == "sluice:rq:{all:0}"),
        "{:?}",
        redis.keys()
    );
    for p in [&a, &b] {
        let out = p.output();
        let lost = out.matches("rate_limit_store: no verdict").count();
        let back = out.matches("rate_limit_store: answering again").count();
        assert_eq!((lost, back), (1, 1), "logged once each way:\n{out}");
    }
}

/// Per-client shared buckets are independent, and neither Redis nor the
/// log ever holds a client key's raw value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_shared_buckets_keep_only_a_hash() {
    let redis = Redis::start();
    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    let route = "[routes.rate_limit]\nrequests_per_minute = 60\nburst = 2\nper = \"client\"\nshared = true\n";
    let toml = format!(
        "[log]\nlevel = \"debug\"\n{}",
        process_toml(&mock.url(), &redis.url(), "timeout = \"200ms\"", route)
    );
    let a = crate::support::Process::start(&toml, &[]).await;
    let b = crate::support::Process::start(&toml, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape(&a, "sluice_rate_limit_degraded").await != 0.0
        || scrape(&b, "sluice_rate_limit_degraded").await != 0.0
        || redis.cli(&["CLIENT", "LIST"]).lines().count() < 3
    {
        assert!(Instant::now() < deadline, "not connected within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let send = |p: &crate::support::Process, secret: &'static str| {
        let url = p.url("/x");
        async move {
            let req = http::Request::get(url)
                .header("authorization", format!("Bearer {secret}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let res = crate::support::send(&crate::support::client(), req).await;
            res.status().as_u16()
        }
    };
    // Alice twice through a, then once through b: her burst of 2 is spent.
    let alice = "sk-alice-SECRET-1";
    let bob = "sk-bob-SECRET-2";
    assert_eq!(send(&a, alice).await, 200);
    assert_eq!(send(&a, alice).await, 200);
    assert_eq!(send(&b, alice).await, 429);
    // Bob's bucket is his own.
    assert_eq!(send(&b, bob).await, 200);
    assert_eq!(send(&a, bob).await, 200);
    assert_eq!(send(&a, bob).await, 429);
    let keys = redis.keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(k.starts_with("sluice:rq:{all:"), "{k}");
        assert!(!k.contains("SECRET") && !k.contains("alice"), "{k}");
        let value = redis.cli(&["GET", k]);
        assert!(value.trim().parse::<u64>().is_ok(), "{k}: {value}");
    }
    for p in [&a, &b] {
        let out = p.output();
        assert!(!out.contains("SECRET"), "a client key in the log:\n{out}");
    }
}

/// A shared token limit: a debt settled on one process is owed by the
/// other (the settle lands in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_token_limit_settles_in_redis_for_every_replica() {
    let redis = Redis::start();
    // Every answer reports 5,000 tokens.
    let usage = r#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":4000,"completion_tokens":1000,"total_tokens":5000}}"#;
    let mock =
        crate::support::Mock::start(move |_| async move { crate::support::json(200, usage) }).await;
    // 100 tokens a second, a burst of 1,000; a request estimated at ~20.
    let route = "[routes.token_limit]\ntokens_per_minute = 6000\nburst = 1000\nshared = true\n";
    let toml = process_toml(&mock.url(), &redis.url(), "timeout = \"200ms\"", route);
    let a = crate::support::Process::start(&toml, &[]).await;
    let b = crate::support::Process::start(&toml, &[]).await;
    let post = |p: &crate::support::Process| {
        let url = p.url("/v1/chat/completions");
        async move {
            let body =
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    body.as_bytes(),
                )))
                .unwrap();
            crate::support::collect(crate::support::send(&crate::support::client(), req).await)
                .await
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.cli(&["CLIENT", "LIST"]).lines().count() < 3 {
        assert!(Instant::now() < deadline, "not connected within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (head, body) = post(&a).await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    // Settled off the response's path, shortly after: then b owes a's debt.
    let settle = r#"sluice_rate_limit_store_requests_total{op="settle",result="ok"}"#;
    let deadline = Instant::now() + Duration::from_secs(3);
    while scrape(&a, settle).await != 1.0 {
        assert!(Instant::now() < deadline, "a never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (head, body) = post(&b).await;
    crate::support::assert_sluice_error(&head, &body, 429, "rate_limit_exceeded");
    let h = |n: &str| head.headers()[n].to_str().unwrap().to_owned();
    assert_eq!(h("x-ratelimit-limit-tokens"), "6000");
    assert_eq!(h("x-ratelimit-remaining-tokens"), "0");
    let retry: u64 = h("retry-after").parse().unwrap();
    assert!((30..=60).contains(&retry), "about 40 s of debt: {retry}");
    assert!(
        redis.keys().iter().any(|k| k == "sluice:tk:{all:0}"),
        "{:?}",
        redis.keys()
    );
}

/// `rediss://`: a Redis that speaks only TLS, its CA given in `ca_file`;
/// without the CA the store never connects (the system does not trust it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_used_with_its_ca() {
    let certs = crate::support::certs::Certs::generate();
    let redis = Redis::start_tls(&certs);
    assert!(redis.url().starts_with("rediss://"));
    let trusted = StoreConfig {
        ca: Some(std::fs::read(&certs.ca_pem).unwrap()),
        timeout: Duration::from_millis(500),
        ..StoreConfig::new(redis.url())
    };
    let store = connected(&trusted).await;
    let got = store.charge(Kind::Requests, "tls", 1, 60, 1, 1).await;
    assert!(got.is_ok_and(|v| v.is_ok()));
    let untrusted = start(&StoreConfig {
        ca: None,
        ..trusted.clone()
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!untrusted.is_connected());
    // Through sluice, with ca_file.
    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    let lines = format!(
        "timeout = \"500ms\"\nca_file = \"{}\"\non_error = \"deny\"",
        certs.ca_pem.display()
    );
    burst_then_refused(&mock.url(), &redis.url(), &lines).await;
    assert!(redis.keys().iter().any(|k| k == "sluice:rq:{all:0}"));
}

/// A sluice limited to 60 a minute with a burst of 2 through the store at
/// `store_url` (with `on_error = "deny"` in `lines`): 503 until it has
/// connected, then the burst, then 429.
async fn burst_then_refused(upstream: &str, store_url: &str, lines: &str) {
    let route = "[routes.rate_limit]\nrequests_per_minute = 60\nburst = 2\nshared = true\n";
    let toml = process_toml(upstream, store_url, lines, route);
    let p = crate::support::Process::start(&toml, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut statuses = Vec::new();
    while !statuses.ends_with(&[429]) {
        assert!(Instant::now() < deadline, "{statuses:?}");
        statuses.push(timed(&p.url("/x")).await.0);
    }
    let served: Vec<u16> = statuses.into_iter().filter(|s| *s != 503).collect();
    assert_eq!(served, [200, 200, 429]);
}

/// A Redis Cluster of three masters: buckets spread over the nodes, two
/// stores share each one's quota, a flushed script cache on every node
/// fails no call, and a sluice with `cluster = true` limits through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_limits_on_a_three_node_cluster() {
    let cluster = Cluster::start();
    let urls = cluster.urls();
    let cfg = StoreConfig {
        cluster: true,
        nodes: urls[1..].to_vec(),
        timeout: Duration::from_millis(500),
        ..StoreConfig::new(&urls[0])
    };
    let (s1, s2) = (connected(&cfg).await, connected(&cfg).await);
    // 20 buckets of burst 3: each admits 3 between the two stores, then refuses.
    for route in 0..20 {
        let name = format!("route-{route}");
        let mut admitted = 0;
        for i in 0..6 {
            let s = if i % 2 == 0 { &s1 } else { &s2 };
            if i == 3 && route % 5 == 0 {
                for n in &cluster.nodes {
                    assert_eq!(n.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
                }
            }
            let got = s.charge(Kind::Requests, &name, 7, 60, 3, 1).await;
            admitted += usize::from(got.unwrap_or_else(|e| panic!("{name}: {e:?}")).is_ok());
        }
        assert_eq!(admitted, 3, "{name}");
    }
    let per_node: Vec<usize> = cluster.nodes.iter().map(|n| n.keys().len()).collect();
    assert_eq!(per_node.iter().sum::<usize>(), 20, "{per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "spread over every node: {per_node:?}"
    );

    let mock = crate::support::Mock::start(|_| async { crate::support::json(200, "{}") }).await;
    let nodes: Vec<String> = urls[1..].iter().map(|u| format!("\"{u}\"")).collect();
    let lines = format!(
        "timeout = \"500ms\"\ncluster = true\nnodes = [{}]\non_error = \"deny\"",
        nodes.join(", ")
    );
    burst_then_refused(&mock.url(), &urls[0], &lines).await;
    assert!(cluster.keys().iter().any(|k| k == "sluice:rq:{all:0}"));
}

/// A charge over the burst waits only until the bucket is full (a full
/// bucket admits any cost); a token key outlives its full bucket long
/// enough for a long stream to settle; a huge refund stays a refund.
#[tokio::test]
async fn over_the_burst_late_settles_and_huge_refunds() {
    let redis = Redis::start();
    let store = connected(&config(&redis, 500)).await;
    // 60,000 a minute: one unit a millisecond; a burst of 100.
    let charge = |cost| store.charge(Kind::Tokens, "t", 1, 60_000, 100, cost);
    assert!(charge(50).await.unwrap().is_ok());
    let refused = charge(500).await.unwrap().unwrap_err();
    // 50 ms from full; 500 is over the burst, so it waits for full, no more.
    assert!(refused.wait <= Duration::from_millis(50), "{refused:?}");
    assert!(refused.wait >= Duration::from_millis(40), "{refused:?}");
    let ttl: i64 = redis
        .cli(&["PTTL", "sluice-test:tk:{t:1}"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        ttl > 20 * 60 * 1000,
        "a token key outlives its bucket: {ttl} ms"
    );
    // A refund of i64::MIN units: the bucket is full, not in debt.
    store
        .settle(Kind::Tokens, "t", 1, 60_000, i64::MIN)
        .await
        .unwrap();
    assert!(charge(100).await.unwrap().is_ok(), "full after the refund");
    // A debt of 5,000 lands: the next charge waits about 5 s.
    store
        .settle(Kind::Tokens, "t", 1, 60_000, 5_000)
        .await
        .unwrap();
    let refused = charge(1).await.unwrap().unwrap_err();
    assert!(refused.ahead > Duration::from_secs(4), "{refused:?}");
}
