//! One attempt, as the proxy makes it: ask the route for a backend, aim the
//! request head at it, send under the `first_byte` and `total` deadlines,
//! record what came of it, and judge the response for the retry policy
//! (reading the start of a 429's body for `insufficient_quota`).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use super::attempts::Attempt;
use super::build::RouteState;
use super::commit::{self, First};
use super::ctx::RequestCtx;
use super::is_sse;
use super::model::Routed;
use crate::backend::{Backend, InFlight, Report, Step, Upstream};
use crate::body::RequestBody;
use crate::config::Commit;
use crate::error::ProxyError;
use crate::retry::{self, Outcome, PlanState, PlanStep, Verdict};

/// How much of a 429 body is read to look for `insufficient_quota`.
const QUOTA_PEEK: usize = 64 * 1024;

/// An upstream response on its way to the client.
pub struct Forwarded {
    pub res: Response<Upstream>,
    /// Body bytes already read (a peeked 429), sent before the rest.
    pub head: VecDeque<Bytes>,
    /// A model-routed response's deployment is busy until it ends.
    pub in_flight: Option<InFlight>,
    /// An event stream's first bytes still to be timed: when the attempt
    /// was sent, and the histogram.
    pub first_token: Option<(Instant, Histogram)>,
    /// Sent with `include_usage` sluice added: its chunk is removed.
    pub injected: bool,
}

/// The request's attempts at its route's backends.
pub struct Exchange<'a> {
    state: &'a RouteState,
    head: Outgoing,
    body: Replay,
    ctx: &'a mut RequestCtx,
    /// Most attempts this request can make.
    pub max: u32,
    /// A model-routed request's plan down its chain.
    routed: Option<Box<Routed>>,
    /// The edit that asks the upstream for usage, where it may.
    ask: Option<(Range<u64>, Bytes)>,
    /// The request's estimated tokens, charged to a deployment's `tpm`.
    pub cost: u64,
    rng: fastrand::Rng,
    /// The model the chain just moved on from, for the next attempt's span.
    fell_from: Option<Arc<str>>,
}

/// The request body each attempt sends.
enum Replay {
    /// Held whole: every attempt shares it.
    Copy(Option<Bytes>),
    /// Streamed, or a route that does not retry: sent once.
    Once(Option<RequestBody>),
}

impl<'a> Exchange<'a> {
    /// `parts` was prepared (`backend::prepare`); a whole body is replayed
    /// when the route retries.
    pub fn new(
        state: &'a RouteState,
        parts: Parts,
        body: RequestBody,
        ctx: &'a mut RequestCtx,
        routed: Option<Box<Routed>>,
        ask: Option<(Range<u64>, Bytes)>,
    ) -> Self {
        let attempts = state.route.retry.attempts;
        // A whole body is kept even when the route does not retry: an
        // upstream that refuses `stream_options` gets it again without.
        let (body, max) = match body {
            RequestBody::Full(b) => (Replay::Copy(b), attempts),
            body => (Replay::Once(Some(body)), 1),
        };
        let head = Outgoing {
            parts,
            aimed: None,
            pristine: None,
        };
        Self {
            state,
            head,
            body,
            ctx,
            max,
            routed,
            ask,
            cost: 0,
            rng: fastrand::Rng::new(),
            fell_from: None,
        }
    }

    /// Each attempt's body, built from the client's bytes: the model the
    /// backend knows spliced in, and with `ask` the request for usage, so
    /// edits never stack.
    fn body(&mut self, backend: &Backend, ask: bool) -> RequestBody {
        let mut body = match &mut self.body {
            Replay::Copy(b) => RequestBody::Full(b.clone()),
            Replay::Once(b) => b
                .take()
                .expect("a request that cannot be replayed is sent once"),
        };
        let model = match (&self.routed, &backend.model_json) {
            (Some(r), Some(m)) => Some((r.span.clone(), m.clone())),
            _ => None,
        };
        let ask = self.ask.clone().filter(|_| ask);
        // The later edit first: the earlier one's offsets stay true.
        let mut edits = [model, ask];
        edits.sort_by_key(|e| std::cmp::Reverse(e.as_ref().map(|(r, _)| r.start)));
        for (range, with) in edits.into_iter().flatten() {
            body.splice(range, with);
        }
        body
    }

    /// Whether this attempt asks `backend` for usage.
    fn asks(&self, backend: &Backend) -> bool {
        self.ask.is_some()
            && backend.upstream.inject_usage
            && !backend
                .refuses_usage
                .load(std::sync::atomic::Ordering::Relaxed)
            && matches!(self.body, Replay::Copy(_))
    }

    /// Moves down the chain so far.
    pub fn fallbacks(&self) -> u32 {
        self.routed.as_ref().map_or(0, |r| r.plan.fallbacks)
    }

    /// The request's step down its plan, in the backends' terms.
    fn plan_state(&self, plan: &crate::backend::Plan) -> PlanState {
        let backends = &self.state.backends;
        let entry = backends.current(plan);
        let cap = entry
            .model
            .attempts
            .unwrap_or(self.state.route.retry.attempts);
        let last = self.ctx.trail.last().map(|s| backends.get(s.backend));
        PlanState {
            model_attempts_left: plan.on_model < cap,
            untried_left: backends.has_untried(plan, &self.ctx.trail),
            has_fallback: backends.has_fallback(plan),
            injected_key: last.is_some_and(|b| b.upstream.key.is_some()),
        }
    }

    /// Reads the retry policy's view of a response: a hint to wait, and
    /// for a 429 worth retrying whether its body says the quota is gone.
    async fn judge(
        &self,
        mut fwd: Forwarded,
        can_retry: bool,
        backend: &Backend,
        sent: Instant,
    ) -> Result<(Forwarded, Outcome), ProxyError> {
        let policy = &self.state.route.retry;
        let status = fwd.res.status();
        let retryable = can_retry && policy.retry_on.statuses.contains(&status.as_u16());
        let mut quota = false;
        if retryable && status == StatusCode::TOO_MANY_REQUESTS {
            let until = self.ctx.deadlines.first_byte_at(sent);
            (fwd, quota) = Box::pin(peek_quota(fwd, until, backend)).await?;
        }
        let hint = (retryable && policy.honor_retry_after)
            .then(|| {
                let h = fwd.res.headers();
                backend.provider.wait_hint(h, status, SystemTime::now())
            })
            .flatten();
        let mut outcome = Outcome::Response {
            status,
            hint,
            quota,
        };
        // Only a route that commits on the first event or times the first
        // token looks at what kind of body this is.
        let ttft = backend.metrics.ttft.as_ref();
        let stream = (policy.commit == Commit::FirstEvent || ttft.is_some())
            && status.is_success()
            && is_sse(fwd.res.headers());
        let ttft = ttft.filter(|_| stream);
        if stream && policy.commit == Commit::FirstEvent {
            let until = self.ctx.deadlines.first_byte_at(sent);
            let (parts, mut body) = fwd.res.into_parts();
            let first = commit::hold(&mut body, &mut fwd.head, until, policy.commit_buffer).await?;
            fwd.res = Response::from_parts(parts, body);
            match first {
                First::Error => outcome = Outcome::StreamError,
                // Held to its first event: timed now, once.
                _ => {
                    if let Some(h) = ttft {
                        h.observe(sent.elapsed().as_secs_f64());
                    }
                }
            }
        } else {
            fwd.first_token = ttft.map(|h| (sent, h.clone()));
        }
        Ok((fwd, outcome))
    }
}

impl Attempt for Exchange<'_> {
    type Response = Forwarded;

    async fn attempt(&mut self, n: u32, sent: Instant) -> Result<(Forwarded, Outcome), ProxyError> {
        let state = self.state;
        let key = self.routed.as_ref().and_then(|r| {
            let h = state.backends.current(&r.plan).model.hash_header.as_ref()?;
            self.head
                .parts
                .headers
                .get(h)
                .map(|v| v.as_bytes().to_vec())
        });
        let plan = self.routed.as_mut().map(|r| &mut r.plan);
        let picked = state.backends.pick(
            &self.ctx.trail,
            plan,
            key.as_deref(),
            &mut self.rng,
            Instant::now(),
            self.cost,
        )?;
        let index = picked.index;
        let backend = state.backends.get(index);
        // The attempt before went nowhere: its deployment's charge is
        // refunded, whoever takes this one.
        if let Some(before) = self.ctx.tokens.as_mut().and_then(|t| t.deployment.take()) {
            before.settle(0);
        }
        let in_flight = picked.taken.map(|t| {
            if let Some(charge) = t.charge {
                let tokens = self.ctx.tokens.get_or_insert_with(Default::default);
                tokens.deployment = Some(charge);
            }
            t.in_flight
        });
        if let Some(r) = &mut self.routed {
            r.plan.on_model += 1;
        }
        let may_switch = self
            .routed
            .as_ref()
            .is_some_and(|r| state.backends.may_switch(&r.plan));
        self.head
            .aim(state.backends.as_slice(), index, &state.route, may_switch);
        let mut ask = self.asks(backend);
        if ask {
            // A compressed stream could not have its usage chunk removed.
            self.head.parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        let body = self.body(backend, ask);
        if let Some(trace) = &mut self.ctx.trace {
            let routed = self.routed.as_ref();
            trace.attempt(
                crate::telemetry::AttemptInfo {
                    n,
                    upstream: &backend.upstream,
                    deployment: routed.map(|_| &*backend.label),
                    model: backend.model.as_ref().or(routed.map(|r| &r.requested)),
                    fallback_from: self.fell_from.take(),
                },
                &mut self.head.parts.headers,
            );
        }
        let res = send(backend, &self.head.parts, body, sent, self.ctx).await;
        let res = match res {
            // An upstream that does not know `stream_options` gets the
            // request again without it, once; when the field was ours
            // alone, it is never asked again until reload.
            Ok(r) if ask && r.status() == StatusCode::BAD_REQUEST => {
                let until = self.ctx.deadlines.first_byte_at(sent);
                match peek(r, until).await {
                    Ok((fwd, body)) if memchr::memmem::find(&body, b"stream_options").is_some() => {
                        // The client's own options may be what the upstream refused.
                        if self.ask.as_ref().is_some_and(|(at, _)| at.is_empty()) {
                            backend
                                .refuses_usage
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(
                                parent: self.ctx.span.get(),
                                upstream = backend.upstream.name.as_str(),
                                "the upstream refused stream_options: usage is no longer asked of it until reload"
                            );
                        }
                        drop(fwd);
                        ask = false;
                        let body = self.body(backend, false);
                        send(backend, &self.head.parts, body, Instant::now(), self.ctx)
                            .await
                            .map(Forwarded::new)
                    }
                    other => other.map(|(fwd, _)| fwd),
                }
            }
            res => res.map(Forwarded::new),
        };
        if ask {
            backend.metrics.usage_injected();
        }
        let m = &backend.metrics;
        let result = match &res {
            Ok(fwd) => {
                let ttfb = sent.elapsed();
                self.ctx.ttfb = Some(ttfb);
                m.ttfb.observe(ttfb.as_secs_f64());
                Ok(fwd.res.status())
            }
            Err(e) => Err(Outcome::Failed(*e).label()),
        };
        m.attempt(result.map_or_else(|word| word, |s| crate::retry::status_class(s.as_u16())));
        self.ctx.trail.push(Step {
            backend: index,
            result,
        });
        if let Some(trace) = &mut self.ctx.trace {
            trace.answered();
        }
        let injected = backend.upstream.key.is_some();
        let judged = match res {
            Ok(res) => self.judge(res, n < self.max, backend, sent).await,
            Err(e) => Err(e),
        };
        // Held for its first event and failed there: the trail says how.
        match &judged {
            Ok((_, o @ Outcome::StreamError)) => self.ctx.trail.amend_last(Err(o.label())),
            Err(e) if result.is_ok() => self.ctx.trail.amend_last(Err(Outcome::Failed(*e).label())),
            _ => {}
        }
        if self.routed.is_some() {
            let now = Instant::now();
            let report = health_report(judged.as_ref().map(|(_, o)| *o), injected);
            backend.load.report(report, now);
            let headers = judged.as_ref().ok().map(|(f, _)| f.res.headers());
            if let Some(wait) = headers.and_then(crate::provider::openai::used_up_for) {
                backend.load.saturate(wait, now);
            }
        }
        let (mut fwd, outcome) = judged?;
        fwd.in_flight = in_flight;
        fwd.injected = ask;
        Ok((fwd, outcome))
    }

    fn steer(&mut self, v: Verdict, outcome: Outcome, _n: u32, now: Instant) -> Verdict {
        let Some(routed) = &self.routed else {
            return v;
        };
        // retry_on and fallback_on name 4xx and 5xx only: a success is
        // the request's whatever the plan.
        if matches!(outcome, Outcome::Response { status, .. } if status.is_success()) {
            return v;
        }
        let state = self.plan_state(&routed.plan);
        let policy = &self.state.route.retry;
        match retry::steer(policy, v, outcome, state, now, self.ctx.deadlines.total) {
            PlanStep::Return => Verdict::Return,
            PlanStep::SameModel(wait) => Verdict::RetryAfter(wait),
            PlanStep::Fallback => {
                let routed = self.routed.as_mut().expect("routed");
                let backends = &self.state.backends;
                let from = backends.current(&routed.plan).name.clone();
                backends.fall_back(&mut routed.plan);
                let to = &backends.current(&routed.plan).name;
                self.state.metrics.fallback(&from, to, outcome.reason());
                if self.ctx.trace.is_some() {
                    self.fell_from = Some(from.clone());
                }
                tracing::debug!(parent: self.ctx.span.get(), from = &*from, to = &**to, "falling back");
                Verdict::RetryAfter(Duration::ZERO)
            }
        }
    }

    fn budget_refused(&mut self) {
        self.ctx.budget_exhausted = true;
        self.state.metrics.budget_exhausted.inc();
    }

    fn retrying(&mut self, n: u32, reason: &'static str, wait: Duration) {
        self.state.metrics.retry(reason);
        tracing::debug!(parent: self.ctx.span.get(), attempt = n, ?wait, reason, "retrying");
    }
}

/// The request head as it goes to a backend.
struct Outgoing {
    parts: Parts,
    /// The backend it is aimed at now.
    aimed: Option<usize>,
    /// The client's URI and headers, kept when a route has several backends
    /// so a switch starts again from them.
    pristine: Option<(Uri, HeaderMap)>,
}

impl Outgoing {
    /// Aims the head at backend `i`: a no-op when it already is, so the
    /// head is lent to each attempt, never copied, while the backend stays.
    /// `may_switch`: a later attempt may go to another backend, so the
    /// client's URI and headers are kept to start again from.
    fn aim(
        &mut self,
        backends: &[Arc<Backend>],
        i: usize,
        route: &crate::config::Route,
        may_switch: bool,
    ) {
        if self.aimed == Some(i) {
            return;
        }
        match &self.pristine {
            Some((uri, headers)) if self.aimed.is_some() => {
                self.parts.uri = uri.clone();
                self.parts.headers = headers.clone();
            }
            None if may_switch => {
                self.pristine = Some((self.parts.uri.clone(), self.parts.headers.clone()));
            }
            // A head aimed once cannot be aimed again from itself.
            _ => debug_assert!(self.aimed.is_none(), "a switch nobody planned for"),
        }
        backends[i].aim(&mut self.parts, route);
        self.aimed = Some(i);
    }
}

/// One attempt, bounded by `first_byte` and the total deadline.
async fn send(
    backend: &Backend,
    parts: &Parts,
    body: RequestBody,
    sent: Instant,
    ctx: &RequestCtx,
) -> Result<Response<Upstream>, ProxyError> {
    let deadlines = ctx.deadlines;
    let stream = body.stream_state();
    // first_byte runs from the end of the upload: a slow client's large
    // body is not the upstream being late.
    let first_byte = async {
        match &stream {
            Some(s) => {
                s.uploaded.notified().await;
                tokio::time::sleep(deadlines.first_byte).await;
            }
            None => tokio::time::sleep_until(sent + deadlines.first_byte).await,
        }
    };
    let total = async {
        match deadlines.total {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        res = backend.send(parts, body, &ctx.span) => res.map_err(|e| {
            // When the client's body broke (too large, cut off), that is the cause.
            stream.as_ref().and_then(|s| s.failure.get().copied()).unwrap_or(e)
        }),
        () = first_byte => Err(ProxyError::UpstreamTimeout),
        () = total => Err(ProxyError::DeadlineExceeded),
    }
}

impl Forwarded {
    fn new(res: Response<Upstream>) -> Self {
        Self {
            res,
            head: VecDeque::new(),
            in_flight: None,
            first_token: None,
            injected: false,
        }
    }
}

/// Reads the start of an error's body (up to `QUOTA_PEEK`), and keeps what
/// was read so the response can still pass on intact. A body that breaks
/// off is a reset: passed on, it would look complete.
async fn peek(res: Response<Upstream>, until: Instant) -> Result<(Forwarded, Vec<u8>), ProxyError> {
    let (parts, mut body) = res.into_parts();
    let mut head = VecDeque::new();
    let mut len = 0;
    while len <= QUOTA_PEEK && !body.is_end_stream() {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    head.push_back(data);
                }
            }
            Ok(Some(Err(_))) => return Err(ProxyError::UpstreamReset),
            // The end, or a stalled body: judge what arrived.
            Ok(None) | Err(_) => break,
        }
    }
    let whole: Vec<u8> = head.iter().flat_map(|b| b.iter().copied()).collect();
    let mut fwd = Forwarded::new(Response::from_parts(parts, body));
    fwd.head = head;
    Ok((fwd, whole))
}

/// Reads the start of a 429's body to see whether it is `insufficient_quota`
/// (true: never retry it).
async fn peek_quota(
    fwd: Forwarded,
    until: Instant,
    backend: &Backend,
) -> Result<(Forwarded, bool), ProxyError> {
    // A 429 is never one whose body was read already (that is a 400's).
    debug_assert!(fwd.head.is_empty());
    let (fwd, whole) = peek(fwd.res, until).await?;
    let encoding = fwd
        .res
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(HeaderValue::as_bytes);
    let quota = backend.provider.is_quota_exhausted(encoding, &whole);
    Ok((fwd, quota))
}

/// What an attempt tells of its deployment's health: only what the
/// upstream caused counts.
fn health_report(judged: Result<Outcome, &ProxyError>, injected_key: bool) -> Report {
    match judged {
        Ok(Outcome::Response { quota: true, .. }) => Report::KeyRefused,
        Ok(Outcome::Response { status, hint, .. }) => match status.as_u16() {
            401 | 403 if injected_key => Report::KeyRefused,
            429 => hint.map_or(Report::Failed, Report::RateLimited),
            501 => Report::Fine,
            s if s >= 500 => Report::Failed,
            // The client's mistake says nothing of the upstream, either way.
            400..=499 => Report::Ignored,
            _ => Report::Fine,
        },
        Ok(Outcome::StreamError) => Report::Failed,
        Ok(Outcome::Failed(e)) | Err(&e) => match e {
            ProxyError::ConnectFailed
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamTimeout
            | ProxyError::UntrustedCertificate => Report::Failed,
            // The client's body, sluice's own deadline: not the upstream's doing.
            _ => Report::Ignored,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn status(code: u16) -> Result<Outcome, &'static ProxyError> {
        Ok(Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            hint: None,
            quota: false,
        })
    }

    #[test]
    fn only_what_the_upstream_caused_counts_for_health() {
        assert_eq!(health_report(status(200), true), Report::Fine);
        assert_eq!(health_report(status(501), true), Report::Fine);
        for code in [500, 502, 503, 504, 529, 429] {
            assert_eq!(health_report(status(code), true), Report::Failed, "{code}");
        }
        for code in [400, 404, 413, 422] {
            assert_eq!(health_report(status(code), true), Report::Ignored, "{code}");
        }
        assert_eq!(health_report(status(401), true), Report::KeyRefused);
        assert_eq!(health_report(status(401), false), Report::Ignored);
        assert_eq!(
            health_report(Ok(Outcome::StreamError), true),
            Report::Failed
        );
        assert_eq!(
            health_report(Err(&ProxyError::ConnectFailed), true),
            Report::Failed
        );
        assert_eq!(
            health_report(Err(&ProxyError::BadRequest), true),
            Report::Ignored
        );
        assert_eq!(
            health_report(Err(&ProxyError::DeadlineExceeded), true),
            Report::Ignored
        );
    }
}
