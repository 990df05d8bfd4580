//! `commit = "first-event"`: a 2xx `text/event-stream` response is held
//! until its first complete event that is not a comment (or until
//! `commit_buffer` bytes are held). Until then nothing has reached the
//! client, so a reset, a silent model (`first_byte`) or an error object as
//! the first event is an attempt failure like any other, and the plan goes
//! on invisibly; after it, the response is the client's.

use std::collections::VecDeque;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::backend::Upstream;
use crate::error::ProxyError;

/// What the held start of a stream says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// A first event that is not an error: commit.
    Event,
    /// The first event is an error (`event: error`, or data that is a JSON
    /// object with an `error` member).
    Error,
    /// No complete event yet (comments and keep-alives do not count).
    Pending,
}

/// Reads `held` (the stream's start) for its first real event.
pub fn first_event(held: &[u8]) -> First {
    let mut named_error = false;
    let mut data: Vec<&[u8]> = Vec::new();
    let mut fields = false;
    let mut lines = held.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // The last piece has no newline after it: an incomplete line.
        if lines.peek().is_none() {
            break;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if fields {
                return if named_error || is_error_data(&data) {
                    First::Error
                } else {
                    First::Event
                };
            }
            continue;
        }
        if line.starts_with(b":") {
            continue;
        }
        fields = true;
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match name {
            b"event" => named_error = value == b"error",
            b"data" => data.push(value),
            _ => {}
        }
    }
    First::Pending
}

fn is_error_data(data: &[&[u8]]) -> bool {
    let joined = data.join(&b'\n');
    serde_json::from_slice::<serde_json::Value>(&joined)
        .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
}

/// Holds the start of `body` in `head` until its first event, `limit`
/// bytes, or the end; `until` bounds the wait (the attempt's `first_byte`).
/// A body that breaks off or ends before its first event is a reset, one
/// that stays silent a timeout.
pub async fn hold(
    body: &mut Upstream,
    head: &mut VecDeque<Bytes>,
    until: Instant,
    limit: u64,
) -> Result<First, ProxyError> {
    let mut held: Vec<u8> = Vec::new();
    loop {
        match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(None) => return Err(ProxyError::UpstreamReset),
            Ok(Some(Err(_))) => return Err(ProxyError::UpstreamReset),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                held.extend_from_slice(&data);
                head.push_back(data);
                match first_event(&held) {
                    First::Pending if (held.len() as u64) < limit => {}
                    First::Pending => return Ok(First::Event),
                    first => return Ok(first),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_real_event_decides() {
        assert_eq!(first_event(b""), First::Pending);
        assert_eq!(first_event(b"data: {\"choices\":[]}"), First::Pending);
        assert_eq!(first_event(b"data: {\"choices\":[]}\n"), First::Pending);
        assert_eq!(first_event(b"data: {\"choices\":[]}\n\n"), First::Event);
        assert_eq!(first_event(b"data: {\"choices\":[]}\r\n\r\n"), First::Event);
        // Comments and keep-alives never commit.
        assert_eq!(first_event(b": keep-alive\n\n: again\n\n"), First::Pending);
        assert_eq!(first_event(b": ping\n\ndata: {\"x\":1}\n\n"), First::Event);
        // Errors, OpenAI's and Anthropic's.
        assert_eq!(
            first_event(b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n"),
            First::Error
        );
        assert_eq!(
            first_event(b"event: error\ndata: {\"type\":\"error\"}\n\n"),
            First::Error
        );
        // A data line that merely mentions an error is not one.
        assert_eq!(
            first_event(b"data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\n"),
            First::Event
        );
        assert_eq!(first_event(b"data: [DONE]\n\n"), First::Event);
        assert_eq!(first_event(b"data: {\"error\":null}\n\n"), First::Event);
    }
}
