//! One request's state, from arrival to the end of its response body: its
//! id and span, its deadlines, the trail of its attempts, its in-flight
//! slot and its route's metric handles. It ends in one [`RequestCtx::finish`]
//! (called when the response body is dropped, or when the request is
//! abandoned) that records the metrics, releases the slot and writes the
//! access line.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::account::{self, Ending, Source, Tokens, Watched};
use super::build::RouteState;
use crate::access::{self, RequestSpan};
use crate::backend::{InFlight, Trail, X_REQUEST_ID};
use crate::config::Timeouts;
use crate::error::StreamFailure;
use crate::metrics::RouteMetrics;
use crate::provider::{Provider, OPENAI};
use crate::usage::Usage;
use prometheus_client::metrics::histogram::Histogram;

static X_SLUICE_ATTEMPTS: HeaderName = HeaderName::from_static("x-sluice-attempts");
static X_SLUICE_UPSTREAM: HeaderName = HeaderName::from_static("x-sluice-upstream");
static X_SLUICE_MODEL: HeaderName = HeaderName::from_static("x-sluice-model");
static X_SLUICE_FALLBACKS: HeaderName = HeaderName::from_static("x-sluice-fallbacks");

/// What a model-routed request adds to its context (boxed: a plain route's
/// context, held by every open stream, stays small).
#[derive(Debug)]
pub struct ModelCtx {
    /// The model the client named (a `[models]` name).
    pub requested: Arc<str>,
    /// Moves down the fallback chain.
    pub fallbacks: u32,
    /// The answering deployment is busy until the response ends.
    pub in_flight: Option<InFlight>,
    /// An event stream's first bytes still to be timed (attempt sent, histogram).
    pub first_token: Option<(Instant, Histogram)>,
}

impl ModelCtx {
    /// The response's first body bytes went out: times the first token.
    pub fn first_bytes(&mut self) {
        if let Some((sent, h)) = self.first_token.take() {
            h.observe(sent.elapsed().as_secs_f64());
        }
    }
}

/// A route's deadlines for one request, computed once at routing.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Per attempt: request sent (or upload ended) to response headers.
    pub first_byte: Duration,
    /// Longest silence between response body frames.
    pub idle: Duration,
    /// When the whole exchange must be over, if the route says.
    pub total: Option<Instant>,
}

impl Deadlines {
    fn new(start: Instant, t: &Timeouts) -> Self {
        Self {
            first_byte: t.first_byte,
            idle: t.idle,
            total: t.total.map(|d| start + d),
        }
    }

    /// When an attempt sent at `sent` must have its response headers.
    pub fn first_byte_at(&self, sent: Instant) -> Instant {
        let at = sent + self.first_byte;
        self.total.map_or(at, |d| d.min(at))
    }
}

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

/// Who the request's metrics and log line belong to.
#[derive(Debug)]
enum Owner {
    Unrouted(Arc<RouteMetrics>),
    Route(Arc<RouteState>),
}

#[derive(Debug)]
pub struct RequestCtx {
    pub span: RequestSpan,
    start: Instant,
    method: Method,
    /// A copy: a stream's context lives as long as the stream, and a slice
    /// of the request would keep the server's read buffer with it.
    path: Box<str>,
    owner: Owner,
    pub deadlines: Deadlines,
    pub trail: Trail,
    /// Time to the last response's headers.
    pub ttfb: Option<Duration>,
    /// `None` until a response exists; logged as 499.
    pub status: Option<StatusCode>,
    /// sluice's own error code, when sluice answered.
    pub error: Option<&'static str>,
    /// The retry budget refused a retry.
    pub budget_exhausted: bool,
    /// The upstream's own `x-request-id`, if it sent one.
    pub upstream_request_id: Option<Box<str>>,
    pub bytes_out: u64,
    pub end: BodyEnd,
    /// The route's in-flight slot, held until the request ends.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Model routing's part, when the request was routed by its model.
    pub model: Option<Box<ModelCtx>>,
    /// Token accounting's charges, when the route or a deployment limits tokens.
    pub tokens: Option<Box<Tokens>>,
    /// What the response reported of its usage, once its body ended.
    pub usage: Option<Usage>,
    pub watched: Watched,
    /// The request's spans, when traces are on.
    pub trace: Option<Box<crate::telemetry::Trace>>,
    finished: bool,
}

impl RequestCtx {
    pub fn new(
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        unrouted: Arc<RouteMetrics>,
        telemetry: Option<&Arc<crate::telemetry::Telemetry>>,
    ) -> Self {
        let start = Instant::now();
        Self {
            span: RequestSpan::new(request_id(headers)),
            start,
            method: method.clone(),
            path: path.into(),
            owner: Owner::Unrouted(unrouted),
            // Set at routing; a request no route takes has none.
            deadlines: Deadlines {
                first_byte: Duration::ZERO,
                idle: Duration::ZERO,
                total: None,
            },
            trail: Trail::default(),
            ttfb: None,
            status: None,
            error: None,
            budget_exhausted: false,
            upstream_request_id: None,
            bytes_out: 0,
            end: BodyEnd::Unfinished,
            permit: None,
            model: None,
            tokens: None,
            usage: None,
            watched: Watched::No,
            trace: telemetry.map(|t| t.begin(method, path, headers)),
            finished: false,
        }
    }

    /// The request matched this route: its metrics, deadlines and dialect
    /// from now on.
    pub fn routed(&mut self, state: &Arc<RouteState>) {
        state.metrics.in_flight.inc();
        self.deadlines = Deadlines::new(self.start, &state.route.timeouts);
        self.owner = Owner::Route(state.clone());
    }

    pub fn route(&self) -> Option<&RouteState> {
        match &self.owner {
            Owner::Route(r) => Some(r),
            Owner::Unrouted(_) => None,
        }
    }

    fn metrics(&self) -> &RouteMetrics {
        match &self.owner {
            Owner::Route(r) => &r.metrics,
            Owner::Unrouted(m) => m,
        }
    }

    /// The dialect of sluice's own errors for this request.
    pub fn provider(&self) -> &'static dyn Provider {
        self.route().map_or(&OPENAI, |r| r.provider)
    }

    /// The headers sluice adds to every response: the request id, and what
    /// the attempts were.
    pub fn response_headers(&self, h: &mut HeaderMap) {
        h.insert(X_REQUEST_ID.clone(), self.span.id_value().clone());
        let attempts = self.trail.attempts();
        if attempts > 1 {
            h.insert(X_SLUICE_ATTEMPTS.clone(), HeaderValue::from(attempts));
        }
        if attempts > 1 || self.budget_exhausted {
            self.provider().forbid_client_retry(h);
        }
        if let (Some(m), Some(route), Some(last)) = (&self.model, self.route(), self.trail.last()) {
            let b = route.backends.get(last.backend);
            if let Some(v) = &b.upstream_header {
                h.insert(X_SLUICE_UPSTREAM.clone(), v.clone());
            }
            let sent = match &b.model_header {
                Some(v) => Some(v.clone()),
                None => HeaderValue::from_str(&m.requested).ok(),
            };
            if let Some(v) = sent {
                h.insert(X_SLUICE_MODEL.clone(), v);
            }
            if m.fallbacks > 0 {
                h.insert(X_SLUICE_FALLBACKS.clone(), HeaderValue::from(m.fallbacks));
            }
        }
    }

    /// The request is over: metrics, the slot, the access line. Once.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let now = Instant::now();
        let duration = now.saturating_duration_since(self.start);
        let status = self.status.map_or(499, |s| s.as_u16());
        let m = self.metrics();
        m.request(status);
        m.duration.observe(duration.as_secs_f64());
        if self.route().is_some() {
            m.in_flight.dec();
        }
        match self.end {
            BodyEnd::Failed(why) => m.stream_abort(why.code()),
            BodyEnd::Unfinished if self.status.is_some() => m.stream_abort("client_gone"),
            _ => {}
        }
        self.permit = None;
        // A stream the upstream broke or left silent after it was committed
        // counts against the deployment's health too.
        if let (Some(_), Some(r), Some(last)) = (&self.model, self.route(), self.trail.last()) {
            if matches!(
                self.end,
                BodyEnd::Failed(StreamFailure::IdleTimeout | StreamFailure::UpstreamReset)
            ) {
                let load = &r.backends.get(last.backend).load;
                load.report(crate::backend::Report::Failed, now);
            }
        }
        let tokens = self.settle_tokens(now);
        let trace = self.trace.take();
        let route = self.route();
        // The backend of the last attempt, or before any the route's own
        // upstream (a model-routed route may have none).
        let backend = route.and_then(|r| {
            let i = self
                .trail
                .last()
                .map(|s| s.backend)
                .or(r.backends.direct())?;
            Some(r.backends.get(i).upstream.name.as_str())
        });
        let (deployment, trail) = match (&self.model, route) {
            (Some(_), Some(r)) => model_trail(&self.trail, r),
            _ => ("", String::new()),
        };
        let model = self.model.as_ref().map(|m| access::ModelRecord {
            model: &m.requested,
            deployment,
            trail: &trail,
            fallbacks: m.fallbacks,
        });
        if let Some(trace) = trace {
            self.finish_trace(*trace, route, status);
        }
        access::write(&access::Record {
            span: &self.span,
            method: &self.method,
            path: &self.path,
            route: route.map_or("-", |r| r.route.name.as_str()),
            upstream: backend.unwrap_or("-"),
            status,
            attempts: self.trail.attempts(),
            duration,
            ttfb: self.ttfb,
            bytes_out: self.bytes_out,
            body: self.end.as_str(),
            error: self.error,
            budget_exhausted: self.budget_exhausted,
            upstream_request_id: self.upstream_request_id.as_deref(),
            model,
            tokens,
        });
    }

    /// The spans get what only the end knows. Out of line: a request
    /// without traces never enters it.
    #[inline(never)]
    fn finish_trace(
        &self,
        trace: crate::telemetry::Trace,
        route: Option<&RouteState>,
        status: u16,
    ) {
        let results: Vec<_> = self.trail.steps().map(|s| s.result).collect();
        trace.finish(&crate::telemetry::Finish {
            route: route.map_or("-", |r| r.route.name.as_str()),
            status,
            error: self.error.or(match self.end {
                BodyEnd::Failed(why) => Some(why.code()),
                _ => None,
            }),
            request_id: self.span.id_value().to_str().unwrap_or("-"),
            results: &results,
            fallbacks: self.model.as_ref().map_or(0, |m| m.fallbacks),
            requested_model: self.model.as_ref().map(|m| &m.requested),
            // What the upstream reported, never an estimate.
            usage: self.usage,
        });
    }

    /// Settles the token charges by what the response reported, counts
    /// its tokens, and says what the access line shows of them.
    fn settle_tokens(&mut self, now: Instant) -> Option<access::TokenRecord> {
        if self.tokens.is_none() && self.watched == Watched::No {
            return None;
        }
        let tokens = self.tokens.take();
        let route = self.route()?;
        let ok = self.status.is_some_and(|s| s.is_success());
        let ending = match self.end {
            _ if !ok => Ending::Failed,
            BodyEnd::Complete => Ending::Complete,
            _ => Ending::Cut,
        };
        let missing = match self.watched {
            Watched::Compressed => Some("compressed"),
            Watched::Yes if self.usage.is_none() && ending == Ending::Complete => {
                Some("not_reported")
            }
            Watched::Yes if self.usage.is_none() => Some("cut"),
            _ => None,
        };
        let count = route.route.token_limit.as_ref().map(|t| t.estimate.count);
        let estimate = tokens.as_ref().and_then(|t| t.estimate);
        let (usage, source) = match tokens {
            Some(mut t) => t.settle(ending, count, self.usage, now),
            None if ending != Ending::Failed && self.usage.is_some() => {
                (self.usage, Source::Reported)
            }
            None => (None, Source::None),
        };
        if let Some(last) = self.trail.last() {
            account::record(
                route,
                last.backend,
                estimate,
                usage.as_ref(),
                source,
                missing,
            );
        }
        Some(access::TokenRecord {
            input: usage.map(|u| u.input),
            output: usage.map(|u| u.output),
            source: source.as_str(),
        })
    }
}

/// The last attempt's deployment and the whole trail, as the access line
/// writes them: `openai-a/gpt-4.1-mini:429,azure-east/gpt-4.1-mini:200`.
fn model_trail<'a>(trail: &Trail, route: &'a RouteState) -> (&'a str, String) {
    let label = |i: usize| &*route.backends.get(i).label;
    let mut out = String::with_capacity(trail.steps().map(|s| label(s.backend).len() + 5).sum());
    for (n, s) in trail.steps().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(label(s.backend));
        out.push(':');
        match s.result {
            Ok(status) => out.push_str(status.as_str()),
            Err(word) => out.extend(word.chars().map(|c| if c == '_' { '-' } else { c })),
        }
    }
    (trail.last().map_or("-", |s| label(s.backend)), out)
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The client's `x-request-id` when it is sane, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            // A copy, not a slice of the request's head: the id lives as
            // long as the stream, and would keep that buffer alive.
            return HeaderValue::from_bytes(b).unwrap_or_else(|_| v.clone());
        }
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(s).expect("a UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_byte_never_runs_past_the_total_deadline() {
        let start = Instant::now();
        let d = Deadlines {
            first_byte: Duration::from_secs(10),
            idle: Duration::from_secs(1),
            total: Some(start + Duration::from_secs(3)),
        };
        assert_eq!(d.first_byte_at(start), start + Duration::from_secs(3));
        let d = Deadlines { total: None, ..d };
        assert_eq!(d.first_byte_at(start), start + Duration::from_secs(10));
    }
}
