//! Errors sluice answers itself. This is the one place that turns a failure
//! into HTTP: OpenAI's error shape, so SDKs raise their usual exceptions.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::retry::format_go_duration;

/// Who caused a failure: it decides the status family and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request, or a limit the client ran into.
    Client,
    Upstream,
}

/// Why no upstream response could be returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Malformed request that the server can still answer.
    BadRequest,
    /// No route matches the method and path.
    RouteNotFound,
    /// Body over `max_request_body`.
    RequestTooLarge,
    /// The client went silent while sending its body.
    RequestTimeout,
    /// The route's (or client's) request rate is used up.
    RateLimited { wait: Duration, limit: u32 },
    /// `max_concurrent` requests in flight and no slot within `max_wait`.
    ConcurrencyLimited,
    /// Connect failed or refused.
    ConnectFailed,
    /// The upstream's TLS certificate is not trusted.
    UntrustedCertificate,
    /// The connection closed before response headers.
    UpstreamReset,
    /// `first_byte` passed on the last attempt.
    UpstreamTimeout,
    /// The route's `total` deadline passed before response headers.
    DeadlineExceeded,
    /// Caught by the drain: arrived as it began, or still waiting when
    /// `shutdown_grace` ran out.
    ShuttingDown,
}

/// What a variant looks like on the wire.
struct Shape {
    status: StatusCode,
    code: &'static str,
    kind: &'static str,
    message: &'static str,
    fault: Fault,
}

impl ProxyError {
    fn shape(self) -> Shape {
        use Fault::{Client, Upstream};
        let (status, code, kind, message, fault) = match self {
            Self::BadRequest => (400, "bad_request", "invalid_request_error", "sluice: malformed request", Client),
            Self::RouteNotFound => (
                404,
                "route_not_found",
                "invalid_request_error",
                "sluice: no route matches this request (method and path)",
                Client,
            ),
            Self::RequestTooLarge => (
                413,
                "request_too_large",
                "invalid_request_error",
                "sluice: request body is larger than max_request_body",
                Client,
            ),
            Self::RequestTimeout => (
                408,
                "request_timeout",
                "invalid_request_error",
                "sluice: the client stopped sending its request body",
                Client,
            ),
            Self::RateLimited { .. } => (
                429,
                "rate_limit_exceeded",
                "requests",
                "sluice: rate limit reached for this route; retry after the time in retry-after",
                Client,
            ),
            Self::ConcurrencyLimited => (
                429,
                "concurrency_limit_exceeded",
                "requests",
                "sluice: too many requests in flight for this route",
                Client,
            ),
            Self::ConnectFailed => (
                502,
                "upstream_unavailable",
                "proxy_error",
                "sluice: upstream unavailable: could not connect",
                Upstream,
            ),
            Self::UntrustedCertificate => (
                502,
                "upstream_unavailable",
                "proxy_error",
                "sluice: upstream unavailable: its TLS certificate is not trusted",
                Upstream,
            ),
            Self::UpstreamReset => (
                502,
                "upstream_unavailable",
                "proxy_error",
                "sluice: upstream unavailable: connection closed before a response",
                Upstream,
            ),
            Self::UpstreamTimeout => (
                504,
                "upstream_timeout",
                "proxy_error",
                "sluice: upstream timeout: no response headers within the route's first_byte timeout",
                Upstream,
            ),
            Self::DeadlineExceeded => (
                504,
                "deadline_exceeded",
                "proxy_error",
                "sluice: the route's total deadline passed before a response",
                Upstream,
            ),
            Self::ShuttingDown => (
                503,
                "shutting_down",
                "proxy_error",
                "sluice: shutting down; retry on another instance",
                Upstream,
            ),
        };
        let status = StatusCode::from_u16(status).expect("a valid status");
        Shape {
            status,
            code,
            kind,
            message,
            fault,
        }
    }

    pub fn status(self) -> StatusCode {
        self.shape().status
    }

    /// Stable code for the body, `x-sluice-error`, logs and metric labels.
    pub fn code(self) -> &'static str {
        self.shape().code
    }

    pub fn fault(self) -> Fault {
        self.shape().fault
    }

    /// The JSON body, `{"error":{...}}`. Every part is a constant of ours, so
    /// nothing needs escaping.
    pub fn body(self) -> Bytes {
        let s = self.shape();
        Bytes::from(format!(
            r#"{{"error":{{"message":"{}","type":"{}","param":null,"code":"{}"}}}}"#,
            s.message, s.kind, s.code
        ))
    }

    /// The whole response, headers included.
    pub fn into_response(self) -> Response<Bytes> {
        let mut res = Response::new(self.body());
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-sluice-error", HeaderValue::from_static(self.code()));
        match self {
            // As OpenAI sends them, so SDKs back off for the right time.
            Self::RateLimited { wait, limit } => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                h.insert(X_LIMIT.clone(), HeaderValue::from(limit));
                h.insert(X_REMAINING.clone(), HeaderValue::from_static("0"));
                let reset = HeaderValue::from_str(&format_go_duration(wait)).expect("ASCII");
                h.insert(X_RESET.clone(), reset);
            }
            Self::ConcurrencyLimited => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::ShuttingDown => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shape().message)
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let res = ProxyError::RouteNotFound.into_response();
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["x-sluice-error"], "route_not_found");
        let text = std::str::from_utf8(res.body()).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"message":"sluice: no route matches this request (method and path)","type":"invalid_request_error","param":null,"code":"route_not_found"}}"#
        );
    }

    #[test]
    fn rate_limited_carries_openai_headers_rounded_up() {
        let e = ProxyError::RateLimited {
            wait: Duration::from_millis(1200),
            limit: 60,
        };
        let res = e.into_response();
        assert_eq!(res.status(), 429);
        let h = res.headers();
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.2s");
        let e = ProxyError::RateLimited {
            wait: Duration::from_millis(80),
            limit: 60,
        };
        assert_eq!(e.into_response().headers()["retry-after"], "1");
    }
}
