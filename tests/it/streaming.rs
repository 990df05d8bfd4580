//! Streaming: response frames pass one at a time, memory stays flat for any
//! body length, and a client that leaves cancels the upstream at once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, oneshot};

use crate::support::mock::repeat;
use crate::support::raw::Conn;
use crate::support::*;

/// The next data frame of a response body, within 5 s.
async fn next_frame(body: &mut hyper::body::Incoming) -> Bytes {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame within 5 s: the proxy is holding it back")
            .expect("body not ended")
            .expect("body intact");
        if let Ok(data) = frame.into_data() {
            return data;
        }
    }
}

#[tokio::test]
async fn first_event_reaches_the_client_before_the_upstream_writes_the_second() {
    // The upstream writes event 2 only once the client holds event 1: a proxy
    // that buffered would deadlock here and the test would time out.
    let (release_tx, release_rx) = mpsc::channel::<()>(1);
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(release_rx));
    let mock = Mock::start(move |_| {
        let release_rx = release_rx.clone();
        async move {
            let (tx, body) = channel();
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
                release_rx.lock().await.recv().await;
                tx.send(Bytes::from_static(b"data: two\n\n")).await.unwrap();
            });
            sse(body)
        }
    })
    .await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let res = open(&proxy.url("/v1/stream")).await;
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    assert_eq!(&next_frame(&mut body).await[..], b"data: one\n\n");
    release_tx.send(()).await.unwrap();
    assert_eq!(&next_frame(&mut body).await[..], b"data: two\n\n");
}

#[tokio::test]
async fn events_300ms_apart_arrive_as_they_are_written() {
    let (sent_tx, sent_rx) = oneshot::channel::<Instant>();
    let sent_tx = std::sync::Mutex::new(Some(sent_tx));
    let mock = Mock::start(move |_| {
        let sent_tx = sent_tx.lock().unwrap().take();
        async move {
            let (tx, body) = channel();
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"data: {\"n\":1}\n\n"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = sent_tx.unwrap().send(Instant::now());
                tx.send(Bytes::from_static(b"data: {\"n\":2}\n\n"))
                    .await
                    .unwrap();
            });
            sse(body)
        }
    })
    .await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let res = open(&proxy.url("/v1/stream")).await;
    let mut body = res.into_body();
    next_frame(&mut body).await;
    let first_received = Instant::now();
    next_frame(&mut body).await;
    let second_sent = sent_rx.await.unwrap();
    assert!(
        first_received < second_sent,
        "event 1 arrived {:?} after event 2 was written",
        first_received - second_sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_passes_through_in_flat_memory() {
    const GIB: u64 = 1 << 30;
    let mock = Mock::start(|req| async move {
        let len = if req.uri().path() == "/big" {
            GIB
        } else {
            1 << 20
        };
        // Made as it is read, through a channel of one frame: costs the
        // mock nothing, so the proxy's memory is all that grows.
        Response::builder()
            .header("content-length", len)
            .body(repeat(len))
            .unwrap()
    })
    .await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Process::start(&toml, &[]).await;
    // Warm up pools and allocator before taking the baseline.
    let (_, warm) = get(&proxy.url("/warm")).await;
    assert_eq!(warm.len(), 1 << 20);
    let baseline = proxy.rss_kib();

    let res = open(&proxy.url("/big")).await;
    let mut body = res.into_body();
    let (mut total, mut peak) = (0u64, baseline);
    let mut last_sample = Instant::now();
    while let Some(frame) = body.frame().await {
        total += frame
            .expect("body intact")
            .data_ref()
            .map_or(0, |d| d.len() as u64);
        if last_sample.elapsed() > Duration::from_millis(50) {
            peak = peak.max(proxy.rss_kib());
            last_sample = Instant::now();
        }
    }
    peak = peak.max(proxy.rss_kib());
    assert_eq!(total, GIB);
    let growth_mib = (peak - baseline) / 1024;
    eprintln!(
        "RSS baseline {} KiB, peak {} KiB, growth {} MiB",
        baseline, peak, growth_mib
    );
    assert!(
        growth_mib < 32,
        "RSS grew by {growth_mib} MiB for a 1 GiB body"
    );
}

/// An SSE upstream that writes an event every 50 ms until its body is
/// dropped, then reports when that happened.
async fn endless_stream() -> (Mock, mpsc::Receiver<Instant>) {
    let (closed_tx, closed_rx) = mpsc::channel(1);
    let mock = Mock::start(move |_| {
        let closed_tx = closed_tx.clone();
        async move {
            let (tx, body) = channel();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let event = Bytes::from(format!("data: {{\"n\":{i}}}\n\n"));
                    tokio::select! {
                        r = tx.send(event) => if r.is_err() { break },
                        () = tx.closed() => break,
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        () = tx.closed() => break,
                    }
                }
                let _ = closed_tx.send(Instant::now()).await;
            });
            sse(body)
        }
    })
    .await;
    (mock, closed_rx)
}

/// The client has just left: the [`endless_stream`] upstream's body is
/// dropped (`closed` reports when) within a second of now.
async fn assert_upstream_stops_within_a_second(closed: &mut mpsc::Receiver<Instant>) {
    let left = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("upstream saw the client leave")
        .unwrap();
    let took = closed_at.saturating_duration_since(left);
    assert!(
        took < Duration::from_secs(1),
        "upstream kept streaming for {took:?}"
    );
}

#[tokio::test]
async fn http1_client_disconnect_closes_the_upstream_within_a_second() {
    let (mock, mut closed) = endless_stream().await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(b"GET /v1/stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    conn.wait_for(b"\"n\":1", Duration::from_secs(5)).await;
    drop(conn);
    assert_upstream_stops_within_a_second(&mut closed).await;
}

#[tokio::test]
async fn h2_stream_reset_closes_the_upstream_within_a_second() {
    let (mock, mut closed) = endless_stream().await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let client = h2c_client();
    let res = send(
        &client,
        Request::get(proxy.url("/v1/stream"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let mut body = res.into_body();
    next_frame(&mut body).await;
    next_frame(&mut body).await;
    // Dropping an h2 body resets the stream; the connection stays open.
    drop(body);
    assert_upstream_stops_within_a_second(&mut closed).await;
}
