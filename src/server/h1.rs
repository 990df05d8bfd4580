//! sluice's own HTTP/1.1 server, for the requests API clients send: a head
//! and a body of known length that fits the server's whole-body limit.
//!
//! It exists for what a held stream costs and what a request costs: hyper's
//! server keeps two read/write buffers for a connection's whole life, and
//! its dispatch is a large share of a proxied request's work. This one:
//! - reads into a buffer on the stack, so a connection waiting for its next
//!   request, or holding a stream open, keeps no read buffer;
//! - parses the head with `httparse` and copies it into one allocation that
//!   the header values slice (the body gets its own);
//! - writes the head with what of the body is ready in one write, and while
//!   a stream waits for its next event holds no write buffer either;
//! - watches the client while the handler works: a client that goes away
//!   cancels its request (as hyper does).
//!
//! What it does not serve goes to hyper, with the bytes read so far: a head
//! `httparse` refuses or over 64 KiB (hyper answers 400/431), HTTP/1.0,
//! `HEAD`, `CONNECT`, `Expect`, `Upgrade`, `Transfer-Encoding`, a repeated or
//! odd `Content-Length`, a body over the limit (hyper streams it), or one
//! still arriving after `header_read_timeout` (the handler's deadlines then
//! bound it). hyper then serves the rest of that connection. So every
//! request whose framing could be read two ways is hyper's to refuse.

use std::future::poll_fn;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::{BodyError, ClientBody, Expiring, Handler, Refusal, ServerOptions};
use crate::drain;
use crate::http1::{self, Framing, HeadCopy, READ_SIZE};

/// At most this many request headers (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Pipelined bytes kept while a response is under way; beyond, reading stops.
const MAX_PIPELINED: usize = 64 * 1024;
/// Body frames up to this are gathered with the head and each other; a
/// larger one is written from where it is.
const COPY_MAX: usize = 4 * 1024;
/// Gathered response bytes written once they reach this.
const WRITE_HIGH: usize = 16 * 1024;
/// Headers the handler adds to a request (key, request id, ...): room for
/// them up front, so the map does not grow.
const ADDED_HEADERS: usize = 3;
/// After a refusal, how long and how much of the client's rest is read and
/// dropped before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// One HTTP/1.1 connection served by sluice.
pub struct Server<'a, IO, H> {
    io: IO,
    /// Bytes read and not yet used: the start of a request, or pipelined ones.
    buf: BytesMut,
    /// Response bytes not yet written.
    out: Vec<u8>,
    handler: &'a H,
    opts: &'a ServerOptions,
    /// Bounds the wait for a request head; made on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
}

/// A request, read whole.
pub(crate) struct Parsed {
    pub(crate) req: Request<ClientBody>,
    /// The client asked to close, or its body broke off.
    pub(crate) close: bool,
}

// Returned once per request and unpacked at once: boxing the request would
// cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parse {
    /// The head is not complete yet.
    Partial,
    /// The head is complete; the body needs this many bytes in all.
    Body(usize),
    /// A request, and how many bytes it took.
    Ready(Parsed, usize),
    /// Not for this server: hyper takes the connection.
    Hyper,
    /// Refused before any handler sees it; the connection closes.
    Refuse(Refusal),
}

/// Where reading the next request stands.
#[allow(clippy::large_enum_variant)]
enum Step {
    Request(Parsed),
    /// The head is in; the body needs this many bytes with it.
    Body(usize),
    /// The client closed.
    Closed,
    /// sluice closes: idle too long, or draining.
    Close,
    Hyper,
    Refuse(Refusal),
}

/// Whether the connection between requests holds part of one: the drain
/// closes an idle connection at once, but lets a request under way arrive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    Idle,
    Begun,
}

/// What follows a response on the connection.
#[derive(PartialEq, Eq)]
enum Next {
    KeepAlive,
    /// Either side asked to close, or the body broke off (the client must
    /// not take it for complete).
    Close,
}

impl<'a, IO, H> Server<'a, IO, H>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    pub fn new(io: IO, handler: &'a H, opts: &'a ServerOptions) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            handler,
            opts,
            timer: None,
        }
    }

    /// Serves requests until the connection ends (`None`), or until one is
    /// for hyper: then the connection and the bytes read of it are returned.
    pub async fn serve(mut self, drain: &drain::Watch) -> io::Result<Option<(IO, Bytes)>> {
        // One wait for the drain for the connection's life.
        let drained = drain.draining();
        tokio::pin!(drained);
        let mut draining = false;
        loop {
            // Bodies up to this are read whole before the request is handed
            // on; a larger one goes to hyper.
            let max_body = self.opts.whole_body();
            // hyper's header_read_timeout also runs from here: it bounds an
            // idle keep-alive connection as well as a slow head.
            let deadline = Instant::now() + self.opts.header_read_timeout;
            let step = poll_fn(|cx| {
                if let Poll::Ready(step) = self.poll_head(cx, max_body) {
                    return Poll::Ready(step);
                }
                // Also at once when the drain began before this connection
                // was served (a TLS handshake under way).
                if !draining && drained.as_mut().poll(cx).is_ready() {
                    draining = true;
                    if reading_state(&self.buf) == Reading::Idle {
                        return Poll::Ready(Ok(Step::Close));
                    }
                }
                // No request within header_read_timeout.
                self.poll_deadline(cx, deadline).map(|()| Ok(Step::Close))
            })
            .await?;
            let step = match step {
                Step::Body(total) => self.read_body(total, max_body).await,
                step => step,
            };
            let parsed = match step {
                Step::Request(p) => p,
                Step::Closed | Step::Body(_) => return Ok(None),
                Step::Close => {
                    self.close().await;
                    return Ok(None);
                }
                Step::Hyper => return Ok(Some((self.io, self.buf.freeze()))),
                Step::Refuse(why) => {
                    self.respond(self.handler.refuse(why), true).await?;
                    self.linger().await;
                    return Ok(None);
                }
            };
            let call = self.handler.call(parsed.req);
            // Until the response is ready, a client that goes away cancels it.
            let gone = poll_fn(|cx| poll_gone(&mut self.io, &mut self.buf, cx));
            let res = tokio::select! {
                biased;
                res = call => res,
                () = gone => return Ok(None),
            };
            draining |= drain.is_draining();
            let close = parsed.close || draining;
            if self.respond(res, close).await? == Next::Close || drain.is_draining() {
                self.close().await;
                return Ok(None);
            }
        }
    }

    /// Reads until a request head is complete. A request that arrives whole
    /// in one read (the usual case) is parsed off the stack and never sits in
    /// `buf`.
    fn poll_head(&mut self, cx: &mut Context<'_>, max_body: u64) -> Poll<io::Result<Step>> {
        loop {
            if self.buf.is_empty() {
                let buf = &mut self.buf;
                let step = ready!(http1::poll_read_stack(Pin::new(&mut self.io), cx, |got| {
                    if got.is_empty() {
                        return Some(Step::Closed);
                    }
                    if let Parse::Ready(parsed, used) = parse(got, max_body, None) {
                        buf.extend_from_slice(&got[used..]);
                        return Some(Step::Request(parsed));
                    }
                    buf.extend_from_slice(got);
                    None
                }))?;
                if let Some(step) = step {
                    return Poll::Ready(Ok(step));
                }
            }
            match parse(&self.buf, max_body, None) {
                Parse::Ready(parsed, used) => {
                    self.consume(used);
                    return Poll::Ready(Ok(Step::Request(parsed)));
                }
                Parse::Body(total) => return Poll::Ready(Ok(Step::Body(total))),
                Parse::Hyper => return Poll::Ready(Ok(Step::Hyper)),
                Parse::Refuse(why) => return Poll::Ready(Ok(Step::Refuse(why))),
                Parse::Partial => {}
            }
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
                self.buf.reserve(READ_SIZE);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.buf
            ))?;
            if n == 0 {
                // Closed inside a head: there is nobody to answer.
                return Poll::Ready(Ok(Step::Closed));
            }
        }
    }

    /// Ready once `deadline` has passed. The connection's one timer is
    /// re-armed only when it fires early (the deadline moved on since): a
    /// request on a busy connection costs a clock read, not a timer.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Reads the rest of a body, `total` bytes with the head. A silence over
    /// `header_read_timeout` is answered 408, and a client that breaks off
    /// 400, as when hyper reads the body. A body still arriving after
    /// `header_read_timeout` in all goes to hyper with what came, to be read
    /// under the handler's deadlines like any streamed body.
    async fn read_body(&mut self, total: usize, max_body: u64) -> Step {
        self.buf.reserve(total - self.buf.len());
        let timeout = self.opts.header_read_timeout;
        let all = Instant::now() + timeout;
        let mut failed = None;
        while self.buf.len() < total {
            let read = tokio::time::timeout(timeout, self.io.read_buf(&mut self.buf));
            match tokio::time::timeout_at(all, read).await {
                Ok(Ok(Ok(n))) if n > 0 => continue,
                Ok(Ok(_)) => failed = Some(BodyError::Incomplete),
                Ok(Err(_)) => failed = Some(BodyError::TimedOut),
                Err(_) => return Step::Hyper,
            }
            break;
        }
        match parse(&self.buf, max_body, failed) {
            Parse::Ready(parsed, used) => {
                self.consume(used);
                Step::Request(parsed)
            }
            // The URI or a header value is invalid (checked once the
            // request is whole).
            Parse::Refuse(why) => Step::Refuse(why),
            _ => Step::Hyper,
        }
    }

    fn consume(&mut self, used: usize) {
        self.buf.advance(used);
        if self.buf.is_empty() {
            // Frees the read buffer: the request owns a copy of what it needs.
            self.buf = BytesMut::new();
        } else if self.buf.capacity() > 2 * READ_SIZE {
            // Grown for a large body: keep only the few bytes after it.
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// Closes the connection: a FIN, or TLS's close_notify first.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }

    /// Closes after a refusal, reading and dropping what the client still
    /// sends for a moment first: closing with unread bytes makes the kernel
    /// send a reset, which can overtake the answer (nginx's lingering close).
    async fn linger(&mut self) {
        self.close().await;
        let drain = async {
            let mut left = LINGER_BYTES;
            while left > 0 {
                match http1::poll_read_stack_once(&mut self.io).await {
                    Ok(n) if n > 0 => left = left.saturating_sub(n),
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Writes a response, framed by what its body says of its length.
    ///
    /// The head is encoded before the future is made, so the future holds
    /// the body alone: it lives as long as the stream, in every connection.
    fn respond<B>(
        &mut self,
        res: Response<B>,
        close: bool,
    ) -> impl Future<Output = io::Result<Next>> + use<'_, 'a, IO, H, B>
    where
        B: Body<Data = Bytes> + Expiring + Unpin,
    {
        let (parts, body) = res.into_parts();
        // The handler asks to close too (a 503 while shutting down).
        let close =
            close || http1::headers_have_token(&parts.headers, &header::CONNECTION, b"close");
        let next = if close { Next::Close } else { Next::KeepAlive };
        let status = parts.status;
        // The framing is what will be sent, as the body says; a length in
        // the headers is never trusted for it.
        let framing = if status.is_informational() || status == 204 || status == 304 {
            Framing::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        };
        encode_head(&mut self.out, &parts, framing, close);
        drop(parts);
        self.send_body(body, framing, next)
    }

    /// Sends the head already in `out`, then the body.
    async fn send_body<B>(&mut self, mut body: B, framing: Framing, next: Next) -> io::Result<Next>
    where
        B: Body<Data = Bytes> + Expiring + Unpin,
    {
        if framing == Framing::Empty {
            drop(body);
            self.flush().await?;
            return Ok(next);
        }
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        loop {
            // What is ready goes out together; the gathered bytes are written
            // only when the body has to wait.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    or_expired(self.flush(), &mut body).await?;
                    // A stream waiting for its next event holds no buffers.
                    self.out = Vec::new();
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    let gone = poll_fn(|cx| poll_gone(&mut self.io, &mut self.buf, cx));
                    tokio::select! {
                        biased;
                        frame = body.frame() => frame,
                        () = gone => return Ok(Next::Close),
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: HTTP/1.1 clients did not ask for them.
                    Err(_) => continue,
                },
                Some(Err(_)) => {
                    // Aborted: what was written goes out, the end never does.
                    self.flush().await?;
                    return Ok(Next::Close);
                }
            };
            if data.is_empty() {
                continue;
            }
            let tail: &[u8] = match framing {
                Framing::Chunked => {
                    http1::push_chunk_size(&mut self.out, data.len());
                    b"\r\n"
                }
                _ => {
                    if data.len() as u64 > left {
                        // More than the length said: the body is wrong, end it short.
                        self.flush().await?;
                        return Ok(Next::Close);
                    }
                    left -= data.len() as u64;
                    b""
                }
            };
            if data.len() > COPY_MAX {
                or_expired(self.write_with(&data, tail), &mut body).await?;
            } else {
                self.out.extend_from_slice(&data);
                self.out.extend_from_slice(tail);
                if self.out.len() >= WRITE_HIGH {
                    or_expired(self.flush(), &mut body).await?;
                }
            }
            if body.is_end_stream() {
                break;
            }
        }
        match framing {
            Framing::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
            _ if left > 0 => {
                // Shorter than the length said: the client must see it cut.
                self.flush().await?;
                return Ok(Next::Close);
            }
            _ => {}
        }
        // The handler's end of the request comes when the body is dropped:
        // after the last byte.
        or_expired(self.flush(), &mut body).await?;
        drop(body);
        if self.out.capacity() > 2 * COPY_MAX {
            // Grown for a large response: an idle connection keeps little.
            self.out = Vec::new();
        }
        Ok(next)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out.clear();
        }
        self.io.flush().await
    }

    /// Writes the gathered bytes, then `data` from where it is, then `tail`.
    async fn write_with(&mut self, data: &[u8], tail: &[u8]) -> io::Result<()> {
        let mut slices = [
            IoSlice::new(&self.out),
            IoSlice::new(data),
            IoSlice::new(tail),
        ];
        let mut bufs = &mut slices[..];
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let n = self.io.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.out.clear();
        Ok(())
    }
}

/// A write of a response under way, unless the body expires first (its
/// deadline, the drain's cut) while the client takes nothing; then, and when
/// the client takes nothing for `send_timeout`, the connection is cut.
async fn or_expired<B: Expiring>(
    write: impl Future<Output = io::Result<()>>,
    body: &mut B,
) -> io::Result<()> {
    let res = tokio::select! {
        // The write first: one that goes straight out costs no expiry check.
        biased;
        res = write => res,
        () = poll_fn(|cx| body.poll_expired(cx)) => Err(io::Error::other(
            "the response's deadline passed while the client was not reading",
        )),
    };
    if res.as_ref().is_err_and(super::timed::is_send_timeout) {
        body.stalled();
    }
    res
}

/// The status line and headers; framing and connection headers are ours.
fn encode_head(out: &mut Vec<u8>, parts: &http::response::Parts, framing: Framing, close: bool) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    http1::push_headers(out, &parts.headers);
    if parts.status == 304 {
        // A 304 tells the length of what it stands for: one valid value, or none.
        if let Ok(Some(n)) = http1::content_length(&parts.headers) {
            http1::push_framing(out, Framing::Length(n));
        }
    }
    http1::push_framing(out, framing);
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads what the client sends while its response is under way. Ready when
/// the client has gone (closed or broken); pipelined bytes are kept in `buf`
/// for the next request, up to a limit.
fn poll_gone<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        if buf.len() >= MAX_PIPELINED {
            // Enough queued: stop reading, and let TCP push back.
            return Poll::Pending;
        }
        let read = http1::poll_read_stack(Pin::new(&mut *io), cx, |got| {
            buf.extend_from_slice(got);
            got.len()
        });
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(n)) if n > 0 => {}
            Poll::Ready(_) => return Poll::Ready(()),
        }
    }
}

/// Parses a request in `buf`. With `failed`, a body that is not all there
/// is handed on as failed (the handler answers for it) instead of awaited.
/// A head that is malformed, too large, or framed two ways is refused here
/// (the handler words the answer); a valid one this server does not serve
/// goes to hyper.
pub(crate) fn parse(buf: &[u8], max_body: u64, failed: Option<BodyError>) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= super::MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Partial) if buf.len() <= super::MAX_HEAD_BYTES => {
            return Parse::Partial
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Parse::Refuse(Refusal::HeadTooLarge)
        }
        Err(_) => return Parse::Refuse(Refusal::Malformed),
    };
    let mut body_len = None;
    let mut repeated_length = false;
    let mut coded = false;
    let mut close = false;
    let mut hyper = req.version != Some(1);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // Digits only; a repeat must say the same (then hyper decides).
            match (body_len, http1::parse_length(h.value)) {
                (_, None) => return Parse::Refuse(Refusal::Malformed),
                (Some(n), Some(m)) if n != m => return Parse::Refuse(Refusal::Malformed),
                (Some(_), Some(_)) => repeated_length = true,
                (None, n) => body_len = n,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= http1::has_token(h.value, b"close");
        } else if name.eq_ignore_ascii_case(b"expect") || name.eq_ignore_ascii_case(b"upgrade") {
            hyper = true;
        }
    }
    if coded {
        // A body framed two ways, by an HTTP/1.0 client, or by a coding
        // other than one chunked: its end cannot be known (RFC 9112 §6.1).
        let codings = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value);
        if body_len.is_some() || req.version != Some(1) || !http1::codings_only_chunked(codings) {
            return Parse::Refuse(Refusal::Malformed);
        }
        // Chunked uploads stream: hyper reads them.
        return Parse::Hyper;
    }
    if hyper || repeated_length {
        return Parse::Hyper;
    }
    let method = match req.method.unwrap_or_default() {
        "POST" => Method::POST,
        "GET" => Method::GET,
        "HEAD" | "CONNECT" => return Parse::Hyper,
        m => match Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Parse::Refuse(Refusal::Malformed),
        },
    };
    let body_len = body_len.unwrap_or(0);
    if body_len > max_body {
        return Parse::Hyper;
    }
    let total = head_len + body_len as usize;
    let take = if buf.len() >= total {
        total
    } else if failed.is_some() {
        buf.len()
    } else {
        return Parse::Body(total);
    };
    // The head gets its own allocation, which the values slice; the body
    // another. Shared, a value kept longer than the request would keep the
    // body alive too.
    let copy = HeadCopy::new(buf, head_len);
    let Ok(uri) = Uri::from_maybe_shared(copy.slice(req.path.unwrap_or_default().as_bytes()))
    else {
        return Parse::Refuse(Refusal::Malformed);
    };
    let mut map = HeaderMap::with_capacity(req.headers.len() + ADDED_HEADERS);
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_maybe_shared(copy.slice(h.value)),
        ) else {
            return Parse::Refuse(Refusal::Malformed);
        };
        map.append(name, value);
    }
    let body = match failed {
        Some(e) if take < total => ClientBody::Failed(e),
        _ if body_len == 0 => ClientBody::Full(None),
        _ => ClientBody::Full(Some(Bytes::copy_from_slice(&buf[head_len..total]))),
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    let parsed = Parsed {
        req: request,
        close: close || take < total,
    };
    Parse::Ready(parsed, take)
}

/// Whether `buf` holds more than the blank lines a client may send between
/// requests.
fn reading_state(buf: &[u8]) -> Reading {
    if buf.iter().any(|&b| b != b'\r' && b != b'\n') {
        Reading::Begun
    } else {
        Reading::Idle
    }
}

/// Today's `Date` value, formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut date = cell.borrow_mut();
        if date.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if let Ok(bytes) = <[u8; 29]>::try_from(text.as_bytes()) {
                *date = (secs, bytes);
            }
        }
        out.extend_from_slice(&date.1);
    });
}

#[cfg(test)]
mod differential;

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BODY: u64 = 1024 * 1024;

    fn ready(buf: &[u8]) -> (Parsed, usize) {
        match parse(buf, MAX_BODY, None) {
            Parse::Ready(p, n) => (p, n),
            _ => panic!("not parsed whole: {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn is_hyper(buf: &[u8]) -> bool {
        matches!(parse(buf, MAX_BODY, None), Parse::Hyper)
    }

    #[test]
    fn a_request_with_its_body_is_parsed_whole() {
        let req = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Custom: v\r\n\r\nhelloGET";
        let (p, used) = ready(req);
        assert_eq!(used, req.len() - 3, "pipelined bytes are left");
        assert_eq!(p.req.method(), Method::POST);
        assert_eq!(p.req.uri().path(), "/v1/chat/completions");
        assert_eq!(p.req.uri().query(), Some("x=1"));
        assert_eq!(p.req.headers()["x-custom"], "v");
        assert!(!p.close);
        match p.req.body() {
            ClientBody::Full(Some(b)) => assert_eq!(&b[..], b"hello"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_partial_head_waits_and_a_partial_body_is_awaited_or_failed() {
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: a\r\n", MAX_BODY, None),
            Parse::Partial
        ));
        let req = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
        match parse(req, MAX_BODY, None) {
            Parse::Body(total) => assert_eq!(total, req.len() + 7),
            _ => panic!("the body is awaited"),
        }
        match parse(req, MAX_BODY, Some(BodyError::TimedOut)) {
            Parse::Ready(p, used) => {
                assert_eq!(used, req.len());
                assert!(p.close, "a broken body ends the connection");
                assert!(matches!(
                    p.req.body(),
                    ClientBody::Failed(BodyError::TimedOut)
                ));
            }
            _ => panic!("dispatched as failed"),
        }
    }

    #[test]
    fn what_this_server_does_not_serve_goes_to_hyper() {
        for req in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
        ] {
            assert!(is_hyper(req), "{:?}", String::from_utf8_lossy(req));
        }
        // Over the body limit: hyper streams it, or answers 413.
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 10, None),
            Parse::Hyper
        ));
    }

    fn refused(buf: &[u8]) -> Option<Refusal> {
        match parse(buf, MAX_BODY, None) {
            Parse::Refuse(why) => Some(why),
            _ => None,
        }
    }

    /// What hyper would answer with a bare 400 or 431 is refused here, so
    /// the handler can answer in the API's error shape.
    #[test]
    fn malformed_or_ambiguous_heads_are_refused() {
        for req in [
            &b"NOT HTTP AT ALL\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET http://[bad/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\na",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                refused(req),
                Some(Refusal::Malformed),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        // A head over 64 KiB, complete or not, or with over 100 headers.
        let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big.resize(super::super::MAX_HEAD_BYTES + 10, b'a');
        assert_eq!(refused(&big), Some(Refusal::HeadTooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(refused(&big), Some(Refusal::HeadTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(refused(&many), Some(Refusal::HeadTooLarge));
    }

    #[test]
    fn connection_close_is_seen_among_tokens() {
        let (p, _) = ready(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(p.close);
        let (p, _) = ready(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
        assert!(!p.close);
    }

    #[test]
    fn dates_are_formatted() {
        let mut date = Vec::new();
        push_date(&mut date);
        let text = String::from_utf8(date).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
