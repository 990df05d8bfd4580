//! SIGTERM/SIGINT: stop accepting, let in-flight streams finish within
//! shutdown_grace, exit 0; a second signal exits at once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::support::*;

/// An SSE upstream writing `n` events 100 ms apart, then ending.
async fn events(n: usize) -> Mock {
    Mock::start(move |_| async move {
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 0..n {
                if tx
                    .send(Bytes::from(format!("data: {i}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        sse(body)
    })
    .await
}

fn config(mock: &Mock, grace: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n{}",
        one_route(&mock.url(), "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_in_flight_finish_then_exits_0() {
    // A 2 s stream: 20 events 100 ms apart.
    let mock = events(20).await;
    let mut proxy = Process::start(&config(&mock, "30s"), &[]).await;
    let res = open(&proxy.url("/v1/stream")).await;
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
    proxy.signal("TERM");
    // New connections are refused while the stream drains.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "still accepting"
    );
    let rest = body
        .collect()
        .await
        .expect("the stream finished intact")
        .to_bytes();
    let expected: String = (1..20).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(String::from_utf8_lossy(&rest), expected);
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_without_waiting_for_the_drain() {
    let mock = events(10_000).await;
    let mut proxy = Process::start(&config(&mock, "60s"), &[]).await;
    let res = open(&proxy.url("/v1/stream")).await;
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    proxy.signal("INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the first signal only starts the drain"
    );
    let started = Instant::now();
    proxy.signal("INT");
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(1));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        proxy.output().contains("second signal"),
        "{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_still_open_when_the_grace_ends_get_the_deadline_event() {
    // One stream keeps talking, one has gone silent: both outlive a 1 s grace.
    let mock = Mock::start(|req| async move {
        let chatty = req.uri().path() == "/v1/chatty";
        let (tx, body) = channel();
        tokio::spawn(async move {
            for i in 0.. {
                if tx
                    .send(Bytes::from(format!("data: {i}\n\n")))
                    .await
                    .is_err()
                    || !chatty
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        sse(body)
    })
    .await;
    let mut proxy = Process::start(&config(&mock, "1s"), &[]).await;
    let mut bodies = Vec::new();
    for path in ["/v1/chatty", "/v1/silent"] {
        let mut body = open(&proxy.url(path)).await.into_body();
        body.frame().await.unwrap().unwrap();
        bodies.push(body);
    }
    let started = Instant::now();
    proxy.signal("TERM");
    for body in bodies {
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("cut within the grace plus a margin")
            .expect("ended cleanly with the event, not aborted")
            .to_bytes();
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.ends_with("\"code\":\"deadline_exceeded\"}}\n\n"),
            "{text}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_waiting_for_the_upstream_at_the_grace_end_gets_503() {
    let hang = Mock::start(|_| std::future::pending()).await;
    let mut proxy = Process::start(&config(&hang, "1s"), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { get(&url).await });
    hang.wait_for_requests(1, Duration::from_secs(5)).await;
    proxy.signal("TERM");
    let (head, body) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered")
        .unwrap();
    assert_sluice_error(&head, &body, 503, "shutting_down");
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_half_sent_when_the_drain_begins_gets_503_shutting_down() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let mut proxy = Process::start(&config(&mock, "5s"), &[]).await;
    let mut conn = crate::support::raw::Conn::open(proxy.addr).await;
    conn.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.send(b"\r\n").await;
    let res = conn.response(Duration::from_secs(5)).await;
    assert_sluice_error(&res.head(), &res.body, 503, "shutting_down");
    assert_eq!(res.get("connection"), Some("close"), "{res:?}");
    assert!(
        mock.seen().is_empty(),
        "nothing new is sent upstream while draining"
    );
    assert_eq!(proxy.exit_within(Duration::from_secs(5)).await, Some(0));
}
