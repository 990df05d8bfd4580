//! The request story, one phase per call: identify, route, admit, read the
//! body, prepare the head, then a short loop of attempts, then respond.
//! This is the only module that calls the others.
//!
//! - `build.rs`: per-config state (routes, backends, budgets, limiters);
//! - `ctx.rs`: per-request state, ended once by `RequestCtx::finish`;
//! - `attempts.rs`: the attempt loop, over the retry policy's verdicts;
//! - `exchange.rs`: one attempt (pick a backend, aim, send, judge);
//! - `response.rs`: the response body, which owns the context until the
//!   body ends.

mod account;
mod attempts;
mod build;
mod commit;
mod ctx;
mod exchange;
mod model;
mod response;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, Method, Request, Response};
use tokio::time::Instant;

use build::RouteState;
pub use build::Shared;
use ctx::RequestCtx;
use exchange::{Exchange, Forwarded};
pub use response::ResponseBody;

use crate::backend::{self, X_REQUEST_ID};
use crate::body::{BodyLimits, RequestBody};
use crate::drain;
use crate::error::{Fault, ProxyError};
use crate::metrics::RouteMetrics;
use crate::route::{self, RouteTable};
use crate::server::{ClientBody, Handler, Refusal};

static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Everything a request needs, built once per config (`build.rs`).
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable<Arc<RouteState>>,
    /// Metrics of requests no route matched.
    unrouted: Arc<RouteMetrics>,
    drain: drain::Watch,
    limits: BodyLimits,
    /// Request body bytes held across all requests, and their cap.
    held: Arc<crate::body::HeldBytes>,
    max_held_body: u64,
    /// Each deployment's load, by upstream, address and model.
    loads: std::collections::HashMap<build::LoadKey, Arc<crate::backend::Load>>,
    /// `[rate_limit_store]`, connected in the background.
    store: Option<(crate::config::StoreSettings, Arc<crate::store::Store>)>,
    /// `[telemetry.otlp]` with an endpoint: the sampler and the batcher.
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

/// The server's handler: each request takes the config current when it
/// arrives (one atomic load); in-flight ones finish on theirs.
pub struct Service(pub Arc<ArcSwap<Proxy>>);

impl Handler for Service {
    type Body = ResponseBody;
    /// Boxed: the server keeps a slot of the future's size for as long as
    /// a connection lives, and unboxed that would be held by every open
    /// stream long after its request phase ended.
    type Future = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

    fn call(&self, req: Request<ClientBody>) -> Self::Future {
        Box::pin(self.0.load_full().handle(req))
    }

    fn refuse(&self, why: Refusal) -> Response<ResponseBody> {
        let e = match why {
            Refusal::Malformed => ProxyError::BadRequest,
            Refusal::HeadTooLarge => ProxyError::HeadTooLarge,
        };
        // No method or path could be read: the access line says "-".
        let method = Method::from_bytes(b"-").expect("a token");
        let proxy = self.0.load();
        let ctx = RequestCtx::new(
            &method,
            "-",
            &HeaderMap::new(),
            proxy.unrouted.clone(),
            proxy.telemetry.as_ref(),
        );
        refuse(e, ctx)
    }
}

impl Proxy {
    /// The tracer, when traces are exported.
    pub fn telemetry(&self) -> Option<Arc<crate::telemetry::Telemetry>> {
        self.telemetry.clone()
    }

    /// Serves one client request. Never fails: errors become responses here.
    pub async fn handle(self: Arc<Self>, req: Request<ClientBody>) -> Response<ResponseBody> {
        let unrouted = self.unrouted.clone();
        let mut ctx = RequestCtx::new(
            req.method(),
            req.uri().path(),
            req.headers(),
            unrouted,
            self.telemetry.as_ref(),
        );
        let outcome = if self.drain.is_draining() {
            Err(ProxyError::ShuttingDown)
        } else {
            // Still waiting for the upstream when the grace runs out: answer, not a reset.
            let forward = self.forward(req, &mut ctx);
            tokio::select! {
                res = forward => res,
                () = self.drain.cut() => Err(ProxyError::ShuttingDown),
            }
        };
        match outcome {
            Ok(Answer::Upstream(fwd)) => self.respond(fwd, ctx),
            Ok(Answer::Local(res)) => {
                ctx.status = Some(res.status());
                let mut res = res;
                ctx.response_headers(res.headers_mut());
                res.map(|b| ResponseBody::full(b, ctx))
            }
            Err(e) => refuse(e, ctx),
        }
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        ctx: &mut RequestCtx,
    ) -> Result<Answer, ProxyError> {
        let (mut parts, body) = req.into_parts();
        route::check_request(&parts.method, parts.uri.path())?;
        let (_, state) = self
            .routes
            .find(&parts.method, parts.uri.path())
            .ok_or(ProxyError::RouteNotFound)?;
        ctx.routed(state);
        let total = ctx.deadlines.total;
        if let Some(limiter) = &state.limiter {
            // Held until the response ends, whichever way it ends.
            ctx.permit = limiter
                .admit(&parts.headers, total)
                .await
                .inspect_err(|_| {
                    state.metrics.rate_limited.inc();
                })?;
        }
        let routing = state.route.model_routing.as_ref();
        if routing.is_some_and(|r| r.list_models)
            && model::is_list_models(&parts.method, parts.uri.path(), &state.route.path_prefix)
        {
            return Ok(Answer::Local(model::list_models(&state.backends)));
        }
        // What the body will hold in memory, taken before it is read: a
        // whole body up to retry_buffer (one of unknown length counts as
        // that much), and more later while peeking for a model.
        let mut held = None;
        let limits = self.limits;
        let expected = match http_body::Body::size_hint(&body).exact() {
            Some(n) => n.min(limits.retry_buffer.max(1)),
            None => limits.retry_buffer,
        };
        if !self.held.take(&mut held, expected, self.max_held_body) {
            return Err(ProxyError::Overloaded);
        }
        let mut body = read_body(body, &parts, state, limits, total).await?;
        let mut facts = None;
        let routed = match routing {
            None => {
                if !state.reads.is_empty() {
                    facts = model::facts(&parts, &body, state.reads)?;
                }
                None
            }
            Some(routing) => {
                let (all, max) = (&self.held, self.max_held_body);
                let mut reserve = |n| all.take(&mut held, n, max);
                let target = model::route(
                    &parts,
                    &mut body,
                    routing,
                    &state.backends,
                    self.limits.read_timeout,
                    &mut reserve,
                    state.reads,
                );
                let target = match total {
                    Some(d) => tokio::time::timeout_at(d, target)
                        .await
                        .unwrap_or(Err(ProxyError::DeadlineExceeded)),
                    None => target.await,
                };
                let unnamed = || Arc::<str>::from("-");
                let target = target.map(|(target, read)| {
                    facts = read;
                    target
                });
                match target {
                    Err(e) => {
                        state.metrics.model_request(&unnamed(), "rejected");
                        return Err(e);
                    }
                    Ok(model::Target::Direct { unknown }) => {
                        let result = if unknown { "unknown" } else { "passthrough" };
                        state.metrics.model_request(&unnamed(), result);
                        None
                    }
                    Ok(model::Target::Model(routed)) => {
                        let entry = state.backends.current(&routed.plan);
                        let counter = || state.metrics.model_counter(&entry.name, "routed");
                        entry.routed.get_or_init(counter).inc();
                        ctx.model = Some(Box::new(ctx::ModelCtx {
                            requested: routed.requested.clone(),
                            fallbacks: 0,
                            in_flight: None,
                            first_token: None,
                        }));
                        Some(routed)
                    }
                }
            }
        };
        let deployments_count = routed.is_some() && state.counts_tokens;
        if state.route.token_limit.is_none() && deployments_count {
            let e = crate::config::Estimate::default();
            let estimate = account::Estimated::new(body_len(&parts, &body), facts.as_ref(), &e);
            ctx.tokens.get_or_insert_with(Default::default).estimate = Some(estimate);
        }
        if let Some(limit) = &state.route.token_limit {
            let len = body_len(&parts, &body);
            let estimate = account::Estimated::new(len, facts.as_ref(), &limit.estimate);
            let tokens = ctx.tokens.get_or_insert_with(Default::default);
            tokens.estimate = Some(estimate);
            let limiter = state
                .tokens
                .as_ref()
                .expect("a token limit has its limiter");
            let key = limiter.client_key(&parts.headers);
            let charged = estimate.counted(limit.estimate.count);
            let charge = limiter.admit(key, charged, total).await.inspect_err(|_| {
                state.metrics.rate_limited.inc();
            })?;
            tokens.route = Some(charge);
        }
        // Asked for on the client's behalf: usage of a streamed chat.
        let ask = facts
            .and_then(|f| f.ask)
            .filter(|_| state.route.usage.inject && account::is_chat(parts.uri.path()));
        backend::prepare(&mut parts, ctx.span.id_value());
        // One clock read serves the deposit and the first attempt's start.
        let now = Instant::now();
        state.budget.deposit_at(now.into_std());
        let model_routed = routed.is_some();
        let cost = ctx
            .tokens
            .as_ref()
            .and_then(|t| t.estimate)
            .map_or(0, |e| e.input.saturating_add(e.output));
        let mut exchange = Exchange::new(state, parts, body, ctx, routed, ask);
        exchange.cost = cost;
        let plan = attempts::Plan {
            policy: &state.route.retry,
            budget: &state.budget,
            max: exchange.max,
            first: now,
            total,
        };
        let fwd = attempts::run(&mut exchange, plan).await?;
        let fallbacks = exchange.fallbacks();
        if let Some(m) = &mut ctx.model {
            m.fallbacks = fallbacks;
        }
        // A provider's 401 may name the (masked) key: when every attempt
        // was refused the key sluice sent, the answer is sluice's own.
        if model_routed && all_refused_our_key(ctx, state) {
            return Err(ProxyError::UpstreamAuthFailed);
        }
        Ok(Answer::Upstream(fwd))
    }

    /// Passes an upstream response on: its headers cleaned, ours added, its
    /// body under the request's deadlines.
    fn respond(&self, fwd: Forwarded, mut ctx: RequestCtx) -> Response<ResponseBody> {
        ctx.status = Some(fwd.res.status());
        if let Some(m) = &mut ctx.model {
            m.in_flight = fwd.in_flight;
            m.first_token = fwd.first_token;
        }
        let (mut parts, body) = fwd.res.into_parts();
        backend::strip_hop_by_hop(&mut parts.headers);
        // The provider's own id (OpenAI's req_...) is what its support asks for.
        if let Some(theirs) = parts.headers.remove(&X_REQUEST_ID) {
            ctx.upstream_request_id = theirs.to_str().ok().map(Into::into);
            parts.headers.insert(X_UPSTREAM_REQUEST_ID.clone(), theirs);
        }
        ctx.response_headers(&mut parts.headers);
        let sse = is_sse(&parts.headers);
        let watch = watch(&parts, sse, fwd.injected, &mut ctx);
        let keepalive = sse && ctx.route().is_some_and(|r| r.route.sse_keepalive.is_some());
        if keepalive || watch.as_ref().is_some_and(|w| w.strips()) {
            // Bytes are added or removed: the upstream's length no longer holds.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = ResponseBody::upstream(fwd.head, body, sse, &self.drain, ctx, watch);
        Response::from_parts(parts, body)
    }
}

/// What reads a 2xx's usage as it passes, on a route that observes it: an
/// event stream or a JSON body in identity encoding.
fn watch(
    parts: &http::response::Parts,
    sse: bool,
    injected: bool,
    ctx: &mut RequestCtx,
) -> Option<Box<response::Watch>> {
    // The chunk sluice asked for is removed whether or not usage is read.
    let strip = injected && sse;
    let observe = ctx.route().is_some_and(|r| r.route.usage.observe);
    if !parts.status.is_success() || !(observe || strip) {
        return None;
    }
    let framing = if sse {
        crate::usage::Framing::Sse
    } else if model::is_json(&parts.headers) {
        crate::usage::Framing::Json
    } else {
        return None;
    };
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        if observe {
            ctx.watched = account::Watched::Compressed;
        }
        return None;
    }
    if observe {
        ctx.watched = account::Watched::Yes;
    }
    Some(response::Watch::new(framing, strip))
}

/// The request body's length: declared, or what is held of it.
fn body_len(parts: &Parts, body: &RequestBody) -> u64 {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    declared.unwrap_or_else(|| body.held().iter().map(|b| b.len() as u64).sum())
}

/// What a request gets: an upstream's response, or one sluice wrote.
enum Answer {
    Upstream(Forwarded),
    Local(Response<bytes::Bytes>),
}

/// Whether every attempt got 401/403 for a key sluice injected.
fn all_refused_our_key(ctx: &RequestCtx, state: &RouteState) -> bool {
    ctx.trail.steps().all(|s| {
        let refused = matches!(s.result, Ok(st) if st == 401 || st == 403);
        refused && state.backends.get(s.backend).upstream.key.is_some()
    })
}

/// sluice's own answer, in the route's dialect.
fn refuse(e: ProxyError, mut ctx: RequestCtx) -> Response<ResponseBody> {
    if e.fault() == Fault::Client {
        tracing::debug!(parent: ctx.span.get(), code = e.code(), "rejected: {e}");
    }
    ctx.status = Some(e.status());
    ctx.error = Some(e.code());
    let mut res = e.into_response(ctx.provider());
    ctx.response_headers(res.headers_mut());
    res.map(|b| ResponseBody::full(b, ctx))
}

/// Reads the client's body within the total deadline; a replay copy is
/// kept only when the route retries.
async fn read_body(
    body: ClientBody,
    parts: &Parts,
    state: &RouteState,
    mut limits: BodyLimits,
    total: Option<Instant>,
) -> Result<RequestBody, ProxyError> {
    // A body read for its fields is held whole when it fits.
    if state.route.retry.attempts == 1 && state.reads.is_empty() {
        limits.retry_buffer = 0;
    }
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let read = RequestBody::read(body, limits, expects_continue);
    match total {
        Some(d) => tokio::time::timeout_at(d, read)
            .await
            .map_err(|_| ProxyError::DeadlineExceeded)?,
        None => read.await,
    }
}

pub(super) fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}
