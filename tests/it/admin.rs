//! Operations: the admin endpoints, every metric present and moving, /readyz
//! during a drain, and live reload (in-process and through SIGHUP).

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::support::*;

#[tokio::test]
async fn healthz_readyz_and_metrics_answer() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let (head, body) = get(&proxy.admin_url("/healthz")).await;
    assert_eq!((head.status().as_u16(), &body[..]), (200, &b"ok\n"[..]));
    let (head, _) = get(&proxy.admin_url("/readyz")).await;
    assert_eq!(head.status(), 200);
    let (head, body) = get(&proxy.admin_url("/metrics")).await;
    assert_eq!(head.status(), 200);
    assert!(head.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(String::from_utf8_lossy(&body).ends_with("# EOF\n"));
    assert_eq!(get(&proxy.admin_url("/nope")).await.0.status(), 404);
    let post = Request::post(proxy.admin_url("/healthz"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client(), post).await.status(), 405);
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_present_and_moves_with_traffic() {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let mock = Mock::start(move |req| {
        let i = n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            match req.uri().path() {
                // First attempt fails, the retry succeeds.
                "/v1/flaky" if i == 0 => json(503, "{}"),
                "/v1/stream" => {
                    let (tx, body) = channel();
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from_static(b"data: 1\n\n")).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    });
                    sse(body)
                }
                _ => json(200, "{}"),
            }
        }
    })
    .await;
    let toml = format!(
        "{}\n[routes.timeouts]\nidle = \"200ms\"\n[routes.retry]\nbackoff_base = \"1ms\"\n[routes.rate_limit]\nrequests_per_minute = 60\nburst = 3\n",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    assert_eq!(get(&proxy.url("/v1/flaky")).await.0.status(), 200); // 2 attempts, 1 retry
    get(&proxy.url("/v1/stream")).await; // idle timeout mid-stream
    assert_eq!(get(&proxy.url("/v1/ok")).await.0.status(), 200);
    assert_eq!(get(&proxy.url("/v1/ok")).await.0.status(), 429); // burst of 3 used up
    proxy.reload("not toml at all [", &[]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = String::from_utf8(get(&proxy.admin_url("/metrics")).await.1.to_vec()).unwrap();
    for family in [
        "sluice_requests_total",
        "sluice_request_duration_seconds",
        "sluice_upstream_ttfb_seconds",
        "sluice_upstream_attempts_total",
        "sluice_retries_total",
        "sluice_retry_budget_exhausted_total",
        "sluice_rate_limited_total",
        "sluice_in_flight_requests",
        "sluice_stream_aborts_total",
        "sluice_config_reloads_total",
    ] {
        let name = family.trim_end_matches("_total");
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "{family} missing:\n{m}"
        );
    }
    for (prefix, expected) in [
        (r#"sluice_requests_total{route="all",status="200"}"#, 3.0),
        (r#"sluice_requests_total{route="all",status="429"}"#, 1.0),
        (r#"sluice_request_duration_seconds_count{route="all"}"#, 4.0),
        (
            r#"sluice_upstream_ttfb_seconds_count{route="all",upstream="up"}"#,
            4.0,
        ),
        (
            r#"sluice_upstream_attempts_total{route="all",upstream="up",outcome="5xx"}"#,
            1.0,
        ),
        (
            r#"sluice_upstream_attempts_total{route="all",upstream="up",outcome="2xx"}"#,
            3.0,
        ),
        (
            r#"sluice_retries_total{route="all",reason="status_5xx"}"#,
            1.0,
        ),
        (r#"sluice_rate_limited_total{route="all"}"#, 1.0),
        (
            r#"sluice_stream_aborts_total{route="all",reason="upstream_idle_timeout"}"#,
            1.0,
        ),
        (r#"sluice_in_flight_requests{route="all"}"#, 0.0),
        (r#"sluice_config_reloads_total{result="error"}"#, 1.0),
    ] {
        assert_eq!(sample(&m, prefix), Some(expected), "{prefix} in:\n{m}");
    }
    // No path, model or client key ever becomes a label.
    assert!(!m.contains("/v1/"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_counter_moves_when_a_retry_is_refused() {
    let mock = Mock::start(|_| async { json(503, "{}") }).await;
    let retry =
        "[routes.retry]\nbackoff_base = \"1ms\"\nbudget_ratio = 0.001\nbudget_min_per_second = 0";
    let proxy = Sidecar::start(&format!("{}\n{retry}\n", one_route(&mock.url(), "")), &[]).await;
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 503);
    let m = String::from_utf8(get(&proxy.admin_url("/metrics")).await.1.to_vec()).unwrap();
    assert_eq!(
        sample(&m, r#"sluice_retry_budget_exhausted_total{route="all"}"#),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_a_stream_drains() {
    let mock = Mock::start(|_| async {
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 0..15 {
                let _ = tx.send(Bytes::from(format!("data: {i}\n\n"))).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        sse(body)
    })
    .await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        one_route(&mock.url(), "")
    );
    let mut proxy = Process::start(&toml, &[]).await;
    let admin = format!("http://{}", proxy.admin.expect("admin address"));
    assert_eq!(get(&format!("{admin}/readyz")).await.0.status(), 200);
    let mut body = open(&proxy.url("/v1/stream")).await.into_body();
    body.frame().await.unwrap().unwrap();
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (head, _) = get(&format!("{admin}/readyz")).await;
    assert_eq!(head.status(), 503, "draining");
    assert_eq!(
        get(&format!("{admin}/healthz")).await.0.status(),
        200,
        "still alive"
    );
    let rest = body
        .collect()
        .await
        .expect("the stream finished")
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: 14\n\n"));
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_new_requests_while_a_stream_finishes_on_the_old_config() {
    let old = Mock::start(|_| async {
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 0..10 {
                let _ = tx.send(Bytes::from(format!("data: old {i}\n\n"))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        sse(body)
    })
    .await;
    let new = Mock::start(|_| async { json(200, r#"{"from":"new"}"#) }).await;
    let proxy = Sidecar::start(&one_route(&old.url(), ""), &[]).await;
    let mut stream = open(&proxy.url("/v1/stream")).await.into_body();
    stream.frame().await.unwrap().unwrap();
    proxy.reload(&one_route(&new.url(), ""), &[]);
    // New requests reach the new upstream (poll: the swap is asynchronous).
    let mut switched = false;
    for _ in 0..100 {
        if &get(&proxy.url("/v1/x")).await.1[..] == br#"{"from":"new"}"# {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(switched, "the new config never took effect");
    // An invalid file, still with the stream in flight: refused, the running config stays.
    proxy.reload("[[routes]]\nname = 1\n", &[]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(&get(&proxy.url("/v1/x")).await.1[..], br#"{"from":"new"}"#);
    // The stream started before both reloads runs to its end, intact.
    let rest = stream.collect().await.expect("stream intact").to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: old 9\n\n"));
}

#[tokio::test]
async fn an_unchanged_route_keeps_its_rate_limit_state_across_a_reload() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let limited = |extra: &str| {
        format!(
            "{}\n[routes.rate_limit]\nrequests_per_minute = 1\nburst = 1\n{extra}",
            one_route(&mock.url(), "")
        )
    };
    let proxy = Sidecar::start(&limited(""), &[]).await;
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 200);
    // Same route and limits, plus an unrelated route: the bucket is still empty.
    let with_other = format!(
        "{}\n[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"up\"\n",
        limited("")
    );
    proxy.reload(&with_other, &[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        get(&proxy.url("/v1/x")).await.0.status(),
        429,
        "a reload must not refill buckets"
    );
    // Changed limits start afresh.
    proxy.reload(&limited("max_wait = \"1ms\""), &[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_cost_no_request() {
    // 8 streams open across all reloads, 4 clients sending requests
    // throughout, 20 reloads 25 ms apart: every request and stream must succeed.
    let mock = Mock::start(|req| async move {
        if req.uri().path() != "/v1/stream" {
            return json(200, "{}");
        }
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 0..12 {
                let _ = tx.send(Bytes::from(format!("data: {i}\n\n"))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        sse(body)
    })
    .await;
    let toml = one_route(&mock.url(), "");
    let proxy = std::sync::Arc::new(Sidecar::start(&toml, &[]).await);
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let url = proxy.url("/v1/stream");
            tokio::spawn(async move {
                open(&url)
                    .await
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
            })
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (proxy.url("/v1/x"), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_secs(5), get(&url)).await {
                        Ok((head, _)) if head.status() == 200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for i in 0..20 {
        // Alternate between two equivalent files so each reload really swaps.
        let next = if i % 2 == 0 {
            format!("{toml}\n# reload {i}\n")
        } else {
            toml.clone()
        };
        proxy.reload(&next, &[]);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed += f;
    }
    for s in streams {
        let body = s.await.unwrap().expect("stream intact across reloads");
        assert!(String::from_utf8_lossy(&body).ends_with("data: 11\n\n"));
    }
    eprintln!("reload cost: 20 reloads, {ok} requests ok, {failed} failed, 8 of 8 streams intact");
    assert_eq!(failed, 0);
    assert!(ok > 20, "the clients ran during the reloads: {ok}");
}

#[tokio::test]
async fn an_unchanged_route_keeps_its_retry_budget_across_a_reload() {
    // The budget allows one retry per second here (a floor of 1/s over 1 s,
    // deposits worth almost nothing): the first request spends it.
    let mock = Mock::start(|_| async { json(503, "{}") }).await;
    let toml = format!(
        "{}\n[routes.retry]\nattempts = 2\nbackoff_base = \"1ms\"\nbudget_ratio = 0.001\nbudget_min_per_second = 1\nbudget_ttl = \"1s\"\n",
        one_route(&mock.url(), "")
    );
    let attempts = |head: &http::Response<()>| {
        head.headers()
            .get("x-sluice-attempts")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let proxy = Sidecar::start(&toml, &[]).await;
    assert_eq!(
        attempts(&get(&proxy.url("/v1/x")).await.0).as_deref(),
        Some("2")
    );
    assert_eq!(
        attempts(&get(&proxy.url("/v1/x")).await.0),
        None,
        "the budget is spent"
    );
    proxy.reload(&format!("{toml}\n# same route\n"), &[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        attempts(&get(&proxy.url("/v1/x")).await.0),
        None,
        "a reload must not refill the budget"
    );
}
