//! The access log: one info line per request, written when the response body
//! is dropped (so it knows how many bytes went out and how the body ended).
//! It carries no header values and no body, so no key can reach it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode, Uri};

use crate::config::Route;
use crate::metrics::RouteMetrics;
use crate::response::StreamFailure;

/// How the response body ended, as far as the client is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Dropped before its end: the client went away (or the server stopped).
    Unfinished,
    Complete,
    /// Cut after the headers: an SSE error event, or an abort.
    Failed(StreamFailure),
}

impl BodyEnd {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unfinished => "client_gone",
            Self::Complete => "complete",
            Self::Failed(why) => why.code(),
        }
    }
}

/// What one request did; logged on drop.
#[derive(Debug)]
pub struct AccessLog {
    pub span: tracing::Span,
    pub start: Instant,
    pub method: Method,
    /// The client's URI; only its path is logged (queries may carry secrets).
    pub uri: Uri,
    pub route: Option<Arc<Route>>,
    /// None until a response exists; logged as 499 (nginx's "client closed request").
    pub status: Option<StatusCode>,
    pub attempts: u32,
    pub ttfb: Option<Duration>,
    pub bytes_out: u64,
    pub end: BodyEnd,
    /// sluice's own error code, when sluice answered.
    pub error: Option<&'static str>,
    /// The retry budget refused a retry.
    pub budget_exhausted: bool,
    /// The upstream's own `x-request-id`, if it sent one.
    pub upstream_request_id: Option<String>,
    /// The route's in-flight slot: released when this record drops, that
    /// is when the response ends or the client leaves.
    pub in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The route's metric handles (or the unrouted ones).
    pub metrics: Option<RouteMetrics>,
}

impl AccessLog {
    pub fn new(span: tracing::Span, start: Instant, method: Method, uri: Uri) -> Self {
        Self {
            span,
            start,
            method,
            uri,
            route: None,
            status: None,
            attempts: 0,
            ttfb: None,
            bytes_out: 0,
            end: BodyEnd::Unfinished,
            error: None,
            budget_exhausted: false,
            upstream_request_id: None,
            in_flight: None,
            metrics: None,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.request(self.status.map_or(499, |s| s.as_u16()));
            m.duration.observe(self.start.elapsed().as_secs_f64());
            if self.route.is_some() {
                m.in_flight.dec();
            }
            match self.end {
                BodyEnd::Failed(why) => m.stream_abort(why.code()),
                BodyEnd::Unfinished if self.status.is_some() => m.stream_abort("client_gone"),
                _ => {}
            }
        }
        let route = self.route.as_deref();
        // Microsecond precision, printed as milliseconds.
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: "sluice::access",
            parent: &self.span,
            method = %self.method,
            path = self.uri.path(),
            route = route.map_or("-", |r| r.name.as_str()),
            upstream = route.map_or("-", |r| r.upstream.name.as_str()),
            status = self.status.map_or(499, |s| s.as_u16()),
            attempts = self.attempts,
            duration_ms = ms(self.start.elapsed()),
            ttfb_ms = self.ttfb.map(ms),
            bytes_out = self.bytes_out,
            body = self.end.as_str(),
            error = self.error,
            budget_exhausted = self.budget_exhausted,
            upstream_request_id = self.upstream_request_id.as_deref(),
            "request"
        );
    }
}
