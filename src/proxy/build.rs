//! Per-config state, built once per config (at start and on each reload):
//! the route table, each route's backends, retry budget, limiter and metric
//! handles.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Proxy;
use crate::backend::{Backend, Backends, Capacity, Health, Load, ModelEntry};
use crate::body::BodyLimits;
use crate::config::{Config, Deployment, Dialect, Route, Upstream};
use crate::drain;
use crate::limit::Limiter;
use crate::metrics::{Metrics, RouteMetrics};
use crate::provider::{Provider, ANTHROPIC, OPENAI};
use crate::retry::Budget;
use crate::route::RouteTable;
use crate::scan::Fields;
use crate::tokens::TokenLimiter;

/// Process-wide state that outlives any one config.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub drain: drain::Watch,
    /// Request body bytes held across all requests.
    pub held: Arc<crate::body::HeldBytes>,
}

/// What a route sends to and what it keeps between requests.
#[derive(Debug)]
pub struct RouteState {
    pub route: Arc<Route>,
    /// Where attempts go: the route's upstream, or its models' deployments.
    pub backends: Backends,
    pub budget: Arc<Budget>,
    pub limiter: Option<Arc<Limiter>>,
    /// `[routes.token_limit]`'s buckets.
    pub tokens: Option<Arc<TokenLimiter>>,
    /// The body fields read for tokens (none: the body is not read for them).
    pub reads: Fields,
    /// A deployment has `tpm`: requests need an estimate.
    pub counts_tokens: bool,
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
        // The shared store: kept across a reload while its settings stay.
        let store = config.rate_limit_store.as_ref().map(|settings| {
            let kept = previous
                .and_then(|p| p.store.as_ref())
                .filter(|(s, _)| s == settings)
                .map(|(_, store)| store.clone());
            let store = kept.unwrap_or_else(|| {
                crate::store::Store::start(&settings.store_config(), metrics.store())
            });
            (settings.clone(), store)
        });
        // Traces: the exporter is kept while its settings stay.
        let telemetry = config.telemetry.as_ref().and_then(|settings| {
            let kept = previous
                .and_then(|p| p.telemetry.as_ref())
                .filter(|t| t.settings() == settings);
            match kept {
                Some(t) => Some(t.clone()),
                None => crate::telemetry::Telemetry::start(settings, metrics.clone()),
            }
        });
        // Kept with the same settings: a shared limiter of an unchanged
        // route is kept too (its in-flight slots and local share with it).
        let store_kept = match (&store, previous.and_then(|p| p.store.as_ref())) {
            (Some((_, now)), Some((_, before))) => Arc::ptr_eq(now, before),
            _ => false,
        };
        // One pool per upstream, shared by the routes that use it, and
        // whether it refused `stream_options` (until the next reload).
        let pools: BTreeMap<&str, _> = config
            .upstreams
            .iter()
            .map(|(name, u)| (name.as_str(), (Backend::pool(u), Arc::default())))
            .collect();
        // A deployment's load is shared by the routes that reach it, and
        // kept across a reload while its upstream and model stay the same.
        let old_loads = previous.map(|p| &p.loads);
        let mut loads = HashMap::new();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let old = previous.and_then(|p| p.routes.named(&r.name));
                let budget = match old {
                    Some(s) if s.budget.config() == r.retry.budget => s.budget.clone(),
                    _ => Arc::new(Budget::new(r.retry.budget)),
                };
                let link = |shared: bool| {
                    let (settings, store) = store.as_ref().filter(|_| shared)?;
                    Some(crate::limit::StoreLink {
                        store: store.clone(),
                        name: r.name.clone(),
                        settings: settings.clone(),
                    })
                };
                let limiter = match (old, &r.rate_limit) {
                    // A shared limiter is kept only with its store.
                    (Some(s), Some(l))
                        if (!l.shared || store_kept)
                            && s.limiter.as_ref().is_some_and(|o| o.config() == l) =>
                    {
                        s.limiter.clone()
                    }
                    (_, l) => l.as_ref().map(|l| Limiter::sharing(l, link(l.shared))),
                };
                let tokens = match (old, &r.token_limit) {
                    (Some(s), Some(l))
                        if (!l.shared || store_kept)
                            && s.tokens.as_ref().is_some_and(|o| o.config() == l) =>
                    {
                        s.tokens.clone()
                    }
                    (_, l) => l.as_ref().map(|l| TokenLimiter::sharing(l, link(l.shared))),
                };
                // A deployment also times the first token, labelled with
                // its model ("-" for the body's own).
                let backend = |up: &Arc<Upstream>, deployment: Option<Option<&str>>| {
                    let mut m = metrics.backend(&r.name, &up.name);
                    if let Some(model) = deployment {
                        m = m.time_first_token(model.unwrap_or("-"));
                    }
                    let (pool, refuses_usage) = &pools[up.name.as_str()];
                    Backend::new(
                        up.clone(),
                        pool.clone(),
                        refuses_usage,
                        provider(up.dialect),
                        m,
                    )
                };
                let backends = match &r.model_routing {
                    None => {
                        let up = r.upstream.as_ref().expect("a plain route has an upstream");
                        Backends::new(vec![Arc::new(backend(up, None))])
                    }
                    Some(routing) => {
                        let mut list = Vec::new();
                        let direct = r.upstream.as_ref().map(|up| {
                            list.push(Arc::new(backend(up, None)));
                            0
                        });
                        // The allowed models, then the fallbacks they name.
                        let mut names: Vec<&str> =
                            routing.models.iter().map(String::as_str).collect();
                        let mut i = 0;
                        while i < names.len() {
                            for f in &config.models[names[i]].fallbacks {
                                if !names.contains(&f.as_str()) {
                                    names.push(f);
                                }
                            }
                            i += 1;
                        }
                        let mut entries: Vec<ModelEntry> = names
                            .iter()
                            .enumerate()
                            .map(|(i, name)| {
                                let model = config.models[*name].clone();
                                let backends = model
                                    .deployments
                                    .iter()
                                    .map(|d| {
                                        let load =
                                            deployment_load(d, old_loads, &mut loads, metrics);
                                        list.push(Arc::new(
                                            backend(&d.upstream, Some(d.model.as_deref()))
                                                .deployment(d, load),
                                        ));
                                        list.len() - 1
                                    })
                                    .collect();
                                ModelEntry {
                                    name: model.name.as_str().into(),
                                    routed: Default::default(),
                                    model,
                                    allowed: i < routing.models.len(),
                                    backends,
                                    chain: Vec::new(),
                                }
                            })
                            .collect();
                        for (e, entry) in entries.iter_mut().enumerate() {
                            let fallbacks = entry.model.fallbacks.iter().map(|f| {
                                names
                                    .iter()
                                    .position(|n| n == f)
                                    .expect("a fallback was added")
                            });
                            entry.chain = std::iter::once(e).chain(fallbacks).collect();
                        }
                        Backends::models(list, direct, entries)
                    }
                };
                let tpm = backends.as_slice().iter().any(|b| b.load.counts_tokens());
                let reads = if r.usage.inject || r.token_limit.is_some() || tpm {
                    super::account::FIELDS
                } else {
                    Fields::empty()
                };
                let state = RouteState {
                    route: r.clone(),
                    backends,
                    budget,
                    limiter,
                    tokens,
                    reads,
                    counts_tokens: tpm,
                    metrics: metrics.route(&r.name),
                    provider: provider(r.dialect),
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
            loads,
            store,
            telemetry,
            held: shared.held.clone(),
            max_held_body: config.server.max_held_body,
        }
    }
}

/// What identifies a deployment across reloads: the upstream's name and
/// address, and the model it is sent.
pub type LoadKey = (String, String, Option<String>);

/// A deployment's load and health: the one another route built already,
/// or the previous config's while the deployment and its health settings
/// stay the same, or a new one.
fn deployment_load(
    d: &Deployment,
    old: Option<&HashMap<LoadKey, Arc<Load>>>,
    loads: &mut HashMap<LoadKey, Arc<Load>>,
    metrics: &Arc<Metrics>,
) -> Arc<Load> {
    let key = load_key(&d.upstream, d.model.as_deref());
    let kept = old
        .and_then(|o| o.get(&key))
        .filter(|l| l.health.as_ref().map(Health::config) == Some(&d.upstream.health))
        .filter(|l| l.same_capacity(d.rpm, d.tpm, d.max_concurrent));
    let kept = kept.cloned();
    loads
        .entry(key)
        .or_insert_with(|| {
            kept.unwrap_or_else(|| {
                let (up, model) = (&d.upstream.name, d.model.as_deref());
                Arc::new(Load::new(
                    metrics.deployment_in_flight(up, model),
                    Health::new(d.upstream.health.clone()),
                    metrics.deployment(up, model),
                    Capacity::new(d.rpm, d.tpm, d.max_concurrent),
                ))
            })
        })
        .clone()
}

fn load_key(up: &Upstream, model: Option<&str>) -> LoadKey {
    let addr = format!("{}://{}{}", up.scheme, up.authority, up.base_path);
    (up.name.clone(), addr, model.map(str::to_owned))
}

fn provider(d: Dialect) -> &'static dyn Provider {
    match d {
        Dialect::OpenAi => &OPENAI,
        Dialect::Anthropic => &ANTHROPIC,
    }
}
