//! Hardening: framing an intermediary must fix, path escapes, early answers
//! to uploads, clients that stop reading, HTTP/2 head trickles and rapid
//! resets, sluice's own refusals, file-descriptor exhaustion and the
//! connection cap, and a config check that reports every error. Each test
//! sends the exact bytes of the case it guards against.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::raw::{Conn, Reply};
use crate::support::upstream::RawUpstream;
use crate::support::*;

const BOUND: Duration = Duration::from_secs(10);

/// An upstream answering every request head with `response`, then closing.
async fn answering(response: &'static [u8]) -> RawUpstream {
    RawUpstream::start(move |mut conn| async move {
        conn.request_head().await;
        conn.write(response).await;
    })
    .await
}

/// `bytes` on a new raw connection.
async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Conn {
    let mut conn = Conn::open(addr).await;
    conn.send(bytes).await;
    conn
}

fn no_retry(url: &str) -> String {
    format!("{}\n[routes.retry]\nattempts = 1\n", one_route(url, ""))
}

// 1. A truncated body that looks complete.

#[tokio::test]
async fn a_chunked_response_with_a_content_length_is_not_cut_at_that_length() {
    let up = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let proxy = Sidecar::start(&no_retry(&up.url()), &[]).await;
    for client in [client(), h2c_client()] {
        let req = Request::get(proxy.url("/v1/x"))
            .body(Full::default())
            .unwrap();
        let (head, body) = collect(send(&client, req).await).await;
        assert_eq!(head.status(), 200);
        assert_eq!(&body[..], b"hello world");
        assert_ne!(
            head.headers().get("content-length").map(|v| v.as_bytes()),
            Some(&b"5"[..]),
            "the upstream's length must not frame what sluice sends"
        );
    }
}

#[tokio::test]
async fn an_sse_stream_with_content_length_0_arrives_whole() {
    let up = answering(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndata: {\"n\":1}\n\n\r\nf\r\ndata: {\"n\":2}\n\n\r\n0\r\n\r\n",
    )
    .await;
    let proxy = Sidecar::start(&no_retry(&up.url()), &[]).await;
    let (head, body) = get(&proxy.url("/v1/x")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], b"data: {\"n\":1}\n\ndata: {\"n\":2}\n\n");
}

// 2. Transfer codings other than chunked.

#[tokio::test]
async fn a_gzip_transfer_coding_is_refused_not_passed_on_as_identity() {
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
    ] {
        let up = answering(Box::leak(response.to_vec().into_boxed_slice())).await;
        let proxy = Sidecar::start(&no_retry(&up.url()), &[]).await;
        let (head, body) = get(&proxy.url("/v1/x")).await;
        assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    }
}

// 3. 304 and 204 with conflicting or invalid lengths.

#[tokio::test]
async fn bodiless_responses_never_carry_an_invalid_or_conflicting_length() {
    for (response, expected) in [
        (
            &b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            None,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: -1, x\r\n\r\n",
            None,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            Some("5"),
        ),
        (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            None,
        ),
    ] {
        let up = answering(Box::leak(response.to_vec().into_boxed_slice())).await;
        let proxy = Sidecar::start(&no_retry(&up.url()), &[]).await;
        let mut conn = raw_request(proxy.addr, b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let res = conn.response(BOUND).await;
        let lengths = res.all("content-length");
        assert_eq!(lengths, expected.into_iter().collect::<Vec<_>>(), "{res:?}");
    }
}

// 4. Route path checks escaped with encodings.

#[tokio::test]
async fn encoded_dot_segments_and_separators_are_refused_before_routing() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let toml = format!(
        "[upstreams.up]\nurl = \"{}\"\n\n[[routes]]\nname = \"allowed\"\npath_prefix = \"/v1/allowed\"\nupstream = \"up\"\n",
        mock.url()
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    for path in [
        "/v1/allowed/..%2fsecret",
        "/v1/allowed/%2e%2e%2fsecret",
        "/v1/allowed/..\\secret",
        "/v1/allowed/..%5csecret",
        "/v1/allowed/..;/secret",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let res = raw_request(proxy.addr, req.as_bytes())
            .await
            .response(BOUND)
            .await;
        assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    }
    assert!(mock.seen().is_empty(), "nothing reached the upstream");
    let (head, _) = get(&proxy.url("/v1/allowed/ok")).await;
    assert_eq!(head.status(), 200);
}

// 5. An early answer does not cut the upload.

#[tokio::test]
async fn an_upload_goes_on_after_an_early_answer_has_ended() {
    const UPLOAD: usize = 1536 * 1024;
    let received = Arc::new(AtomicUsize::new(0));
    let (got, done) = (received.clone(), Arc::new(tokio::sync::Notify::new()));
    let finished = done.clone();
    let up = RawUpstream::start(move |mut conn| {
        let (got, done) = (got.clone(), done.clone());
        async move {
            conn.request_head().await;
            // The whole answer at once, before reading any of the body.
            conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            while !conn.buf.ends_with(b"0\r\n\r\n") {
                if conn.read_more().await == 0 {
                    break;
                }
            }
            got.store(dechunk(&conn.buf).len(), SeqCst);
            done.notify_one();
        }
    })
    .await;
    let proxy = Sidecar::start(&no_retry(&up.url()), &[]).await;
    let (tx, body) = channel();
    let mut conn = h1_connection(proxy.addr).await;
    let req = Request::post("/v1/upload")
        .header("host", "x")
        .body(body)
        .unwrap();
    let res = tokio::spawn(async move { conn.send_request(req).await });
    let piece = Bytes::from(vec![b'a'; 64 * 1024]);
    tx.send(piece.clone()).await.unwrap();
    let res = tokio::time::timeout(BOUND, res)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (head, body) = collect(res).await;
    assert_eq!((head.status().as_u16(), &body[..]), (200, &b"ok"[..]));
    // The answer has ended; the rest of the upload still goes.
    for _ in 1..UPLOAD / piece.len() {
        tx.send(piece.clone()).await.unwrap();
    }
    drop(tx);
    tokio::time::timeout(BOUND, finished.notified())
        .await
        .unwrap();
    assert_eq!(
        received.load(SeqCst),
        UPLOAD,
        "every byte reached the upstream"
    );
}

/// The data of a chunked body (a test helper: sizes and CRLFs checked).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap(), 16).unwrap();
        raw = &raw[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n");
        raw = &raw[size + 2..];
    }
}

// 7. A client that stops reading.

/// An endless SSE upstream: 8 KiB events, as fast as they are taken. The
/// counter drops to zero when sluice drops the stream.
async fn endless_sse() -> (Mock, Arc<AtomicUsize>) {
    let open = Arc::new(AtomicUsize::new(0));
    let o = open.clone();
    let mock = Mock::start(move |_| {
        let o = o.clone();
        async move {
            let (tx, body) = channel();
            o.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let event = Bytes::from(format!("data: {}\n\n", "x".repeat(8 * 1024)));
                while tx.send(event.clone()).await.is_ok() {}
                o.fetch_sub(1, SeqCst);
            });
            sse(body)
        }
    })
    .await;
    (mock, open)
}

/// Waits until the upstream stream is gone; how long that took.
async fn until_closed(open: &AtomicUsize, bound: Duration) -> Duration {
    let start = Instant::now();
    while open.load(SeqCst) > 0 {
        assert!(
            start.elapsed() < bound,
            "the upstream stream is still open after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

async fn read_one_event_then_stop(addr: SocketAddr) -> Conn {
    let mut conn = raw_request(addr, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    conn.wait_for(b"\n\n", BOUND).await;
    conn
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_send_timeout_and_frees_its_slot() {
    let (mock, open) = endless_sse().await;
    let toml = format!(
        "[server]\nsend_timeout = \"1s\"\n\n{}\n[routes.rate_limit]\nmax_concurrent = 1\n",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let _stalled = read_one_event_then_stop(proxy.addr).await;
    let took = until_closed(&open, BOUND).await;
    assert!(
        took >= Duration::from_millis(900),
        "not before send_timeout: {took:?}"
    );
    // The slot is free again: a new stream is admitted.
    let res = open_stream(&proxy).await;
    assert_eq!(res.status(), 200);
}

async fn open_stream(proxy: &Sidecar) -> http::Response<hyper::body::Incoming> {
    open(&proxy.url("/v1/stream")).await
}

#[tokio::test]
async fn total_fires_even_while_the_client_is_not_reading() {
    let (mock, open) = endless_sse().await;
    let toml = format!(
        "{}\n[routes.timeouts]\ntotal = \"2s\"\n",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let start = Instant::now();
    let _stalled = read_one_event_then_stop(proxy.addr).await;
    until_closed(&open, BOUND).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "cut at the total deadline, not at send_timeout (60 s): {took:?}"
    );
}

#[tokio::test]
async fn an_h2_stream_nobody_reads_is_cut_after_send_timeout() {
    let (mock, open) = endless_sse().await;
    let toml = format!(
        "[server]\nsend_timeout = \"1s\"\n\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let req = Request::get(proxy.url("/v1/stream"))
        .body(Full::default())
        .unwrap();
    // The response is held, its body never read: the stream's window fills.
    let res = send(&h2c_client(), req).await;
    assert_eq!(res.status(), 200);
    let took = until_closed(&open, BOUND).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
    drop(res);
}

// 8. HTTP/2 head trickle and rapid reset.

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn an_h2_client_trickling_continuation_frames_is_cut_off() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let toml = format!(
        "[server]\nheader_read_timeout = \"1s\"\n\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    // HEADERS without END_HEADERS (:method GET, :scheme http, :path /).
    s.write_all(&h2_frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84]))
        .await
        .unwrap();
    let (read, mut write) = s.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // One header byte at a time: a literal that never ends.
            if write
                .write_all(&h2_frame(0x9, 0, 1, &[0x40]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let (_, took) = Conn::new(read).read_until_closed(BOUND).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    trickle.abort();
    // Others are served meanwhile and after.
    assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_leaves_sluice_responsive_and_its_cpu_bounded() {
    let mock = Mock::start(|_| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        json(200, "{}")
    })
    .await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Process::start(&toml, &[]).await;
    let addr = proxy.addr;
    let cpu_before = proxy.cpu_time();
    let attack = tokio::spawn(async move {
        let start = Instant::now();
        let (mut resets, mut conns) = (0usize, 0usize);
        while start.elapsed() < Duration::from_secs(3) {
            let Ok(tcp) = TcpStream::connect(addr).await else {
                continue;
            };
            let Ok((mut h2, conn)) = h2::client::handshake(tcp).await else {
                continue;
            };
            conns += 1;
            tokio::spawn(conn);
            for _ in 0..500 {
                // Ready: the stream really goes out (the server's limits hold it back).
                let Ok(ready) = h2.ready().await else { break };
                h2 = ready;
                let req = Request::get(format!("http://{addr}/v1/x"))
                    .body(())
                    .unwrap();
                let Ok((_, mut stream)) = h2.send_request(req, false) else {
                    break;
                };
                stream.send_reset(h2::Reason::CANCEL);
                resets += 1;
            }
        }
        (resets, conns)
    });
    // A well-behaved client keeps being served throughout.
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert_eq!(get(&proxy.url("/v1/x")).await.0.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    let (resets, conns) = attack.await.unwrap();
    let cpu = proxy.cpu_time() - cpu_before;
    eprintln!(
        "rapid reset: {resets} streams opened and reset on {conns} connections in 3 s; \
         sluice used {cpu:?} of CPU; slowest request {slowest:?}"
    );
    assert!(
        conns > 10,
        "the attack ran, and sluice ended its connections: {conns}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "served throughout: {slowest:?}"
    );
    assert!(
        cpu < Duration::from_secs(3),
        "less than one core over 3 s: {cpu:?}"
    );
}

// 9. sluice's own 400 and 431.

#[tokio::test]
async fn an_oversized_head_gets_sluices_431() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let mut req = b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.resize(req.len() + 70 * 1024, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    let res = raw_request(proxy.addr, &req).await.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 431, "request_headers_too_large");
    assert!(mock.seen().is_empty());
}

// 10. File-descriptor exhaustion, and the connection cap.

#[tokio::test]
async fn past_max_connections_new_clients_are_closed_at_once() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let toml = format!(
        "[server]\nmax_connections = 2\n\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Sidecar::start(&toml, &[]).await;
    let req = b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = raw_request(proxy.addr, req).await;
    first.response(BOUND).await;
    let mut second = raw_request(proxy.addr, req).await;
    second.response(BOUND).await;
    let mut third = raw_request(proxy.addr, req).await;
    assert!(matches!(third.reply(BOUND).await, Reply::Closed(_)));
    drop(first);
    // Once one leaves, a new client is served again.
    let mut served = false;
    for _ in 0..50 {
        let mut s = raw_request(proxy.addr, req).await;
        if let Reply::Response(res) = s.reply(BOUND).await {
            assert_eq!(res.status, 200);
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a slot freed is used again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 10000\n\n{}",
        one_route(&mock.url(), "")
    );
    let proxy = Process::start_with_nofile(&toml, &[], 64).await;
    // A keep-alive connection with a pooled upstream connection behind it.
    let mut kept = raw_request(proxy.addr, b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    kept.response(BOUND).await;
    // Then clients until the descriptors run out.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_before = proxy.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = proxy.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(500),
        "the accept loop spins: {cpu:?} in 2 s"
    );
    let log = proxy.output();
    let failures = log.matches("accept failed").count();
    assert!(
        (1..=2).contains(&failures),
        "logged at a bounded rate: {failures}\n{log}"
    );
    // The connection it has is still served.
    kept.send(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(kept.response(BOUND).await.status, 200);
    // Descriptors freed: new clients are accepted again.
    drop(idle);
    let mut s = raw_request(proxy.addr, b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(s.response(BOUND).await.status, 200);
}

// 11. `sluice check` reports every error.

#[test]
fn check_reports_a_type_error_and_an_unknown_key_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let toml = format!(
        "[server]\nlistn = \"x\"\n\n{}\n[routes.retry]\nattempts = \"three\"\n",
        one_route("http://h", "")
    );
    std::fs::write(&path, toml).unwrap();
    let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(":2:1: server.listn: unknown field `listn`"),
        "{err}"
    );
    assert!(
        err.contains("routes[0].retry.attempts: invalid type"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
}
