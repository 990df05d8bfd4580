//! Uploads to an HTTP/1.1 upstream that answers before the body is all
//! sent, or that answers while it reads.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::mock::repeat;
use crate::support::{channel, client, h1_connection, Mock, Sidecar};

const BOUND: Duration = Duration::from_secs(15);

/// Reads one request head off `s`; what was read past it is returned.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a request head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn config(url: &str, server: &str, route: &str) -> String {
    format!(
        "[server]\n{server}\n\n[upstreams.up]\nurl = \"{url}\"\n\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n{route}\n"
    )
}

/// A buffered (replayable) body too large to go out with the head: an
/// upstream that answers from the head alone (401 for a bad key, 413, 400)
/// and stops reading must be heard while the upload is blocked, so the
/// client gets the 401, not a 504 after first_byte.
#[tokio::test]
async fn an_early_answer_to_a_buffered_body_reaches_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = read_head(&mut s).await;
            let body = r#"{"error":{"message":"bad key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
            let res = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(res.as_bytes()).await.unwrap();
            // Never reads the body; keeps the connection open.
            held.push(s);
        }
    });
    // Default retry settings (attempts = 3): the body is held for replay.
    let sluice = Sidecar::start(
        &config(
            &format!("http://{addr}"),
            "retry_buffer = \"32MiB\"\nmax_request_body = \"64MiB\"",
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
    up.abort();
}

/// With retries off every body streams (retry_buffer is 0). An upstream
/// that sends a 200 head early, then reads the rest of the body before it
/// finishes its answer, must get the rest: RFC 9112 §9.5 has a client stop
/// sending only on an error answer.
#[tokio::test]
async fn an_early_2xx_head_does_not_cut_the_upload() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (head, mut got) = read_head(&mut s).await;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().unwrap())
                    })
                    .expect("a content-length");
                s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
                )
                .await
                .unwrap();
                let mut chunk = [0u8; 4096];
                while got.len() < len {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&chunk[..n]);
                }
                let msg = format!("got {}", got.len());
                let _ = s
                    .write_all(format!("{:x}\r\n{msg}\r\n0\r\n\r\n", msg.len()).as_bytes())
                    .await;
            });
        }
    });
    let sluice = Sidecar::start(
        &config(
            &format!("http://{addr}"),
            "",
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
    up.abort();
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
        &config(
            &mock.url(),
            "max_request_body = \"256MiB\"",
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
