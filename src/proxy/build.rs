//! Per-config state, built once per config (at start and on each reload):
//! the route table, each route's backends, retry budget, limiter and metric
//! handles.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Proxy;
use crate::backend::{Backend, Backends};
use crate::body::BodyLimits;
use crate::config::{Config, Route};
use crate::drain;
use crate::limit::Limiter;
use crate::metrics::{Metrics, RouteMetrics};
use crate::provider::{Provider, OPENAI};
use crate::retry::Budget;
use crate::route::RouteTable;

/// Process-wide state that outlives any one config.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub drain: drain::Watch,
}

/// What a route sends to and what it keeps between requests.
#[derive(Debug)]
pub struct RouteState {
    pub route: Arc<Route>,
    /// Where attempts go (today: exactly one).
    pub backends: Backends,
    pub budget: Arc<Budget>,
    pub limiter: Option<Arc<Limiter>>,
    pub metrics: RouteMetrics,
    /// The dialect of the errors sluice answers on this route.
    pub provider: &'static dyn Provider,
}

impl Proxy {
    /// Builds the request path for `config`. With `previous` (a reload), a
    /// route of the same name and settings keeps its retry budget and rate
    /// limiter state, so a reload does not hand out fresh bursts.
    pub fn new(config: &Config, shared: &Shared, previous: Option<&Proxy>) -> Self {
        let metrics = &shared.metrics;
        // One pool per upstream, shared by the routes that use it.
        let pools: BTreeMap<&str, _> = config
            .upstreams
            .iter()
            .map(|(name, u)| (name.as_str(), Backend::pool(u)))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let old = previous.and_then(|p| p.routes.named(&r.name));
                let budget = match old {
                    Some(s) if s.budget.config() == r.retry.budget => s.budget.clone(),
                    _ => Arc::new(Budget::new(r.retry.budget)),
                };
                let limiter = match (old, &r.rate_limit) {
                    (Some(s), Some(l)) if s.limiter.as_ref().is_some_and(|o| o.config() == l) => {
                        s.limiter.clone()
                    }
                    (_, l) => l.as_ref().map(Limiter::new),
                };
                let up = &r.upstream;
                let backend = Backend::new(
                    up.clone(),
                    pools[up.name.as_str()].clone(),
                    &OPENAI,
                    metrics.backend(&r.name, &up.name),
                );
                let state = RouteState {
                    route: r.clone(),
                    backends: Backends::new(vec![Arc::new(backend)]),
                    budget,
                    limiter,
                    metrics: metrics.route(&r.name),
                    provider: &OPENAI,
                };
                (r.clone(), Arc::new(state))
            })
            .collect();
        Self {
            routes: RouteTable::new(routes),
            unrouted: Arc::new(metrics.route("-")),
            drain: shared.drain.clone(),
            limits: BodyLimits {
                max_request_body: config.server.max_request_body,
                retry_buffer: config.server.retry_buffer,
                read_timeout: config.server.header_read_timeout,
            },
        }
    }
}
