//! The request story, one phase per call: identify, route, read the body,
//! rewrite, then a plain loop of attempts, then respond. This is the only
//! module that calls the others.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::access::{AccessLog, RequestSpan};
use crate::body::{BodyLimits, ClientBody, RequestBody};
use crate::client::UpstreamBody;
use crate::config::{Config, RetryPolicy, Route};
use crate::cutoff::Cutoff;
use crate::error::{Fault, ProxyError};
use crate::limit::Limiter;
use crate::metrics::{status_class, Metrics, RouteMetrics};
use crate::response::ResponseBody;
use crate::retry::{self, Budget};
use crate::route::RouteTable;
use crate::upstream::{self, Upstream, X_REQUEST_ID};

static X_SLUICE_ATTEMPTS: HeaderName = HeaderName::from_static("x-sluice-attempts");
static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
/// How much of a 429 body is read to look for `insufficient_quota`.
const PEEK_LIMIT: usize = 64 * 1024;

/// Everything a request needs, built once per config.
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable<Target>,
    /// Metrics of requests no route matched.
    unrouted: Arc<RouteMetrics>,
    cutoff: Arc<Cutoff>,
    limits: BodyLimits,
}

/// Process-wide state that outlives any one config.
#[derive(Debug, Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Fired when shutdown_grace runs out.
    pub cutoff: Arc<Cutoff>,
}

/// What a route sends to, and its retry budget.
#[derive(Debug)]
struct Target {
    upstream: Arc<Upstream>,
    budget: Arc<Budget>,
    limiter: Option<Arc<Limiter>>,
    metrics: Arc<RouteMetrics>,
}

/// An upstream response on its way to the client.
struct Forwarded {
    res: Response<UpstreamBody>,
    /// Body bytes already read (a peeked 429), sent before the rest.
    head: VecDeque<Bytes>,
}

/// When an attempt was sent (its `first_byte` and TTFB run from here) and
/// when the whole request must be over.
#[derive(Clone, Copy)]
struct Times {
    sent: Instant,
    deadline: Option<Instant>,
}

impl Proxy {
    /// Builds the request path for `config`. With `previous` (a reload), a
    /// route of the same name and settings keeps its retry budget and rate
    /// limiter state, so a reload does not hand out fresh bursts.
    pub fn new(config: &Config, shared: &Shared, previous: Option<&Proxy>) -> Self {
        let metrics = &shared.metrics;
        // One pool per upstream, shared by the routes that use it.
        let upstreams: BTreeMap<&str, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|(name, u)| (name.as_str(), Arc::new(Upstream::new(u.clone()))))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let old = previous.and_then(|p| p.routes.named(&r.name));
                let budget = match old {
                    Some(t) if t.budget.config() == r.retry.budget => t.budget.clone(),
                    _ => Arc::new(Budget::new(r.retry.budget)),
                };
                let limiter = match (old, &r.rate_limit) {
                    (Some(t), Some(l)) if t.limiter.as_ref().is_some_and(|o| o.config() == l) => {
                        t.limiter.clone()
                    }
                    (_, l) => l.as_ref().map(Limiter::new),
                };
                let target = Target {
                    upstream: upstreams[r.upstream.name.as_str()].clone(),
                    budget,
                    limiter,
                    metrics: metrics.route(&r.name, &r.upstream.name),
                };
                (r.clone(), target)
            })
            .collect();
        Self {
            routes: RouteTable::new(routes),
            unrouted: metrics.route("-", "-"),
            cutoff: shared.cutoff.clone(),
            limits: BodyLimits {
                max_request_body: config.server.max_request_body,
                retry_buffer: config.server.retry_buffer,
                read_timeout: config.server.header_read_timeout,
            },
        }
    }

    /// The body limits of this config, for a server that reads bodies itself.
    pub fn body_limits(&self) -> BodyLimits {
        self.limits
    }

    /// Serves one client request. Never fails: errors become responses here.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<ClientBody>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let id = request_id(req.headers());
        let mut log = AccessLog::new(
            id.clone(),
            start.into_std(),
            req.method().clone(),
            req.uri().path(),
        );
        log.metrics = Some(self.unrouted.clone());
        let outcome = if self.cutoff.is_draining() {
            Err(ProxyError::ShuttingDown)
        } else {
            // Still waiting for the upstream when the grace runs out: answer, not a reset.
            let forward = self.forward(req, &id, start, &mut log);
            tokio::select! {
                res = forward => res,
                () = self.cutoff.wait() => Err(ProxyError::ShuttingDown),
            }
        };
        let (attempts, refused) = (log.attempts, log.budget_exhausted);
        let mut res = match outcome {
            Ok(Forwarded { res, head }) => {
                log.status = Some(res.status());
                let route = log.route.clone().expect("a forwarded request has a route");
                let (mut parts, body) = res.into_parts();
                upstream::strip_hop_by_hop(&mut parts.headers);
                // The provider's own id (OpenAI's req_...) is what its support asks for.
                if let Some(theirs) = parts.headers.remove(&X_REQUEST_ID) {
                    log.upstream_request_id = theirs.to_str().ok().map(str::to_owned);
                    parts.headers.insert(X_UPSTREAM_REQUEST_ID.clone(), theirs);
                }
                let sse = is_sse(&parts.headers);
                let deadline = route.timeouts.total.map(|t| start + t);
                let body = ResponseBody::upstream(
                    head,
                    body,
                    sse,
                    route.timeouts.idle,
                    deadline,
                    &self.cutoff,
                    log,
                );
                Response::from_parts(parts, body)
            }
            Err(e) => {
                if e.fault() == Fault::Client {
                    tracing::debug!(parent: log.span.get(), code = e.code(), "rejected: {e}");
                }
                log.status = Some(e.status());
                log.error = Some(e.code());
                e.into_response().map(|b| ResponseBody::full(b, log))
            }
        };
        let h = res.headers_mut();
        h.insert(X_REQUEST_ID.clone(), id);
        if attempts > 1 {
            h.insert(X_SLUICE_ATTEMPTS.clone(), HeaderValue::from(attempts));
        }
        // The SDKs obey this, so their retries do not multiply ours.
        if attempts > 1 || refused {
            h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
        }
        Ok(res)
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        id: &HeaderValue,
        start: Instant,
        log: &mut AccessLog,
    ) -> Result<Forwarded, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path();
        // Dot segments would let "/v1/chat/../files" match one route and
        // reach another path upstream, with the provider key attached.
        if parts.method == Method::CONNECT || !path.starts_with('/') || has_dot_segment(path) {
            return Err(ProxyError::BadRequest);
        }
        let (route, target) = self
            .routes
            .find(&parts.method, parts.uri.path())
            .ok_or(ProxyError::RouteNotFound)?;
        log.route = Some(route.clone());
        target.metrics.in_flight.inc();
        log.metrics = Some(target.metrics.clone());
        let deadline = route.timeouts.total.map(|t| start + t);
        if let Some(limiter) = &target.limiter {
            // Held until the response ends, whichever way it ends.
            log.in_flight = limiter
                .admit(&parts.headers, deadline)
                .await
                .inspect_err(|_| {
                    target.metrics.rate_limited.inc();
                })?;
        }
        // Keep a replay copy only when the route retries.
        let mut limits = self.limits;
        if route.retry.attempts == 1 {
            limits.retry_buffer = 0;
        }
        let expects_continue = parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let body = until(deadline, RequestBody::read(body, limits, expects_continue)).await??;
        upstream::rewrite_request(&mut parts, route, id);
        // One clock read serves the deposit and the first attempt's start.
        let now = Instant::now();
        target.budget.deposit_at(now.into_std());
        let times = Times {
            sent: now,
            deadline,
        };
        self.attempts(route, target, parts, body, times, log).await
    }

    /// Tries the upstream up to `attempts` times. A retry happens only before
    /// anything reached the client; when a limit refuses one, the last
    /// outcome stands.
    async fn attempts(
        &self,
        route: &Route,
        target: &Target,
        parts: Parts,
        body: RequestBody,
        first: Times,
        log: &mut AccessLog,
    ) -> Result<Forwarded, ProxyError> {
        let deadline = first.deadline;
        let policy = &route.retry;
        // A replayable body is shared by every attempt; any other is moved, once.
        // The head is lent to each attempt, never copied for HTTP/1.1.
        let (replay, mut once) = match body {
            RequestBody::Full(b) if policy.attempts > 1 => (Some(b), None),
            body => (None, Some(body)),
        };
        let mut rng = fastrand::Rng::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            log.attempts = attempt;
            let body = match &replay {
                Some(b) => RequestBody::Full(b.clone()),
                None => once
                    .take()
                    .expect("a request that cannot be replayed is sent once"),
            };
            let sent = if attempt == 1 {
                first.sent
            } else {
                Instant::now()
            };
            let times = Times { sent, deadline };
            let outcome = self
                .attempt(route, target, &parts, body, times, &log.span)
                .await;
            let m = &target.metrics;
            let mut ttfb = None;
            match &outcome {
                Ok(res) => {
                    let t = sent.elapsed();
                    ttfb = Some(t);
                    m.ttfb.observe(t.as_secs_f64());
                    m.attempt(status_class(res.status().as_u16()));
                }
                Err(e) => m.attempt(failure_word(*e)),
            }
            let can_retry = replay.is_some() && attempt < policy.attempts;
            let (outcome, hint) = match outcome {
                Ok(res) if can_retry && policy.on_status.contains(&res.status().as_u16()) => {
                    log.ttfb = ttfb;
                    let peeked = if res.status() == StatusCode::TOO_MANY_REQUESTS {
                        let first_byte = sent + route.timeouts.first_byte;
                        Box::pin(peek_quota(
                            res,
                            deadline.map_or(first_byte, |d| d.min(first_byte)),
                        ))
                        .await
                    } else {
                        Ok((
                            Forwarded {
                                res,
                                head: VecDeque::new(),
                            },
                            false,
                        ))
                    };
                    match peeked {
                        Ok((fwd, true)) => return Ok(fwd),
                        Ok((fwd, false)) => {
                            let hint = policy
                                .honor_retry_after
                                .then(|| {
                                    retry::hint(
                                        fwd.res.headers(),
                                        fwd.res.status(),
                                        SystemTime::now(),
                                    )
                                })
                                .flatten();
                            (Ok(fwd), hint)
                        }
                        Err(e) if retryable(e, policy) => (Err(e), None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(res) => {
                    log.ttfb = ttfb;
                    return Ok(Forwarded {
                        res,
                        head: VecDeque::new(),
                    });
                }
                Err(e) if can_retry && retryable(e, policy) => (Err(e), None),
                Err(e) => return Err(e),
            };
            if hint.is_some_and(|h| h > policy.max_retry_after) {
                return outcome;
            }
            let backoff = retry::backoff(
                policy.backoff_base,
                policy.backoff_max,
                attempt - 1,
                &mut rng,
            );
            let wait = backoff.max(hint.unwrap_or(Duration::ZERO));
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return outcome;
            }
            // tokio's clock, as for the deposit (the same clock outside tests).
            if !target.budget.try_withdraw_at(Instant::now().into_std()) {
                log.budget_exhausted = true;
                target.metrics.budget_exhausted.inc();
                return outcome;
            }
            let reason = match &outcome {
                Ok(f) if f.res.status() == StatusCode::TOO_MANY_REQUESTS => "status_429",
                Ok(f) if f.res.status().is_server_error() => "status_5xx",
                Ok(_) => "status_4xx",
                Err(e) => failure_word(*e),
            };
            target.metrics.retry(reason);
            tracing::debug!(parent: log.span.get(), attempt, ?wait, reason, "retrying");
            // The response is dropped unread: it must never reach the client.
            drop(outcome);
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt, bounded by `first_byte` and the total deadline.
    async fn attempt(
        &self,
        route: &Route,
        target: &Target,
        parts: &Parts,
        body: RequestBody,
        Times { sent, deadline }: Times,
        span: &RequestSpan,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let stream = body.stream_state();
        // first_byte runs from the end of the upload: a slow client's large
        // body is not the upstream being late.
        let first_byte = async {
            match &stream {
                Some(s) => {
                    s.uploaded.notified().await;
                    tokio::time::sleep(route.timeouts.first_byte).await;
                }
                None => tokio::time::sleep_until(sent + route.timeouts.first_byte).await,
            }
        };
        let deadline_passes = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = target.upstream.send(parts, body) => res.map_err(|e| {
                // When the client's body broke (too large, cut off), that is the cause.
                stream
                    .as_ref()
                    .and_then(|s| s.failure.get().copied())
                    .unwrap_or_else(|| upstream::classify(&e, &route.upstream.name, span))
            }),
            () = first_byte => Err(ProxyError::UpstreamTimeout),
            () = deadline_passes => Err(ProxyError::DeadlineExceeded),
        }
    }
}

/// Which failures before response headers `retry_on` covers. An untrusted
/// certificate and a client-side problem never get better by retrying.
fn retryable(e: ProxyError, policy: &RetryPolicy) -> bool {
    match e {
        ProxyError::ConnectFailed => policy.on_connect_failure,
        ProxyError::UpstreamReset => policy.on_reset,
        ProxyError::UpstreamTimeout => policy.on_timeout,
        _ => false,
    }
}

/// A failed attempt as a fixed word for metric labels.
fn failure_word(e: ProxyError) -> &'static str {
    match e {
        ProxyError::ConnectFailed => "connect_failure",
        ProxyError::UntrustedCertificate => "tls_untrusted",
        ProxyError::UpstreamReset => "reset",
        ProxyError::UpstreamTimeout => "timeout",
        ProxyError::DeadlineExceeded => "deadline",
        _ => "client_error",
    }
}

/// Reads the start of a 429's body to see whether it is `insufficient_quota`
/// (true: never retry it); what was read is kept so the response can still
/// pass on intact. A body that breaks off is a reset: passed on, it would
/// look complete.
async fn peek_quota(
    res: Response<UpstreamBody>,
    until: Instant,
) -> Result<(Forwarded, bool), ProxyError> {
    let (parts, mut body) = res.into_parts();
    let mut head = VecDeque::new();
    let mut len = 0;
    while len <= PEEK_LIMIT && !body.is_end_stream() {
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
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(HeaderValue::as_bytes);
    let quota = retry::is_insufficient_quota(encoding, &whole);
    Ok((
        Forwarded {
            res: Response::from_parts(parts, body),
            head,
        },
        quota,
    ))
}

/// Runs `f`, bounded by the route's total deadline when it has one.
async fn until<F: Future>(deadline: Option<Instant>, f: F) -> Result<F::Output, ProxyError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f)
            .await
            .map_err(|_| ProxyError::DeadlineExceeded),
        None => Ok(f.await),
    }
}

/// Whether a path has a "." or ".." segment, literal or percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|seg| {
        let (mut dots, mut rest) = (0, seg.as_bytes());
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && rest[2] | 0x20 == b'e'
            {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The client's `x-request-id` when it is sane, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            // A copy, not a slice of hyper's read buffer: the id lives as
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
    use super::has_dot_segment;

    #[test]
    fn dot_segments_are_found_raw_and_encoded() {
        for bad in [
            "/v1/../x",
            "/v1/./x",
            "/..",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/a/%2e/b",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/...",
            "/v1/.well-known",
            "/",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }
}
