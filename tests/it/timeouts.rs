//! Timeouts: first_byte per attempt, idle between body frames, total across
//! attempts, backoff and streaming; before headers a 504, after them an SSE
//! error event or an aborted body.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};

use crate::support::*;

fn route(mock: &Mock, timeouts: &str, retry: &str) -> String {
    format!(
        "{}\n[routes.timeouts]\n{timeouts}\n[routes.retry]\n{retry}\n",
        one_route(&mock.url(), "")
    )
}

/// A response whose body sends `frames` and then never ends (an upstream
/// gone silent): the sender is held until the body is dropped.
fn silent_after(
    content_type: &str,
    frames: &[&'static str],
    length: Option<usize>,
) -> Response<MockBody> {
    let mut res = Response::builder().header("content-type", content_type);
    if let Some(n) = length {
        res = res.header("content-length", n);
    }
    let (tx, body) = channel();
    let frames = frames.to_vec();
    tokio::spawn(async move {
        for f in frames {
            if tx.send(f).await.is_err() {
                return;
            }
        }
        tx.closed().await;
    });
    res.body(body).unwrap()
}

/// An SSE answer of `data: {"n":i}` events, `every` apart: `count` of
/// them then the end, or without end. The first comes at once when
/// `first_at_once`, else after one interval.
fn ticking_sse(every: Duration, count: Option<u32>, first_at_once: bool) -> Response<MockBody> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        for i in 0..count.unwrap_or(u32::MAX) {
            if !first_at_once || i > 0 {
                tokio::time::sleep(every).await;
            }
            let event = Bytes::from(format!("data: {{\"n\":{i}}}\n\n"));
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    sse(body)
}

/// An upstream whose first `slow` answers take `delay`; later ones are instant.
async fn slow_then_fast(slow: usize, delay: Duration) -> (Mock, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let mock = Mock::start(move |_| {
        let n = c.fetch_add(1, SeqCst);
        async move {
            if n < slow {
                tokio::time::sleep(delay).await;
            }
            json(200, r#"{"ok":true}"#)
        }
    })
    .await;
    (mock, count)
}

#[tokio::test]
async fn first_byte_exceeded_is_504_upstream_timeout() {
    let (mock, count) = slow_then_fast(usize::MAX, Duration::from_secs(30)).await;
    let proxy = Sidecar::start(&route(&mock, "first_byte = \"300ms\"", "attempts = 1"), &[]).await;
    let started = Instant::now();
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_sluice_error(&head, &body, 504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_is_not_retried_by_default_but_is_when_listed() {
    let (mock, count) = slow_then_fast(1, Duration::from_secs(30)).await;
    // Default retry_on lacks "timeout": the upstream may still be generating (and billing).
    let proxy = Sidecar::start(
        &route(&mock, "first_byte = \"300ms\"", "backoff_base = \"1ms\""),
        &[],
    )
    .await;
    let (head, body) = get(&proxy.url("/v1/x")).await;
    assert_sluice_error(&head, &body, 504, "upstream_timeout");
    assert_eq!(count.load(SeqCst), 1);

    let (mock, count) = slow_then_fast(1, Duration::from_secs(30)).await;
    let retry = "backoff_base = \"1ms\"\nretry_on = [\"timeout\"]";
    let proxy = Sidecar::start(&route(&mock, "first_byte = \"300ms\"", retry), &[]).await;
    let (head, _) = get(&proxy.url("/v1/x")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-attempts"], "2");
    assert_eq!(count.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn total_deadline_across_retries_is_504_deadline_exceeded_in_about_total() {
    let (mock, count) = slow_then_fast(usize::MAX, Duration::from_secs(30)).await;
    let retry = "attempts = 10\nbackoff_base = \"10ms\"\nretry_on = [\"timeout\"]";
    let proxy = Sidecar::start(
        &route(&mock, "first_byte = \"300ms\"\ntotal = \"1s\"", retry),
        &[],
    )
    .await;
    let started = tokio::time::Instant::now();
    let (head, body) = get(&proxy.url("/v1/x")).await;
    let took = started.elapsed();
    // Timed-out attempts are retried until the deadline cuts the last one
    // short; on the paused clock, at the deadline exactly.
    assert_sluice_error(&head, &body, 504, "deadline_exceeded");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1050),
        "took {took:?}"
    );
    // 300 ms each, with backoff up to 10, 20, 40 ms between: four begin.
    assert_eq!(count.load(SeqCst), 4, "attempts");
}

#[tokio::test]
async fn idle_silence_mid_sse_ends_with_the_error_event() {
    let events = ["data: {\"n\":1}\n\n", "data: {\"n\":2}\n\n"];
    let mock =
        Mock::start(move |_| async move { silent_after("text/event-stream", &events, None) }).await;
    let proxy = Sidecar::start(&route(&mock, "idle = \"300ms\"", "attempts = 1"), &[]).await;
    let started = Instant::now();
    // The body ends cleanly: collect() would fail on an abort.
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let expected_tail = "data: {\"error\":{\"message\":\"sluice: the upstream sent nothing for longer than the route's idle timeout\",\"type\":\"proxy_error\",\"param\":null,\"code\":\"upstream_idle_timeout\"}}\n\n";
    assert_eq!(text, format!("{}{}{expected_tail}", events[0], events[1]));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn idle_silence_mid_plain_body_aborts_it() {
    // With a content-length the client knows the body is short; without one
    // (chunked) it knows because the last chunk never comes. Either way the
    // read fails: a truncated body must never look complete.
    for length in [Some(100), None] {
        let mock = Mock::start(move |_| async move {
            silent_after("application/json", &["{\"partial\":"], length)
        })
        .await;
        let proxy = Sidecar::start(&route(&mock, "idle = \"300ms\"", "attempts = 1"), &[]).await;
        for client in [client(), h2c_client()] {
            let res = send(
                &client,
                Request::get(proxy.url("/v1/files/x"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
            assert_eq!(res.status(), 200);
            let read = tokio::time::timeout(Duration::from_secs(5), res.into_body().collect())
                .await
                .unwrap();
            assert!(read.is_err(), "length {length:?}: the body looked complete");
        }
    }
}

#[tokio::test]
async fn chunks_closer_than_idle_keep_a_long_stream_alive() {
    // 12 events 100 ms apart last 1.2 s, three times the idle limit: the
    // idle clock must restart with each event (its timer, armed once, is
    // re-armed when it wakes early), so the stream ends whole.
    let mock =
        Mock::start(|_| async { ticking_sse(Duration::from_millis(100), Some(12), false) }).await;
    let proxy = Sidecar::start(&route(&mock, "idle = \"400ms\"", "attempts = 1"), &[]).await;
    let (head, body) = get(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(head.status(), 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let expected: String = (0..12)
        .map(|i| format!("data: {{\"n\":{i}}}\n\n"))
        .collect();
    assert_eq!(text, expected);
}

#[tokio::test]
async fn total_deadline_mid_sse_ends_with_deadline_exceeded() {
    // The upstream keeps talking (so idle never fires) but total is short.
    let mock = Mock::start(|_| async { ticking_sse(Duration::from_millis(50), None, true) }).await;
    let proxy = Sidecar::start(
        &route(&mock, "idle = \"10s\"\ntotal = \"600ms\"", "attempts = 1"),
        &[],
    )
    .await;
    let started = Instant::now();
    let (_, body) = get(&proxy.url("/v1/chat/completions")).await;
    let took = started.elapsed();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.starts_with("data: {\"n\":0}\n\n"), "{text}");
    assert!(
        text.ends_with("\"code\":\"deadline_exceeded\"}}\n\n"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_untimely_mid_event_cut_still_ends_on_an_event_boundary() {
    let mock = Mock::start(|_| async {
        silent_after(
            "text/event-stream",
            &["data: {\"n\":1}\n\n", "data: {\"par"],
            None,
        )
    })
    .await;
    let proxy = Sidecar::start(&route(&mock, "idle = \"300ms\"", "attempts = 1"), &[]).await;
    let (_, body) = get(&proxy.url("/v1/chat/completions")).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    // A blank line closes the broken event before sluice's own.
    assert!(
        text.starts_with("data: {\"n\":1}\n\ndata: {\"par\n\ndata: {\"error\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_raises_api_error_on_idle_timeout_mid_stream() {
    let mock = Mock::start(|_| async {
        let chunk = r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        let first: &'static str = Box::leak(format!("{chunk}\n\n").into_boxed_str());
        silent_after("text/event-stream", &[first], None)
    })
    .await;
    let proxy = Sidecar::start(&route(&mock, "idle = \"300ms\"", "attempts = 1"), &[]).await;
    crate::sdk::python_scenario("idle_timeout_raises", &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_starts_after_a_slow_upload_ends() {
    // The upstream answers as soon as it has the whole body; the client
    // takes about 1 s to send it. first_byte = 300ms must not count the upload.
    let mock = Mock::start(|req: Request<hyper::body::Incoming>| async move {
        let body = crate::support::mock::read_body(req.into_body())
            .await
            .unwrap();
        json(200, &format!("{{\"received\":{}}}", body.len()))
    })
    .await;
    let toml = format!(
        "[server]\nretry_buffer = \"1KiB\"\n{}",
        route(&mock, "first_byte = \"300ms\"", "attempts = 1")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let (tx, res) = post_streamed(&proxy.url("/v1/audio/transcriptions"));
    for _ in 0..10 {
        tx.send(Bytes::from(vec![b'a'; 4096])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(10), res)
        .await
        .unwrap()
        .unwrap();
    let (head, body) = collect(res).await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"received":40960}"#);
}
