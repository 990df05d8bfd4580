//! Rate limits and in-flight caps: GCRA per route or per client, OpenAI's
//! rate-limit headers on the 429, max_wait, max_concurrent, and the slot
//! released on every path.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};

use crate::support::raw::Conn;
use crate::support::*;

fn limited(url: &str, limit: &str, extra: &str) -> String {
    format!(
        "{}\n[routes.rate_limit]\n{limit}\n{extra}\n",
        one_route(url, "")
    )
}

async fn counting() -> (Mock, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let mock = Mock::start(move |_| {
        c.fetch_add(1, SeqCst);
        async { json(200, "{}") }
    })
    .await;
    (mock, n)
}

async fn get_as(proxy: &Sidecar, auth: Option<&str>) -> (Response<()>, Bytes) {
    let mut req = Request::get(proxy.url("/v1/models"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    collect(send(&client(), req.body(Full::default()).unwrap()).await).await
}

#[tokio::test]
async fn a_burst_of_5_then_the_6th_is_429_with_openai_headers() {
    let (mock, seen) = counting().await;
    let proxy = Sidecar::start(
        &limited(&mock.url(), "requests_per_minute = 60\nburst = 5", ""),
        &[],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    }
    let (head, body) = get_as(&proxy, None).await;
    assert_sluice_error(&head, &body, 429, "rate_limit_exceeded");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "requests");
    let h = head.headers();
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
    assert!(reset.ends_with("ms") || reset == "1s", "{reset}");
    assert_eq!(
        seen.load(SeqCst),
        5,
        "the rejected request never reached the upstream"
    );
}

#[tokio::test]
async fn per_client_buckets_are_independent() {
    let (mock, seen) = counting().await;
    let limit = "requests_per_minute = 60\nburst = 1\nper = \"client\"";
    let proxy = Sidecar::start(&limited(&mock.url(), limit, ""), &[]).await;
    assert_eq!(
        get_as(&proxy, Some("Bearer client-a")).await.0.status(),
        200
    );
    assert_eq!(
        get_as(&proxy, Some("Bearer client-a")).await.0.status(),
        429
    );
    assert_eq!(
        get_as(&proxy, Some("Bearer client-b")).await.0.status(),
        200
    );
    // Requests without the header share one anonymous bucket.
    assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    assert_eq!(get_as(&proxy, None).await.0.status(), 429);
    assert_eq!(seen.load(SeqCst), 3);
}

#[tokio::test]
async fn a_custom_client_key_header_is_used_and_never_logged() {
    let (mock, _) = counting().await;
    let limit =
        "requests_per_minute = 60\nburst = 1\nper = \"client\"\nclient_key_header = \"x-tenant\"";
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"trace\"\n{}",
        limited(&mock.url(), limit, "")
    );
    let mut proxy = Process::start(&toml, &[]).await;
    let get = |tenant: &'static str| {
        let req = Request::get(proxy.url("/v1/models"))
            .header("x-tenant", tenant)
            .body(Full::default())
            .unwrap();
        async { collect(send(&client(), req).await).await.0.status() }
    };
    assert_eq!(get("tenant-SECRET-one").await, 200);
    assert_eq!(get("tenant-SECRET-one").await, 429);
    assert_eq!(get("tenant-SECRET-two").await, 200);
    proxy.stop().await;
    assert!(
        !proxy.output().contains("tenant-SECRET"),
        "{}",
        proxy.output()
    );
}

#[tokio::test]
async fn max_wait_lets_a_request_through_after_a_wait() {
    let (mock, seen) = counting().await;
    // One request per 100 ms, a burst of 1: the second waits about 100 ms.
    let proxy = Sidecar::start(
        &limited(
            &mock.url(),
            "requests_per_minute = 600\nburst = 1\nmax_wait = \"2s\"",
            "",
        ),
        &[],
    )
    .await;
    assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    let started = Instant::now();
    assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.load(SeqCst), 2);
    // A wait longer than max_wait is not taken.
    let proxy = Sidecar::start(
        &limited(
            &mock.url(),
            "requests_per_minute = 60\nburst = 1\nmax_wait = \"100ms\"",
            "",
        ),
        &[],
    )
    .await;
    assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    let started = Instant::now();
    assert_eq!(get_as(&proxy, None).await.0.status(), 429);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn the_wait_counts_against_the_total_deadline() {
    let (mock, _) = counting().await;
    let limit = "requests_per_minute = 60\nburst = 1\nmax_wait = \"10s\"";
    let proxy = Sidecar::start(
        &limited(&mock.url(), limit, "[routes.timeouts]\ntotal = \"300ms\""),
        &[],
    )
    .await;
    assert_eq!(get_as(&proxy, None).await.0.status(), 200);
    let started = Instant::now();
    let (head, body) = get_as(&proxy, None).await;
    assert_sluice_error(&head, &body, 429, "rate_limit_exceeded");
    assert!(
        started.elapsed() < Duration::from_millis(280),
        "{:?}",
        started.elapsed()
    );
}

/// An upstream whose responses stream for `hold` before ending.
async fn slow_streams(hold: Duration) -> Mock {
    Mock::start(move |_| async move {
        let (tx, body) = channel();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"data: start\n\n")).await;
            tokio::time::sleep(hold).await;
            let _ = tx.send(Bytes::from_static(b"data: end\n\n")).await;
        });
        sse(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_2_with_3_streams_refuses_one_until_they_finish() {
    let mock = slow_streams(Duration::from_millis(600)).await;
    let limit = "requests_per_minute = 0\nmax_concurrent = 2";
    let proxy = Sidecar::start(&limited(&mock.url(), limit, ""), &[]).await;
    let a = open(&proxy.url("/v1/chat/completions")).await;
    let b = open(&proxy.url("/v1/chat/completions")).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_sluice_error(&head, &body, 429, "concurrency_limit_exceeded");
    // Streams hold their slot until their bodies end.
    a.into_body().collect().await.unwrap();
    b.into_body().collect().await.unwrap();
    assert_eq!(
        get(&proxy.url("/v1/chat/completions")).await.0.status(),
        200
    );
}

/// Polls until a request is admitted (its slot came back), up to 2 s.
async fn admitted_again(proxy: &Sidecar) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        // Headers only: the upstream's streams last 30 s.
        if open(&proxy.url("/v1/x")).await.status() != 429 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_released_on_every_path() {
    let limit = "requests_per_minute = 0\nmax_concurrent = 1";
    // Upstream error: connection refused, 502.
    let port = refused_port();
    let proxy = Sidecar::start(
        &limited(
            &format!("http://127.0.0.1:{port}"),
            limit,
            "[routes.retry]\nattempts = 1",
        ),
        &[],
    )
    .await;
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 502);
    assert_eq!(
        get(&proxy.url("/v1/x")).await.0.status(),
        502,
        "the 502 released its slot"
    );

    // Timeout: first_byte, 504.
    let hang = Mock::start(|_| std::future::pending()).await;
    let proxy = Sidecar::start(
        &limited(
            &hang.url(),
            limit,
            "[routes.timeouts]\nfirst_byte = \"200ms\"",
        ),
        &[],
    )
    .await;
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 504);
    assert_eq!(
        get(&proxy.url("/v1/x")).await.0.status(),
        504,
        "the 504 released its slot"
    );

    // Success, and a client that leaves mid-stream.
    let mock = slow_streams(Duration::from_secs(30)).await;
    let proxy = Sidecar::start(&limited(&mock.url(), limit, ""), &[]).await;
    let stream = open(&proxy.url("/v1/x")).await;
    assert_eq!(
        get(&proxy.url("/v1/x")).await.0.status(),
        429,
        "the open stream holds the slot"
    );
    drop(stream);
    assert!(
        admitted_again(&proxy).await,
        "the slot came back after the client left"
    );

    // A client that leaves before the response headers.
    let proxy = Sidecar::start(&limited(&hang.url(), limit, ""), &[]).await;
    // Counted before sending: the upstream may see the request at once.
    let before = hang.seen().len();
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(b"GET /v1/x HTTP/1.1\r\nhost: x\r\n\r\n").await;
    hang.wait_for_requests(before + 1, Duration::from_secs(5))
        .await;
    drop(conn);
    // Admitted now means: no quick 429, the request waits on the silent upstream.
    let admitted = async {
        loop {
            let url = proxy.url("/v1/x");
            match tokio::time::timeout(Duration::from_millis(300), get(&url)).await {
                Ok((head, _)) if head.status() == 429 => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => return,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), admitted)
        .await
        .expect("the slot came back after the client left before headers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_with_retries_succeeds_by_honouring_retry_after() {
    let mock = openai_ok().await;
    let limit = "requests_per_minute = 60\nburst = 1";
    let proxy = Sidecar::start(&limited(&mock.url(), limit, ""), &[]).await;
    crate::sdk::python_scenario("rate_limited_retry", &proxy).await;
    assert_eq!(
        mock.seen().len(),
        2,
        "the SDK's retry came after the limit allowed it"
    );
}

async fn openai_ok() -> Mock {
    Mock::start(|_| async {
        json(200, r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_for_want_of_a_slot_spends_no_rate_token() {
    let mock = slow_streams(Duration::from_millis(400)).await;
    // Two tokens, one slot: the refused request must leave the second token.
    let limit = "requests_per_minute = 1\nburst = 2\nmax_concurrent = 1";
    let proxy = Sidecar::start(&limited(&mock.url(), limit, ""), &[]).await;
    let stream = open(&proxy.url("/v1/chat/completions")).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_sluice_error(&head, &body, 429, "concurrency_limit_exceeded");
    stream.into_body().collect().await.unwrap();
    assert_eq!(
        get(&proxy.url("/v1/chat/completions")).await.0.status(),
        200
    );
}
