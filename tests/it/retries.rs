//! Retries: which outcomes are retried, backoff and Retry-After, the
//! x-sluice-attempts / x-should-retry headers, bodies too large to replay,
//! insufficient_quota, and the retry budget under a failing upstream.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};

use crate::support::mock::full;
use crate::support::upstream::RawUpstream;
use crate::support::*;

fn route(url: &str, retry: &str) -> String {
    format!(
        "{}\n[routes.retry]\nbackoff_base = \"5ms\"\nbackoff_max = \"20ms\"\n{retry}\n",
        one_route(url, "")
    )
}

/// An upstream answering from `script` by attempt number (the last entry
/// repeats), recording when each attempt arrived.
async fn scripted(
    script: Vec<Response<MockBody>>,
) -> (Mock, Arc<Mutex<Vec<tokio::time::Instant>>>) {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (a, n) = (arrivals.clone(), AtomicUsize::new(0));
    let script = cloneable(script).await;
    let mock = Mock::start(move |_| {
        a.lock().unwrap().push(tokio::time::Instant::now());
        let i = n.fetch_add(1, SeqCst).min(script.len() - 1);
        let (status, headers, body) = script[i].clone();
        async move {
            let mut res = Response::builder().status(status);
            for (k, v) in headers {
                res = res.header(k, v);
            }
            res.body(full(body)).unwrap()
        }
    })
    .await;
    (mock, arrivals)
}

/// A response as cloneable parts: status, headers, body.
type Canned = (u16, Vec<(String, String)>, Bytes);

/// Turns prepared responses into cloneable parts.
async fn cloneable(script: Vec<Response<MockBody>>) -> Vec<Canned> {
    let mut out = Vec::new();
    for res in script {
        let (parts, body) = res.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        out.push((
            parts.status.as_u16(),
            headers,
            body.collect().await.unwrap().to_bytes(),
        ));
    }
    out
}

fn status(code: u16, headers: &[(&str, &str)], body: &str) -> Response<MockBody> {
    let mut res = json(code, body);
    for (k, v) in headers {
        res.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    res
}

const RATE_LIMITED: &str = r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;

const UNAVAILABLE: &str =
    r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#;

#[tokio::test]
async fn two_503s_then_200_is_a_200_after_three_attempts() {
    let (mock, arrivals) = scripted(vec![
        status(503, &[], UNAVAILABLE),
        status(503, &[], UNAVAILABLE),
        status(200, &[], r#"{"ok":true}"#),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), "attempts = 3"), &[]).await;
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .body(Full::from(r#"{"model":"m"}"#))
        .unwrap();
    let (head, body) = collect(send(&client(), req).await).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], br#"{"ok":true}"#);
    assert_eq!(head.headers()["x-sluice-attempts"], "3");
    assert_eq!(head.headers()["x-should-retry"], "false");
    assert_eq!(arrivals.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn with_attempts_1_the_503_passes_through_unchanged() {
    let (mock, arrivals) = scripted(vec![status(503, &[("x-upstream", "yes")], UNAVAILABLE)]).await;
    let proxy = Sidecar::start(&route(&mock.url(), "attempts = 1"), &[]).await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_eq!(head.status(), 503);
    assert_eq!(&body[..], UNAVAILABLE.as_bytes());
    assert_eq!(head.headers()["x-upstream"], "yes");
    assert!(!head.headers().contains_key("x-sluice-error"));
    assert!(!head.headers().contains_key("x-sluice-attempts"));
    assert!(!head.headers().contains_key("x-should-retry"));
    assert_eq!(arrivals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn after_the_last_attempt_the_upstream_response_passes_through() {
    let (mock, arrivals) =
        scripted(vec![status(503, &[("x-upstream", "last")], UNAVAILABLE)]).await;
    let proxy = Sidecar::start(&route(&mock.url(), "attempts = 3"), &[]).await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_eq!(head.status(), 503);
    assert_eq!(&body[..], UNAVAILABLE.as_bytes());
    assert_eq!(head.headers()["x-upstream"], "last");
    assert_eq!(head.headers()["x-sluice-attempts"], "3");
    assert_eq!(head.headers()["x-should-retry"], "false");
    assert_eq!(arrivals.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn connection_refused_is_502_after_every_attempt() {
    let port = refused_port();
    let proxy = Sidecar::start(
        &route(&format!("http://127.0.0.1:{port}"), "attempts = 4"),
        &[],
    )
    .await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    assert_eq!(head.headers()["x-sluice-attempts"], "4");
    assert_eq!(head.headers()["x-should-retry"], "false");
}

#[tokio::test(start_paused = true)]
async fn retry_after_1_delays_the_next_attempt_by_a_second() {
    let (mock, arrivals) = scripted(vec![
        status(429, &[("retry-after", "1")], RATE_LIMITED),
        status(200, &[], "{}"),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, _) = get(&proxy.url("/v1/models")).await;
    assert_eq!(head.status(), 200);
    let t = arrivals.lock().unwrap().clone();
    assert_eq!(t.len(), 2);
    // The paused clock: the wait is the hint, to the millisecond.
    let waited = t[1] - t[0];
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1010),
        "waited {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_and_openai_reset_headers_are_hints_too() {
    let (mock, arrivals) = scripted(vec![
        status(429, &[("retry-after-ms", "600")], "{}"),
        status(200, &[], "{}"),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    assert_eq!(get(&proxy.url("/v1/models")).await.0.status(), 200);
    let t = arrivals.lock().unwrap().clone();
    let waited = t[1] - t[0];
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(610),
        "{waited:?}"
    );

    let reset = [
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "700ms"),
    ];
    let (mock, arrivals) = scripted(vec![status(429, &reset, "{}"), status(200, &[], "{}")]).await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    assert_eq!(get(&proxy.url("/v1/models")).await.0.status(), 200);
    let t = arrivals.lock().unwrap().clone();
    let waited = t[1] - t[0];
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(710),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_over_max_retry_after_returns_the_429_at_once() {
    let (mock, arrivals) = scripted(vec![
        status(429, &[("retry-after", "60")], RATE_LIMITED),
        status(200, &[], "{}"),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), "max_retry_after = \"20s\""), &[]).await;
    // The paused clock: a wait for the hint would show in full.
    let started = tokio::time::Instant::now();
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(head.status(), 429);
    assert_eq!(head.headers()["retry-after"], "60");
    assert_eq!(&body[..], RATE_LIMITED.as_bytes());
    assert_eq!(arrivals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn insufficient_quota_is_never_retried_and_passes_intact() {
    let quota = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let (mock, arrivals) = scripted(vec![status(429, &[], quota), status(200, &[], "{}")]).await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 429);
    assert_eq!(&body[..], quota.as_bytes());
    assert_eq!(
        head.headers()["content-length"],
        quota.len().to_string().as_str()
    );
    assert!(!head.headers().contains_key("x-should-retry"));
    assert_eq!(arrivals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_400_is_never_retried() {
    let bad =
        r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#;
    let (mock, arrivals) = scripted(vec![status(400, &[], bad), status(200, &[], "{}")]).await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!((head.status().as_u16(), &body[..]), (400, bad.as_bytes()));
    assert!(!head.headers().contains_key("x-should-retry"));
    assert_eq!(arrivals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_body_over_retry_buffer_is_attempted_once() {
    let (mock, arrivals) =
        scripted(vec![status(503, &[], UNAVAILABLE), status(200, &[], "{}")]).await;
    let toml = format!(
        "[server]\nretry_buffer = \"1KiB\"\n{}",
        route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let req = Request::post(proxy.url("/v1/files"))
        .body(Full::from(vec![b'x'; 4096]))
        .unwrap();
    let (head, _) = collect(send(&client(), req).await).await;
    assert_eq!(head.status(), 503);
    assert!(!head.headers().contains_key("x-sluice-attempts"));
    assert_eq!(arrivals.lock().unwrap().len(), 1);
    // A small body on the same route is replayed.
    let req = Request::post(proxy.url("/v1/files"))
        .body(Full::from("small"))
        .unwrap();
    assert_eq!(collect(send(&client(), req).await).await.0.status(), 200);
}

/// A body of `events` written 20 ms apart (so they reach sluice before the
/// break), then, 20 ms after the last, the connection breaks (the body
/// errors).
fn events_then_reset(events: Vec<Bytes>) -> MockBody {
    let (tx, body) = channel();
    tokio::spawn(async move {
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tx.fail("upstream crashed").await;
    });
    body
}

#[tokio::test]
async fn a_reset_after_three_events_is_not_retried_and_ends_with_upstream_reset() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let mock = Mock::start(move |_| {
        c.fetch_add(1, SeqCst);
        async {
            let events = (1..=3)
                .map(|i| Bytes::from(format!("data: {{\"n\":{i}}}\n\n")))
                .collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(events_then_reset(events))
                .unwrap()
        }
    })
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), "attempts = 3"), &[]).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.starts_with(
            "data: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: {\"n\":3}\n\ndata: {\"error\""
        ),
        "{text}"
    );
    assert!(
        text.ends_with("\"code\":\"upstream_reset\"}}\n\n"),
        "{text}"
    );
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test]
async fn x_should_retry_only_when_sluice_retried_or_was_refused() {
    // A first-try success carries neither header.
    let (mock, _) = scripted(vec![status(200, &[], "{}")]).await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, _) = get(&proxy.url("/v1/models")).await;
    assert!(
        !head.headers().contains_key("x-should-retry")
            && !head.headers().contains_key("x-sluice-attempts")
    );

    // An empty budget refuses the retry: one attempt, and the SDK is told not to retry either.
    let (mock, arrivals) = scripted(vec![status(503, &[], UNAVAILABLE)]).await;
    let retry = "budget_ratio = 0.001\nbudget_min_per_second = 0";
    let proxy = Sidecar::start(&route(&mock.url(), retry), &[]).await;
    let (head, _) = get(&proxy.url("/v1/models")).await;
    assert_eq!(head.status(), 503);
    assert_eq!(arrivals.lock().unwrap().len(), 1);
    assert_eq!(head.headers()["x-should-retry"], "false");
    assert!(!head.headers().contains_key("x-sluice-attempts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_amplification_under_a_failing_upstream() {
    let (mock, arrivals) = scripted(vec![status(503, &[], UNAVAILABLE)]).await;
    let retry = "attempts = 3\nbackoff_base = \"0ms\"\nbackoff_max = \"0ms\"\nbudget_ratio = 0.2\nbudget_min_per_second = 1\nbudget_ttl = \"10s\"";
    let proxy = Sidecar::start(
        &format!("{}\n[routes.retry]\n{retry}\n", one_route(&mock.url(), "")),
        &[],
    )
    .await;
    let requests = 200;
    let client = client();
    for _ in 0..requests {
        let (head, _) = collect(
            send(
                &client,
                Request::get(proxy.url("/v1/models"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await,
        )
        .await;
        assert_eq!(head.status(), 503);
    }
    let attempts = arrivals.lock().unwrap().len();
    // 200 requests, 20% of them as retries, plus 1/s over 10 s: at most 250 (+ slack for overdraw).
    let ratio = attempts as f64 / requests as f64;
    eprintln!("budget amplification: {attempts} attempts for {requests} requests = {ratio:.3} per request");
    assert!(
        attempts <= requests + 40 + 10 + 5,
        "{attempts} attempts: the budget did not hold"
    );
    // Without a budget it would be 3 per request; with it, well under 1.3.
    assert!(
        attempts >= requests + 40,
        "{attempts}: the budget refused retries it had"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_without_retries_succeeds_because_sluice_retried() {
    let ok = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"recovered"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    let (mock, arrivals) = scripted(vec![
        status(500, &[], UNAVAILABLE),
        status(502, &[], UNAVAILABLE),
        status(200, &[], ok),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    crate::sdk::python_scenario("retried_success", &proxy).await;
    assert_eq!(arrivals.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_connection_closed_before_headers_is_retried_as_reset() {
    // A raw upstream: the first connection reads the request and hangs up,
    // later ones answer 200.
    let hangs_up_first = || {
        RawUpstream::start(|mut conn| async move {
            if conn.request().await.is_some() && conn.index > 0 {
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
            }
        })
    };
    let up = hangs_up_first().await;
    let proxy = Sidecar::start(&route(&up.url(), ""), &[]).await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_eq!((head.status().as_u16(), &body[..]), (200, &b"{}"[..]));
    assert_eq!(head.headers()["x-sluice-attempts"], "2");
    assert_eq!(up.accepted(), 2);

    // Without "reset" in retry_on the hang-up is a 502 after one attempt.
    let up = hangs_up_first().await;
    let proxy = Sidecar::start(&route(&up.url(), "retry_on = [503]"), &[]).await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_whose_wait_would_cross_the_total_deadline() {
    // Retry-After: 2 against total = 1s: waiting could only end past the
    // deadline, so the 503 is returned at once rather than a 504 later.
    let (mock, arrivals) = scripted(vec![
        status(503, &[("retry-after", "2")], UNAVAILABLE),
        status(200, &[], "{}"),
    ])
    .await;
    let toml = format!(
        "{}\n[routes.timeouts]\ntotal = \"1s\"\n",
        route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let started = tokio::time::Instant::now();
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (head.status().as_u16(), &body[..]),
        (503, UNAVAILABLE.as_bytes())
    );
    assert_eq!(arrivals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_absurd_retry_after_ms_is_ignored_not_a_crash() {
    let (mock, arrivals) = scripted(vec![
        status(503, &[("retry-after-ms", "1e30")], UNAVAILABLE),
        status(200, &[], "{}"),
    ])
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, _) = get(&proxy.url("/v1/models")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(arrivals.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_gzipped_insufficient_quota_is_recognised_and_passed_intact() {
    use std::io::Write;
    let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(quota.as_bytes()).unwrap();
    let compressed = Bytes::from(gz.finish().unwrap());
    let c = compressed.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let mock = Mock::start(move |_| {
        n2.fetch_add(1, SeqCst);
        let body = c.clone();
        async move {
            Response::builder()
                .status(429)
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(full(body))
                .unwrap()
        }
    })
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 429);
    assert_eq!(head.headers()["content-encoding"], "gzip");
    assert_eq!(body, compressed);
    assert_eq!(n.load(SeqCst), 1);
}

#[tokio::test]
async fn a_429_whose_body_breaks_is_treated_as_a_reset() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let mock = Mock::start(move |_| {
        let first = n2.fetch_add(1, SeqCst) == 0;
        async move {
            if !first {
                return json(200, "{}");
            }
            let events = vec![Bytes::from_static(b"{\"error\":{\"mess")];
            Response::builder()
                .status(429)
                .body(events_then_reset(events))
                .unwrap()
        }
    })
    .await;
    let proxy = Sidecar::start(&route(&mock.url(), ""), &[]).await;
    let (head, _) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(n.load(SeqCst), 2);
}
