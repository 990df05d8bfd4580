//! What sluice's two HTTP/1.1 codecs share: the client-facing server
//! (`server/h1.rs`) and the upstream client (`client/h1.rs`).
//!
//! Both sides of the HTTP/1.1 data path are ours, so request smuggling and
//! response desync are ours to prevent. The rules the codecs keep (RFC 9112
//! §6.3, §11.2):
//! - **Framing headers are always our own.** A message sluice writes carries
//!   the `content-length` or `transfer-encoding` of what it actually sends
//!   ([`push_framing`]); the peer's framing headers are never copied.
//! - **Ambiguous framing is never guessed at.** The server takes only
//!   requests with no body or one `content-length` of plain digits; anything
//!   else (`transfer-encoding`, a repeated or odd length, obs-fold, HTTP/1.0)
//!   goes to hyper, which rejects what is ambiguous with 400. The client
//!   refuses conflicting or invalid lengths in a response, and a response
//!   with both `transfer-encoding` and `content-length` is read as chunked
//!   and its connection closed after it.
//! - **A connection is reused only when its framing is certain**: the body
//!   ended exactly where its framing said, and nothing followed it.
//! - **A body that breaks off never looks complete**: a short body is an
//!   error, and the side writing it to the next hop aborts rather than end it.

pub mod decode;
#[cfg(test)]
pub mod mutations;

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, ReadBuf};

/// What `http_body::Body::poll_frame` gives for a body of `Bytes`.
pub type FramePoll<E> = Poll<Option<Result<http_body::Frame<Bytes>, E>>>;

/// One read from a socket, into a buffer on the stack.
pub const READ_SIZE: usize = 8 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body and no framing header (a GET, a 204, a HEAD's answer).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (a response only).
    Eof,
}

/// A decimal length (`content-length`, or one part of a list of them):
/// digits only, at most 19 of them, so it cannot overflow.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether a comma-separated header value holds `token` (any case).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether any value of header `name` holds `token`.
pub fn headers_have_token(headers: &HeaderMap, name: &HeaderName, token: &[u8]) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| has_token(v.as_bytes(), token))
}

/// The one length every `content-length` value (and list item) agrees on:
/// `Ok(None)` when there is none, `Err` when one is not plain digits or two
/// differ. A message whose lengths disagree must never be forwarded as it
/// came: its recipients could each pick another.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii()).ok_or("invalid content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Makes `content-length` the single value `n` (a no-op when it already is).
pub fn set_content_length(headers: &mut HeaderMap, n: u64) {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let single = values.next().filter(|_| values.next().is_none());
    if single.is_some_and(|v| parse_length(v.as_bytes()) == Some(n)) {
        return;
    }
    headers.insert(http::header::CONTENT_LENGTH, n.into());
}

/// Whether the transfer codings are exactly `chunked`, once: any other
/// coding (gzip, a repeated chunked) would change the body's meaning if
/// sluice decoded only the chunking.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    let values = headers.get_all(http::header::TRANSFER_ENCODING);
    codings_only_chunked(values.iter().map(HeaderValue::as_bytes))
}

/// [`only_chunked`] over raw `transfer-encoding` values.
pub fn codings_only_chunked<'a>(values: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut codings = values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    codings
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// A chunk-size line: `n` in hex and CRLF.
pub fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// `name: value` and CRLF.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Every header of `headers` but the framing and connection ones, which
/// are the writer's to set.
pub fn push_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if !is_framing(name) {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// The framing header of what is actually sent.
pub fn push_framing(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(n) => push_header(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Eof => {}
    }
}

/// Headers that describe this hop's framing or connection: never copied
/// from one message to the next.
pub fn is_framing(name: &HeaderName) -> bool {
    name == http::header::CONTENT_LENGTH
        || name == http::header::TRANSFER_ENCODING
        || name == http::header::CONNECTION
}

/// A message head copied into one allocation of its own, which the header
/// values slice. Sharing the read buffer instead would keep it alive as long
/// as any value (h2's header table keeps some), and a body with it.
pub struct HeadCopy {
    copy: Bytes,
    base: usize,
}

impl HeadCopy {
    /// Copies `buf[..len]`; `buf` is what the parsed slices point into.
    pub fn new(buf: &[u8], len: usize) -> Self {
        Self {
            copy: Bytes::copy_from_slice(&buf[..len]),
            base: buf.as_ptr() as usize,
        }
    }

    /// The copy of `s`, a slice of the buffer the head was parsed from.
    pub fn slice(&self, s: &[u8]) -> Bytes {
        let at = s.as_ptr() as usize - self.base;
        self.copy.slice(at..at + s.len())
    }
}

/// Reads once into a buffer on the stack and hands what came to `took`
/// (an empty slice at EOF). A connection waiting for its next message so
/// holds no read buffer, and a small message costs an allocation of its
/// size only when it has to be kept.
pub fn poll_read_stack<IO, T>(
    io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    took: impl FnOnce(&[u8]) -> T,
) -> Poll<io::Result<T>>
where
    IO: AsyncRead + ?Sized,
{
    let mut stack = [const { MaybeUninit::<u8>::uninit() }; READ_SIZE];
    let mut read = ReadBuf::uninit(&mut stack);
    ready!(io.poll_read(cx, &mut read))?;
    Poll::Ready(Ok(took(read.filled())))
}

/// Reads once into a buffer on the stack and drops what came: its length
/// (0 at EOF).
pub async fn poll_read_stack_once<IO>(io: &mut IO) -> io::Result<usize>
where
    IO: AsyncRead + Unpin + ?Sized,
{
    std::future::poll_fn(|cx| poll_read_stack(Pin::new(&mut *io), cx, <[u8]>::len)).await
}

/// Reads into `buf`: through the stack when it is empty (it keeps only
/// what came), else into its spare room, grown when little is left.
pub fn poll_read_buf<IO>(
    io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>>
where
    IO: AsyncRead + ?Sized,
{
    if buf.is_empty() {
        return poll_read_stack(io, cx, |got| {
            buf.extend_from_slice(got);
            got.len()
        });
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(io, cx, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only_and_cannot_overflow() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"571"), Some(571));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1a",
            b"99999999999999999999",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens_are_found_in_lists_in_any_case() {
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(has_token(b"close", b"close"));
        assert!(!has_token(b"keep-alive", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }

    #[test]
    fn chunk_sizes_are_hex_lines() {
        let mut out = Vec::new();
        push_chunk_size(&mut out, 0);
        push_chunk_size(&mut out, 255);
        push_chunk_size(&mut out, 0x1_0000);
        assert_eq!(out, b"0\r\nff\r\n10000\r\n");
    }

    #[test]
    fn framing_headers_are_never_copied_and_ours_are_written() {
        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("connection", "close".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        let mut out = Vec::new();
        push_headers(&mut out, &h);
        push_framing(&mut out, Framing::Length(11));
        push_framing(&mut out, Framing::Empty);
        assert_eq!(out, b"x-a: 1\r\ncontent-length: 11\r\n");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn content_lengths_must_agree_and_be_digits() {
        let cl = |vs: &[&str]| {
            let pairs: Vec<_> = vs.iter().map(|v| ("content-length", *v)).collect();
            content_length(&headers(&pairs))
        };
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["5"]), Ok(Some(5)));
        assert_eq!(cl(&["5, 5", "5"]), Ok(Some(5)));
        for bad in [&["5", "6"][..], &["-1, x"], &["5,"], &[" "], &["0x5"]] {
            assert!(cl(bad).is_err(), "{bad:?}");
        }
        let mut h = headers(&[("content-length", "5, 5")]);
        set_content_length(&mut h, 5);
        assert_eq!(h.get_all("content-length").iter().count(), 1);
        assert_eq!(h["content-length"], "5");
    }

    #[test]
    fn only_a_single_chunked_coding_is_taken() {
        let te = |v: &str| only_chunked(&headers(&[("transfer-encoding", v)]));
        assert!(te("chunked") && te("Chunked") && te(" chunked "));
        for bad in [
            "gzip",
            "gzip, chunked",
            "chunked, chunked",
            "identity",
            "chunked, gzip",
            "",
        ] {
            assert!(!te(bad), "{bad:?}");
        }
        assert!(!only_chunked(&headers(&[
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked")
        ])));
    }

    #[test]
    fn a_head_copy_slices_its_own_bytes() {
        let buf = b"HTTP/1.1 200 OK\r\nx: abc\r\n\r\nbody".to_vec();
        let copy = HeadCopy::new(&buf, 27);
        let value = copy.slice(&buf[20..23]);
        assert_eq!(&value[..], b"abc");
        drop(buf);
        assert_eq!(&value[..], b"abc");
    }
}
