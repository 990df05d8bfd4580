//! The upstream client: one pool of connections per upstream.
//!
//! HTTP/1.1 runs on a small codec of our own (`h1.rs`): one write per
//! request, the response head parsed by `httparse` with its values sharing
//! one small copy of the head, body frames split off the read buffer without
//! copying, and a read buffer that is freed while a stream waits, so a
//! waiting SSE stream holds no buffer at all. The pool is a stack of idle
//! connections per upstream (no key to hash), and a connection taken from
//! it is checked for a close from the upstream's side first. An HTTPS
//! upstream that picks `h2` by ALPN gets hyper's HTTP/2 client instead, one
//! multiplexed connection shared by every request.
//!
//! This is transport: it knows connections and bytes, not routes or the
//! proxy. The framing rules it keeps against response desync are in
//! [`crate::http1`].

pub(crate) mod h1;

use crate::http1::FramePoll;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::http1::decode::DecodeError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client can send as a request body.
pub trait SendBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<T> SendBody for T where
    T: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// Where a client connects.
pub struct Target<'a> {
    pub authority: &'a Authority,
    pub https: bool,
    /// Roots and settings for an HTTPS upstream (ALPN is set here).
    pub tls: &'a rustls::ClientConfig,
    /// Resolving, TCP and the TLS handshake together.
    pub connect_timeout: Duration,
}

/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are checked for expiry and for a close from
/// the upstream's side, so they do not sit in CLOSE_WAIT.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// Idle connections kept per upstream; past this the oldest is closed.
/// Enough for a burst of a few hundred concurrent requests to find a
/// connection again when the next burst comes.
const MAX_IDLE: usize = 1024;

/// The connection pool of one upstream.
pub struct Client<B: SendBody> {
    pool: Arc<Pool<B>>,
}

impl<B: SendBody> Clone for Client<B> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
        }
    }
}

impl<B: SendBody> fmt::Debug for Client<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.pool.addr)
            .finish_non_exhaustive()
    }
}

struct Pool<B> {
    /// `host:port`, resolved on every new connection.
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Mutex<VecDeque<Idle>>,
    /// The shared connection of an upstream that chose h2.
    h2: Mutex<Option<http2::SendRequest<B>>>,
    /// Set once the upstream has chosen h2: from then on one request at a
    /// time makes the shared connection, the others wait and use it.
    speaks_h2: AtomicBool,
    h2_connecting: tokio::sync::Mutex<()>,
    /// Reconnects tried so far: a waiter that sees it move found no shared
    /// connection after someone else's attempt, which failed.
    h2_tries: AtomicU64,
    reaping: AtomicBool,
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

enum Connected<B> {
    H1(h1::Conn),
    H2(http2::SendRequest<B>),
}

impl<B: SendBody> Client<B> {
    pub fn new(target: Target<'_>) -> Self {
        let host = target.authority.host();
        let https = target.https;
        let port = target
            .authority
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let tls = https.then(|| {
            let mut tls = target.tls.clone();
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            // The URL was parsed as a URI; a host rustls cannot name is an IP literal form it
            // does not know, and the handshake will say so.
            let name = ServerName::try_from(bare.to_owned())
                .unwrap_or_else(|_| ServerName::try_from("invalid.").expect("valid name"));
            (TlsConnector::from(Arc::new(tls)), name)
        });
        Self {
            pool: Arc::new(Pool {
                addr: format!("{host}:{port}"),
                tls,
                connect_timeout: target.connect_timeout,
                idle: Mutex::new(VecDeque::new()),
                h2: Mutex::new(None),
                speaks_h2: AtomicBool::new(false),
                h2_connecting: tokio::sync::Mutex::new(()),
                h2_tries: AtomicU64::new(0),
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends a request (`parts` with an absolute URI and `Host` set) and
    /// waits for the response head. The head is only read: a retry sends
    /// it again without a copy.
    pub async fn send(&self, parts: &Parts, body: B) -> Result<Response<UpstreamBody<B>>, Error> {
        // The rarer paths are boxed: every request's future is as large as
        // its largest branch, and a TLS or h2 handshake is several KiB.
        if let Some(h2) = self.pool.shared_h2() {
            return Box::pin(send_h2(h2, parts, body)).await;
        }
        if self.pool.speaks_h2.load(Ordering::Relaxed) {
            return Box::pin(self.send_on_new_h2(parts, body)).await;
        }
        let conn = match self.pool.checkout() {
            Some(conn) => conn,
            None => match Box::pin(self.pool.connect()).await? {
                Connected::H1(conn) => conn,
                Connected::H2(h2) => return Box::pin(send_h2(h2, parts, body)).await,
            },
        };
        h1::exchange(conn, parts, body, &self.pool).await
    }
}

impl<B: SendBody> Client<B> {
    /// The shared h2 connection is gone (closed, or a GOAWAY): one request
    /// makes the next, the others wait for it instead of each handshaking.
    async fn send_on_new_h2(
        &self,
        parts: &Parts,
        body: B,
    ) -> Result<Response<UpstreamBody<B>>, Error> {
        let tries = self.pool.h2_tries.load(Ordering::Acquire);
        let connecting = self.pool.h2_connecting.lock().await;
        let h2 = match self.pool.shared_h2() {
            Some(h2) => h2,
            None if self.pool.h2_tries.load(Ordering::Acquire) != tries => {
                return Err(Error::Connect(io::Error::other("the h2 reconnect failed")));
            }
            None => match self.pool.h2_connect().await? {
                Connected::H2(h2) => h2,
                // The upstream went back to HTTP/1.1.
                Connected::H1(conn) => {
                    self.pool.speaks_h2.store(false, Ordering::Relaxed);
                    drop(connecting);
                    return h1::exchange(conn, parts, body, &self.pool).await;
                }
            },
        };
        drop(connecting);
        send_h2(h2, parts, body).await
    }
}

async fn send_h2<B: SendBody>(
    mut h2: http2::SendRequest<B>,
    parts: &Parts,
    body: B,
) -> Result<Response<UpstreamBody<B>>, Error> {
    // hyper's client takes the request whole.
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    h2.ready().await.map_err(Error::H2)?;
    let res = h2.send_request(req).await.map_err(Error::H2)?;
    Ok(res.map(UpstreamBody::H2))
}

impl<B: SendBody> Pool<B> {
    fn shared_h2(&self) -> Option<http2::SendRequest<B>> {
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.as_ref().filter(|h2| !h2.is_closed()).cloned()
    }

    /// The most recently used idle connection that is still open. The
    /// check never waits; connections found closed or expired are closed
    /// after the lock is released.
    fn checkout(&self) -> Option<h1::Conn> {
        let mut closed = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let Some(mut entry) = idle.pop_back() else {
                    break None;
                };
                let idle_for = entry.since.elapsed();
                if idle_for >= IDLE_TIMEOUT {
                    // Everything before it is older still.
                    closed.push(entry);
                    closed.extend(idle.drain(..));
                    break None;
                }
                if entry.conn.still_open(idle_for) {
                    break Some(entry.conn);
                }
                closed.push(entry);
            }
        };
        drop(closed);
        found
    }

    /// Takes back a connection whose exchange ended, if it is clean: bytes
    /// past the end would be the upstream speaking out of turn.
    fn reuse(self: &Arc<Self>, mut conn: h1::Conn) {
        if !conn.buf_is_empty() {
            return;
        }
        // Grown for a large head: not worth keeping while idle. An empty one
        // stays: the next exchange reuses its allocation.
        conn.shrink_buf();
        self.put(conn);
    }

    /// Returns a connection whose exchange ended cleanly.
    fn put(self: &Arc<Self>, conn: h1::Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = if idle.len() >= MAX_IDLE {
            idle.pop_front()
        } else {
            None
        };
        idle.push_back(Idle {
            conn,
            since: Instant::now(),
        });
        drop(idle);
        drop(oldest);
        if !self.reaping.swap(true, Ordering::Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(self)));
            }
        }
    }

    /// A new connection: resolve, TCP, then TLS and ALPN, all within
    /// `connect_timeout` (SPEC: a TLS failure is a connect failure).
    async fn connect(&self) -> Result<Connected<B>, Error> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        tokio::time::timeout(self.connect_timeout, self.connect_unbounded())
            .await
            .unwrap_or_else(|_| Err(Error::Connect(timed_out())))
    }

    async fn connect_unbounded(&self) -> Result<Connected<B>, Error> {
        let tcp = connect_tcp(&self.addr, self.connect_timeout)
            .await
            .map_err(Error::Connect)?;
        // SSE chunks must not wait on Nagle.
        tcp.set_nodelay(true).map_err(Error::Connect)?;
        let Some((connector, name)) = &self.tls else {
            return Ok(Connected::H1(h1::Conn::new(Io::Tcp(tcp))));
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(Error::Connect)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(Connected::H1(h1::Conn::new(Io::Tls(Box::new(tls)))));
        }
        let (h2, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(Error::H2)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream h2 connection ended: {e}");
            }
        });
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(h2.clone());
        self.speaks_h2.store(true, Ordering::Relaxed);
        Ok(Connected::H2(h2))
    }

    /// A reconnect of the shared h2 connection, counted so that requests
    /// that waited for a failed one fail at once instead of each trying.
    async fn h2_connect(&self) -> Result<Connected<B>, Error> {
        self.h2_tries.fetch_add(1, Ordering::AcqRel);
        self.connect().await
    }

    /// Closes idle connections that expired or that the upstream closed.
    fn reap(&self) {
        let mut closed = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = VecDeque::with_capacity(idle.len());
        for mut e in idle.drain(..) {
            // The reaper always asks the socket (the reactor may not have
            // looked at an idle connection for a while).
            if e.since.elapsed() < IDLE_TIMEOUT && e.conn.still_open(IDLE_TIMEOUT) {
                kept.push_back(e);
            } else {
                closed.push(e);
            }
        }
        *idle = kept;
        drop(idle);
        drop(closed);
    }
}

/// Runs while the pool lives (a reload drops it with its config).
async fn reap<B: SendBody>(pool: Weak<Pool<B>>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.reap(),
            None => return,
        }
    }
}

/// Tries each address the name resolves to, in order, each with an equal
/// share of what is left of `budget`, so one black-holed address (an IPv6
/// route that goes nowhere, say) does not use up the whole timeout.
async fn connect_tcp(addr: &str, budget: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + budget;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    let mut last = None;
    for (i, a) in addrs.iter().enumerate() {
        let share = deadline.saturating_duration_since(Instant::now()) / (addrs.len() - i) as u32;
        match tokio::time::timeout(share, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {a} timed out"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address found")))
}

/// A connection's transport.
enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A response body from the upstream.
pub enum UpstreamBody<B: SendBody> {
    H1(h1::Body<B>),
    H2(Incoming),
}

impl<B: SendBody> fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::H1(_) => "UpstreamBody::H1",
            Self::H2(_) => "UpstreamBody::H2",
        })
    }
}

impl<B: SendBody> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll<Error> {
        match self.get_mut() {
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Error::H2))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}

/// Why an exchange with the upstream failed. No variant holds a header
/// value, so no key can reach a log through one.
#[derive(Debug)]
pub enum Error {
    /// Resolving, connecting or the TLS handshake.
    Connect(io::Error),
    /// Reading or writing an open connection.
    Io(io::Error),
    /// Closed before the first byte of a response.
    Closed,
    /// Closed before the end of a response body.
    Truncated,
    /// Not a valid HTTP/1.1 response.
    Invalid(&'static str),
    /// The client's request body broke off or went over its limit.
    RequestBody,
    H2(hyper::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Invalid(why) => Self::Invalid(why),
            DecodeError::Truncated => Self::Truncated,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(_) => f.write_str("connect"),
            Self::Io(_) => f.write_str("connection error"),
            Self::Closed => f.write_str("connection closed before a response"),
            Self::Truncated => f.write_str("connection closed before the end of the body"),
            Self::Invalid(why) => write!(f, "invalid response: {why}"),
            Self::RequestBody => f.write_str("the request body broke off"),
            Self::H2(_) => f.write_str("h2"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) | Self::Io(e) => Some(e),
            Self::H2(e) => Some(e),
            _ => None,
        }
    }
}
