//! Uploads and reconnects under upstreams that stream while they read, or
//! that stop accepting h2 connections.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::support::certs::{Certs, ALPN_H2};
use crate::support::mock::MockBody;
use crate::support::{channel, client, Mock, Sidecar};

const BOUND: Duration = Duration::from_secs(20);

fn config(url: &str, server: &str, upstream: &str, route: &str) -> String {
    format!(
        "[server]\n{server}\n\n[upstreams.up]\nurl = \"{url}\"\n{upstream}\n\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n{route}\n"
    )
}

/// An HTTP/1.1 client connection to sluice (to stream a request body).
async fn h1(addr: std::net::SocketAddr) -> hyper::client::conn::http1::SendRequest<MockBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Finding: an early non-error head is held until the upload ends, and the
/// response is not read meanwhile (h1.rs Sending::poll). An upstream that
/// answers 200 at once and streams its answer while it reads the upload (an
/// echo, a transcription service with partial results) blocks on its write,
/// stops reading, and both sides wait for ever: no head, and for a streamed
/// body no first_byte timer either (it waits for `uploaded`). hyper's
/// client handed the head over and went on writing.
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
            "",
            "[routes.retry]\nattempts = 1",
        ),
        &[],
    )
    .await;
    const LEN: usize = 64 << 20;
    let mut send = h1(sluice.addr).await;
    let (tx, body) = channel();
    let req = Request::post("/v1/audio/transcriptions")
        .header("host", "sluice")
        .header("content-length", LEN.to_string())
        .body(body)
        .unwrap();
    tokio::spawn(async move {
        let frame = Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..LEN / frame.len() {
            if tx.send(frame.clone()).await.is_err() {
                return;
            }
        }
    });
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

/// Finding: h2 reconnects are single-flight, but a failed connect is not
/// shared: each waiter on `h2_connecting` tries again in turn, so with a
/// black-holed upstream the k-th request fails after k x connect_timeout
/// (or, with the default first_byte, gets 504 upstream_timeout instead of
/// 502 connect failure, which `retry_on = connect-failure` would retry).
#[tokio::test]
async fn a_failed_h2_reconnect_fails_every_waiter_within_connect_timeout() {
    let certs = Certs::generate();
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config(&[ALPN_H2]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = tokio::spawn(async move {
        // The first connection: TLS, h2, one answer, then closed.
        let (s, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(s).await.unwrap();
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), svc);
        let _ = tokio::time::timeout(Duration::from_millis(500), conn).await;
        // Then a black hole: accepted, never a TLS handshake.
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let sluice = Sidecar::start(
        &config(
            &format!("https://{addr}"),
            "",
            &format!(
                "ca_file = \"{}\"\nconnect_timeout = \"1s\"",
                certs.ca_pem.display()
            ),
            "[routes.retry]\nattempts = 1\n\n[routes.timeouts]\nfirst_byte = \"30s\"",
        ),
        &[],
    )
    .await;
    let c = client();
    let first = c
        .request(
            Request::get(sluice.url("/v1/models"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let _ = first.into_body().collect().await;
    // The upstream closes that connection; sluice's handle sees it closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = Instant::now();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            let url = sluice.url("/v1/models");
            tokio::spawn(async move {
                let res = c
                    .request(Request::get(url).body(Full::default()).unwrap())
                    .await
                    .unwrap();
                (res.status().as_u16(), started.elapsed())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in waiters {
        outcomes.push(tokio::time::timeout(BOUND, w).await.unwrap().unwrap());
    }
    for (status, took) in &outcomes {
        assert_eq!(*status, 502, "{outcomes:?}");
        assert!(
            *took < Duration::from_millis(2500),
            "every request should fail about one connect_timeout (1s) in: {outcomes:?}"
        );
    }
    up.abort();
}
