//! A minimal HTTP/1.1 keep-alive client on a raw socket, cheap enough that
//! the load generator is not what is measured: one write per request, a read
//! loop, and the body handed over as it arrives (chunked or sized).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Drops the connection (after a timeout: its state is unknown).
    pub fn reset(&mut self) {
        self.stream = None;
    }

    /// Sends `request` (a whole HTTP/1.1 request) and reads the response,
    /// handing each piece of body to `on_data` as soon as it is read.
    /// Returns the status. Any error leaves the connection closed, so the
    /// next call reconnects.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        on_data: impl FnMut(&[u8]),
    ) -> io::Result<u16> {
        let result = self.exchange_inner(request, on_data).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange_inner(
        &mut self,
        request: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> io::Result<u16> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
            self.buf.clear();
        }
        self.stream_mut().write_all(request).await?;
        let (status, framing, keep_alive) = loop {
            if let Some((len, head)) = parse_head(&self.buf)? {
                self.buf.drain(..len);
                break head;
            }
            if self.read_more().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        match framing {
            Framing::Length(len) => self.deliver(len, &mut on_data).await?,
            Framing::Chunked => self.read_chunked(&mut on_data).await?,
            Framing::Close => {
                loop {
                    if !self.buf.is_empty() {
                        on_data(&self.buf);
                        self.buf.clear();
                    }
                    if self.read_more().await? == 0 {
                        break;
                    }
                }
                self.stream = None;
            }
        }
        if !keep_alive {
            self.stream = None;
        }
        Ok(status)
    }

    fn stream_mut(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("connected")
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        let stream = self.stream.as_mut().expect("connected");
        stream.read_buf(&mut self.buf).await
    }

    /// Hands the next `len` body bytes to `on_data` as they arrive.
    async fn deliver(&mut self, mut len: usize, on_data: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while len > 0 {
            if self.buf.is_empty() && self.read_more().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = len.min(self.buf.len());
            on_data(&self.buf[..n]);
            self.buf.drain(..n);
            len -= n;
        }
        Ok(())
    }

    async fn fill_line(&mut self) -> io::Result<usize> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(i);
            }
            if self.read_more().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn read_chunked(&mut self, on_data: &mut impl FnMut(&[u8])) -> io::Result<()> {
        loop {
            let line = self.fill_line().await?;
            let size = std::str::from_utf8(&self.buf[..line])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| io::Error::other("bad chunk size"))?;
            self.buf.drain(..line + 2);
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let line = self.fill_line().await?;
                    self.buf.drain(..line + 2);
                    if line == 0 {
                        return Ok(());
                    }
                }
            }
            self.deliver(size, on_data).await?;
            while self.buf.len() < 2 {
                if self.read_more().await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            self.buf.drain(..2);
        }
    }
}

type Head = (u16, Framing, bool);

fn parse_head(buf: &[u8]) -> io::Result<Option<(usize, Head)>> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(e)),
    };
    let status = res.code.unwrap_or(0);
    let mut framing = Framing::Close;
    let mut keep_alive = res.version == Some(1);
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::other("bad content-length"))?;
            framing = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if h.value.eq_ignore_ascii_case(b"chunked") {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep_alive = !h.value.eq_ignore_ascii_case(b"close");
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok(Some((len, (status, framing, keep_alive))))
}

/// The chat body's length without padding or `stream`.
pub const BASE_LEN: usize = 189;

/// The body length the chat request is padded to, when set.
static PAD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Pads every chat request's body (spaces in the user's message) to `n`
/// bytes, for a request of a given size.
pub fn pad_chat_to(n: usize) {
    let _ = PAD.set(n);
}

/// What a target's requests look like beyond the common chat request.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    /// Pad the body to this many bytes (instead of the run's size).
    pub bytes: Option<usize>,
    /// `model` as the body's last field instead of its first.
    pub model_last: bool,
    /// The model named (default `gpt-4o-mini`).
    pub model: Option<&'static str>,
    /// Header lines (each ending in CRLF) a gateway needs, e.g. to name
    /// its upstream.
    pub headers: String,
}

/// A chat request as an OpenAI SDK sends it; `stream` asks the mock for an
/// SSE stream of that many chunks, `interval_ms` apart (0 = until closed).
pub fn chat_request(addr: SocketAddr, stream: Option<(u64, u64)>) -> Vec<u8> {
    shaped_request(addr, stream, &Shape::default())
}

/// [`chat_request`] shaped for one target. The stream's parameters go in
/// the query and, for gateways that do not pass the query on, in the body
/// (`"stream_chunks"`, `"interval_ms"`: LiteLLM passes unknown fields on)
/// and in an `x-bench-stream` header (Portkey forwards headers it is told
/// to); the mock reads whichever arrives.
pub fn shaped_request(addr: SocketAddr, stream: Option<(u64, u64)>, shape: &Shape) -> Vec<u8> {
    let (query, flag, header) = match stream {
        Some((n, ms)) => (
            format!("?stream={n}&interval_ms={ms}"),
            format!(r#","stream":true,"stream_chunks":{n},"interval_ms":{ms}"#),
            format!("x-bench-stream: {n},{ms}\r\n"),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let model = format!(r#""model":"{}""#, shape.model.unwrap_or("gpt-4o-mini"));
    let (first, last) = if shape.model_last {
        (String::new(), format!(",{model}"))
    } else {
        (format!("{model},"), String::new())
    };
    let size = shape.bytes.or_else(|| PAD.get().copied());
    let unpadded = BASE_LEN - 21 + model.len() + flag.len();
    let body = format!(
        r#"{{{first}"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Say this is a test, in one short sentence please.{pad}"}}],"max_tokens":64{flag}{last}}}"#,
        pad = " ".repeat(size.map_or(0, |n| n.saturating_sub(unpadded)))
    );
    format!(
        "POST /v1/chat/completions{query} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         accept: application/json\r\nuser-agent: sluice-bench\r\nauthorization: Bearer sk-client\r\n\
         {header}{}content-length: {}\r\n\r\n{body}",
        shape.headers,
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_chat_body_has_the_length_asked_and_stays_json() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let unpadded = chat_request(addr, None);
        let split = |r: &[u8]| {
            let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            r[at..].to_vec()
        };
        assert_eq!(split(&unpadded).len(), BASE_LEN);
        pad_chat_to(600);
        for stream in [None, Some((3, 0))] {
            let body = split(&chat_request(addr, stream));
            assert_eq!(body.len(), 600);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["model"], "gpt-4o-mini");
        }
        let last = Shape {
            bytes: Some(100 * 1024),
            model_last: true,
            ..Shape::default()
        };
        for stream in [None, Some((3, 0))] {
            let body = split(&shaped_request(addr, stream, &last));
            assert_eq!(body.len(), 100 * 1024);
            assert!(body.ends_with(br#","model":"gpt-4o-mini"}"#));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["model"], "gpt-4o-mini");
            assert_eq!(v["stream"].as_bool().unwrap_or(false), stream.is_some());
        }
    }
}
