//! HTTP/1.1 towards the upstream: write a request, read a response head,
//! decode its body (RFC 9112), and hand the connection back to the pool
//! when the exchange ended cleanly.
//!
//! The upstream is a known provider, but its bytes are still checked: a
//! malformed head, a bad chunk or a short body is an error, never a body
//! that looks complete (the rules are in [`crate::http1`]).

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Error, Io, Pool, SendBody, UpstreamBody};
use crate::http1::decode::{Decoded, Decoder};
use crate::http1::{self, Framing, HeadCopy, READ_SIZE};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// A request body up to this size goes out in the same write as its head.
const INLINE_BODY: u64 = 16 * 1024;
/// A pooled connection back for less than this is checked through the
/// reactor's readiness alone (see [`Conn::still_open`]): servers close idle
/// connections after seconds, and under load a connection comes back within
/// milliseconds.
const TRUST_REACTOR: std::time::Duration = std::time::Duration::from_secs(1);
/// An upload carried on after its answer ended stops after this long
/// without progress.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// One HTTP/1.1 connection with its read buffer.
pub struct Conn {
    io: Io,
    /// Freed whenever a response body's read would block, so a stream
    /// waiting for the upstream holds none; an idle pooled connection keeps
    /// an empty one of up to 8 KiB for its next exchange.
    buf: BytesMut,
}

impl Conn {
    pub(super) fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    pub(super) fn buf_is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn shrink_buf(&mut self) {
        if self.buf.capacity() > READ_SIZE {
            self.buf = BytesMut::new();
        }
    }

    /// Whether an idle connection can carry another request: the upstream
    /// has not closed it and sent nothing unasked. Never waits. A byte the
    /// upstream sent out of turn would be read as the next response's
    /// start (a desync), so the socket is asked itself (a `MSG_PEEK`)
    /// unless the connection came back less than [`TRUST_REACTOR`] ago and
    /// the reactor has seen nothing on it since its last read drained it.
    /// That skips one syscall in five per proxied request under load; what
    /// it gives up is a close or a byte that reached the socket after the
    /// reactor's last look, the same race any check has with a close that
    /// comes just after it (the exchange then fails before its first byte
    /// and is retried like any reset).
    pub(super) fn still_open(&mut self, idle_for: std::time::Duration) -> bool {
        let tcp = match &self.io {
            Io::Tcp(s) => s,
            Io::Tls(s) => s.get_ref().0,
        };
        let mut cx = Context::from_waker(Waker::noop());
        // Pending: no readiness since a read last found the socket empty.
        let quiet = tcp.poll_read_ready(&mut cx).is_pending();
        if !(quiet && idle_for < TRUST_REACTOR) {
            let mut byte = [MaybeUninit::<u8>::uninit(); 1];
            // Would block: nothing to read, the connection is open. A byte,
            // the end of the stream or an error rules it out.
            match socket2::SockRef::from(tcp).peek(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => return false,
            }
        }
        // TLS: what rustls already decrypted and holds counts too.
        if let Io::Tls(_) = &self.io {
            let mut probe = [0u8; 1];
            let mut probe = ReadBuf::new(&mut probe);
            return Pin::new(&mut self.io)
                .poll_read(&mut cx, &mut probe)
                .is_pending();
        }
        true
    }
}

/// Sends a request on `conn` and reads the response head; the body reads
/// on from the same connection.
pub(super) async fn exchange<B: SendBody>(
    mut conn: Conn,
    parts: &Parts,
    mut body: B,
    pool: &Arc<Pool<B>>,
) -> Result<Response<UpstreamBody<B>>, Error> {
    let framing = request_framing(parts, &body);
    let mut out = Vec::with_capacity(512);
    encode_head(parts, framing, &mut out);
    let rest = inline_body(&mut body, framing, &mut out)?.then_some(body);
    let mut send = Sending {
        cur: Bytes::from(out),
        after: None,
        crlf: false,
        body: rest,
        chunked: framing == Framing::Chunked,
        state: Upload::Writing,
        heard: false,
    };
    let head_only = parts.method == Method::HEAD;
    let head = std::future::poll_fn(|cx| send.poll(cx, &mut conn, head_only)).await?;
    let Head {
        res,
        framing,
        keep_alive,
    } = head;
    let reuse = match (keep_alive, send.state) {
        (false, _) => Reuse::Never,
        (true, Upload::Sent) => Reuse::Ready,
        (true, _) => Reuse::AfterUpload,
    };
    // An early answer that is not an error: the body carries the upload on.
    let upload =
        (send.state == Upload::Writing && res.status().as_u16() < 400).then(|| Box::new(send));
    let body = Body {
        conn: Some(conn),
        decoder: Decoder::new(framing),
        reuse,
        upload,
        pool: pool.clone(),
    };
    Ok(res.map(|()| UpstreamBody::H1(body)))
}

/// Where the request's upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// Bytes left to write.
    Writing,
    /// Everything written and flushed.
    Sent,
    /// The upstream stopped taking the body; its answer may still come.
    Refused,
}

/// Whether the connection can carry another exchange once the body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reuse {
    Never,
    /// The response allows it, once the upload carried on by the body ends.
    AfterUpload,
    Ready,
}

/// A request on its way out, with the response head read alongside: the
/// upstream may answer before the body is all sent (a 401 for a bad key, a
/// 413), and it may stop reading then. One task drives both directions, as
/// hyper's connection does, with no split of the connection.
struct Sending<B> {
    /// Being written; then `after`, then a CRLF when `crlf`.
    cur: Bytes,
    after: Option<Bytes>,
    crlf: bool,
    /// The rest of the body; `None` once it has all been taken.
    body: Option<B>,
    chunked: bool,
    state: Upload,
    /// Some of a response arrived: a close then cuts a head, not an idle connection.
    heard: bool,
}

impl<B: SendBody> Sending<B> {
    /// Ready with the head. It is returned as soon as it arrives: an error
    /// answer ends the upload (RFC 9112 §9.5); after any other the response
    /// body carries the rest of the upload on, since the upstream may stream
    /// its answer while it reads (waiting for the upload first could
    /// deadlock both).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Conn,
        head_only: bool,
    ) -> Poll<Result<Head, Error>> {
        while self.state == Upload::Writing {
            match self.poll_upload(cx, conn) {
                // Progress: keep writing while the socket takes it.
                Poll::Ready(Ok(())) => {}
                Poll::Pending => break,
                Poll::Ready(Err(Error::Io(_))) => self.state = Upload::Refused,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        poll_head(cx, conn, head_only, &mut self.heard)
    }

    /// One step of the upload: a write, the next frame, or the final flush.
    fn poll_upload(&mut self, cx: &mut Context<'_>, conn: &mut Conn) -> Poll<Result<(), Error>> {
        if !self.cur.is_empty() {
            let n = ready!(Pin::new(&mut conn.io).poll_write(cx, &self.cur)).map_err(Error::Io)?;
            if n == 0 {
                return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.cur.advance(n);
            return Poll::Ready(Ok(()));
        }
        if let Some(next) = self.after.take() {
            self.cur = next;
            return Poll::Ready(Ok(()));
        }
        if self.crlf {
            self.crlf = false;
            self.cur = Bytes::from_static(b"\r\n");
            return Poll::Ready(Ok(()));
        }
        if let Some(body) = &mut self.body {
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // While the client's next frame is awaited, what TLS
                    // still holds goes out (a no-op on plain TCP).
                    if let Poll::Ready(Err(e)) = Pin::new(&mut conn.io).poll_flush(cx) {
                        return Poll::Ready(Err(Error::Io(e)));
                    }
                    return Poll::Pending;
                }
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        let mut size = Vec::with_capacity(18);
                        http1::push_chunk_size(&mut size, data.len());
                        self.cur = Bytes::from(size);
                        self.after = Some(data);
                        self.crlf = true;
                    }
                    Ok(data) => self.cur = data,
                    // Trailers: not forwarded.
                    Err(_) => {}
                },
                Some(Err(_)) => return Poll::Ready(Err(Error::RequestBody)),
                None => {
                    self.body = None;
                    if self.chunked {
                        self.cur = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
            }
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(Error::Io)?;
        self.state = Upload::Sent;
        Poll::Ready(Ok(()))
    }
}

/// The framing of the body sent upstream: a length when it is known, else
/// chunked. An empty body gets `content-length: 0` where one is expected.
fn request_framing<B: http_body::Body>(parts: &Parts, body: &B) -> Framing {
    match body.size_hint().exact() {
        Some(0) if body.is_end_stream() => {
            let expects_body = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            if expects_body || parts.headers.contains_key(CONTENT_LENGTH) {
                Framing::Length(0)
            } else {
                Framing::Empty
            }
        }
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    }
}

/// Appends a small body that is ready now (one held in memory) to the head,
/// so both go out in one write. Whether a body is left to send.
fn inline_body<B: SendBody>(
    body: &mut B,
    framing: Framing,
    out: &mut Vec<u8>,
) -> Result<bool, Error> {
    let mut left = match framing {
        Framing::Empty | Framing::Length(0) => return Ok(false),
        Framing::Length(n) if n <= INLINE_BODY => n,
        _ => return Ok(true),
    };
    // A body in memory is ready at once, in one frame or several (a body
    // with its model spliced in); any other says Pending and is polled
    // again, with a real waker, by the upload.
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    // More than its length said: never sent as framed.
                    left = left
                        .checked_sub(data.len() as u64)
                        .ok_or(Error::RequestBody)?;
                    out.extend_from_slice(&data);
                }
                if body.is_end_stream() {
                    break;
                }
            }
            Poll::Ready(Some(Err(_))) => return Err(Error::RequestBody),
            Poll::Ready(None) => break,
            Poll::Pending => return Ok(true),
        }
    }
    // Shorter than its length said: the upstream would wait for the rest,
    // and take the next request's bytes for it.
    if left > 0 {
        return Err(Error::RequestBody);
    }
    Ok(false)
}

/// The request line and headers, origin-form; the framing headers are ours.
fn encode_head(parts: &Parts, framing: Framing, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if !target.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    http1::push_headers(out, &parts.headers);
    http1::push_framing(out, framing);
    out.extend_from_slice(b"\r\n");
}

pub(crate) struct Head {
    pub(crate) res: Response<()>,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
}

/// Reads until a final response head, skipping interim (1xx) ones.
fn poll_head(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    head_only: bool,
    heard: &mut bool,
) -> Poll<Result<Head, Error>> {
    let buf = &mut conn.buf;
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, head_only)? {
                return Poll::Ready(Ok(head));
            }
            if buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(Error::Invalid("response head over 64 KiB")));
            }
        }
        match ready!(http1::poll_read_buf(Pin::new(&mut conn.io), cx, buf)) {
            Ok(0) if *heard => {
                return Poll::Ready(Err(Error::Invalid("closed inside the response head")))
            }
            Ok(0) => return Poll::Ready(Err(Error::Closed)),
            Ok(_) => *heard = true,
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// Parses a complete head off the front of `buf`: `None` when more bytes
/// are needed. An interim (1xx) response is consumed and parsing goes on.
pub(crate) fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, Error> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Invalid(parse_error(e))),
        };
        match parsed.code.unwrap_or(0) {
            101 => return Err(Error::Invalid("101 Switching Protocols is not supported")),
            100..=199 => {
                buf.advance(len);
                if buf.is_empty() {
                    return Ok(None);
                }
            }
            _ => {
                // The values share a copy of the head, not the read buffer:
                // the next exchange reuses that.
                let built = build_head(&parsed, &HeadCopy::new(buf, len), head_only);
                buf.advance(len);
                return built.map(Some);
            }
        }
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "more than 100 headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The head as a `Response`, its values slices of `copy`.
fn build_head(
    parsed: &httparse::Response<'_, '_>,
    copy: &HeadCopy,
    head_only: bool,
) -> Result<Head, Error> {
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Invalid("invalid status code"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Room for the headers the proxy adds (request id, attempts): no regrowth.
    let mut map = HeaderMap::with_capacity(parsed.headers.len() + 2);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(copy.slice(h.value))
            .map_err(|_| Error::Invalid("invalid header value"))?;
        map.append(name, value);
    }
    let (framing, mut keep_alive) = response_framing(status, &mut map, head_only)?;
    keep_alive &=
        version == Version::HTTP_11 && !http1::headers_have_token(&map, &CONNECTION, b"close");
    let mut res = Response::new(());
    *res.status_mut() = status;
    *res.version_mut() = version;
    *res.headers_mut() = map;
    Ok(Head {
        res,
        framing,
        keep_alive,
    })
}

/// RFC 9112 §6.3, and whether the framing leaves the connection reusable.
/// The framing headers left in `headers` are the ones that describe what
/// the client will be sent: one valid `content-length` for a body of that
/// length (or a HEAD's or 304's), none otherwise.
fn response_framing(
    status: StatusCode,
    headers: &mut HeaderMap,
    head_only: bool,
) -> Result<(Framing, bool), Error> {
    let length = http1::content_length(headers);
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // No body follows. A HEAD's or a 304's length tells the size of
        // what it stands for: kept when it is one valid value. A 204 has
        // none (RFC 9110 §8.6).
        match length {
            Ok(Some(n)) if status != StatusCode::NO_CONTENT => {
                http1::set_content_length(headers, n)
            }
            _ => drop(headers.remove(CONTENT_LENGTH)),
        }
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if !http1::only_chunked(headers) {
            return Err(Error::Invalid("a transfer coding other than chunked"));
        }
        // With a content-length as well the message is suspect (smuggling):
        // read it as chunked, drop the length (an intermediary must), then
        // close the connection.
        let keep = headers.remove(CONTENT_LENGTH).is_none();
        return Ok((Framing::Chunked, keep));
    }
    match length.map_err(Error::Invalid)? {
        Some(n) => {
            http1::set_content_length(headers, n);
            Ok((Framing::Length(n), true))
        }
        None => Ok((Framing::Eof, false)),
    }
}

/// A response body read off its connection.
pub struct Body<B: SendBody> {
    /// `None` once the body ended (the connection went back or was closed).
    conn: Option<Conn>,
    decoder: Decoder,
    reuse: Reuse,
    /// The rest of the request after an early answer that is not an error,
    /// driven by this body's polls; the connection is reused only if it
    /// completes.
    upload: Option<Box<Sending<B>>>,
    pool: Arc<Pool<B>>,
}

impl<B: SendBody> Body<B> {
    /// The body ended: the connection goes back to the pool when clean.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        match self.upload.take() {
            // The answer ended before the upload: the upstream may still be
            // reading it, and a cut would look like a client that gave up.
            Some(upload) => {
                let (pool, reuse) = (self.pool.clone(), self.reuse);
                // Outside a runtime (a process ending) there is nobody to finish it.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(finish_upload(conn, upload, pool, reuse));
                }
            }
            None if self.reuse == Reuse::Ready => self.pool.reuse(conn),
            None => {}
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(e)))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.decoder.is_end()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }

    /// Drives the upload an early answer left under way.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let (Some(up), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        // Pending leaves the write's (or the client body's) waker set.
        loop {
            match up.poll_upload(cx, conn) {
                Poll::Ready(Ok(())) if up.state == Upload::Sent => break,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(Error::Io(_))) => {
                    up.state = Upload::Refused;
                    break;
                }
                Poll::Ready(Err(e)) => {
                    self.upload = None;
                    return Err(e);
                }
                Poll::Pending => return Ok(()),
            }
        }
        if up.state == Upload::Refused || self.reuse == Reuse::Never {
            self.reuse = Reuse::Never;
        } else {
            self.reuse = Reuse::Ready;
        }
        self.upload = None;
        Ok(())
    }

    pub(super) fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if let Err(e) = this.poll_upload(cx) {
            return this.fail(e);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(d)) => {
                    if this.is_end_stream() {
                        // hyper may not poll again once the end is known.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return this.fail(e.into()),
            }
            match http1::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Ready(Ok(0)) => {
                    this.reuse = Reuse::Never;
                    if let Err(e) = this.decoder.at_eof() {
                        return this.fail(e.into());
                    }
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(Error::Io(e)),
                Poll::Pending => {
                    if conn.buf.is_empty() {
                        // Waiting costs no buffer; the next read takes a fresh one.
                        conn.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Sends the rest of a request whose answer has ended, while the upload
/// makes progress (at most `UPLOAD_IDLE` without any), then hands the
/// connection back when the exchange ended cleanly.
async fn finish_upload<B: SendBody>(
    mut conn: Conn,
    mut up: Box<Sending<B>>,
    pool: Arc<Pool<B>>,
    reuse: Reuse,
) {
    let idle = tokio::time::sleep(UPLOAD_IDLE);
    tokio::pin!(idle);
    let sent = std::future::poll_fn(|cx| loop {
        match up.poll_upload(cx, &mut conn) {
            Poll::Ready(Ok(())) if up.state == Upload::Sent => return Poll::Ready(true),
            Poll::Ready(Ok(())) => idle
                .as_mut()
                .reset(tokio::time::Instant::now() + UPLOAD_IDLE),
            Poll::Ready(Err(_)) => return Poll::Ready(false),
            Poll::Pending => {
                return match std::future::Future::poll(idle.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    })
    .await;
    if sent && reuse != Reuse::Never {
        pool.reuse(conn);
    }
}

impl<B: SendBody> Drop for Body<B> {
    fn drop(&mut self) {
        // Read to its end but not polled past it: the connection is still good.
        if self.decoder.is_end() {
            self.finish();
        }
    }
}
#[cfg(test)]
mod differential;

#[cfg(test)]
mod tests {
    use super::*;

    /// A body held in pieces whose declared length may lie.
    struct Pieces(std::collections::VecDeque<Bytes>, u64);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|d| Ok(http_body::Frame::data(d))))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }

    #[test]
    fn a_body_in_pieces_goes_with_the_head_and_a_wrong_length_is_refused() {
        let pieces = |p: &[&'static str], len| {
            Pieces(
                p.iter().map(|s| Bytes::from_static(s.as_bytes())).collect(),
                len,
            )
        };
        let mut out = Vec::new();
        let mut b = pieces(&["{\"model\":", "\"x\"", "}"], 13);
        assert!(!inline_body(&mut b, Framing::Length(13), &mut out).unwrap());
        assert_eq!(out, b"{\"model\":\"x\"}");
        // Longer or shorter than the length the head announced: never sent.
        let mut out = Vec::new();
        let mut b = pieces(&["12345", "678"], 5);
        assert!(matches!(
            inline_body(&mut b, Framing::Length(5), &mut out),
            Err(Error::RequestBody)
        ));
        let mut b = pieces(&["123"], 5);
        assert!(matches!(
            inline_body(&mut b, Framing::Length(5), &mut Vec::new()),
            Err(Error::RequestBody)
        ));
    }

    fn head(raw: &[u8], head_only: bool) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(raw), head_only)
    }

    /// A whole head that must parse.
    fn parsed(raw: &[u8], head_only: bool) -> Head {
        head(raw, head_only).unwrap().unwrap()
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Length(5));
        let h = parsed(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let h = parsed(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(
            !h.res.headers().contains_key("content-length"),
            "an intermediary must drop it (RFC 9112 6.3)"
        );
        let h = parsed(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Eof, false));
        let h = parsed(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: Close\r\n\r\n",
            false,
        );
        assert!(!h.keep_alive);
        let h = parsed(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n", false);
        assert!(!h.keep_alive);
        let h = parsed(
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Empty);
        let h = parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n", true);
        assert_eq!(h.framing, Framing::Empty);
        let h = parsed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert_eq!(h.res.status(), 200);
        assert!(head(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .is_none());
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-len", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bodiless_responses_keep_one_valid_length_or_none() {
        let length = |raw: &[u8], head_only| {
            let h = head(raw, head_only).unwrap().unwrap();
            assert_eq!(h.framing, Framing::Empty);
            let all: Vec<_> = h
                .res
                .headers()
                .get_all("content-length")
                .iter()
                .cloned()
                .collect();
            all
        };
        let not_modified = |cl: &str| format!("HTTP/1.1 304 Not Modified\r\n{cl}\r\n").into_bytes();
        assert_eq!(length(&not_modified("content-length: 5\r\n"), false), ["5"]);
        assert_eq!(
            length(&not_modified("content-length: 5, 5\r\n"), false),
            ["5"]
        );
        for bad in [
            "content-length: 5\r\ncontent-length: 6\r\n",
            "content-length: -1, x\r\n",
        ] {
            assert!(length(&not_modified(bad), false).is_empty(), "{bad}");
        }
        assert!(length(
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false
        )
        .is_empty());
        assert_eq!(
            length(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n", true),
            ["50"]
        );
    }

    /// A connection idle for a while is checked on the socket itself:
    /// stray bytes and a close are seen even though the reactor has not
    /// looked since (no await between the write and the check).
    #[tokio::test]
    async fn long_idle_connections_are_checked_on_the_socket() {
        use std::io::Write;
        let idle = TRUST_REACTOR;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut conn = Conn::new(Io::Tcp(tcp));
        // Let the reactor see the socket idle first.
        tokio::task::yield_now().await;
        assert!(conn.still_open(idle), "an idle connection is open");
        peer.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        assert!(!conn.still_open(idle), "stray bytes rule it out");

        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().unwrap();
        let mut conn = Conn::new(Io::Tcp(tcp));
        tokio::task::yield_now().await;
        assert!(conn.still_open(idle));
        drop(peer);
        // The FIN may take a moment on loopback; no reactor turn is needed.
        let closed = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            !conn.still_open(idle)
        });
        assert!(closed, "a close rules it out");
    }

    /// A connection back only just now is checked through the reactor: it
    /// is ruled out by stray bytes or a close once a turn of the reactor has
    /// seen them, and by nothing else (no syscall).
    #[tokio::test]
    async fn fresh_connections_are_checked_through_the_reactor() {
        use std::io::{Read, Write};
        let fresh = std::time::Duration::ZERO;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (peer, _) = listener.accept().unwrap();
            (Conn::new(Io::Tcp(tcp)), peer)
        };
        // A turn of the reactor, with the socket's events in the kernel.
        let turn = || async {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };

        // An exchange: the answer read to the end, the socket drained.
        let (mut conn, mut peer) = connect().await;
        turn().await;
        peer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        turn().await;
        let mut buf = [0u8; 64];
        let n = tokio::io::AsyncReadExt::read(&mut conn.io, &mut buf)
            .await
            .unwrap();
        assert_eq!(n, 27, "the whole answer");
        assert!(conn.still_open(fresh), "a drained connection is reused");

        peer.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        // Not yet seen by the reactor: the fresh check does not ask the
        // socket (the syscall it saves); a long-idle one does.
        assert!(conn.still_open(fresh), "no syscall for a fresh connection");
        assert!(!conn.still_open(TRUST_REACTOR));
        turn().await;
        assert!(!conn.still_open(fresh), "stray bytes rule it out");

        let (mut conn, peer) = connect().await;
        turn().await;
        assert!(conn.still_open(fresh));
        drop(peer);
        turn().await;
        assert!(!conn.still_open(fresh), "a close rules it out");
        // Nothing read: the peer's socket got no request either.
        let (mut conn, mut peer) = connect().await;
        turn().await;
        assert!(conn.still_open(fresh));
        peer.set_nonblocking(true).unwrap();
        assert!(peer.read(&mut buf).is_err(), "the check sent nothing");
    }

    #[test]
    fn malformed_heads_are_errors() {
        for bad in [
            &b"HELLO\r\n\r\n"[..],
            b"HTTP/1.1 99999 X\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            // Decoding the chunks of a gzip body would pass gzip bytes on as identity.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
        ] {
            assert!(
                head(bad, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn header_values_share_the_head_bytes() {
        let h = parsed(
            b"HTTP/1.1 200 OK\r\nx-request-id: req_1\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(h.res.headers()["x-request-id"], "req_1");
    }

    #[test]
    fn request_heads_are_origin_form_with_our_framing() {
        let req = http::Request::post("http://up.example/v1/chat?x=1")
            .header("host", "up.example")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_head(&parts, Framing::Length(2), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: up.example\r\ncontent-length: 2\r\n\r\n"
        );
    }
}
