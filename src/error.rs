//! Errors sluice answers itself. This is the one place that turns a failure
//! into HTTP: OpenAI's error shape, so SDKs raise their usual exceptions.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Who caused a failure: it decides the status family and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
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
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ConnectFailed | Self::UntrustedCertificate | Self::UpstreamReset => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout | Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable code for the body, `x-sluice-error`, logs and metric labels.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::RouteNotFound => "route_not_found",
            Self::RequestTooLarge => "request_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::ConnectFailed | Self::UntrustedCertificate | Self::UpstreamReset => {
                "upstream_unavailable"
            }
            Self::UpstreamTimeout => "upstream_timeout",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            Self::BadRequest
            | Self::RouteNotFound
            | Self::RequestTooLarge
            | Self::RequestTimeout => Fault::Client,
            Self::ConnectFailed
            | Self::UntrustedCertificate
            | Self::UpstreamReset
            | Self::UpstreamTimeout
            | Self::DeadlineExceeded => Fault::Upstream,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::BadRequest => "sluice: malformed request",
            Self::RouteNotFound => "sluice: no route matches this request (method and path)",
            Self::RequestTooLarge => "sluice: request body is larger than max_request_body",
            Self::RequestTimeout => "sluice: the client stopped sending its request body",
            Self::ConnectFailed => "sluice: upstream unavailable: could not connect",
            Self::UntrustedCertificate => {
                "sluice: upstream unavailable: its TLS certificate is not trusted"
            }
            Self::UpstreamReset => {
                "sluice: upstream unavailable: connection closed before a response"
            }
            Self::UpstreamTimeout => {
                "sluice: upstream timeout: no response headers within the route's first_byte timeout"
            }
            Self::DeadlineExceeded => {
                "sluice: the route's total deadline passed before a response"
            }
        }
    }

    fn error_type(self) -> &'static str {
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream => "proxy_error",
        }
    }

    /// The JSON body, `{"error":{...}}`. Every part is a constant of ours, so
    /// nothing needs escaping.
    pub fn body(self) -> Bytes {
        Bytes::from(format!(
            r#"{{"error":{{"message":"{}","type":"{}","param":null,"code":"{}"}}}}"#,
            self.message(),
            self.error_type(),
            self.code()
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
        res
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
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
}
