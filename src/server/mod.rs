//! The data-plane listener: accept, optional TLS, HTTP/1.1 or HTTP/2 per
//! connection, and a bounded drain on shutdown. It serves a [`Handler`] and
//! knows nothing of what the handler does (hyper's `serve_connection(io,
//! service)` is the model).
//!
//! HTTP/1.1 is served by sluice's own server (`h1.rs`) for the requests an
//! API client sends: a head, and a body whole under a size. Anything else on
//! an HTTP/1.1 connection (a malformed or huge head, a chunked or large
//! upload, `Expect`, HTTP/1.0) is handed to hyper with the bytes already
//! read, and hyper serves the rest of that connection. HTTP/2 is hyper's.
//!
//! The protocol is chosen here rather than by hyper-util's auto builder
//! because its version sniff has no timeout: a client that connects and
//! sends two bytes would hold a connection forever. Here the sniff (or the
//! TLS handshake) is bounded by `header_read_timeout`.

/// `AsyncWrite` for a connection wrapper that only looks at what is read:
/// every write goes to its `io` as is.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }
        }
    };
}

mod body;
pub(crate) mod h1;
mod h2_heads;
mod pump;
mod rewind;
mod timed;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::drain;
pub use body::{whole_frame, whole_hint, BodyError, ClientBody};
use rewind::Rewind;

/// Largest request head accepted (431 above), near Envoy's 60 KiB default;
/// hyper's own limit is far more than an API request needs.
const MAX_HEAD_BYTES: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server serves: a request in, a response out. Errors are the
/// handler's to turn into responses, the server's own refusals too.
pub trait Handler: Send + Sync + 'static {
    type Body: http_body::Body<Data = Bytes, Error = BoxError> + Expiring + Send + Unpin + 'static;
    type Future: Future<Output = Response<Self::Body>> + Send + Unpin + 'static;

    fn call(&self, req: Request<ClientBody>) -> Self::Future;

    /// The answer to a request the server refused before reading it as one.
    fn refuse(&self, why: Refusal) -> Response<Self::Body>;
}

/// A response body that can end while its client is not reading it: the
/// server asks while a write waits on the client, since a body that is not
/// polled for frames cannot notice its own deadlines.
pub trait Expiring {
    /// Ready once the response cannot finish any more (its deadline, the
    /// drain's cut); the body has then ended as failed and the server cuts
    /// the connection or stream.
    fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()>;

    /// The client took nothing for `send_timeout`: the body ends as failed.
    fn stalled(&mut self);
}

/// Why the server refused a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A head that does not parse, or whose body framing is ambiguous: 400.
    Malformed,
    /// A head over 64 KiB or with over 100 headers: 431.
    HeadTooLarge,
}

/// Listener settings, fixed at start.
#[derive(Clone)]
pub struct ServerOptions {
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsAcceptor>,
    /// The largest body sluice's HTTP/1.1 server reads whole before it
    /// hands the request on; larger ones go to hyper and stream. Shared, so
    /// a reload can move it.
    pub whole_body: Arc<AtomicU64>,
    /// Client connections served at once; a new one past this is closed
    /// at once.
    pub max_connections: usize,
    /// Longest wait for a client to take any of a response (nginx's
    /// `send_timeout`); then the connection, or the h2 stream, is cut.
    pub send_timeout: Duration,
}

/// Protocol builders, shared by every connection.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Accepts until `shutdown` resolves, then drains for up to `shutdown_grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    opts: ServerOptions,
    handler: Arc<H>,
    signal: drain::Signal,
    shutdown: impl Future<Output = ()>,
) {
    let mut h1 = http1::Builder::new();
    // Without a timer hyper silently ignores header_read_timeout.
    h1.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    // Pings find dead peers (an evicted pod, a dropped NAT entry) that would
    // otherwise hold their streams forever.
    h2.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        // Rapid reset (CVE-2023-44487): streams a client opens and resets
        // before they are served end the connection past this many.
        .max_pending_accept_reset_streams(20)
        .max_concurrent_streams(256);
    let builders = Arc::new(Builders { h1, h2 });
    let watch = signal.watch();
    let mut accept_failed = Every::new(LOG_EVERY);
    let mut refused = Every::new(LOG_EVERY);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if let Some(more) = accept_failed.due() {
                        tracing::warn!(more, "accept failed: {e}");
                    }
                    // Out of descriptors or memory: the connection waits in
                    // the backlog; back off instead of spinning, and serve
                    // the connections already open meanwhile. Anything else
                    // concerns one connection only.
                    if is_resource_exhaustion(&e) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if signal.connections() >= opts.max_connections {
            // Refused at once rather than left to wait, so each client
            // already served can still open its upstream connections.
            if let Some(more) = refused.due() {
                tracing::warn!(
                    max_connections = opts.max_connections,
                    more,
                    "max_connections reached: closing a new client connection"
                );
            }
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builders: builders.clone(),
            handler: handler.clone(),
            drain: watch.clone(),
            _held: watch.hold(),
            opts: opts.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.accept(stream).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!(connections = signal.connections(), "draining");
    signal.start();
    let drained = signal.drained();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => tracing::info!("drained"),
        () = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!("shutdown_grace elapsed; cutting the streams still open");
            // SSE streams end with a deadline_exceeded event, others abort;
            // give them a moment to go out, then stop regardless.
            signal.cut();
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut drained).await;
        }
    }
}

/// How often a repeated accept problem is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A log line at most once per period, saying how many were held back.
struct Every {
    period: Duration,
    last: Option<tokio::time::Instant>,
    held: u64,
}

impl Every {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            held: 0,
        }
    }

    /// `Some(held back since the last line)` when a line is due.
    fn due(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|t| now < t + self.period) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// ENFILE, EMFILE, ENOMEM, ENOBUFS (Linux numbering).
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105))
}

/// One accepted connection's share of the server.
struct Conn<H> {
    builders: Arc<Builders>,
    handler: Arc<H>,
    drain: drain::Watch,
    /// The drain waits for this connection until it is dropped.
    _held: drain::Held,
    opts: ServerOptions,
}

impl<H: Handler> Conn<H> {
    /// TLS or the protocol sniff, each within `header_read_timeout`, then
    /// the connection's requests.
    async fn accept(self, stream: TcpStream) -> Result<(), BoxError> {
        let bound = self.opts.header_read_timeout;
        let Some(acceptor) = self.opts.tls.clone() else {
            return match tokio::time::timeout(bound, sniff_h2(&stream)).await {
                Ok(Ok(h2)) => self.serve(stream, h2).await,
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err("no request within header_read_timeout".into()),
            };
        };
        // Boxed: a TLS handshake's and connection's state is several KiB,
        // and inline it would size every plaintext connection's task too.
        Box::pin(self.accept_tls(stream, acceptor)).await
    }

    async fn accept_tls(self, stream: TcpStream, acceptor: TlsAcceptor) -> Result<(), BoxError> {
        let bound = self.opts.header_read_timeout;
        let tls = tokio::time::timeout(bound, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve(tls, h2).await
    }

    async fn serve<IO>(self, io: IO, h2: bool) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = timed::Timed::new(io, self.opts.send_timeout);
        if h2 {
            // Boxed: hyper's h2 connection state would size every HTTP/1.1
            // connection's task too.
            return Box::pin(self.serve_hyper(Rewind::new(io, Bytes::new()), true)).await;
        }
        let fast = h1::Server::new(io, &*self.handler, &self.opts);
        match fast.serve(&self.drain).await? {
            None => Ok(()),
            // Boxed: hyper's connection state is large and rarely needed.
            Some((io, read)) => Box::pin(self.serve_hyper(Rewind::new(io, read), false)).await,
        }
    }

    /// Serves the rest of the connection with hyper; `io` replays what sluice
    /// read of it already.
    async fn serve_hyper<IO>(self, io: Rewind<IO>, h2: bool) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let handler = self.handler;
        let send_timeout = self.opts.send_timeout;
        let svc = service_fn(move |req: Request<Incoming>| {
            let call = handler.call(req.map(ClientBody::Hyper));
            async move {
                let res = call.await.map(|body| pump::pump(body, send_timeout));
                Ok::<_, Infallible>(res)
            }
        });
        if h2 {
            let io = TokioIo::new(h2_heads::H2Heads::new(
                io.into_inner(),
                self.opts.header_read_timeout,
            ));
            let conn = self.builders.h2.serve_connection(io, svc);
            until_drained(conn, &self.drain).await?;
        } else {
            let conn = self.builders.h1.serve_connection(io, svc);
            until_drained(conn, &self.drain).await?;
        }
        Ok(())
    }
}

impl ServerOptions {
    fn whole_body(&self) -> u64 {
        self.whole_body.load(Ordering::Relaxed)
    }
}

/// Runs a hyper connection; when the server drains, lets its requests in
/// flight finish and then closes it.
async fn until_drained<C: GracefulConnection>(
    conn: C,
    drain: &drain::Watch,
) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::select! {
        // The connection first: a request sluice handed over is in the bytes
        // hyper has yet to read, and hyper's graceful shutdown closes at once
        // a connection it has read nothing of.
        biased;
        res = conn.as_mut() => return res,
        () = drain.draining() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Whether a plaintext client opens with the HTTP/2 preface (h2c prior
/// knowledge). Reads nothing: peeks until it can tell.
async fn sniff_h2(stream: &TcpStream) -> io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A partial preface: peek would return at once again, so wait a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
