//! TLS on both sides. Upstream: https to a mock whose certificate comes from
//! a CA generated for the test, trusted through `ca_file` (h2 or HTTP/1.1 by
//! ALPN) and refused without it (502, and a log line that says why).
//! Listener: `[server] tls` serves h2 and HTTP/1.1 by ALPN.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::support::certs::{Certs, ALPN_H1, ALPN_H2};
use crate::support::raw::{chunk, Conn};
use crate::support::upstream::RawUpstream;
use crate::support::{assert_sluice_error, get, json, one_route, run_cli, Mock, Process, Sidecar};

/// A mock upstream over TLS with the test CA's leaf, offering `alpn`.
async fn tls_mock(certs: &Certs, alpn: &[&[u8]]) -> Mock {
    Mock::start_tls(
        |_| async { json(200, r#"{"tls":true}"#) },
        certs.server_config(alpn),
    )
    .await
}

fn https_url(mock: &Mock) -> String {
    // 127.0.0.1: the leaf carries it as an IP SAN, so the name is verified too.
    format!("https://{}", mock.addr)
}

fn ca_file_line(certs: &Certs) -> String {
    format!("ca_file = \"{}\"", certs.ca_pem.display())
}

#[tokio::test]
async fn upstream_https_with_ca_file_uses_h2_by_alpn() {
    let certs = Certs::generate();
    let mock = tls_mock(&certs, &[ALPN_H2, ALPN_H1]).await;
    let sluice = Sidecar::start(&one_route(&https_url(&mock), &ca_file_line(&certs)), &[]).await;
    let (head, body) = get(&sluice.url("/v1/models")).await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"tls":true}"#);
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    // The mock offered h2 first and sluice's connector accepted it.
    assert_eq!(seen[0].version, Version::HTTP_2, "upstream spoken over h2");
    assert_eq!(seen[0].uri.path(), "/v1/models");
}

#[tokio::test]
async fn upstream_https_with_http11_only_alpn_uses_http11() {
    let certs = Certs::generate();
    let mock = tls_mock(&certs, &[ALPN_H1]).await;
    let sluice = Sidecar::start(&one_route(&https_url(&mock), &ca_file_line(&certs)), &[]).await;
    let (head, body) = get(&sluice.url("/v1/models")).await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"tls":true}"#);
    assert_eq!(mock.seen()[0].version, Version::HTTP_11);

    // A server that offers no ALPN at all: HTTP/1.1 as well.
    let no_alpn = tls_mock(&certs, &[]).await;
    let sluice = Sidecar::start(&one_route(&https_url(&no_alpn), &ca_file_line(&certs)), &[]).await;
    let (head, _) = get(&sluice.url("/v1/models")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(no_alpn.seen()[0].version, Version::HTTP_11);
}

/// Without ca_file the test CA is unknown: every attempt fails the
/// handshake, the client gets 502 upstream_unavailable, and the log says
/// the certificate is not trusted (the real binary, to read its stderr).
/// (hyper-rustls nests the rustls error two io::Errors deep; the cause
/// search must look through both.)
#[tokio::test]
async fn upstream_https_without_ca_file_is_502_and_logged_as_untrusted() {
    let certs = Certs::generate();
    let mock = tls_mock(&certs, &[ALPN_H2, ALPN_H1]).await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\n{}",
        one_route(&https_url(&mock), "")
    );
    let sluice = Process::start(&toml, &[]).await;
    let (head, body) = get(&sluice.url("/v1/models")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    assert!(
        mock.seen().is_empty(),
        "no request passed the failed handshake"
    );

    // The warning is written before the response, but reaches us through a
    // pipe and a reader task: wait for it, within a bound.
    let line = wait_for_log_line(&sluice, "certificate not trusted").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("upstream TLS certificate not trusted"),
        "{line}"
    );
    assert!(
        line.contains("ca_file"),
        "the line says how to fix it: {line}"
    );
    assert!(
        line.contains("upstream=\"up\""),
        "the line names the upstream: {line}"
    );
    // sluice has a message of its own for this case; the client should get it.
    let message = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("not trusted"), "{message}");
}

/// The first line of the process's output containing `needle`.
async fn wait_for_log_line(p: &Process, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = p.output().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// sluice serving TLS with the test CA's leaf, in front of a plain mock.
async fn tls_sidecar(certs: &Certs) -> (Mock, Sidecar) {
    let mock =
        Mock::start(
            |req| async move { json(200, &format!(r#"{{"path":"{}"}}"#, req.uri().path())) },
        )
        .await;
    let toml = format!(
        "[server]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n{}",
        certs.cert_pem.display(),
        certs.key_pem.display(),
        one_route(&mock.url(), "")
    );
    (mock, Sidecar::start(&toml, &[]).await)
}

/// One GET over TLS to `sluice`, offering only `alpn`; returns the protocol
/// the handshake chose and the response.
async fn get_over_tls(
    sluice: &Sidecar,
    certs: &Certs,
    alpn: &[u8],
    path: &str,
) -> (Vec<u8>, Response<()>, Bytes) {
    let tcp = TcpStream::connect(sluice.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(certs.client_config(&[alpn]));
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake within 5 s")
        .expect("handshake: sluice presents the configured certificate");
    let negotiated = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let io = TokioIo::new(tls);
    let url = format!("https://localhost:{}{path}", sluice.addr.port());
    let req = Request::get(url)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = if negotiated == ALPN_H2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        // HTTP/1.1 wants origin-form on the wire.
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().unwrap();
        send.send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (negotiated, Response::from_parts(parts, ()), body)
}

#[tokio::test]
async fn listener_tls_serves_h2_by_alpn() {
    let certs = Certs::generate();
    let (mock, sluice) = tls_sidecar(&certs).await;
    let (alpn, head, body) = get_over_tls(&sluice, &certs, ALPN_H2, "/v1/h2").await;
    assert_eq!(alpn, ALPN_H2, "sluice's listener accepted h2 by ALPN");
    assert_eq!(head.version(), Version::HTTP_2);
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], br#"{"path":"/v1/h2"}"#);
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn listener_tls_serves_http11_by_alpn() {
    let certs = Certs::generate();
    let (mock, sluice) = tls_sidecar(&certs).await;
    let (alpn, head, body) = get_over_tls(&sluice, &certs, ALPN_H1, "/v1/h1").await;
    assert_eq!(alpn, ALPN_H1, "sluice's listener accepted http/1.1 by ALPN");
    assert_eq!(head.version(), Version::HTTP_11);
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], br#"{"path":"/v1/h1"}"#);
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn check_names_a_bad_listener_cert_or_key() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    let write = |cert: &std::path::Path, key: &std::path::Path| {
        let toml = format!(
            "[server]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n{}",
            cert.display(),
            key.display(),
            one_route("http://127.0.0.1:9", "")
        );
        std::fs::write(&config, toml).unwrap();
    };
    let check = || run_cli(&["check", "--config", config.to_str().unwrap()], &[]);

    // Control: the same config with good files passes, so the failures
    // below are about the files and nothing else.
    write(&certs.cert_pem, &certs.key_pem);
    let (code, stdout, stderr) = check();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "ok");

    let missing = dir.path().join("missing.crt");
    write(&missing, &certs.key_pem);
    let (code, _, stderr) = check();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("server.tls.cert"), "{stderr}");
    assert!(
        stderr.contains("missing.crt"),
        "the message names the file: {stderr}"
    );
    assert!(
        !stderr.contains("server.tls.key"),
        "the key is fine: {stderr}"
    );

    // A certificate where the key should be: named as the key's problem.
    write(&certs.cert_pem, &certs.cert_pem);
    let (code, _, stderr) = check();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("server.tls.key"), "{stderr}");
}

/// Over an HTTP/2 upstream a request body that crosses max_request_body
/// while streaming becomes a stream reset upstream; the client must still be
/// told 413 (its fault), not 502 (the upstream's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_an_h2_upstream_a_body_over_max_is_still_413() {
    use tokio::io::AsyncWriteExt;
    let certs = Certs::generate();
    let mock = Mock::start_tls(
        |req| async move {
            let _ = crate::support::mock::read_body(req.into_body()).await;
            json(200, "{}")
        },
        certs.server_config(&[ALPN_H2]),
    )
    .await;
    let toml = format!(
        "[server]\nretry_buffer = \"64KiB\"\nmax_request_body = \"256KiB\"\n{}",
        one_route(&https_url(&mock), &ca_file_line(&certs))
    );
    let sluice = Sidecar::start(&toml, &[]).await;
    // A first request shows the upstream speaks h2; the refused upload then
    // runs on the same pooled connection. (Its reset can reach the mock before
    // the mock accepts the stream, so the mock may never see that one.)
    let (res, _) = get(&sluice.url("/v1/models")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(mock.seen()[0].version, Version::HTTP_2);
    let s = TcpStream::connect(sluice.addr).await.unwrap();
    let (read, mut write) = s.into_split();
    tokio::spawn(async move {
        let head = "POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        write.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..64 {
            let c = chunk(&[b'x'; 16 * 1024]);
            if write.write_all(&c).await.is_err() {
                return;
            }
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
    });
    let res = Conn::new(read).response(Duration::from_secs(10)).await;
    assert_sluice_error(&res.head(), &res.body, 413, "request_too_large");
}

#[tokio::test]
async fn an_absolute_uri_with_an_empty_path_reaches_an_h2_upstream_as_slash() {
    // `GET http://host?x=1`: the path is "/" but the path-and-query is
    // "?x=1", which an h2 upstream would refuse as its :path.
    let certs = Certs::generate();
    let mock = tls_mock(&certs, &[ALPN_H2]).await;
    let sluice = Sidecar::start(&one_route(&https_url(&mock), &ca_file_line(&certs)), &[]).await;
    let request = format!(
        "GET http://{}?x=1 HTTP/1.1\r\nhost: {}\r\n\r\n",
        sluice.addr, sluice.addr
    );
    let mut conn = Conn::open(sluice.addr).await;
    conn.send(request.as_bytes()).await;
    let reply = conn.reply(Duration::from_secs(10)).await;
    let seen = mock.seen();
    assert_eq!(seen.len(), 1, "{reply:?}");
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].uri.path_and_query().unwrap().as_str(), "/?x=1");
}

/// An upstream that accepts TCP but never answers the TLS handshake: the
/// handshake is part of connecting (SPEC: a TLS failure is a connect
/// failure), so `connect_timeout` cuts it, not the 120 s `first_byte`.
#[tokio::test]
async fn a_tls_handshake_that_never_completes_is_cut_by_connect_timeout() {
    let certs = Certs::generate();
    // Accepts, and holds every connection without a word.
    let silent = RawUpstream::start(|_conn| std::future::pending()).await;
    let extra = format!("{}\nconnect_timeout = \"300ms\"", ca_file_line(&certs));
    let url = format!("https://{}", silent.addr);
    let sluice = Sidecar::start(&one_route(&url, &extra), &[]).await;
    let started = Instant::now();
    let (head, body) = get(&sluice.url("/v1/models")).await;
    let took = started.elapsed();
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(silent.accepted() >= 1, "TCP connected");
}

/// One connection an [`H2Upstream`] accepted.
struct H2Conn {
    /// A second handle on the same socket (a duplicate of its descriptor).
    /// Shutting down its write side sends a FIN under the TLS and h2 layers,
    /// as an upstream that drops a connection does, while the server goes on
    /// reading the socket, so it sees when sluice closes its side.
    twin: std::net::TcpStream,
    /// Resolves once the server's side of the connection has ended.
    ended: tokio::sync::oneshot::Receiver<()>,
}

/// An upstream over TLS that offers only h2, written here (not [`Mock`]) so
/// the test counts the connections it accepts and can close them. Every
/// answer waits 200 ms, so requests sent together overlap. Stops,
/// connections included, when dropped.
struct H2Upstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The version of every request received.
    versions: std::sync::Arc<std::sync::Mutex<Vec<Version>>>,
    conns: tokio::sync::mpsc::UnboundedReceiver<H2Conn>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Upstream {
    async fn start(certs: &Certs) -> H2Upstream {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config(&[ALPN_H2]));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (conns_tx, conns) = tokio::sync::mpsc::unbounded_channel();
        let (accepted2, versions2) = (accepted.clone(), versions.clone());
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: aborts every connection's task.
            let mut served = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let std = tcp.into_std().unwrap();
                let twin = std.try_clone().unwrap();
                let tcp = TcpStream::from_std(std).unwrap();
                let (ended_tx, ended) = tokio::sync::oneshot::channel();
                let _ = conns_tx.send(H2Conn { twin, ended });
                let (acceptor, versions) = (acceptor.clone(), versions2.clone());
                served.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let svc = hyper::service::service_fn(move |req: Request<_>| {
                            versions.lock().unwrap().push(req.version());
                            async {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                Ok::<_, std::convert::Infallible>(json(200, r#"{"h2":true}"#))
                            }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    }
                    let _ = ended_tx.send(());
                });
            }
        });
        H2Upstream {
            addr,
            accepted,
            versions,
            conns,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn versions(&self) -> Vec<Version> {
        self.versions.lock().unwrap().clone()
    }
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET url` through `client`: the status and the whole body.
async fn status_and_body(client: &crate::support::TestClient, url: String) -> (u16, Bytes) {
    let req = Request::get(url)
        .body(http_body_util::Full::default())
        .unwrap();
    let res = client.request(req).await.expect("a response");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("a whole body");
    (status, body.to_bytes())
}

/// The shared h2 connection is lost (the upstream closed it): the requests
/// that find it gone make one new connection between them, the first makes
/// it and the others wait for it, rather than each handshaking its own.
#[tokio::test]
async fn a_lost_h2_connection_is_remade_once_for_concurrent_requests() {
    /// Each phase; three of them stay within 30 s whatever sluice does.
    const PHASE: Duration = Duration::from_secs(5);
    let certs = Certs::generate();
    let mut up = H2Upstream::start(&certs).await;
    let toml = format!(
        "[upstreams.up]\nurl = \"https://{}\"\n{}\n\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n\n\
         [routes.retry]\nattempts = 1\n",
        up.addr,
        ca_file_line(&certs)
    );
    let sluice = Sidecar::start(&toml, &[]).await;
    let client = crate::support::client();

    // The first request shows sluice the upstream speaks h2.
    let (status, body) =
        tokio::time::timeout(PHASE, status_and_body(&client, sluice.url("/v1/models")))
            .await
            .expect("the first response within the bound");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(up.versions(), [Version::HTTP_2]);
    assert_eq!(up.accepted(), 1);

    // The upstream drops the connection; the server's side ends once sluice
    // has closed its own, which it does when hyper's h2 connection task
    // ends. That task's end wakes hyper's dispatch task, whose end is what
    // makes the shared sender `is_closed()`; on this single-threaded runtime
    // it is queued before the upstream's task even hears of the close, so no
    // request below can find the old connection still looking open: the
    // count of 2 is exact, not a race.
    let first = up.conns.try_recv().expect("the first connection");
    first
        .twin
        .shutdown(std::net::Shutdown::Write)
        .expect("the write side shuts down");
    tokio::time::timeout(PHASE, first.ended)
        .await
        .expect("sluice closes the connection the upstream dropped")
        .unwrap();
    drop(first.twin);

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..10 {
        let (client, url) = (client.clone(), sluice.url(&format!("/v1/after/{i}")));
        requests.spawn(async move { status_and_body(&client, url).await });
    }
    let results = tokio::time::timeout(PHASE, requests.join_all())
        .await
        .expect("the concurrent responses within the bound");
    for (status, body) in &results {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(&body[..], br#"{"h2":true}"#);
    }
    assert_eq!(
        up.accepted(),
        2,
        "one new connection for the ten requests, not one each"
    );
    assert_eq!(up.versions(), [Version::HTTP_2; 11]);
}

/// Requests that waited for an h2 reconnect that failed fail with it, each
/// within one connect_timeout; they do not each try again in turn (the k-th
/// would fail after k × connect_timeout, or get 504 from first_byte).
#[tokio::test]
async fn a_failed_h2_reconnect_fails_every_waiter_within_connect_timeout() {
    let certs = Certs::generate();
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config(&[ALPN_H2]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = tokio::spawn(async move {
        // The first connection: TLS, h2, one answer, then closed.
        let (s, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(s).await.unwrap();
        let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
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
        &format!(
            "{}[routes.retry]\nattempts = 1\n\n[routes.timeouts]\nfirst_byte = \"30s\"\n",
            one_route(
                &format!("https://{addr}"),
                &format!("{}\nconnect_timeout = \"1s\"", ca_file_line(&certs)),
            )
        ),
        &[],
    )
    .await;
    let c = crate::support::client();
    let first = c
        .request(
            Request::get(sluice.url("/v1/models"))
                .body(http_body_util::Full::default())
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
                    .request(
                        Request::get(url)
                            .body(http_body_util::Full::default())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                (res.status().as_u16(), started.elapsed())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in waiters {
        outcomes.push(
            tokio::time::timeout(Duration::from_secs(20), w)
                .await
                .unwrap()
                .unwrap(),
        );
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
