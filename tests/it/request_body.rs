//! Request bodies: up to `retry_buffer` collected whole (sent upstream with a
//! content-length, ready for replay), larger ones streamed upstream as they
//! arrive, over `max_request_body` answered 413 `request_too_large`, and
//! when the size is known up front, without contacting the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::support::mock::read_body_with;
use crate::support::raw::{chunk, Conn, Reply};
use crate::support::{
    assert_sluice_error, client, collect, json, pattern, post_streamed, send, Mock, MockBody,
    Sidecar,
};

const BOUND: Duration = Duration::from_secs(10);

/// What the mock read of one request body: the bytes in order, and whether
/// the body ended cleanly (`Err` = it broke off, with the bytes before that).
type Received = Result<Bytes, (Bytes, String)>;

type MockFuture = Pin<Box<dyn Future<Output = Response<MockBody>> + Send>>;

/// A mock that reads each request body frame by frame, reports the first
/// data it sees on `first` (once) and the whole outcome on `done`, then
/// answers 200 with the body's length.
fn recording_mock(
    first: Option<oneshot::Sender<usize>>,
) -> (
    impl Fn(Request<Incoming>) -> MockFuture + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Received>,
) {
    let first = Arc::new(Mutex::new(first));
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let handler = move |req: Request<Incoming>| {
        let (first, done_tx) = (first.clone(), done_tx.clone());
        Box::pin(async move {
            let outcome = read_body_with(req.into_body(), |len| {
                if let Some(tx) = first.lock().unwrap().take() {
                    let _ = tx.send(len);
                }
            })
            .await;
            let answer = match &outcome {
                Ok(body) => json(200, &format!(r#"{{"received":{}}}"#, body.len())),
                Err(_) => json(500, r#"{"mock":"body broke off"}"#),
            };
            let _ = done_tx.send(outcome);
            answer
        }) as MockFuture
    };
    (handler, done_rx)
}

/// The mock's outcome for the next request body.
async fn received(done: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(BOUND, done.recv())
        .await
        .expect("the mock read a body within the bound")
        .expect("mock alive")
}

#[tokio::test]
async fn small_body_arrives_whole_with_content_length() {
    let (handler, mut done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let body = pattern(10_000);
    let req = Request::post(sluice.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let (head, res_body) = collect(send(&client(), req).await).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&res_body[..], br#"{"received":10000}"#);
    assert_eq!(received(&mut done).await.unwrap(), body, "byte-exact");
    let seen = mock.seen();
    assert_eq!(seen[0].headers["content-length"], "10000");
    assert!(!seen[0].headers.contains_key("transfer-encoding"));
}

#[tokio::test]
async fn small_chunked_body_is_collected_and_sent_with_content_length() {
    let (handler, mut done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    // A body of unknown length, in three frames: the client sends it chunked.
    let (tx, res) = post_streamed(&sluice.url("/v1/embeddings"));
    let parts = [
        pattern(3000),
        Bytes::from_static(b"-middle-"),
        pattern(5000),
    ];
    for p in &parts {
        tx.send(p.clone()).await.unwrap();
    }
    drop(tx); // end of body
    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    let (head, _) = collect(res).await;
    assert_eq!(head.status(), 200);
    let expected: Bytes = parts.concat().into();
    assert_eq!(received(&mut done).await.unwrap(), expected, "byte-exact");
    // Collected whole (held for replay), so its length is known upstream:
    // a content-length, not chunked framing.
    let seen = mock.seen();
    assert_eq!(
        seen[0].headers["content-length"],
        expected.len().to_string()
    );
    assert!(!seen[0].headers.contains_key("transfer-encoding"));
}

/// Fails if sluice waited for the whole body before contacting the
/// upstream: the client holds back most of the body until the mock reports
/// data, so buffering would deadlock (and time out) here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_retry_buffer_streams_upstream_as_it_arrives() {
    let (first_tx, first_rx) = oneshot::channel();
    let (handler, mut done) = recording_mock(Some(first_tx));
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "retry_buffer = \"64KiB\"").await;

    const CHUNK: usize = 16 * 1024;
    let body = pattern(1024 * 1024); // 64 chunks
    let (tx, res) = post_streamed(&sluice.url("/v1/files"));

    // 80 KiB: just past retry_buffer, so sluice must switch to streaming.
    let mut chunks = body.chunks(CHUNK);
    for c in chunks.by_ref().take(5) {
        tx.send(Bytes::copy_from_slice(c)).await.unwrap();
    }
    let first = tokio::time::timeout(BOUND, first_rx)
        .await
        .expect("the upstream saw data before the client sent the rest of the body")
        .unwrap();
    assert!(first > 0);
    // Only now the other 59 chunks, the last one included.
    for c in chunks {
        tx.send(Bytes::copy_from_slice(c)).await.unwrap();
    }
    drop(tx);

    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    let (head, res_body) = collect(res).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&res_body[..], br#"{"received":1048576}"#);
    let got = received(&mut done)
        .await
        .expect("the body arrived complete");
    assert!(got == body, "byte-exact ({} bytes received)", got.len());
    // Streamed with its length unknown: chunked upstream.
    let seen = mock.seen();
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
}

/// The same with a declared length (raw client, so the test decides when
/// each byte is sent): streamed as it arrives, and the upstream is told the
/// length rather than getting chunked framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_length_over_retry_buffer_streams_with_content_length() {
    let (first_tx, first_rx) = oneshot::channel();
    let (handler, mut done) = recording_mock(Some(first_tx));
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "retry_buffer = \"64KiB\"").await;
    let body = pattern(1024 * 1024);
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = Conn::open(sluice.addr).await;
    s.send(head.as_bytes()).await;
    s.send(&body[..80 * 1024]).await;
    tokio::time::timeout(BOUND, first_rx)
        .await
        .expect("the upstream saw data before the client sent the rest of the body")
        .unwrap();
    s.send(&body[80 * 1024..]).await;
    let res = s.response(BOUND).await;
    assert_eq!(res.status, 200);
    assert_eq!(&res.body[..], br#"{"received":1048576}"#);
    assert!(received(&mut done).await.unwrap() == body, "byte-exact");
    let seen = mock.seen();
    assert_eq!(seen[0].headers["content-length"], "1048576");
    assert!(!seen[0].headers.contains_key("transfer-encoding"));
}

/// A declared length over max_request_body is refused from the head alone.
/// The raw client sends the head and a few bytes and then waits, so the 413
/// cannot be a reaction to a body that was read.
#[tokio::test]
async fn declared_length_over_max_gets_413_without_upstream() {
    let (handler, _done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "max_request_body = \"1KiB\"").await;
    let mut s = Conn::open(sluice.addr).await;
    s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n{\"model\":")
        .await;
    let res = s.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 413, "request_too_large");
    assert!(
        mock.seen().is_empty(),
        "nothing was sent upstream: {:?}",
        mock.seen()
    );
}

#[tokio::test]
async fn declared_length_one_over_max_gets_413_and_exactly_max_passes() {
    let (handler, mut done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "max_request_body = \"1KiB\"").await;

    let over = Request::post(sluice.url("/v1/x"))
        .body(Full::new(pattern(1025)))
        .unwrap();
    let (head, body) = collect(send(&client(), over).await).await;
    assert_sluice_error(&head, &body, 413, "request_too_large");
    assert!(mock.seen().is_empty());

    let at = Request::post(sluice.url("/v1/x"))
        .body(Full::new(pattern(1024)))
        .unwrap();
    let (head, _) = collect(send(&client(), at).await).await;
    assert_eq!(
        head.status(),
        200,
        "a body of exactly max_request_body is allowed"
    );
    assert_eq!(received(&mut done).await.unwrap(), pattern(1024));
}

/// Chunked, so no declared length: the limit is found while collecting
/// (retry_buffer is capped at max_request_body, so this is the buffered
/// path) and nothing has gone upstream yet.
#[tokio::test]
async fn chunked_body_over_max_while_collecting_gets_413_without_upstream() {
    let (handler, _done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "max_request_body = \"1KiB\"").await;
    let mut req = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend(chunk(&pattern(1000)));
    req.extend(chunk(&pattern(25)));
    req.extend_from_slice(b"0\r\n\r\n");
    let mut s = Conn::open(sluice.addr).await;
    s.send(&req).await;
    let res = s.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 413, "request_too_large");
    assert!(mock.seen().is_empty(), "{:?}", mock.seen());
}

/// retry_buffer < max_request_body < body: the start of the body has
/// already gone upstream when the limit is crossed. The upstream must never
/// see a complete body (a truncated body that looks whole would be a request
/// the client never made), nor more than max_request_body bytes of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_max_while_streaming_never_completes_upstream() {
    const MAX: usize = 256 * 1024;
    let (handler, mut done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(
        &mock.url(),
        "retry_buffer = \"64KiB\"\nmax_request_body = \"256KiB\"",
    )
    .await;

    let s = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    let (read, mut write) = s.into_split();
    // Writes 1 MiB in 16 KiB chunks, stopping at the first write error
    // (sluice closes the connection once it has answered).
    let writer = tokio::spawn(async move {
        let head = "POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        write.write_all(head.as_bytes()).await.unwrap();
        for c in pattern(1024 * 1024).chunks(16 * 1024) {
            if write.write_all(&chunk(c)).await.is_err() {
                return;
            }
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
    });
    let reply = Conn::new(read).reply(BOUND).await;
    match &reply {
        Reply::Response(res) => {
            assert_sluice_error(&res.head(), &res.body, 413, "request_too_large")
        }
        // A reset can overtake the 413 when sluice closes with unread input.
        Reply::Closed(got) => assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(got)),
    }
    let _ = writer.await;

    // The body's start went upstream before the limit was crossed, so the
    // upstream did get a request: its body must have broken off, after no
    // more than max_request_body bytes, all of them the body's start.
    let (part, e) = match received(&mut done).await {
        Ok(all) => panic!(
            "the upstream received a complete body of {} bytes",
            all.len()
        ),
        Err(broken) => broken,
    };
    assert!(
        part.len() <= MAX,
        "{} bytes reached the upstream",
        part.len()
    );
    assert!(
        part == pattern(part.len()),
        "what arrived is the body's start"
    );
    assert_eq!(mock.seen().len(), 1);
    eprintln!(
        "over-max streaming: client got {}; upstream read {} bytes, then: {e}",
        match &reply {
            Reply::Response(res) => res.status.to_string(),
            Reply::Closed(_) => "a closed connection".into(),
        },
        part.len()
    );
}

/// The streaming path's boundary: exactly max_request_body, chunked and
/// larger than retry_buffer, passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_of_exactly_max_passes() {
    let (handler, mut done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(
        &mock.url(),
        "retry_buffer = \"64KiB\"\nmax_request_body = \"256KiB\"",
    )
    .await;
    let body = pattern(256 * 1024);
    let (tx, res) = post_streamed(&sluice.url("/v1/files"));
    for c in body.chunks(16 * 1024) {
        tx.send(Bytes::copy_from_slice(c)).await.unwrap();
    }
    drop(tx);
    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    let (head, _) = collect(res).await;
    assert_eq!(head.status(), 200);
    assert!(received(&mut done).await.unwrap() == body, "byte-exact");
    assert_eq!(
        mock.seen()[0].headers["transfer-encoding"],
        "chunked",
        "it was streamed"
    );
}

/// A client that uploads its whole (too large) body before reading still
/// gets the 413: sluice keeps reading and discarding for a while (a
/// lingering close) instead of resetting the connection under the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_uploads_everything_first_still_reads_its_413() {
    let (handler, _done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "max_request_body = \"1KiB\"").await;
    for _ in 0..5 {
        let s = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
        let (read, mut write) = s.into_split();
        let writer = tokio::spawn(async move {
            let head = "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n";
            write.write_all(head.as_bytes()).await.unwrap();
            write.write_all(&pattern(4 << 20)).await.is_ok()
        });
        let res = Conn::new(read).response(BOUND).await;
        assert_sluice_error(&res.head(), &res.body, 413, "request_too_large");
        assert!(
            writer.await.unwrap(),
            "the upload was cut off under the client"
        );
    }
    assert!(mock.seen().is_empty());
}

/// A client that stops sending mid-body while sluice collects it gets 408
/// within header_read_timeout of silence, instead of holding the request forever.
#[tokio::test]
async fn a_client_silent_mid_body_gets_408() {
    let (handler, _done) = recording_mock(None);
    let mock = Mock::start(handler).await;
    let sluice = Sidecar::in_front_of(&mock.url(), "header_read_timeout = \"500ms\"").await;
    let started = std::time::Instant::now();
    let mut s = Conn::open(sluice.addr).await;
    s.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await;
    let res = s.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 408, "request_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(mock.seen().is_empty());
}
