//! The Anthropic dialect (Messages API): its error shape and its SSE error
//! event. Wait hints are the standard `retry-after`; Anthropic has no
//! quota code in a 429.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::openai::{CLIENT_KEYS, X_SHOULD_RETRY};
use super::{ErrorInfo, Provider};

static X_LIMIT: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-remaining");
static X_LIMIT_TOKENS: HeaderName = HeaderName::from_static("anthropic-ratelimit-tokens-limit");
static X_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
static X_RESET_TOKENS: HeaderName = HeaderName::from_static("anthropic-ratelimit-tokens-reset");

#[derive(Debug)]
pub struct Anthropic;

impl Provider for Anthropic {
    fn client_key_headers(&self) -> &'static [HeaderName] {
        &CLIENT_KEYS
    }

    fn wait_hint(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        now: SystemTime,
    ) -> Option<Duration> {
        super::openai::hint(headers, status, now)
    }

    fn is_quota_exhausted(&self, _encoding: Option<&[u8]>, _body: &[u8]) -> bool {
        false
    }

    /// `{"type":"error","error":{"type","message"}}`; the code is in
    /// `x-sluice-error`.
    fn error_body(&self, e: ErrorInfo) -> Bytes {
        Bytes::from(error_json(e))
    }

    /// `event: error` with the same object, as Anthropic ends a stream.
    fn sse_error_event(&self, e: ErrorInfo, at_boundary: bool) -> Bytes {
        let lead = if at_boundary { "" } else { "\n\n" };
        Bytes::from(format!("{lead}event: error\ndata: {}\n\n", error_json(e)))
    }

    fn rate_limit_headers(&self, h: &mut HeaderMap, wait: Duration, limit: u32) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        h.insert(X_LIMIT.clone(), HeaderValue::from(limit));
        h.insert(X_REMAINING.clone(), HeaderValue::from_static("0"));
    }

    /// Anthropic's names; the reset is a time (RFC 3339), as Anthropic sends it.
    fn token_limit_headers(&self, h: &mut HeaderMap, r: super::TokenRefusal) {
        super::retry_after(h, r.wait);
        h.insert(X_LIMIT_TOKENS.clone(), HeaderValue::from(r.limit));
        h.insert(X_REMAINING_TOKENS.clone(), HeaderValue::from(r.remaining));
        let at = humantime::format_rfc3339_seconds(SystemTime::now() + r.reset).to_string();
        h.insert(
            X_RESET_TOKENS.clone(),
            HeaderValue::from_str(&at).expect("ASCII"),
        );
    }

    /// Anthropic's own `ping` event, which its SDKs expect.
    fn sse_keepalive(&self) -> Bytes {
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n")
    }

    fn forbid_client_retry(&self, h: &mut HeaderMap) {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
}

/// Anthropic's error types for ours: the SDKs map them to exception classes.
fn kind(e: ErrorInfo) -> &'static str {
    match e.kind {
        "invalid_request_error" => match e.code {
            "model_not_found" | "route_not_found" => "not_found_error",
            "request_too_large" | "routing_body_too_large" => "request_too_large",
            _ => "invalid_request_error",
        },
        "requests" | "tokens" => "rate_limit_error",
        _ if e.code == "overloaded" || e.code == "shutting_down" => "overloaded_error",
        _ => "api_error",
    }
}

fn error_json(e: ErrorInfo) -> String {
    format!(
        r#"{{"type":"error","error":{{"type":"{}","message":"{}"}}}}"#,
        kind(e),
        e.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_take_anthropics_shape() {
        let e = ErrorInfo {
            code: "model_not_found",
            kind: "invalid_request_error",
            message: "no such model",
        };
        let v: serde_json::Value = serde_json::from_slice(&Anthropic.error_body(e)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["message"], "no such model");
        let ev = Anthropic.sse_error_event(e, true);
        assert!(ev.starts_with(b"event: error\ndata: {\"type\":\"error\""));
    }
}
