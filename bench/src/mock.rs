//! A fast mock OpenAI upstream: HTTP/1.1 keep-alive on raw sockets, so that
//! the mock costs as little as it can on the core it shares with the load
//! generator.
//!
//! - the stream's parameters come from the query, or from the body's
//!   `"stream_chunks"` and `"interval_ms"`, or from an `x-bench-stream: N,M`
//!   header, whichever a gateway in front passes on;
//! - any request without `stream=` in its query gets a ~600-byte
//!   `chat.completion` JSON with a content-length;
//! - `?stream=N&interval_ms=M` gets an SSE stream of N chat chunks M ms
//!   apart (the first at once), then a usage-only chunk (`"choices": []`,
//!   as OpenAI sends with `include_usage`) and `data: [DONE]`; N = 0
//!   streams until the client leaves. Each chunk carries `"t":<ns since the Unix epoch>`, taken
//!   just before it is written, for the client to measure lag, and the same
//!   time as its content (` @<ns>`), which a gateway that re-serialises
//!   chunks and drops unknown fields (LiteLLM) still passes on.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The non-streaming answer, about 600 bytes of body.
const CHAT_BODY: &str = concat!(
    r#"{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","#,
    r#""created":1732000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"#,
    r#""message":{"role":"assistant","content":"Sluice is a reverse-proxy sidecar "#,
    r#"for LLM APIs: timeouts, retries under a budget, rate limits, key injection "#,
    r#"and streaming.","#,
    r#""refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"#,
    r#""prompt_tokens":24,"completion_tokens":58,"total_tokens":82,"#,
    r#""prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"#,
    r#""reasoning_tokens":0}},"system_fingerprint":"fp_bench000"}"#
);

const MAX_HEAD: usize = 64 * 1024;

pub async fn serve(listener: TcpListener) {
    let chat = chat_response();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let chat = chat.clone();
        tokio::spawn(async move {
            let _ = connection(stream, &chat).await;
        });
    }
}

fn chat_response() -> std::sync::Arc<[u8]> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_bench\r\n\
         content-length: {}\r\n\r\n{CHAT_BODY}",
        CHAT_BODY.len()
    )
    .into_bytes()
    .into()
}

/// What the request line asked for.
struct Ask {
    stream: Option<(u64, u64)>,
    content_length: usize,
    chunked: bool,
}

async fn connection(mut stream: TcpStream, chat: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let (head_len, mut ask) = loop {
            if let Some(parsed) = parse_request(&buf)? {
                break parsed;
            }
            if buf.len() > MAX_HEAD {
                return Err(io::Error::other("request head too large"));
            }
            if read_more(&mut stream, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        buf.drain(..head_len);
        if ask.chunked {
            skip_chunked(&mut stream, &mut buf).await?;
        } else {
            while buf.len() < ask.content_length {
                if read_more(&mut stream, &mut buf).await? == 0 {
                    return Ok(());
                }
            }
            if ask.stream.is_none() {
                ask.stream = stream_in_body(&buf[..ask.content_length]);
            }
            buf.drain(..ask.content_length);
        }
        match ask.stream {
            None => stream.write_all(chat).await?,
            Some((count, interval)) => {
                sse(&mut stream, count, Duration::from_millis(interval)).await?;
            }
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(4096);
    }
    stream.read_buf(buf).await
}

fn parse_request(buf: &[u8]) -> io::Result<Option<(usize, Ask)>> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(e)),
    };
    let mut ask = Ask {
        stream: req.path.and_then(stream_query),
        content_length: 0,
        chunked: false,
    };
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            ask.content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::other("bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            ask.chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("x-bench-stream") && ask.stream.is_none() {
            // `N,M`: a gateway that passes neither the query nor unknown
            // body fields on can be told to forward a header (Portkey).
            ask.stream = std::str::from_utf8(h.value).ok().and_then(|v| {
                let (n, ms) = v.split_once(',')?;
                Some((n.trim().parse().ok()?, ms.trim().parse().ok()?))
            });
        }
    }
    Ok(Some((len, ask)))
}

/// `"stream_chunks":N` and `"interval_ms":M` from a JSON body, for clients
/// behind a gateway that does not pass the query string on. Only the
/// body's end is looked at (the bench puts them there; a gateway that
/// re-serialises keeps them near it), so a large body costs nothing more.
fn stream_in_body(body: &[u8]) -> Option<(u64, u64)> {
    let tail = &body[body.len().saturating_sub(256)..];
    let number = |key: &[u8]| -> Option<u64> {
        let at = tail.windows(key.len()).position(|w| w == key)? + key.len();
        let rest = &tail[at..];
        let rest = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    };
    let count = number(b"\"stream_chunks\":")?;
    Some((count, number(b"\"interval_ms\":").unwrap_or(10)))
}

/// `stream=N&interval_ms=M` from a request target.
fn stream_query(path: &str) -> Option<(u64, u64)> {
    let query = path.split_once('?')?.1;
    let mut count = None;
    let mut interval = 10;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("stream", n)) => count = n.parse().ok(),
            Some(("interval_ms", n)) => interval = n.parse().ok()?,
            _ => {}
        }
    }
    count.map(|c| (c, interval))
}

/// Reads and discards a chunked request body.
async fn skip_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if read_more(stream, buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let size = std::str::from_utf8(&buf[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| io::Error::other("bad chunk size"))?;
        // The chunk, its CRLF; the last chunk is followed by an empty trailer line.
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            if read_more(stream, buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.drain(..need);
        if size == 0 {
            return Ok(());
        }
    }
}

async fn sse(stream: &mut TcpStream, count: u64, interval: Duration) -> io::Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              x-request-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(512);
    let mut sent = 0;
    while count == 0 || sent < count {
        ticks.tick().await;
        out.clear();
        let event = chunk_event(now_ns());
        out.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\r\n");
        stream.write_all(&out).await?;
        sent += 1;
    }
    let usage = usage_event(sent);
    let done = "data: [DONE]\n\n";
    let tail = format!(
        "{:x}\r\n{usage}\r\n{:x}\r\n{done}\r\n0\r\n\r\n",
        usage.len(),
        done.len()
    );
    stream.write_all(tail.as_bytes()).await
}

fn chunk_event(t: u128) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1732000000,\
         \"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_bench000\",\
         \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" @{t}\"}},\"finish_reason\":null}}],\
         \"t\":{t}}}\n\n"
    )
}

/// The stream's last chunk: its usage, with no choices.
fn usage_event(chunks: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1732000000,\
         \"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{{\"prompt_tokens\":24,\
         \"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\n",
        24 + chunks
    )
}

/// Wall-clock nanoseconds: both ends of a lag measurement are on this machine.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(stream_query("/v1/chat/completions"), None);
        assert_eq!(
            stream_query("/v1/chat/completions?stream=20&interval_ms=10"),
            Some((20, 10))
        );
        assert_eq!(
            stream_query("/x?stream=0&interval_ms=1000"),
            Some((0, 1000))
        );
    }

    #[test]
    fn stream_asked_in_the_body() {
        assert_eq!(stream_in_body(br#"{"model":"m"}"#), None);
        assert_eq!(
            stream_in_body(br#"{"stream":true,"stream_chunks":20,"interval_ms":10}"#),
            Some((20, 10))
        );
        // As a gateway re-serialises it: spaces, another order.
        assert_eq!(
            stream_in_body(br#"{"interval_ms": 1000, "stream_chunks": 0, "stream": true}"#),
            Some((0, 1000))
        );
        let mut big = vec![b' '; 100_000];
        big.extend_from_slice(br#""stream_chunks":3}"#);
        assert_eq!(stream_in_body(&big), Some((3, 10)));
    }

    #[test]
    fn the_chat_body_is_about_600_bytes() {
        assert!(
            (550..=700).contains(&CHAT_BODY.len()),
            "{}",
            CHAT_BODY.len()
        );
        serde_json::from_str::<serde_json::Value>(CHAT_BODY).unwrap();
        let event = chunk_event(12345);
        let json = event.strip_prefix("data: ").unwrap().trim_end();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["t"], 12345);
        let usage = usage_event(20);
        let json = usage.strip_prefix("data: ").unwrap().trim_end();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 20);
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
    }
}
