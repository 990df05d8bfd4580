//! Uploads to an HTTP/1.1 upstream that answers before the body is all
//! sent, or that answers while it reads.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::support::mock::repeat;
use crate::support::upstream::RawUpstream;
use crate::support::{channel, client, h1_connection, sluice_toml, Mock, Sidecar};

const BOUND: Duration = Duration::from_secs(15);

/// A buffered (replayable) body too large to go out with the head: an
/// upstream that answers from the head alone (401 for a bad key, 413, 400)
/// and stops reading must be heard while the upload is blocked, so the
/// client gets the 401, not a 504 after first_byte.
#[tokio::test]
async fn an_early_answer_to_a_buffered_body_reaches_the_client() {
    let up = RawUpstream::start(|mut conn| async move {
        if conn.request_head().await.is_none() {
            return;
        }
        let body = r#"{"error":{"message":"bad key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let res = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write(res.as_bytes()).await;
        // Never reads the body; keeps the connection open.
        std::future::pending::<()>().await;
    })
    .await;
    // Default retry settings (attempts = 3): the body is held for replay.
    let sluice = Sidecar::start(
        &sluice_toml(
            "retry_buffer = \"32MiB\"\nmax_request_body = \"64MiB\"",
            &up.url(),
            "[routes.timeouts]\nfirst_byte = \"3s\"",
        ),
        &[],
    )
    .await;
    let req = Request::post(sluice.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(vec![b'x'; 16 * 1024 * 1024])))
        .unwrap();
    let started = Instant::now();
    let res = tokio::time::timeout(BOUND, client().request(req))
        .await
        .expect("a response within the bound")
        .expect("a response");
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        401,
        "after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&body)
    );
}

/// With retries off every body streams (retry_buffer is 0). An upstream
/// that sends a 200 head early, then reads the rest of the body before it
/// finishes its answer, must get the rest: RFC 9112 §9.5 has a client stop
/// sending only on an error answer.
#[tokio::test]
async fn an_early_2xx_head_does_not_cut_the_upload() {
    let up = RawUpstream::start(|mut conn| async move {
        let Some(req) = conn.request_head().await else {
            return;
        };
        let len: usize = req
            .get("content-length")
            .expect("a content-length")
            .parse()
            .unwrap();
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await;
        if !conn.fill(len).await {
            return;
        }
        let msg = format!("got {}", conn.buf.len());
        conn.write(format!("{:x}\r\n{msg}\r\n0\r\n\r\n", msg.len()).as_bytes())
            .await;
    })
    .await;
    let sluice = Sidecar::start(
        &sluice_toml(
            "",
            &up.url(),
            "[routes.timeouts]\nidle = \"3s\"\n\n[routes.retry]\nattempts = 1",
        ),
        &[],
    )
    .await;
    let mut send = h1_connection(sluice.addr).await;
    let (tx, body) = channel();
    let req = Request::post("/v1/audio/transcriptions")
        .header("host", "sluice")
        .header("content-length", "20")
        .body(body)
        .unwrap();
    tokio::spawn(async move {
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = tx.send(Bytes::from_static(b"abcdefghij")).await;
    });
    let res = tokio::time::timeout(BOUND, send.send_request(req))
        .await
        .expect("a head within the bound")
        .expect("a response");
    assert_eq!(res.status(), 200);
    let body = tokio::time::timeout(BOUND, res.into_body().collect())
        .await
        .expect("the body ends within the bound")
        .map(|c| c.to_bytes());
    assert_eq!(
        body.as_ref().map(|b| &b[..]).map_err(|e| e.to_string()),
        Ok(&b"got 20"[..])
    );
}

/// An upstream that answers 200 at once and streams its answer while it
/// reads the upload (an echo, a transcription service with partial
/// results): the head must reach the client at once and the upload go on
/// alongside. Holding the head until the upload ends would deadlock: the
/// upstream blocks on its write and stops reading, and for a streamed body
/// no first_byte timer runs (it waits for the upload to end).
#[tokio::test]
async fn an_upstream_that_answers_while_it_reads_the_upload_does_not_deadlock() {
    // hyper echo: the head goes out at once, the body is the request body.
    let mock = Mock::start(|req: Request<Incoming>| async move {
        Response::new(req.into_body().map_err(|e| e.into()).boxed())
    })
    .await;
    let sluice = Sidecar::start(
        &sluice_toml(
            "max_request_body = \"256MiB\"",
            &mock.url(),
            "[routes.retry]\nattempts = 1",
        ),
        &[],
    )
    .await;
    const LEN: usize = 64 << 20;
    let mut send = h1_connection(sluice.addr).await;
    let req = Request::post("/v1/audio/transcriptions")
        .header("host", "sluice")
        .header("content-length", LEN.to_string())
        .body(repeat(LEN as u64))
        .unwrap();
    let res = tokio::time::timeout(BOUND, send.send_request(req))
        .await
        .expect("the head within the bound (sluice and the upstream wait on each other)")
        .expect("a response");
    assert_eq!(res.status(), 200);
    let n = tokio::time::timeout(BOUND, res.into_body().collect())
        .await
        .expect("the echo within the bound")
        .unwrap()
        .to_bytes()
        .len();
    assert_eq!(n, LEN);
}
