//! Raw HTTP/1 over a bare stream, for what a well-behaved client library
//! will not do (garbage, bad framing, a head without its body, pipelining),
//! for watching exactly what a server sends and when it closes, and for the
//! raw upstreams ([`super::upstream`]) to read requests.
//!
//! [`Conn`] is the one reader: a stream and the bytes read from it but not
//! yet used, so messages that arrive together (pipelined) are read one at a
//! time. Responses come whole, however HTTP/1.1 frames them: content-length,
//! chunked (extensions and trailers skipped, the body de-chunked), to the
//! close, or no body at all (HEAD, 1xx, 204, 304). A close before a whole
//! message is an answer too ([`Reply::Closed`]). Every read on the client
//! side is bounded: with nothing within the bound it panics with what did
//! arrive, since a hang is exactly what these tests look for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1 connection, raw: the stream (use it directly to write in
/// pieces or to shut it down) and what was read from it but not yet used.
pub struct Conn<S = TcpStream> {
    pub stream: S,
    /// Read from `stream`, not yet part of a message returned.
    pub buf: Vec<u8>,
}

/// A request or a response, as it came over the wire.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The minor version: 1 for HTTP/1.1.
    pub version: u8,
    /// A response's status; 0 in a request.
    pub status: u16,
    /// A request's method and target, as sent; empty in a response.
    pub method: String,
    pub path: String,
    /// Every header in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if it was chunked.
    pub body: Bytes,
}

/// What came back on a connection: a whole response, or the close.
#[derive(Debug)]
pub enum Reply {
    Response(Message),
    /// The connection ended (EOF or reset) before a whole response; the
    /// bytes that did arrive, usually none.
    Closed(Vec<u8>),
}

impl Reply {
    /// The response, or a panic saying what came instead.
    #[track_caller]
    pub fn response(self) -> Message {
        match self {
            Reply::Response(res) => res,
            Reply::Closed(got) => panic!(
                "expected a response, the connection closed after {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

impl Message {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of header `name` (panics if it is repeated).
    #[track_caller]
    pub fn get(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} repeated: {self:?}");
        all.first().copied()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A response's status and headers as an `http::Response` (for
    /// `assert_sluice_error`).
    pub fn head(&self) -> Response<()> {
        let mut res = Response::new(());
        *res.status_mut() = self.status.try_into().expect("a response status");
        for (n, v) in &self.headers {
            res.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        res
    }
}

/// What to read next, which decides where a message ends.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    Response,
    /// A response to HEAD: no body follows its head.
    ResponseToHead,
    /// A request head and its content-length body (a chunked body is left
    /// in the buffer).
    Request,
    /// A request head only: its body, if any, is left in the buffer.
    RequestHead,
}

impl Conn<TcpStream> {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> Conn {
        Conn::new(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncWrite + Unpin> Conn<S> {
    /// Writes `bytes`, all of them.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// A connection over `stream` (a TLS stream, a read half...).
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next response, or the close: a panic if neither within `bound`.
    pub async fn reply(&mut self, bound: Duration) -> Reply {
        self.reply_to(Read::Response, bound).await
    }

    /// The next response (a panic if the connection closes first).
    pub async fn response(&mut self, bound: Duration) -> Message {
        self.reply(bound).await.response()
    }

    /// The next response, to a HEAD request: no body follows its head.
    pub async fn head_response(&mut self, bound: Duration) -> Message {
        self.reply_to(Read::ResponseToHead, bound).await.response()
    }

    async fn reply_to(&mut self, read: Read, bound: Duration) -> Reply {
        let got = tokio::time::timeout(bound, self.next(read)).await;
        match got {
            Ok(Some(res)) => Reply::Response(res),
            Ok(None) => Reply::Closed(std::mem::take(&mut self.buf)),
            Err(_) => panic!(
                "no whole response and no close within {bound:?}; received {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// The next request, with its body when a content-length frames one (a
    /// chunked body is left in `buf`); `None` once the peer closed. Not
    /// bounded: for upstreams, which wait for what sluice sends.
    pub async fn request(&mut self) -> Option<Message> {
        self.next(Read::Request).await
    }

    /// The next request head alone: its body, if any, is left in `buf`.
    pub async fn request_head(&mut self) -> Option<Message> {
        self.next(Read::RequestHead).await
    }

    /// Reads until `buf` holds at least `len` bytes; false if the peer
    /// closed first.
    pub async fn fill(&mut self, len: usize) -> bool {
        while self.buf.len() < len {
            if self.read_more().await == 0 {
                return false;
            }
        }
        true
    }

    /// Reads until `buf` contains `needle` (nothing is used up): a panic on
    /// a close, or if it has not come within `bound`.
    pub async fn wait_for(&mut self, needle: &[u8], bound: Duration) {
        let found = tokio::time::timeout(bound, async {
            while find(&self.buf, needle).is_none() {
                if self.read_more().await == 0 {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "{:?} not received within {bound:?} ({}); received {:?}",
            String::from_utf8_lossy(needle),
            if found.is_ok() { "closed" } else { "open" },
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Reads until the peer closes (EOF or reset); returns all that was not
    /// yet used and how long the close took. Panics if the connection is
    /// still open after `bound`.
    pub async fn read_until_closed(&mut self, bound: Duration) -> (Vec<u8>, Duration) {
        let start = Instant::now();
        let closed =
            tokio::time::timeout(bound, async { while self.read_more().await > 0 {} }).await;
        if closed.is_err() {
            panic!(
                "connection still open after {bound:?}; received {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
        (std::mem::take(&mut self.buf), start.elapsed())
    }

    /// Asserts the peer closes within `bound` with nothing more sent; how
    /// long the close took.
    pub async fn assert_closed_within(&mut self, bound: Duration) -> Duration {
        let (got, after) = self.read_until_closed(bound).await;
        assert!(
            got.is_empty(),
            "bytes before the close: {:?}",
            String::from_utf8_lossy(&got)
        );
        after
    }

    /// Reads once more into `buf`; 0 on EOF or on a reset (both are "closed"
    /// here).
    pub async fn read_more(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// The next message off `buf`, reading as needed; `None` if the peer
    /// closed before a whole one (what came stays in `buf`).
    async fn next(&mut self, read: Read) -> Option<Message> {
        let mut eof = false;
        loop {
            if let Some((msg, used)) = parse(&self.buf, read, eof) {
                self.buf.drain(..used);
                return Some(msg);
            }
            if eof {
                return None;
            }
            eof = self.read_more().await == 0;
        }
    }
}

/// Parses one message at the start of `buf`: `None` if more bytes are
/// needed. `eof`: the peer closed (which ends a close-delimited body).
/// Panics on what is not HTTP/1.
fn parse(buf: &[u8], read: Read, eof: bool) -> Option<(Message, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let lowercased = |headers: &[httparse::Header]| -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| {
                let value = std::str::from_utf8(h.value).expect("header value is ASCII");
                (h.name.to_ascii_lowercase(), value.to_owned())
            })
            .collect()
    };
    let complete = |parsed: httparse::Result<usize>| match parsed {
        Ok(httparse::Status::Complete(n)) => Some(n),
        Ok(httparse::Status::Partial) => None,
        Err(e) => panic!("not HTTP/1 ({e}): {:?}", String::from_utf8_lossy(buf)),
    };
    let mut msg = Message::default();
    let head_len = if matches!(read, Read::Request | Read::RequestHead) {
        let mut r = httparse::Request::new(&mut headers);
        let n = complete(r.parse(buf))?;
        msg.method = r.method.unwrap().to_owned();
        msg.path = r.path.unwrap().to_owned();
        (msg.version, msg.headers) = (r.version.unwrap(), lowercased(r.headers));
        n
    } else {
        let mut r = httparse::Response::new(&mut headers);
        let n = complete(r.parse(buf))?;
        msg.status = r.code.unwrap();
        (msg.version, msg.headers) = (r.version.unwrap(), lowercased(r.headers));
        n
    };
    let bodiless = match read {
        Read::ResponseToHead | Read::RequestHead => true,
        Read::Response => msg.status / 100 == 1 || msg.status == 204 || msg.status == 304,
        Read::Request => false,
    };
    if bodiless {
        return Some((msg, head_len));
    }
    let chunked = msg
        .all("transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    let length: Option<usize> = msg
        .get("content-length")
        .map(|v| v.parse().unwrap_or_else(|_| panic!("content-length {v:?}")));
    let end = if chunked && read == Read::Response {
        assert!(length.is_none(), "both framings: {msg:?}");
        let (body, end) = dechunk(buf, head_len)?;
        msg.body = body.into();
        end
    } else if let Some(len) = length.or((read == Read::Request).then_some(0)) {
        if buf.len() < head_len + len {
            return None;
        }
        msg.body = Bytes::copy_from_slice(&buf[head_len..head_len + len]);
        head_len + len
    } else if eof {
        // A response delimited by the close.
        msg.body = Bytes::copy_from_slice(&buf[head_len..]);
        buf.len()
    } else {
        return None;
    };
    Some((msg, end))
}

/// A chunked body starting at `pos`: its data and where it ends, or `None`
/// if more bytes are needed.
fn dechunk(buf: &[u8], mut pos: usize) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    loop {
        let line = pos + find(&buf[pos..], b"\r\n")?;
        let size = std::str::from_utf8(&buf[pos..line]).unwrap();
        // Extensions (`;name=value`) are skipped.
        let size = size.split(';').next().unwrap().trim();
        let size =
            usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk size line {size:?}"));
        pos = line + 2;
        if size == 0 {
            // Trailers, if any, up to the empty line; skipped.
            loop {
                let end = pos + find(&buf[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some((body, pos));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        assert_eq!(&buf[pos + size..pos + size + 2], b"\r\n", "chunk end");
        pos += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One chunk in chunked transfer-encoding.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The reader itself, on bytes written into an in-memory pipe: every
/// framing, pipelining, the close and the bound.
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(5);

    /// A reader whose peer has written `bytes` and then closed.
    async fn reader(bytes: &[u8]) -> Conn<tokio::io::DuplexStream> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        server.write_all(bytes).await.unwrap();
        drop(server);
        Conn::new(client)
    }

    #[tokio::test]
    async fn pipelined_responses_of_every_framing_are_read_one_at_a_time() {
        let mut conn = reader(
            b"HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello\
              HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;foo=bar\r\nhello\r\n6\r\n world\r\n0;last=1\r\nx-t: 1\r\n\r\n\
              HTTP/1.1 204 No Content\r\nX-B: b\r\n\r\n\
              HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n\
              HTTP/1.0 200 OK\r\n\r\nto the close",
        )
        .await;
        assert_eq!(conn.response(BOUND).await.status, 100);
        let res = conn.response(BOUND).await;
        assert_eq!(
            (res.status, res.version, res.text()),
            (200, 1, "hello".into())
        );
        assert_eq!(res.all("x-a"), ["1", "2"]);
        assert_eq!(res.get("content-length"), Some("5"));
        assert_eq!(conn.response(BOUND).await.text(), "hello world");
        let res = conn.response(BOUND).await;
        assert_eq!((res.status, res.get("x-b")), (204, Some("b")));
        let res = conn.response(BOUND).await;
        assert_eq!((res.status, res.body.len()), (304, 0));
        let res = conn.response(BOUND).await;
        assert_eq!((res.version, res.text()), (0, "to the close".into()));
        assert!(matches!(conn.reply(BOUND).await, Reply::Closed(got) if got.is_empty()));
    }

    #[tokio::test]
    async fn a_head_response_has_no_body_whatever_its_length() {
        let mut conn = reader(
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert!(conn.head_response(BOUND).await.body.is_empty());
        assert_eq!(conn.response(BOUND).await.text(), "ok");
    }

    #[tokio::test]
    async fn a_close_inside_a_response_is_reported_with_what_came() {
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234";
        let got = match reader(cut).await.reply(BOUND).await {
            Reply::Closed(got) => got,
            Reply::Response(res) => panic!("a cut body looked whole: {res:?}"),
        };
        assert_eq!(got, cut);
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert!(matches!(
            reader(cut).await.reply(BOUND).await,
            Reply::Closed(_)
        ));
    }

    #[tokio::test]
    #[should_panic(
        expected = "no whole response and no close within 50ms; received \"HTTP/1.1 200"
    )]
    async fn nothing_whole_within_the_bound_panics_with_what_came() {
        let (client, mut server) = tokio::io::duplex(1024);
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        Conn::new(client).reply(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn requests_are_read_with_their_content_length_body_only() {
        let mut conn = reader(
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
              GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /c HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody\
              POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        )
        .await;
        let req = conn.request().await.unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/a"));
        assert_eq!(req.text(), "abc");
        let req = conn.request().await.unwrap();
        assert_eq!((req.path.as_str(), req.get("host")), ("/b", Some("x")));
        assert!(req.body.is_empty());
        // A head alone: the body stays in the buffer.
        let req = conn.request_head().await.unwrap();
        assert_eq!((req.path.as_str(), &conn.buf[..4]), ("/c", &b"body"[..]));
        conn.buf.drain(..4);
        // A chunked body is left to the caller.
        assert_eq!(conn.request().await.unwrap().path, "/d");
        assert_eq!(conn.buf, b"1\r\nx\r\n0\r\n\r\n");
        assert!(conn.fill(conn.buf.len()).await);
        assert!(!conn.fill(conn.buf.len() + 1).await);
    }
}
