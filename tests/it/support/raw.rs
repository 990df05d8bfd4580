//! Raw HTTP/1.1 over a bare `TcpStream`, for requests a well-behaved client
//! library refuses to send (garbage, bad framing, a head without its body)
//! and for watching exactly when the server closes a connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a raw connection.
#[derive(Debug)]
pub enum Reply {
    /// One whole response: head and body (framed by content-length).
    Response(Response<()>, Bytes),
    /// The connection ended (EOF or reset) before a whole response; the
    /// bytes that did arrive, usually none.
    Closed(Vec<u8>),
}

impl Reply {
    /// The response, or a panic saying what came instead.
    #[track_caller]
    pub fn response(self) -> (Response<()>, Bytes) {
        match self {
            Reply::Response(head, body) => (head, body),
            Reply::Closed(got) => panic!(
                "expected a response, the connection closed after {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Connects to `addr` and writes `bytes`.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads one response or notices the close. Panics if neither happens
/// within `bound`: a hang is exactly what these tests look for.
pub async fn read_reply(stream: &mut (impl AsyncRead + Unpin), bound: Duration) -> Reply {
    tokio::time::timeout(bound, read_reply_inner(stream))
        .await
        .unwrap_or_else(|_| panic!("no response and no close within {bound:?}"))
}

async fn read_reply_inner(stream: &mut (impl AsyncRead + Unpin)) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Once the head is in: its end, and the declared body length.
        let framing = find(&buf, b"\r\n\r\n").map(|end| {
            let head = parse_head(&buf[..end]);
            assert!(
                !head.headers().contains_key(http::header::TRANSFER_ENCODING),
                "the raw reader handles content-length framing only: {head:?}"
            );
            let len: Option<usize> = head
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().parse().unwrap());
            (end, len)
        });
        if let Some((end, Some(len))) = framing {
            if buf.len() >= end + 4 + len {
                let body = Bytes::copy_from_slice(&buf[end + 4..end + 4 + len]);
                return Reply::Response(parse_head(&buf[..end]), body);
            }
        }
        if read_some(stream, &mut chunk, &mut buf).await == 0 {
            return match framing {
                // No content-length: the body ran to the close.
                Some((end, None)) => Reply::Response(
                    parse_head(&buf[..end]),
                    Bytes::copy_from_slice(&buf[end + 4..]),
                ),
                _ => Reply::Closed(buf),
            };
        }
    }
}

/// Reads once into `buf`; 0 on EOF or on a reset (both are "closed" here).
async fn read_some(
    stream: &mut (impl AsyncRead + Unpin),
    chunk: &mut [u8],
    buf: &mut Vec<u8>,
) -> usize {
    match stream.read(chunk).await {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            n
        }
        Err(_) => 0,
    }
}

/// Reads until the peer closes (EOF or reset); returns what arrived and
/// how long that took. Panics if the connection is still open after `bound`.
pub async fn read_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    tokio::time::timeout(bound, async {
        while read_some(stream, &mut chunk, &mut buf).await > 0 {}
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "connection still open after {bound:?}; received {:?}",
            String::from_utf8_lossy(&buf)
        )
    });
    (buf, start.elapsed())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HTTP/1.1 NNN reason` and `name: value` lines into a `Response<()>`.
fn parse_head(head: &[u8]) -> Response<()> {
    let text = std::str::from_utf8(head).expect("response head is ASCII");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap();
    assert!(
        version.starts_with("HTTP/1."),
        "status line: {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!("status line: {status_line:?}");
        });
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        res.headers_mut().append(
            HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            HeaderValue::from_str(value.trim()).unwrap(),
        );
    }
    res
}

/// One chunk in chunked transfer-encoding.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}
