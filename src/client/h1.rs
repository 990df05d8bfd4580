//! HTTP/1.1 towards the upstream: write a request, read a response head,
//! decode its body (RFC 9112), and hand the connection back to the pool
//! when the exchange ended cleanly.
//!
//! The upstream is a known provider, but its bytes are still checked: a
//! malformed head, a bad chunk or a short body is an error, never a body
//! that looks complete.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::Body as _;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Error, Io, Pool, UpstreamBody};
use crate::body::RequestBody;
use crate::http1;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// What a read asks the kernel for.
const READ_SIZE: usize = 8 * 1024;
/// A request body up to this size goes out in the same write as its head.
const INLINE_BODY: usize = 16 * 1024;
/// Longest chunk-size line (extensions included) and all trailers together.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

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

    /// Whether an idle connection can carry another request: the upstream
    /// has not closed it and sent nothing unasked. Never waits.
    pub(super) fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        // Plain TCP: no news from the reactor means nothing arrived, no syscall needed.
        if let Io::Tcp(s) = &self.io {
            if s.poll_read_ready(&mut cx).is_pending() {
                return true;
            }
        }
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        // Pending: nothing to read, the connection is open. Anything else
        // (end of stream, stray bytes, an error) rules it out.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Eof,
}

/// Sends a request on `conn` and reads the response head; the body reads
/// on from the same connection.
pub(super) async fn exchange(
    mut conn: Conn,
    parts: &Parts,
    body: RequestBody,
    pool: &Arc<Pool>,
) -> Result<Response<UpstreamBody>, Error> {
    let framing = request_framing(parts, &body);
    let mut out = Vec::with_capacity(512);
    encode_head(parts, framing, &mut out);
    let head_only = parts.method == Method::HEAD;
    // A small body goes out in the head's write; a larger one follows it.
    let body = match body {
        RequestBody::Full(Some(d)) if d.len() <= INLINE_BODY => {
            out.extend_from_slice(&d);
            None
        }
        RequestBody::Full(None) => None,
        body => Some(body),
    };
    let mut send = Sending {
        cur: Bytes::from(out),
        after: None,
        crlf: false,
        body,
        chunked: framing == Some(Framing::Chunked),
        done: false,
        write_failed: false,
        got_any: false,
    };
    let (head, uploaded) = std::future::poll_fn(|cx| send.poll(cx, &mut conn, head_only)).await?;
    let Head {
        res,
        framing,
        keep_alive,
    } = head;
    // An early answer that is not an error: the body carries the upload on.
    let upload =
        (!uploaded && !send.write_failed && res.status().as_u16() < 400).then(|| Box::new(send));
    let decoder = match framing {
        Framing::Length(n) => Decoder::Length(n),
        Framing::Chunked => Decoder::Chunked(Chunked::Size, 0),
        Framing::Eof => Decoder::Eof,
    };
    let body = Body {
        conn: Some(conn),
        decoder,
        reusable: keep_alive && uploaded,
        keep_alive,
        upload,
        pool: pool.clone(),
    };
    Ok(res.map(|()| UpstreamBody::H1(body)))
}

/// A request on its way out, with the response head read alongside: the
/// upstream may answer before the body is all sent (a 401 for a bad key, a
/// 413), and it may stop reading then. One task drives both directions, as
/// hyper's connection does, with no split of the connection.
struct Sending {
    /// Being written; then `after`, then a CRLF when `crlf`.
    cur: Bytes,
    after: Option<Bytes>,
    crlf: bool,
    /// The rest of the body; `None` once it has all been taken.
    body: Option<RequestBody>,
    chunked: bool,
    /// Everything written and flushed.
    done: bool,
    /// The upstream stopped taking the body; its answer may still come.
    write_failed: bool,
    got_any: bool,
}

impl Sending {
    /// Ready with the head, and whether the whole request went out by then.
    /// The head is returned as soon as it arrives: an error answer ends the
    /// upload (RFC 9112 §9.5); after any other the response body carries
    /// the rest of the upload on, since the upstream may stream its answer
    /// while it reads (waiting for the upload first could deadlock both).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Conn,
        head_only: bool,
    ) -> Poll<Result<(Head, bool), Error>> {
        loop {
            if !self.done && !self.write_failed {
                match self.poll_upload(cx, conn) {
                    // Progress: keep writing while the socket takes it.
                    Poll::Ready(Ok(())) if !self.done => continue,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    Poll::Ready(Err(Error::Io(_))) => self.write_failed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
            return match ready!(poll_head(cx, conn, head_only, &mut self.got_any)) {
                Ok(head) => Poll::Ready(Ok((head, self.done))),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
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
                Some(Ok(frame)) => {
                    match frame.into_data() {
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
                    }
                }
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
        self.done = true;
        Poll::Ready(Ok(()))
    }
}

/// The framing of the body sent upstream: a length when it is known, else
/// chunked. An empty body gets `content-length: 0` where one is expected.
fn request_framing(parts: &Parts, body: &RequestBody) -> Option<Framing> {
    match body {
        RequestBody::Full(Some(d)) => Some(Framing::Length(d.len() as u64)),
        RequestBody::Full(None) => {
            let expects_body = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            (expects_body || parts.headers.contains_key(CONTENT_LENGTH))
                .then_some(Framing::Length(0))
        }
        RequestBody::Streaming(_) => Some(
            http_body::Body::size_hint(body)
                .exact()
                .map_or(Framing::Chunked, Framing::Length),
        ),
    }
}

/// The request line and headers, origin-form; the framing headers are ours.
fn encode_head(parts: &Parts, framing: Option<Framing>, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if !target.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Some(Framing::Length(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Some(Framing::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(Framing::Eof) | None => {}
    }
    out.extend_from_slice(b"\r\n");
}

struct Head {
    res: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

/// Reads from the upstream into `buf`. With nothing buffered, the read goes
/// to the stack and `buf` keeps only what came: a response of a few hundred
/// bytes, or one SSE event, costs an allocation of its size rather than a
/// read buffer's.
fn poll_read(
    io: Pin<&mut Io>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.is_empty() {
        let mut stack = [const { MaybeUninit::<u8>::uninit() }; READ_SIZE];
        let mut read = ReadBuf::uninit(&mut stack);
        ready!(io.poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        return Poll::Ready(Ok(read.filled().len()));
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// Reads until a final response head, skipping interim (1xx) ones.
fn poll_head(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    head_only: bool,
    got_any: &mut bool,
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
        match ready!(poll_read(Pin::new(&mut conn.io), cx, buf)) {
            Ok(0) => {
                return Poll::Ready(Err(if *got_any {
                    Error::Invalid("closed inside the response head")
                } else {
                    Error::Closed
                }))
            }
            Ok(_) => *got_any = true,
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// Parses a complete head off the front of `buf`: `None` when more bytes
/// are needed. An interim (1xx) response is consumed and parsing goes on.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, Error> {
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
                // The head's values get their own small allocation: sharing the
                // read buffer would keep it alive for as long as hyper keeps the
                // headers, and the next exchange would need a new one.
                let head = Bytes::copy_from_slice(&buf[..len]);
                let base = buf.as_ptr() as usize;
                let built = build_head(
                    &parsed,
                    |v| {
                        let at = v.as_ptr() as usize - base;
                        head.slice(at..at + v.len())
                    },
                    head_only,
                );
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

/// The head as a `Response`; `value` turns a parsed value into shared bytes.
fn build_head(
    parsed: &httparse::Response<'_, '_>,
    value: impl Fn(&[u8]) -> Bytes,
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
        let value = HeaderValue::from_maybe_shared(value(h.value))
            .map_err(|_| Error::Invalid("invalid header value"))?;
        map.append(name, value);
    }
    let (framing, mut keep_alive) = response_framing(status, &map, head_only)?;
    keep_alive &= version == Version::HTTP_11 && !has_token(&map, &CONNECTION, "close");
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
fn response_framing(
    status: StatusCode,
    headers: &HeaderMap,
    head_only: bool,
) -> Result<(Framing, bool), Error> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        let chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        // With a content-length as well, the message is suspect (smuggling):
        // read it as chunked, then close.
        let keep = chunked && !headers.contains_key(CONTENT_LENGTH);
        return Ok((
            if chunked {
                Framing::Chunked
            } else {
                Framing::Eof
            },
            keep,
        ));
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = http1::parse_length(part.trim_ascii())
                .ok_or(Error::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Eof, false),
    })
}

/// Whether a comma-separated header has `token` (any case).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| http1::has_token(v.as_bytes(), token.as_bytes()))
}

/// A response body read off its connection.
pub struct Body {
    /// `None` once the body ended (the connection went back or was closed).
    conn: Option<Conn>,
    decoder: Decoder,
    /// Whether the connection can carry another request once the body ends.
    reusable: bool,
    /// The response allows another request on the connection.
    keep_alive: bool,
    /// The rest of the request after an early answer that is not an error,
    /// driven by this body's polls; the connection is reused only if it
    /// completes.
    upload: Option<Box<Sending>>,
    pool: Arc<Pool>,
}

enum Decoder {
    /// Bytes still to come.
    Length(u64),
    /// Where in the chunked coding, and the trailer bytes seen.
    Chunked(Chunked, usize),
    Eof,
    Done,
}

#[derive(Clone, Copy)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What the decoder made of the buffer.
enum Decoded {
    Data(Bytes),
    /// The body is complete.
    End,
    /// Needs more bytes.
    More,
}

impl Decoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        match self {
            Self::Done | Self::Length(0) => {
                *self = Self::Done;
                Ok(Decoded::End)
            }
            _ if buf.is_empty() => Ok(Decoded::More),
            Self::Length(rest) => {
                let n = (*rest).min(buf.len() as u64);
                *rest -= n;
                Ok(Decoded::Data(buf.split_to(n as usize).freeze()))
            }
            Self::Eof => Ok(Decoded::Data(buf.split().freeze())),
            Self::Chunked(state, trailers) => decode_chunked(state, trailers, buf).map(|d| {
                if matches!(d, Decoded::End) {
                    *self = Self::Done;
                }
                d
            }),
        }
    }

    /// When the upstream closes the connection.
    fn at_eof(&mut self) -> Result<(), Error> {
        match self {
            Self::Eof | Self::Done => {
                *self = Self::Done;
                Ok(())
            }
            _ => Err(Error::Truncated),
        }
    }
}

fn decode_chunked(
    state: &mut Chunked,
    trailers: &mut usize,
    buf: &mut BytesMut,
) -> Result<Decoded, Error> {
    loop {
        match *state {
            Chunked::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Decoded::More);
                };
                let size = parse_chunk_size(&line)?;
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(rest) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = rest.min(buf.len() as u64);
                *state = if n == rest {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(rest - n)
                };
                return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Invalid("chunk not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let Some(line) = take_line(buf, MAX_TRAILERS.saturating_sub(*trailers))? else {
                    return Ok(Decoded::More);
                };
                if line.is_empty() {
                    return Ok(Decoded::End);
                }
                // Trailers are dropped: nothing downstream of a proxy of SSE needs them.
                *trailers += line.len() + 2;
            }
        }
    }
}

/// Takes a CRLF-terminated line off `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Error> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > max {
            Err(Error::Invalid("chunk line or trailers too long"))
        } else {
            Ok(None)
        };
    };
    if lf > max || lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Error::Invalid("invalid chunk line"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// Hex digits, then optional whitespace and `;extensions`, which are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Error::Invalid("invalid chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(Error::Invalid("invalid chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            _ => (d | 0x20) - b'a' + 10,
        };
        n * 16 + u64::from(v)
    });
    Ok(size)
}

impl Body {
    /// The body ended: the connection goes back to the pool when clean.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes past the end are the upstream speaking out of turn. The
            // empty buffer stays: the next exchange reuses its allocation.
            if self.reusable && self.upload.is_none() && conn.buf.is_empty() {
                let mut conn = conn;
                if conn.buf.capacity() > READ_SIZE {
                    // Grown for a large head: not worth keeping while idle.
                    conn.buf = BytesMut::new();
                }
                self.pool.put(conn);
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(e)))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done | Decoder::Length(0))
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    pub(super) fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if let (Some(up), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            // Pending leaves the write's (or the client body's) waker set.
            let end = loop {
                match up.poll_upload(cx, conn) {
                    Poll::Ready(Ok(())) if up.done => break Some(Ok(true)),
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(Error::Io(_))) => break Some(Ok(false)),
                    Poll::Ready(Err(e)) => break Some(Err(e)),
                    Poll::Pending => break None,
                }
            };
            match end {
                Some(Ok(done)) => {
                    this.upload = None;
                    this.reusable = this.keep_alive && done;
                }
                Some(Err(e)) => {
                    this.upload = None;
                    return this.fail(e);
                }
                None => {}
            }
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
                Err(e) => return this.fail(e),
            }
            match poll_read(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Ready(Ok(0)) => {
                    this.reusable = false;
                    if let Err(e) = this.decoder.at_eof() {
                        return this.fail(e);
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

impl Drop for Body {
    fn drop(&mut self) {
        // Read to its end but not polled past it: the connection is still good.
        if self.is_end_stream() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(input: &[u8]) -> Result<(Vec<u8>, bool), Error> {
        let mut buf = BytesMut::from(input);
        let mut d = Decoder::Chunked(Chunked::Size, 0);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End => return Ok((out, buf.is_empty())),
                Decoded::More => return Ok((out, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, _) = chunked(b"5\r\nhello\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello");
        let (body, _) =
            chunked(b"5;foo=bar\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-t: 1\r\n\r\n").unwrap();
        assert_eq!(body, b"hello world");
        let (body, _) = chunked(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn chunked_decoding_waits_for_more_at_every_boundary() {
        let whole = b"5\r\nhello\r\n3\r\nabc\r\n0\r\nt: v\r\n\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::new();
            let mut d = Decoder::Chunked(Chunked::Size, 0);
            let mut out = Vec::new();
            let mut ended = false;
            for part in [&whole[..cut], &whole[cut..]] {
                buf.extend_from_slice(part);
                loop {
                    match d.decode(&mut buf).unwrap() {
                        Decoded::Data(b) => out.extend_from_slice(&b),
                        Decoded::End => {
                            ended = true;
                            break;
                        }
                        Decoded::More => break,
                    }
                }
            }
            assert!(ended, "cut at {cut}");
            assert_eq!(out, b"helloabc", "cut at {cut}");
        }
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n",
            b"ffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
            b"\r\n",
        ] {
            assert!(chunked(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let endless = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(chunked(&endless).is_err());
    }

    fn head(raw: &[u8], head_only: bool) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(raw), head_only)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Eof, false));
        let h = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: Close\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head(
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        let h = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.res.status(), 200);
        assert!(head(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .is_none());
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-len", false)
            .unwrap()
            .is_none());
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
        let h = head(
            b"HTTP/1.1 200 OK\r\nx-request-id: req_1\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
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
        encode_head(&parts, Some(Framing::Length(2)), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: up.example\r\ncontent-length: 2\r\n\r\n"
        );
    }
}
