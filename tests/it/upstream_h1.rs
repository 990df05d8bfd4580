//! Towards an HTTP/1.1 upstream: connections are kept alive and reused, a
//! connection the upstream closed is not, and every way an upstream can get
//! HTTP wrong (garbage, broken framing, bad heads, early answers) ends in a
//! 502 or an aborted body, never a hang, a panic or a truncated body that
//! looks complete. Edge cases of valid HTTP/1.1 (1xx, HEAD, 204, chunk
//! extensions, trailers, close-delimited bodies, HTTP/1.0) pass through.
//!
//! The upstream here is a bare TCP listener writing exact bytes (hyper's own
//! server cannot send broken HTTP), and it counts the connections it
//! accepts: reuse is what the upstream sees, not what sluice says. Every
//! route has retries off, so a retry cannot hide a failure.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::support::mock::repeat;
use crate::support::raw::chunk;
use crate::support::upstream::RawUpstream;
use crate::support::{
    assert_sluice_error, client, h1_connection, json, pattern, sluice_toml, Mock, MockBody,
    Process, Sidecar,
};

/// Generous bound for anything that should take milliseconds.
const BOUND: Duration = Duration::from_secs(10);

/// A 200 with a content-length body (HTTP/1.1: keep-alive by default).
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// sluice in this process, `server` under `[server]`, in front of `up`, with
/// retries off.
async fn sluice(up: &RawUpstream, server: &str) -> Sidecar {
    let toml = sluice_toml(server, &up.url(), "\n[routes.retry]\nattempts = 1");
    Sidecar::start(&toml, &[]).await
}

/// `GET url` on a fresh client connection; the response, body unread.
async fn open(url: &str) -> Response<Incoming> {
    let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
    tokio::time::timeout(BOUND, client().request(req))
        .await
        .expect("a response within the bound: sluice hangs")
        .expect("a response")
}

/// `GET url`: the head, and the whole body, which must end cleanly.
async fn get(url: &str) -> (Response<()>, Bytes) {
    let (parts, body) = open(url).await.into_parts();
    let body = read_body(body)
        .await
        .unwrap_or_else(|e| panic!("{url}: the body ends cleanly: {e:?}"));
    (Response::from_parts(parts, ()), body)
}

/// [`crate::support::mock::read_body`] within the bound: `Ok` with every
/// byte on a clean end, `Err` with the bytes that came before it broke off.
async fn read_body(body: Incoming) -> Result<Bytes, (Bytes, String)> {
    tokio::time::timeout(BOUND, crate::support::mock::read_body(body))
        .await
        .expect("the body ends or breaks within the bound: sluice hangs")
}

/// Sends `req` on `conn` once it is free; the response, body unread.
async fn send_on<B>(conn: &mut SendRequest<B>, req: Request<B>) -> Response<Incoming>
where
    B: Body + Send + 'static,
{
    tokio::time::timeout(BOUND, async {
        conn.ready().await.expect("the client connection is usable");
        conn.send_request(req).await.expect("a response")
    })
    .await
    .expect("a response within the bound: sluice hangs")
}

fn request(method: &str, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sluice")
        .body(Empty::new())
        .unwrap()
}

// 1. Keep-alive reuse.

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = RawUpstream::keep_alive(|conn, req| ok(&format!("{conn}:{}", req.path))).await;
    let sluice = sluice(&up, "").await;
    // Five client connections, one after the other: the upstream pool is
    // sluice's, not the client's.
    for i in 0..5 {
        let path = format!("/v1/req{i}");
        let (head, body) = get(&sluice.url(&path)).await;
        assert_eq!(head.status(), 200);
        assert_eq!(body, format!("0:{path}"));
    }
    assert_eq!(up.accepted(), 1, "one upstream connection, reused");
    assert_eq!(up.conns(), [0; 5]);
}

// 2. A connection the upstream closed while idle is not reused.

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_reused() {
    let up = RawUpstream::start(|mut conn| async move {
        if let Some(req) = conn.request().await {
            conn.write(&ok(&format!("{}:{}", conn.index, req.path)))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Dropped: the upstream closes its end (an idle timeout upstream).
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    let (head, body) = get(&sluice.url("/v1/one")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], b"0:/v1/one");
    // Long after the close: sluice has had every chance to notice it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (head, body) = get(&sluice.url("/v1/two")).await;
    assert_eq!(
        head.status(),
        200,
        "the second request must not go to the closed connection: {body:?}"
    );
    assert_eq!(&body[..], b"1:/v1/two");
    assert_eq!(up.accepted(), 2);
}

// 3. Garbage instead of a status line.

#[tokio::test]
async fn garbage_instead_of_a_status_line_gets_502() {
    let up = RawUpstream::start(|mut conn| async move {
        if conn.request().await.is_some() {
            conn.write(b"HELLO\r\n\r\n").await;
            // Left open: sluice must not wait for more.
            conn.drain_until_closed().await;
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    let (head, body) = get(&sluice.url("/v1/x")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    assert_eq!(up.seen().len(), 1, "sent once: retries are off");
}

// 4. A body shorter than its framing promised.

/// `GET /v1/x` on a fresh client connection, for a response whose body the
/// upstream breaks after `partial`. The client gets the head (200, passed on
/// as it came), every byte the upstream sent, and then a body error: never a
/// body that looks complete, and never no response at all (a client that got
/// nothing may retry a request the upstream already served). The upstream's
/// head, bytes and close usually arrive in one read, so this also checks
/// that the abort waits for hyper to flush what it holds.
async fn assert_aborted(sluice: &Sidecar, partial: &[u8]) {
    let req = Request::get(sluice.url("/v1/x"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = tokio::time::timeout(BOUND, client().request(req))
        .await
        .expect("a response or a close within the bound: sluice hangs")
        .expect("the head reaches the client before the abort");
    assert_eq!(res.status(), 200, "the upstream's head");
    match read_body(res.into_body()).await {
        Ok(body) => panic!("a truncated body looked complete: {body:?}"),
        Err((got, _)) => assert_eq!(&got[..], partial, "the upstream's bytes, then the abort"),
    }
}

#[tokio::test]
async fn a_body_cut_short_of_its_content_length_is_aborted() {
    let up = RawUpstream::start(|mut conn| async move {
        if conn.request().await.is_some() {
            conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            // Dropped: closed 90 bytes early.
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    assert_aborted(&sluice, b"0123456789").await;
}

#[tokio::test]
async fn a_chunked_body_cut_off_before_its_last_chunk_is_aborted() {
    let up = RawUpstream::start(|mut conn| async move {
        if conn.request().await.is_some() {
            let mut res = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            res.extend_from_slice(&chunk(b"0123456789"));
            conn.write(&res).await;
            // Dropped: no last chunk.
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    assert_aborted(&sluice, b"0123456789").await;
}

// 5. Invalid chunked encoding mid-body.

/// An upstream that sends one good chunk, then an invalid chunk size, and
/// keeps the connection open (so only the decode error can end the body).
async fn broken_chunks(content_type: &'static str, first: &'static [u8]) -> RawUpstream {
    RawUpstream::start(move |mut conn| async move {
        if conn.request().await.is_some() {
            let mut res = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            res.extend_from_slice(&chunk(first));
            res.extend_from_slice(b"zz\r\n");
            conn.write(&res).await;
            conn.drain_until_closed().await;
        }
    })
    .await
}

#[tokio::test]
async fn invalid_chunk_size_mid_body_aborts_the_body() {
    let up = broken_chunks("application/json", b"{\"partial\":").await;
    let sluice = sluice(&up, "").await;
    assert_aborted(&sluice, b"{\"partial\":").await;
}

#[tokio::test]
async fn invalid_chunk_size_mid_sse_ends_with_an_error_event() {
    let up = broken_chunks("text/event-stream", b"data: {\"n\":1}\n\n").await;
    let sluice = sluice(&up, "").await;
    let res = open(&sluice.url("/v1/chat/completions")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let body = read_body(res.into_body())
        .await
        .expect("an SSE stream ends cleanly, with an error event");
    let rest = body
        .strip_prefix(b"data: {\"n\":1}\n\n".as_slice())
        .unwrap_or_else(|| panic!("the good event first: {body:?}"));
    let event = std::str::from_utf8(rest).unwrap();
    let json = event
        .strip_prefix("data: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("one final data event: {event:?}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["error"]["code"], "upstream_reset");
    assert_eq!(v["error"]["type"], "proxy_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("sluice: "));
}

// 6. A body delimited by the close.

#[tokio::test]
async fn a_close_delimited_body_passes_whole() {
    let body = pattern(256 * 1024);
    let expected = body.clone();
    let up = RawUpstream::start(move |mut conn| {
        let body = body.clone();
        async move {
            if conn.request().await.is_some() {
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n")
                    .await;
                conn.write(&body).await;
                // Dropped: the close ends the body.
            }
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    for _ in 0..2 {
        let res = open(&sluice.url("/v1/files/x/content")).await;
        assert_eq!(res.status(), 200);
        let got = read_body(res.into_body())
            .await
            .expect("a close-delimited body ends cleanly");
        assert_eq!(got.len(), expected.len());
        assert!(got[..] == expected[..], "the bytes arrive intact");
    }
    assert_eq!(up.accepted(), 2, "a closed connection is not reused");
}

// 7. Responses without a body: 204, and HEAD's with a content-length.

#[tokio::test]
async fn no_content_and_head_responses_end_without_a_body() {
    let up = RawUpstream::keep_alive(|conn, req| {
        if req.method == "HEAD" {
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n"
                .to_vec()
        } else if req.path == "/v1/empty" {
            b"HTTP/1.1 204 No Content\r\nx-up: 1\r\n\r\n".to_vec()
        } else {
            ok(&format!("{conn}:{}", req.path))
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    // One client connection: each response must end for the next to start.
    let mut conn = h1_connection::<Empty<Bytes>>(sluice.addr).await;
    let res = send_on(&mut conn, request("DELETE", "/v1/empty")).await;
    assert_eq!(res.status(), 204);
    assert_eq!(res.headers()["x-up"], "1");
    assert_eq!(read_body(res.into_body()).await.unwrap().len(), 0);
    let res = send_on(&mut conn, request("HEAD", "/v1/models")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-length"],
        "50",
        "HEAD's length passes through"
    );
    assert_eq!(read_body(res.into_body()).await.unwrap().len(), 0);
    let res = send_on(&mut conn, request("GET", "/v1/after")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        &read_body(res.into_body()).await.unwrap()[..],
        b"0:/v1/after"
    );
    // Had sluice waited for HEAD's 50 bytes, the upstream connection would
    // still be busy and the last request would have needed another.
    assert_eq!(up.accepted(), 1, "bodiless responses leave it reusable");
    assert_eq!(up.conns(), [0, 0, 0]);
}

// 8. Interim responses.

#[tokio::test]
async fn interim_responses_are_skipped() {
    let up = RawUpstream::keep_alive(|conn, req| {
        let mut res = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        res.extend_from_slice(
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        );
        res.extend_from_slice(&ok(&format!("{conn}:{}", req.path)));
        res
    })
    .await;
    let sluice = sluice(&up, "").await;
    for path in ["/v1/one", "/v1/two"] {
        let (head, body) = get(&sluice.url(path)).await;
        assert_eq!(head.status(), 200);
        assert_eq!(body, format!("0:{path}"));
    }
    assert_eq!(up.accepted(), 1, "the framing after 1xx is kept: reused");
}

// 9. Chunk extensions and trailers.

#[tokio::test]
async fn chunk_extensions_and_trailers_end_cleanly_and_keep_the_connection() {
    let up = RawUpstream::keep_alive(|conn, req| {
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
        match req.path.as_str() {
            "/v1/extensions" => {
                format!("{head}5;foo=bar\r\nhello\r\n0;last=1\r\n\r\n").into_bytes()
            }
            "/v1/trailers" => format!("{head}5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n").into_bytes(),
            _ => ok(&format!("{conn}:{}", req.path)),
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    for path in ["/v1/extensions", "/v1/trailers"] {
        let res = open(&sluice.url(path)).await;
        assert_eq!(res.status(), 200, "{path}");
        let body = read_body(res.into_body())
            .await
            .unwrap_or_else(|e| panic!("{path}: the body ends cleanly: {e:?}"));
        assert_eq!(&body[..], b"hello", "{path}");
    }
    let (head, body) = get(&sluice.url("/v1/after")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], b"0:/v1/after");
    assert_eq!(up.accepted(), 1, "the connection is reused after both");
    assert_eq!(up.conns(), [0, 0, 0]);
}

// 10. Malformed response heads: 502, and sluice stays up.

#[tokio::test]
async fn malformed_response_heads_get_502_and_sluice_stays_up() {
    let up = RawUpstream::start(|mut conn| async move {
        if let Some(req) = conn.request().await {
            let res: &[u8] = match req.path.as_str() {
                "/raw/obs-fold" => {
                    b"HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 2\r\n\r\nok"
                }
                "/raw/control-in-value" => {
                    b"HTTP/1.1 200 OK\r\nx-a: a\x01b\r\ncontent-length: 2\r\n\r\nok"
                }
                "/raw/nul-in-value" => {
                    b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 2\r\n\r\nok"
                }
                "/raw/bad-name" => b"HTTP/1.1 200 OK\r\nx(a): b\r\ncontent-length: 2\r\n\r\nok",
                "/raw/space-before-colon" => {
                    b"HTTP/1.1 200 OK\r\nx-a : b\r\ncontent-length: 2\r\n\r\nok"
                }
                "/raw/long-status" => b"HTTP/1.1 999999 X\r\ncontent-length: 2\r\n\r\nok",
                "/raw/short-status" => b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\nok",
                "/raw/two-lengths" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!"
                }
                // Not a 502: fails the test.
                _ => b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
            };
            conn.write(res).await;
            conn.drain_until_closed().await;
        }
    })
    .await;
    let good = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    // The real binary: a panic would show on its stderr.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nshutdown_grace = \"2s\"\n\n\
         [upstreams.raw]\nurl = \"{}\"\n\n[upstreams.good]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"raw\"\npath_prefix = \"/raw\"\nupstream = \"raw\"\n\n\
         [routes.retry]\nattempts = 1\n\n\
         [[routes]]\nname = \"good\"\nupstream = \"good\"\n",
        up.url(),
        good.url()
    );
    let mut sluice = Process::start(&toml, &[]).await;
    let cases = [
        "/raw/obs-fold",
        "/raw/control-in-value",
        "/raw/nul-in-value",
        "/raw/bad-name",
        "/raw/space-before-colon",
        "/raw/long-status",
        "/raw/short-status",
        "/raw/two-lengths",
    ];
    for path in cases {
        let (head, body) = get(&sluice.url(path)).await;
        assert_eq!(
            head.status(),
            502,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_sluice_error(&head, &body, 502, "upstream_unavailable");
        let (head, body) = get(&sluice.url("/v1/healthy")).await;
        assert_eq!(head.status(), 200, "after {path}");
        assert_eq!(&body[..], br#"{"ok":true}"#);
    }
    assert_eq!(up.seen().len(), cases.len(), "each sent once");
    assert_eq!(
        up.accepted(),
        cases.len(),
        "a connection that sent a bad head is not reused"
    );
    let exit = tokio::time::timeout(BOUND, sluice.stop())
        .await
        .expect("sluice exits on SIGTERM");
    assert_eq!(exit, Some(0), "clean exit on SIGTERM");
    let log = sluice.output();
    assert!(!log.contains("panicked"), "sluice panicked:\n{log}");
}

// 11. An early final answer while the request body still streams.

const TOO_LARGE: &str = r#"{"error":{"message":"upstream: too large","type":"invalid_request_error","param":null,"code":"too_large"}}"#;

/// An upstream that reads 64 KiB of a request body, answers 413 with
/// `connection: close`, then either reads (and drops) the rest as nginx's
/// lingering close does (`drain`), or stops reading and holds the connection
/// open. Either way, what it drained is sent on the channel once sluice
/// closes the connection.
async fn answers_413_early(drain: bool) -> (RawUpstream, mpsc::UnboundedReceiver<usize>) {
    let (drained_tx, drained) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut conn| {
        let drained_tx = drained_tx.clone();
        async move {
            if conn.request().await.is_none() {
                return;
            }
            if !conn.fill(64 * 1024).await {
                return;
            }
            let res = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{TOO_LARGE}",
                TOO_LARGE.len()
            );
            conn.write(res.as_bytes()).await;
            if !drain {
                // Never read again; the test's end drops the connection.
                std::future::pending::<()>().await;
            }
            let _ = drained_tx.send(conn.drain_until_closed().await);
        }
    })
    .await;
    (up, drained)
}

/// POSTs 20 MiB, chunked, through `sluice` (which streams it: it is over
/// retry_buffer) and checks that the upstream's 413 arrives whole.
async fn upload_gets_the_413(sluice: &Sidecar) {
    let mut conn = h1_connection::<MockBody>(sluice.addr).await;
    // Made as it is sent, its length unknown up front (so it goes chunked).
    let req = Request::post("/v1/files")
        .header("host", "sluice")
        .header("content-type", "application/octet-stream")
        .body(repeat(20 * 1024 * 1024))
        .unwrap();
    let res = send_on(&mut conn, req).await;
    assert_eq!(res.status(), 413);
    assert!(
        res.headers().get("x-sluice-error").is_none(),
        "the upstream's answer, not sluice's"
    );
    let body = read_body(res.into_body())
        .await
        .expect("the upstream's 413 body, whole");
    assert_eq!(&body[..], TOO_LARGE.as_bytes());
}

#[tokio::test]
async fn an_early_413_reaches_the_client_while_the_body_streams() {
    let (up, mut drained) = answers_413_early(true).await;
    let sluice = sluice(&up, "retry_buffer = \"64KiB\"").await;
    upload_gets_the_413(&sluice).await;
    // Whether sluice sends the rest of the upload or stops, it lets go of
    // the upstream connection in the end.
    let drained = tokio::time::timeout(BOUND, drained.recv())
        .await
        .expect("sluice closes the upstream connection")
        .unwrap();
    tracing::info!(drained, "upload bytes the upstream drained after its 413");
}

#[tokio::test]
async fn an_early_413_reaches_the_client_while_the_upload_is_stalled() {
    // The upstream no longer reads: sluice's upload is stuck on
    // backpressure, and the answer must come through all the same.
    let (up, _drained) = answers_413_early(false).await;
    let sluice = sluice(&up, "retry_buffer = \"64KiB\"").await;
    upload_gets_the_413(&sluice).await;
}

// 12. Responses that end their connection: HTTP/1.0, `connection: close`.

/// Two requests to an upstream that answers with `head` (a status line and
/// headers, the content-length added here) and keeps every connection open
/// and answering, so a reuse would show: each must get its own connection,
/// and sluice must close the first.
async fn each_request_gets_its_own_connection(head: &'static str) {
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut conn| {
        let closed_tx = closed_tx.clone();
        async move {
            while let Some(req) = conn.request().await {
                let body = format!("{}:{}", conn.index, req.path);
                let res = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
                conn.write(res.as_bytes()).await;
            }
            let _ = closed_tx.send(conn.index);
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    for (i, path) in ["/v1/one", "/v1/two"].into_iter().enumerate() {
        let (res, body) = get(&sluice.url(path)).await;
        assert_eq!(res.status(), 200);
        assert_eq!(body, format!("{i}:{path}"), "{head:?}");
    }
    assert_eq!(up.accepted(), 2, "used once: {head:?}");
    let first = tokio::time::timeout(BOUND, closed.recv())
        .await
        .expect("sluice closes a connection it will not reuse")
        .unwrap();
    assert_eq!(first, 0);
}

#[tokio::test]
async fn an_http_1_0_response_without_keep_alive_is_not_reused() {
    each_request_gets_its_own_connection("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n").await;
}

#[tokio::test]
async fn a_response_with_connection_close_is_not_reused() {
    each_request_gets_its_own_connection(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n",
    )
    .await;
}

// 13. An idle connection the upstream half-closed is closed by the reaper.

/// The upstream answers one keep-alive request, then half-closes (a FIN:
/// sluice reads EOF) and goes on reading. No request comes to find the
/// close, so only the pool's sweep (every REAP_EVERY, 10 s) can see it;
/// without it the socket would sit in CLOSE_WAIT for good.
#[tokio::test]
async fn an_idle_connection_the_upstream_half_closed_is_closed_by_the_pool_within_its_sweep() {
    /// REAP_EVERY (10 s) plus a margin.
    const SWEEP: Duration = Duration::from_secs(15);
    let (half_closed_tx, mut half_closed) = mpsc::unbounded_channel();
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut conn| {
        let (half_closed_tx, closed_tx) = (half_closed_tx.clone(), closed_tx.clone());
        async move {
            let Some(req) = conn.request().await else {
                return;
            };
            conn.write(&ok(&format!("{}:{}", conn.index, req.path)))
                .await;
            // Not a wait for anything: it puts the close after the sweep
            // that runs as the connection first goes idle, so a later,
            // periodic sweep has to be the one that sees it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            conn.stream
                .shutdown()
                .await
                .expect("the write side shuts down");
            let _ = half_closed_tx.send(());
            // Sluice's close (or a reset) ends the read; any bytes count.
            let _ = closed_tx.send(conn.drain_until_closed().await);
        }
    })
    .await;
    let sluice = sluice(&up, "").await;
    let (head, body) = get(&sluice.url("/v1/one")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], b"0:/v1/one");

    tokio::time::timeout(BOUND, half_closed.recv())
        .await
        .expect("the upstream half-closes")
        .unwrap();
    let since = std::time::Instant::now();
    let drained = tokio::time::timeout(SWEEP, closed.recv())
        .await
        .unwrap_or_else(|_| panic!("sluice still holds the half-closed connection after {SWEEP:?}"))
        .unwrap();
    tracing::info!(after = ?since.elapsed(), "sluice closed the half-closed connection");
    assert_eq!(drained, 0, "nothing was sent on the half-closed connection");
    assert_eq!(up.accepted(), 1);
    assert_eq!(up.seen().len(), 1, "no further request was needed");
}
