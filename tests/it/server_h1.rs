//! sluice's own HTTP/1.1 server (src/server/h1.rs), seen from a raw TCP
//! client: keep-alive, pipelining, the handover to hyper in the middle of a
//! connection, bodies that trickle in or break off, the framing and headers
//! of responses, `Connection: close`, the idle timeout and the drain.
//!
//! Responses are read with the raw reader (`support::raw::Conn`), which keeps
//! the bytes past one response for the next and de-chunks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::support::mock::{full, read_body};
use crate::support::raw::{chunk, Conn, Message};
use crate::support::{
    assert_sluice_error, channel, pattern, sluice_toml, Mock, MockBody, Process, Sidecar,
};

/// Generous bound for anything that should take milliseconds.
const BOUND: Duration = Duration::from_secs(10);

/// `[server]` lines for the binary, with a long grace: a prompt close comes
/// from the drain, not from the grace ending.
const LONG_GRACE: &str = "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\nshutdown_grace = \"30s\"";

// ---- requests, and what is checked of every response ----------------------

/// The checks these tests make of a response.
trait Check {
    fn assert_ok(&self, body: &str);
    fn assert_date(&self);
}

impl Check for Message {
    /// Status 200 and this body.
    #[track_caller]
    fn assert_ok(&self, body: &str) {
        assert_eq!(self.status, 200, "{self:?} body {:?}", self.text());
        assert_eq!(self.text(), body, "{self:?}");
    }

    /// A `date` header, exactly one, that parses as an HTTP date.
    #[track_caller]
    fn assert_date(&self) {
        let date = self
            .get("date")
            .unwrap_or_else(|| panic!("no date header: {self:?}"));
        assert!(httpdate::parse_http_date(date).is_ok(), "date: {date:?}");
    }
}

fn get_req(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

fn post_req(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// A POST whose body is sent chunked, in these pieces.
fn chunked_req(path: &str, pieces: &[&[u8]]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for p in pieces {
        req.extend_from_slice(&chunk(p));
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

// ---- the upstream ----------------------------------------------------------

/// The request bodies the mock read, in order, by path (a body that broke
/// off is recorded as `BROKEN: ...`).
type Bodies = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A mock that answers `GET|POST <path> <body>` as text, except:
/// `/v1/stream` streams `STREAM` in two frames 100 ms apart (no length),
/// `/v1/empty` answers 204, and `/v1/slow` answers after 300 ms.
async fn echo_mock() -> (Mock, Bodies) {
    let bodies: Bodies = Arc::default();
    let log = bodies.clone();
    let mock = Mock::start(move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let body = match read_body(req.into_body()).await {
                Ok(b) => b,
                Err((_, e)) => Bytes::from(format!("BROKEN: {e}")),
            };
            log.lock().unwrap().push((path.clone(), body.clone()));
            if path == "/v1/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            match path.as_str() {
                "/v1/stream" => streamed(),
                "/v1/empty" => Response::builder()
                    .status(204)
                    .body(full(Bytes::new()))
                    .unwrap(),
                _ => {
                    let text = format!("{method} {path} {}", String::from_utf8_lossy(&body));
                    Response::builder()
                        .header("content-type", "text/plain")
                        .body(full(text))
                        .unwrap()
                }
            }
        }
    })
    .await;
    (mock, bodies)
}

/// The two frames `/v1/stream` sends.
const STREAM: [&str; 2] = ["data: first frame\n\n", "data: second, later\n\n"];

/// A body of unknown length: two frames 100 ms apart, then the end.
fn streamed() -> Response<MockBody> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        tx.send(Bytes::from_static(STREAM[0].as_bytes()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Bytes::from_static(STREAM[1].as_bytes()))
            .await
            .unwrap();
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// The bodies the mock read, as (path, text).
fn bodies(b: &Bodies) -> Vec<(String, String)> {
    b.lock()
        .unwrap()
        .iter()
        .map(|(p, b)| (p.clone(), String::from_utf8_lossy(b).into_owned()))
        .collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, b)| (p.to_string(), b.to_string()))
        .collect()
}

// ---- keep-alive and pipelining --------------------------------------------

#[tokio::test]
async fn three_requests_in_turn_on_one_connection_are_all_answered() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/models")).await;
    let first = conn.response(BOUND).await;
    first.assert_ok("GET /v1/models ");
    assert_eq!(first.version, 1, "{first:?}");
    assert!(first.get("connection").is_none(), "{first:?}");
    conn.send(&post_req("/v1/chat/completions", br#"{"n":2}"#))
        .await;
    conn.response(BOUND)
        .await
        .assert_ok(r#"POST /v1/chat/completions {"n":2}"#);
    conn.send(&get_req("/v1/third")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/third ");
    let seen = mock.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.uri.path()).collect();
    assert_eq!(
        paths,
        ["/v1/models", "/v1/chat/completions", "/v1/third"],
        "{seen:?}"
    );
    assert_eq!(
        bodies(&bodies_seen),
        owned(&[
            ("/v1/models", ""),
            ("/v1/chat/completions", r#"{"n":2}"#),
            ("/v1/third", "")
        ])
    );
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    let mut reqs = post_req("/v1/one", b"body-one");
    reqs.extend_from_slice(&get_req("/v1/two"));
    reqs.extend_from_slice(&post_req("/v1/three", b"body-three"));
    conn.send(&reqs).await;
    conn.response(BOUND)
        .await
        .assert_ok("POST /v1/one body-one");
    conn.response(BOUND).await.assert_ok("GET /v1/two ");
    conn.response(BOUND)
        .await
        .assert_ok("POST /v1/three body-three");
    assert_eq!(
        bodies(&bodies_seen),
        owned(&[
            ("/v1/one", "body-one"),
            ("/v1/two", ""),
            ("/v1/three", "body-three")
        ])
    );
    // Still open for more.
    conn.send(&get_req("/v1/four")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/four ");
}

/// Requests written while the one before is still upstream are read by
/// the server as it watches for the client going away: they must be kept,
/// and answered after it, in order, including one hyper takes over.
#[tokio::test]
async fn requests_written_while_one_is_upstream_are_answered_after_it() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&post_req("/v1/slow", b"slow")).await;
    // The mock holds /v1/slow for 300 ms: these arrive while it waits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut more = get_req("/v1/two");
    more.extend_from_slice(&chunked_req("/v1/three", &[b"thr", b"ee"]));
    more.extend_from_slice(&post_req("/v1/four", b"four"));
    conn.send(&more).await;
    conn.response(BOUND).await.assert_ok("POST /v1/slow slow");
    conn.response(BOUND).await.assert_ok("GET /v1/two ");
    conn.response(BOUND).await.assert_ok("POST /v1/three three");
    conn.response(BOUND).await.assert_ok("POST /v1/four four");
    assert_eq!(
        bodies(&bodies_seen),
        owned(&[
            ("/v1/slow", "slow"),
            ("/v1/two", ""),
            ("/v1/three", "three"),
            ("/v1/four", "four")
        ])
    );
}

/// The same while a response body streams (the server waits between its
/// frames and reads the client meanwhile).
#[tokio::test]
async fn a_request_written_while_a_stream_is_under_way_is_answered_after_it() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/stream")).await;
    // Read the head and the first frame, so the stream is surely under way.
    conn.wait_for(STREAM[0].as_bytes(), BOUND).await;
    // The second frame comes 100 ms after the first.
    conn.send(&post_req("/v1/next", b"next")).await;
    let res = conn.response(BOUND).await;
    assert_eq!(res.text(), STREAM.concat(), "{res:?}");
    conn.response(BOUND).await.assert_ok("POST /v1/next next");
}

// ---- the handover to hyper -----------------------------------------------

#[tokio::test]
async fn a_chunked_post_after_a_plain_one_is_handed_over_with_its_bytes() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    // Served by sluice's own server.
    conn.send(&post_req("/v1/plain", br#"{"plain":true}"#))
        .await;
    conn.response(BOUND)
        .await
        .assert_ok(r#"POST /v1/plain {"plain":true}"#);
    // Chunked: sluice reads its head (and some of its body) and hands the
    // connection, with those bytes, to hyper.
    conn.send(&chunked_req(
        "/v1/chunked",
        &[b"{\"chunked\":", b"\"yes\",", b"\"n\":3}"],
    ))
    .await;
    conn.response(BOUND)
        .await
        .assert_ok(r#"POST /v1/chunked {"chunked":"yes","n":3}"#);
    // hyper serves the rest of the connection.
    conn.send(&post_req("/v1/after", b"after")).await;
    conn.response(BOUND).await.assert_ok("POST /v1/after after");
    assert_eq!(
        bodies(&bodies_seen),
        owned(&[
            ("/v1/plain", r#"{"plain":true}"#),
            ("/v1/chunked", r#"{"chunked":"yes","n":3}"#),
            ("/v1/after", "after"),
        ])
    );
}

/// The handover with pipelined bytes: when the chunked request comes, the
/// bytes sluice read already hold its head, its body and the request after
/// it; hyper must get every one of them.
#[tokio::test]
async fn a_pipelined_chunked_post_is_handed_over_with_what_follows_it() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    let mut reqs = post_req("/v1/one", b"one");
    reqs.extend_from_slice(&chunked_req("/v1/two", &[b"tw", b"o"]));
    reqs.extend_from_slice(&post_req("/v1/three", b"three"));
    conn.send(&reqs).await;
    conn.response(BOUND).await.assert_ok("POST /v1/one one");
    conn.response(BOUND).await.assert_ok("POST /v1/two two");
    conn.response(BOUND).await.assert_ok("POST /v1/three three");
    assert_eq!(
        bodies(&bodies_seen),
        owned(&[
            ("/v1/one", "one"),
            ("/v1/two", "two"),
            ("/v1/three", "three")
        ])
    );
}

// ---- bodies that arrive slowly or not at all -------------------------------

#[tokio::test]
async fn a_body_arriving_in_pieces_is_awaited_and_forwarded_whole() {
    let (mock, bodies_seen) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let body = pattern(3000);
    let mut conn = Conn::open(sluice.addr).await;
    let req = post_req("/v1/pieces", &body);
    let head_len = req.len() - body.len();
    conn.send(&req[..head_len]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.send(&body[..1500]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        mock.seen().is_empty(),
        "dispatched before the body was complete"
    );
    conn.send(&body[1500..]).await;
    let res = conn.response(BOUND).await;
    let text = std::str::from_utf8(&body).unwrap();
    res.assert_ok(&format!("POST /v1/pieces {text}"));
    assert_eq!(bodies(&bodies_seen), owned(&[("/v1/pieces", text)]));
    assert_eq!(mock.seen()[0].headers["content-length"], "3000");
    // The connection goes on.
    conn.send(&get_req("/v1/next")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/next ");
}

/// Runs the binary (a panic would show in its log) and cuts two bodies
/// short: one client half-closes after 10 of 100 bytes, one goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_mid_body_sends_nothing_upstream() {
    let (mock, bodies_seen) = echo_mock().await;
    let toml = sluice_toml(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\nshutdown_grace = \"2s\"",
        &mock.url(),
        "",
    );
    let mut sluice = Process::start(&toml, &[]).await;
    let partial = b"POST /v1/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";

    // Half-closed: it can still read, and gets sluice's 400 (as when hyper
    // reads the body); the broken body is refused before any upstream work.
    let mut s = Conn::open(sluice.addr).await;
    s.send(partial).await;
    s.stream.shutdown().await.unwrap();
    let res = s.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    assert_eq!(res.get("connection"), Some("close"), "{res:?}");
    // The connection is not reused after a broken body.
    s.assert_closed_within(BOUND).await;
    drop(s);

    // Gone altogether.
    let mut s = Conn::open(sluice.addr).await;
    s.send(partial).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Served afterwards, on a new connection.
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/after")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/after ");
    let seen = mock.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the whole request went upstream: {seen:?}"
    );
    assert_eq!(bodies(&bodies_seen), owned(&[("/v1/after", "")]));
    assert_eq!(sluice.stop().await, Some(0), "clean exit on SIGTERM");
    let log = sluice.output();
    assert!(!log.contains("panicked"), "sluice panicked:\n{log}");
}

// ---- response framing ------------------------------------------------------

#[tokio::test]
async fn a_response_of_known_length_is_sent_with_content_length() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&post_req("/v1/known", b"0123456789")).await;
    let res = conn.response(BOUND).await;
    let expected = "POST /v1/known 0123456789";
    res.assert_ok(expected);
    assert_eq!(
        res.get("content-length"),
        Some(expected.len().to_string().as_str()),
        "{res:?}"
    );
    assert!(res.all("transfer-encoding").is_empty(), "{res:?}");
    assert_eq!(res.get("content-type"), Some("text/plain"));
    res.assert_date();
}

#[tokio::test]
async fn a_stream_of_unknown_length_is_sent_chunked() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/stream")).await;
    let res = conn.response(BOUND).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.get("transfer-encoding"), Some("chunked"), "{res:?}");
    assert!(res.all("content-length").is_empty(), "{res:?}");
    assert_eq!(res.get("content-type"), Some("text/event-stream"));
    assert_eq!(res.text(), STREAM.concat(), "de-chunked bytes exact");
    res.assert_date();
    // The last chunk ended the body: the connection carries on.
    conn.send(&get_req("/v1/next")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/next ");
}

#[tokio::test]
async fn a_204_has_no_body_nor_framing_headers_and_the_connection_goes_on() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&post_req("/v1/empty", b"x")).await;
    let res = conn.response(BOUND).await;
    assert_eq!(res.status, 204, "{res:?}");
    assert!(res.all("content-length").is_empty(), "{res:?}");
    assert!(res.all("transfer-encoding").is_empty(), "{res:?}");
    res.assert_date();
    // Had a body (even an empty chunked one) followed, it would be read as
    // the start of the next response, which would then not parse.
    conn.send(&get_req("/v1/next")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/next ");
    assert!(conn.buf.is_empty());
}

/// Every response carries one valid `date`: those passed on from the
/// upstream (which sent its own) and those sluice writes itself.
#[tokio::test]
async fn every_response_carries_a_date() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    for req in [
        get_req("/v1/models"),
        post_req("/v1/x", b"abc"),
        get_req("/v1/stream"),
        get_req("/v1/empty"),
    ] {
        conn.send(&req).await;
        conn.response(BOUND).await.assert_date();
    }
    // sluice's own error (no upstream date to pass on), on its own server.
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let res = conn.response(BOUND).await;
    assert_sluice_error(&res.head(), &res.body, 400, "bad_request");
    res.assert_date();
}

// ---- Connection: close, HEAD, HTTP/1.0 -------------------------------------

#[tokio::test]
async fn connection_close_is_answered_then_the_connection_is_closed() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(
        b"POST /v1/bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
    )
    .await;
    let res = conn.response(BOUND).await;
    res.assert_ok("POST /v1/bye bye");
    assert_eq!(res.get("connection"), Some("close"), "{res:?}");
    conn.assert_closed_within(Duration::from_secs(5)).await;
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn head_is_answered_without_a_body_and_the_connection_goes_on() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    // Served by sluice, then HEAD hands the connection to hyper.
    conn.send(&get_req("/v1/models")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/models ");
    conn.send(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let res = conn.head_response(BOUND).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.is_empty());
    // Had a body followed the head, the next response would not parse.
    conn.send(&get_req("/v1/models")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/models ");
    let methods: Vec<_> = mock.seen().iter().map(|s| s.method.clone()).collect();
    assert_eq!(methods, ["GET", "HEAD", "GET"]);
}

#[tokio::test]
async fn head_first_on_a_connection_is_answered_without_a_body() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let res = conn.head_response(BOUND).await;
    assert_eq!(res.status, 200, "{res:?}");
    conn.send(&get_req("/v1/models")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/models ");
}

#[tokio::test]
async fn an_http_1_0_request_is_answered() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    // Without keep-alive an HTTP/1.0 connection ends after its response:
    // one response, then the close, both within the bound.
    let res = tokio::time::timeout(BOUND, async {
        let res = conn.response(BOUND).await;
        conn.assert_closed_within(BOUND).await;
        res
    })
    .await
    .expect("one response and the close within the bound");
    res.assert_ok("GET /v1/models ");
    assert_eq!(mock.seen().len(), 1);
}

// ---- idle connections: the timeout and the drain ---------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_header_read_timeout() {
    let (mock, _) = echo_mock().await;
    let sluice = Sidecar::in_front_of(&mock.url(), "header_read_timeout = \"1s\"").await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/models")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/models ");
    let after = conn.assert_closed_within(Duration::from_secs(10)).await;
    assert!(
        after >= Duration::from_millis(800),
        "closed after {after:?}: too early for a 1 s timeout"
    );
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_an_idle_keep_alive_connection_at_once() {
    let (mock, _) = echo_mock().await;
    // A long grace: a prompt close comes from the drain, not from the grace ending.
    let toml = sluice_toml(LONG_GRACE, &mock.url(), "");
    let mut sluice = Process::start(&toml, &[]).await;
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(&get_req("/v1/models")).await;
    conn.response(BOUND).await.assert_ok("GET /v1/models ");
    // The blank line some clients send after a body is not a request begun.
    conn.send(b"\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    sluice.signal("TERM");
    conn.assert_closed_within(Duration::from_secs(2)).await;
    assert_eq!(
        sluice.exit_within(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        sluice.output()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = sluice.output();
    assert!(!log.contains("panicked"), "sluice panicked:\n{log}");
}

/// A request whose head began before the drain, and that sluice hands to
/// hyper (HEAD), is still answered (a 503, as on sluice's own path): hyper
/// must not take it for an idle connection it can close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_handed_to_hyper_during_the_drain_is_answered() {
    let (mock, _) = echo_mock().await;
    let toml = sluice_toml(LONG_GRACE, &mock.url(), "");
    let mut sluice = Process::start(&toml, &[]).await;
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut c = Conn::open(sluice.addr).await;
        c.send(b"HEAD /v1/models HTTP/1.1\r\n").await;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sluice.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut answered = 0;
    for c in &mut conns {
        c.send(b"Host: x\r\n\r\n").await;
        let (got, _) = c.read_until_closed(BOUND).await;
        if got.starts_with(b"HTTP/1.1 ") {
            answered += 1;
        }
    }
    let _ = sluice.exit_within(Duration::from_secs(10)).await;
    assert_eq!(answered, conns.len(), "some closed without a response");
}

/// A body still trickling in after `header_read_timeout` in all is handed to
/// hyper, where the route's `total` deadline bounds it: the client is
/// answered while it is still uploading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_past_header_read_timeout_is_bounded_by_the_route_deadline() {
    let (mock, seen) = echo_mock().await;
    let toml = sluice_toml(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\nheader_read_timeout = \"1s\"",
        &mock.url(),
        "\n[routes.timeouts]\ntotal = \"1s\"",
    );
    let sluice = Sidecar::start(&toml, &[]).await;
    let body = pattern(40);
    let mut conn = Conn::open(sluice.addr).await;
    let started = Instant::now();
    conn.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    // 40 bytes, one every 200 ms: 8 s in all, each read well within 1 s.
    let uploader = async {
        for b in &body {
            conn.stream.write_all(std::slice::from_ref(b)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), uploader).await;
    let res = conn.response(BOUND).await;
    assert_eq!(res.status, 504, "{res:?} {}", res.text());
    assert!(res.text().contains("deadline_exceeded"), "{}", res.text());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(bodies(&seen).is_empty(), "nothing reached the upstream");
}

/// A TLS connection accepted before the drain, whose handshake ends after
/// it began, is idle when sluice starts serving it: it is closed at once,
/// not after header_read_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_whose_handshake_ends_in_the_drain_is_closed_at_once() {
    use crate::support::certs::{Certs, ALPN_H1};
    let certs = Certs::generate();
    let (mock, _) = echo_mock().await;
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        certs.cert_pem.display(),
        certs.key_pem.display(),
    );
    let toml = sluice_toml(&format!("{LONG_GRACE}\n{tls}"), &mock.url(), "");
    let mut sluice = Process::start(&toml, &[]).await;
    // Accepted now; the TLS handshake waits for our ClientHello.
    let tcp = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sluice.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connector = tokio_rustls::TlsConnector::from(certs.client_config(&[ALPN_H1]));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("handshake");
    // Idle, as a client's pooled connection: the drain should close it.
    let (got, after) = Conn::new(tls)
        .read_until_closed(Duration::from_secs(20))
        .await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(
        after < Duration::from_secs(2),
        "idle connection closed only after {after:?} (header_read_timeout), not by the drain"
    );
    let _ = sluice.exit_within(Duration::from_secs(5)).await;
}
