//! Errors sluice answers itself. This is the one place that turns a failure
//! into HTTP, in the route's dialect (OpenAI's shape by default), so SDKs
//! raise their usual exceptions.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::provider::{ErrorInfo, Provider};
use crate::server::BodyError;

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
    /// A request head over 64 KiB or with over 100 headers.
    HeadTooLarge,
    /// The route's (or client's) request rate is used up.
    RateLimited { wait: Duration, limit: u32 },
    /// The route's (or client's) tokens per minute are used up.
    TokensLimited(crate::provider::TokenRefusal),
    /// A shared limit's store is away and `on_error = "deny"`.
    RateLimitStoreUnavailable,
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
    /// A model-routed JSON body without a string top-level `model`.
    ModelRequired,
    /// A field sluice acts on appears twice at the top level.
    AmbiguousRequestBody,
    /// Not JSON before the fields sluice needs were found.
    InvalidJsonBody,
    /// A non-JSON body on a model-routed route with no `upstream`.
    ModelRoutingUnsupportedBody,
    /// A compressed body on a model-routed route with no `upstream`.
    UnsupportedContentEncoding,
    /// A model the route does not know or allow.
    ModelNotFound,
    /// The fields sluice needs were not within `peek_limit`.
    RoutingBodyTooLarge,
    /// Every attempt got 401/403 for a key sluice injected.
    UpstreamAuthFailed,
    /// `max_held_body` reached.
    Overloaded,
    /// `on_all_ejected = "fail"` and every deployment of the model is ejected.
    NoHealthyDeployment { wait: Duration },
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
            Self::HeadTooLarge => (
                431,
                "request_headers_too_large",
                "invalid_request_error",
                "sluice: the request head is larger than 64 KiB or has more than 100 headers",
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
            Self::TokensLimited(_) => (
                429,
                "rate_limit_exceeded",
                "tokens",
                "sluice: token limit reached for this route; retry after the time in retry-after",
                Client,
            ),
            Self::RateLimitStoreUnavailable => (
                503,
                "rate_limit_store_unavailable",
                "proxy_error",
                "sluice: the shared rate limit store is unavailable",
                Upstream,
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
            Self::ModelRequired => (
                400,
                "model_required",
                "invalid_request_error",
                "sluice: this route routes by model: the JSON body needs a string top-level `model`",
                Client,
            ),
            Self::AmbiguousRequestBody => (
                400,
                "ambiguous_request_body",
                "invalid_request_error",
                "sluice: a top-level field sluice acts on (such as `model`) appears twice in the body",
                Client,
            ),
            Self::InvalidJsonBody => (
                400,
                "invalid_json_body",
                "invalid_request_error",
                "sluice: the request body is not a JSON object",
                Client,
            ),
            Self::ModelRoutingUnsupportedBody => (
                400,
                "model_routing_unsupported_body",
                "invalid_request_error",
                "sluice: this route routes by the JSON body's model and has no upstream for other requests",
                Client,
            ),
            Self::UnsupportedContentEncoding => (
                415,
                "unsupported_content_encoding",
                "invalid_request_error",
                "sluice: this route reads the body's model and cannot read a compressed body",
                Client,
            ),
            Self::ModelNotFound => (
                404,
                "model_not_found",
                "invalid_request_error",
                "sluice: the model does not exist on this route",
                Client,
            ),
            Self::RoutingBodyTooLarge => (
                413,
                "routing_body_too_large",
                "invalid_request_error",
                "sluice: the body's model was not within the route's peek_limit",
                Client,
            ),
            Self::UpstreamAuthFailed => (
                502,
                "upstream_auth_failed",
                "proxy_error",
                "sluice: every upstream refused the key sluice sent (401/403); check the configured keys",
                Upstream,
            ),
            Self::NoHealthyDeployment { .. } => (
                503,
                "no_healthy_deployment",
                "proxy_error",
                "sluice: every deployment of this model is ejected after failures; retry after the time in retry-after",
                Upstream,
            ),
            Self::Overloaded => (
                503,
                "overloaded",
                "proxy_error",
                "sluice: too many request bodies held at once (max_held_body); retry shortly",
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

    fn info(self) -> ErrorInfo {
        let s = self.shape();
        ErrorInfo {
            code: s.code,
            kind: s.kind,
            message: s.message,
        }
    }

    /// The whole response in `provider`'s dialect, headers included.
    pub fn into_response(self, provider: &dyn Provider) -> Response<Bytes> {
        let mut res = Response::new(provider.error_body(self.info()));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-sluice-error", HeaderValue::from_static(self.code()));
        match self {
            // As the provider sends them, so SDKs back off for the right time.
            Self::RateLimited { wait, limit } => provider.rate_limit_headers(h, wait, limit),
            Self::TokensLimited(r) => provider.token_limit_headers(h, r),
            Self::ConcurrencyLimited | Self::Overloaded | Self::RateLimitStoreUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::NoHealthyDeployment { wait } => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            Self::ShuttingDown => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shape().message)
    }
}

impl std::error::Error for ProxyError {}

impl From<BodyError> for ProxyError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TimedOut => Self::RequestTimeout,
            // A client that breaks its body off cannot get a useful answer.
            BodyError::Incomplete => Self::BadRequest,
        }
    }
}

/// Why a response could not finish after its headers went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailure {
    IdleTimeout,
    Deadline,
    UpstreamReset,
    /// The client took nothing for `send_timeout`.
    SendTimeout,
}

impl StreamFailure {
    pub fn code(self) -> &'static str {
        self.info().code
    }

    /// What an SSE stream's last event says.
    pub fn info(self) -> ErrorInfo {
        let (code, message) = match self {
            Self::IdleTimeout => (
                "upstream_idle_timeout",
                "sluice: the upstream sent nothing for longer than the route's idle timeout",
            ),
            Self::Deadline => (
                "deadline_exceeded",
                "sluice: a deadline was reached mid-stream (the route's total, or the shutdown grace)",
            ),
            Self::UpstreamReset => (
                "upstream_reset",
                "sluice: the upstream connection broke mid-stream",
            ),
            Self::SendTimeout => (
                "send_timeout",
                "sluice: the client took none of the response for longer than send_timeout",
            ),
        };
        ErrorInfo {
            code,
            kind: "proxy_error",
            message,
        }
    }
}

impl std::fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for StreamFailure {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::OPENAI;

    /// Messages are written into JSON unescaped: none may need escaping.
    #[test]
    fn every_error_body_is_valid_json_in_both_dialects() {
        use crate::provider::ANTHROPIC;
        let all = [
            ProxyError::BadRequest,
            ProxyError::RouteNotFound,
            ProxyError::RequestTooLarge,
            ProxyError::RequestTimeout,
            ProxyError::HeadTooLarge,
            ProxyError::RateLimited {
                wait: Duration::from_secs(1),
                limit: 1,
            },
            ProxyError::TokensLimited(crate::provider::TokenRefusal {
                wait: Duration::from_secs(2),
                limit: 1000,
                remaining: 10,
                reset: Duration::from_secs(6),
            }),
            ProxyError::RateLimitStoreUnavailable,
            ProxyError::ConcurrencyLimited,
            ProxyError::ConnectFailed,
            ProxyError::UntrustedCertificate,
            ProxyError::UpstreamReset,
            ProxyError::UpstreamTimeout,
            ProxyError::DeadlineExceeded,
            ProxyError::ShuttingDown,
            ProxyError::ModelRequired,
            ProxyError::AmbiguousRequestBody,
            ProxyError::InvalidJsonBody,
            ProxyError::ModelRoutingUnsupportedBody,
            ProxyError::UnsupportedContentEncoding,
            ProxyError::ModelNotFound,
            ProxyError::RoutingBodyTooLarge,
            ProxyError::UpstreamAuthFailed,
            ProxyError::Overloaded,
            ProxyError::NoHealthyDeployment {
                wait: Duration::from_secs(3),
            },
        ];
        for e in all {
            for p in [&OPENAI as &dyn Provider, &ANTHROPIC] {
                let res = e.into_response(p);
                let v: serde_json::Value =
                    serde_json::from_slice(res.body()).unwrap_or_else(|err| panic!("{e:?}: {err}"));
                assert!(v["error"]["message"].is_string(), "{e:?}");
            }
        }
    }

    #[test]
    fn body_has_openai_shape() {
        let res = ProxyError::RouteNotFound.into_response(&OPENAI);
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["x-sluice-error"], "route_not_found");
        let text = std::str::from_utf8(res.body()).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"message":"sluice: no route matches this request (method and path)","type":"invalid_request_error","param":null,"code":"route_not_found"}}"#
        );
    }

    #[test]
    fn rate_limited_carries_the_providers_headers() {
        let e = ProxyError::RateLimited {
            wait: Duration::from_millis(1200),
            limit: 60,
        };
        let res = e.into_response(&OPENAI);
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "2");
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "60");
    }
}
