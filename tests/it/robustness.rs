//! Client-side robustness: malformed requests get a 4xx or a close, never a
//! panic or a hang, and `header_read_timeout` cuts off slow clients (h1
//! headers trickled, nothing sent, a partial h2c preface) while other
//! clients are served.
//!
//! The malformed-request tests run the real binary (`Process`): inside the
//! test process a panicking connection task would be invisible (tokio
//! catches it and the server keeps accepting), while the binary's stderr
//! shows every panic. Each test then proves the server is still healthy: a
//! normal request gets the mock's 200 and SIGTERM still exits 0.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::raw::{Conn, Reply};
use crate::support::{assert_sluice_error, get, json, sluice_toml, Mock, Process, Sidecar};

/// Generous bound for "answered or closed": hyper answers in milliseconds.
const BOUND: Duration = Duration::from_secs(5);

/// A mock upstream that answers every request 200, and sluice in front of it
/// as a real process.
struct Harness {
    mock: Mock,
    sluice: Process,
}

impl Harness {
    async fn start() -> Harness {
        let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
        // admin_listen = "": parallel tests must not fight over the default port.
        let toml = sluice_toml(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\nshutdown_grace = \"2s\"",
            &mock.url(),
            "",
        );
        let sluice = Process::start(&toml, &[]).await;
        Harness { mock, sluice }
    }

    /// Sends `raw` on a new connection; returns the reply (or the close).
    async fn probe(&self, raw: &[u8]) -> Reply {
        let mut s = Conn::open(self.sluice.addr).await;
        s.send(raw).await;
        s.reply(BOUND).await
    }

    /// The process survived: a well-formed request is still proxied, the
    /// malformed one never reached the upstream, no panic was logged, and
    /// SIGTERM still ends it cleanly.
    async fn assert_survived(mut self) {
        let (head, body) = get(&self.sluice.url("/v1/after")).await;
        assert_eq!(head.status(), 200, "normal request after the malformed one");
        assert_eq!(&body[..], br#"{"ok":true}"#);
        let seen = self.mock.seen();
        assert_eq!(
            seen.len(),
            1,
            "only the normal request reaches the upstream: {seen:?}"
        );
        assert_eq!(seen[0].uri.path(), "/v1/after");
        assert_eq!(self.sluice.stop().await, Some(0), "clean exit on SIGTERM");
        let log = self.sluice.output();
        assert!(!log.contains("panicked"), "sluice panicked:\n{log}");
    }
}

/// sluice's own 400 (OpenAI-shaped, with `x-sluice-error`) for a head it
/// cannot serve, with the connection closed after it.
#[track_caller]
fn assert_refused(reply: Reply) {
    let res = reply.response();
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    assert_eq!(res.get("connection"), Some("close"));
}

#[tokio::test]
async fn garbage_bytes_get_400() {
    let h = Harness::start().await;
    let reply = h.probe(b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_refused(reply);
    h.assert_survived().await;
}

#[tokio::test]
async fn invalid_uri_gets_400() {
    let h = Harness::start().await;
    // httparse accepts the characters; http::Uri rejects the unclosed IPv6 literal.
    let reply = h
        .probe(b"GET http://[bad/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_refused(reply);
    // A control character in the request target: rejected by the parser itself.
    let reply = h.probe(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_refused(reply);
    h.assert_survived().await;
}

#[tokio::test]
async fn conflicting_or_invalid_content_length_gets_400() {
    let h = Harness::start().await;
    // Two different lengths: the framing is ambiguous (request smuggling).
    let reply = h
        .probe(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        .await;
    assert_refused(reply);
    let reply = h
        .probe(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello")
        .await;
    assert_refused(reply);
    let reply = h
        .probe(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello")
        .await;
    assert_refused(reply);
    h.assert_survived().await;
}

#[tokio::test]
async fn invalid_chunk_size_gets_sluice_400() {
    let h = Harness::start().await;
    // The head is fine, so sluice's handler runs and reads the body itself:
    // the decode error must become its own 400, not a panic or a forwarded
    // half-body.
    let mut s = Conn::open(h.sluice.addr).await;
    s.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .await;
    let res = s.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    // The framing is lost, so the connection cannot be reused: it is closed.
    s.read_until_closed(BOUND).await;
    drop(s);
    h.assert_survived().await;
}

/// A 100 KiB header line is refused (431), not forwarded: sluice caps request
/// heads at 64 KiB as Envoy does (60 KiB); hyper alone allows ~400 KiB.
#[tokio::test]
async fn header_line_of_100_kib_is_rejected() {
    let h = Harness::start().await;
    let mut req = b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.resize(req.len() + 100 * 1024, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    let reply = h.probe(&req).await;
    match reply {
        Reply::Response(res) => assert!(res.status / 100 == 4, "got {res:?}"),
        Reply::Closed(_) => {}
    }
    h.assert_survived().await;
}

#[tokio::test]
async fn headers_over_the_read_buffer_get_431() {
    let h = Harness::start().await;
    // 1 MiB of one header: past hyper's buffer whatever the configuration.
    let mut req = b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Huge: ".to_vec();
    req.resize(req.len() + 1024 * 1024, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    // The server may stop reading (and close) while we are still writing.
    let mut s = Conn::open(h.sluice.addr).await;
    let _ = s.stream.write_all(&req).await;
    match s.reply(BOUND).await {
        Reply::Response(res) => assert_eq!(res.status, 431, "{res:?}"),
        // Closing with our unread bytes in its buffer makes the kernel send
        // a reset, which can overtake the 431: a close is also a rejection.
        Reply::Closed(got) => assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 431"),
            "{got:?}"
        ),
    }
    drop(s);
    h.assert_survived().await;
}

#[tokio::test]
async fn connect_method_gets_sluice_400() {
    let h = Harness::start().await;
    // sluice is a reverse proxy: it must not open tunnels for anyone.
    let reply = h
        .probe(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await;
    let res = reply.response();
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    h.assert_survived().await;
}

#[tokio::test]
async fn options_asterisk_gets_sluice_400() {
    let h = Harness::start().await;
    // `*` has no path to route on; it must not reach the upstream as "/*" or "/".
    let reply = h.probe(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let res = reply.response();
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    h.assert_survived().await;
}

// ---- header_read_timeout -------------------------------------------------

/// sluice in-process with `header_read_timeout = "1s"`.
async fn sidecar_with_1s_header_timeout() -> (Mock, Sidecar) {
    let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    let sidecar = Sidecar::in_front_of(&mock.url(), "header_read_timeout = \"1s\"").await;
    (mock, sidecar)
}

/// The close came from the timeout: not at once (which a panic or an eager
/// close would give), and well within 5 s of a 1 s timeout. Whatever arrived
/// before the close is nothing or a 408.
#[track_caller]
fn assert_cut_off_by_timeout(got: &[u8], after: Duration) {
    assert!(
        after >= Duration::from_millis(500),
        "closed after {after:?}: too early for a 1 s timeout"
    );
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(got)
    );
}

/// Fails if the h1 builder had no timer: hyper then either panics on the
/// connection (A closed at once, B gets no 200) or, with the timeout left
/// unset, uses no timeout or its 30 s default (A still open at 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_while_others_are_served() {
    let (mock, sidecar) = sidecar_with_1s_header_timeout().await;

    // Client A: a request line and one header, then one byte every 200 ms,
    // never the blank line that ends the head.
    let start = Instant::now();
    let a = TcpStream::connect(sidecar.addr).await.unwrap();
    let (a_read, mut a_write) = a.into_split();
    a_write
        .write_all(b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (trickling_tx, trickling_rx) = tokio::sync::oneshot::channel();
    let trickle = tokio::spawn(async move {
        let mut trickling_tx = Some(trickling_tx);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let bytes = b"X-Slow: ".iter().copied().chain(std::iter::repeat(b'a'));
        for (i, byte) in bytes.enumerate() {
            tick.tick().await;
            if a_write.write_all(&[byte]).await.is_err() {
                return i;
            }
            if i == 1 {
                // Two bytes in: A is visibly trickling.
                let _ = trickling_tx.take().unwrap().send(());
            }
        }
        unreachable!()
    });
    let a_closed = tokio::spawn(async move {
        let (got, _) = Conn::new(a_read)
            .read_until_closed(Duration::from_secs(10))
            .await;
        (got, start.elapsed())
    });

    // Client B: while A trickles, a normal request is served at once.
    tokio::time::timeout(BOUND, trickling_rx)
        .await
        .unwrap()
        .unwrap();
    let (head, _) = get(&sidecar.url("/v1/fast")).await;
    assert_eq!(head.status(), 200);
    assert!(
        !a_closed.is_finished(),
        "B was served while A was still connected and trickling"
    );

    let (got, after) = a_closed.await.unwrap();
    assert_cut_off_by_timeout(&got, after);
    // A never produced a request: only B reached the upstream.
    let seen = mock.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri.path(), "/v1/fast");
    // The trickle stops on a write error once sluice closed the socket.
    let written = tokio::time::timeout(BOUND, trickle).await.unwrap().unwrap();
    assert!(written >= 2, "{written} bytes trickled");
}

/// A client that connects and says nothing is closed by sluice's own
/// protocol sniff (bounded by header_read_timeout), before hyper is involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_cut_off() {
    let (_mock, sidecar) = sidecar_with_1s_header_timeout().await;
    let start = Instant::now();
    let mut silent = Conn::open(sidecar.addr).await;
    let closed = tokio::spawn(async move {
        let (got, _) = silent.read_until_closed(Duration::from_secs(10)).await;
        (got, start.elapsed())
    });
    // Others are served meanwhile.
    let (head, _) = get(&sidecar.url("/v1/fast")).await;
    assert_eq!(head.status(), 200);
    let (got, after) = closed.await.unwrap();
    assert_cut_off_by_timeout(&got, after);
}

/// A partial HTTP/2 preface keeps the sniff undecided (it could still become
/// h2c); the timeout must still end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_h2_preface_is_cut_off() {
    let (_mock, sidecar) = sidecar_with_1s_header_timeout().await;
    let start = Instant::now();
    let mut partial = Conn::open(sidecar.addr).await;
    partial.send(b"PRI * HTTP/2.0\r\n").await;
    let closed = tokio::spawn(async move {
        let (got, _) = partial.read_until_closed(Duration::from_secs(10)).await;
        (got, start.elapsed())
    });
    let (head, _) = get(&sidecar.url("/v1/fast")).await;
    assert_eq!(head.status(), 200);
    let (got, after) = closed.await.unwrap();
    assert_cut_off_by_timeout(&got, after);
}
