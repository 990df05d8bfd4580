//! What sluice knows of an API dialect, behind one small trait: where a
//! client's own key travels, how an upstream asks for a wait, how it says an
//! account is out of quota, and the shape of the errors sluice writes in
//! that dialect (JSON bodies, the last SSE event of a cut stream, rate-limit
//! headers). One file per dialect; routes and backends hold a
//! `&'static dyn Provider`.

pub(crate) mod anthropic;
pub(crate) mod openai;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, StatusCode};
use serde::Deserialize;

pub use anthropic::Anthropic;
pub use openai::OpenAi;

/// The OpenAI dialect: OpenAI itself and every OpenAI-compatible server.
pub static OPENAI: OpenAi = OpenAi;

/// Anthropic's Messages API.
pub static ANTHROPIC: Anthropic = Anthropic;

/// How a dialect carries the upstream key (`auth = ...` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthScheme {
    /// `Authorization: Bearer KEY` (OpenAI and most compatibles).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    ApiKey,
    /// `x-api-key: KEY` (Anthropic).
    XApiKey,
    /// Send no key; the client's auth headers pass through.
    None,
}

impl AuthScheme {
    /// The header and value that carry `key`; `None` sends no key.
    pub fn key_header(self, key: &str) -> Option<(HeaderName, String)> {
        match self {
            Self::None => None,
            Self::Bearer => Some((header::AUTHORIZATION, format!("Bearer {key}"))),
            Self::ApiKey => Some((HeaderName::from_static("api-key"), key.to_owned())),
            Self::XApiKey => Some((HeaderName::from_static("x-api-key"), key.to_owned())),
        }
    }
}

/// An error sluice answers itself, before it takes a dialect's shape.
#[derive(Debug, Clone, Copy)]
pub struct ErrorInfo {
    /// Stable code: the body's `code`, `x-sluice-error`, logs and metrics.
    pub code: &'static str,
    /// The dialect's error type (`invalid_request_error`, `requests`, ...).
    pub kind: &'static str,
    pub message: &'static str,
}

pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Headers a client may carry its own key in: removed when sluice sets
    /// the upstream's key.
    fn client_key_headers(&self) -> &'static [HeaderName];

    /// How long the upstream asks to wait before a retry, from a response's
    /// headers (`now` reads HTTP dates).
    fn wait_hint(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        now: SystemTime,
    ) -> Option<Duration>;

    /// Whether an error body says the account is out of quota: a billing
    /// state that no retry fixes. `encoding` is the response's
    /// `content-encoding`.
    fn is_quota_exhausted(&self, encoding: Option<&[u8]>, body: &[u8]) -> bool;

    /// The JSON body of an error sluice answers itself.
    fn error_body(&self, e: ErrorInfo) -> Bytes;

    /// The last event of an SSE stream cut after its headers; `at_boundary`
    /// says whether the stream so far ends on an event boundary.
    fn sse_error_event(&self, e: ErrorInfo, at_boundary: bool) -> Bytes;

    /// Headers of sluice's own refusal for a request rate: when to come
    /// back, in the form the dialect's SDKs read.
    fn rate_limit_headers(&self, h: &mut HeaderMap, wait: Duration, limit: u32);

    /// A token limit's refusal headers: how long to wait, the limit, what
    /// is left and when the bucket is full again.
    fn token_limit_headers(&self, h: &mut HeaderMap, r: TokenRefusal);

    /// What an idle event stream gets to keep proxies and clients from
    /// timing it out (`[routes.sse] keepalive`).
    fn sse_keepalive(&self) -> Bytes;

    /// Tells the client's SDK not to retry on its own: sluice retried, or
    /// its budget refused a retry, and SDK retries would multiply sluice's.
    fn forbid_client_retry(&self, h: &mut HeaderMap);
}

/// A token limit's refusal, as its headers say it.
pub use crate::tokens::TokensRefused as TokenRefusal;

/// `retry-after` in whole seconds, at least 1.
pub(crate) fn retry_after(h: &mut HeaderMap, wait: Duration) {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(secs.max(1)),
    );
}
