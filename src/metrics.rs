//! The metric families (prometheus-client), registered once per process.
//! Labels stay bounded: route and upstream names from the config, status
//! codes, and fixed reason words; never a path, a model or a client key.
//! Per-route and per-backend handles are built at config load, so a request
//! records its metrics without building label sets for the fixed labels.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Seconds, from 5 ms to 10 min: LLM calls range from cached embeddings to long reasoning streams.
const LATENCY_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    route: Arc<String>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: Arc<String>,
    upstream: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: Arc<String>,
    upstream: Arc<String>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: Arc<String>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    route: Arc<String>,
    /// A `[models]` name, or "-" for one the client made up.
    model: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    route: Arc<String>,
    from_model: Arc<str>,
    to_model: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TtftLabels {
    route: Arc<String>,
    upstream: Arc<String>,
    /// The deployment's model, or "-" for the body's as sent.
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    route: Arc<String>,
    upstream: Arc<String>,
    /// The deployment's model, or "-" for the body's as sent.
    model: Arc<str>,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MissingLabels {
    route: Arc<String>,
    upstream: Arc<String>,
    reason: &'static str,
}

/// Reported input tokens over the estimate: a tenth to ten times.
const RATIO_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0,
];

fn ratio() -> Histogram {
    Histogram::new(RATIO_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    upstream: Arc<str>,
    /// The model sent upstream, or "-" for the body's as sent.
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentStateLabels {
    upstream: Arc<str>,
    model: Arc<str>,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    upstream: Arc<str>,
    model: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// Seconds, from 100 µs to 250 ms: a store call on loopback or in a zone.
const STORE_BUCKETS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

fn store_latency() -> Histogram {
    Histogram::new(STORE_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Declares the families, each with its name and help, and registers them
/// all in one `Default`.
macro_rules! families {
    ($($field:ident: $ty:ty = $make:expr, $name:literal, $help:literal;)*) => {
        /// Every family SPEC §6 and §12 name.
        #[derive(Debug)]
        pub struct Metrics {
            registry: Registry,
            /// Read into `held_bytes` when the metrics are scraped.
            held: OnceLock<Arc<crate::body::HeldBytes>>,
            $($field: $ty,)*
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut registry = Registry::with_prefix("sluice");
                $(
                    let $field: $ty = $make;
                    registry.register($name, $help, $field.clone());
                )*
                Self { registry, held: OnceLock::new(), $($field,)* }
            }
        }
    };
}

families! {
    requests: Family<StatusLabels, Counter> = Family::default(),
        "requests", "Requests answered, by route and status";
    duration: Family<RouteLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency),
        "request_duration_seconds", "Whole request, until the body ended";
    ttfb: Family<UpstreamLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency),
        "upstream_ttfb_seconds", "Attempt sent to response headers";
    attempts: Family<OutcomeLabels, Counter> = Family::default(),
        "upstream_attempts", "Upstream attempts by outcome";
    retries: Family<ReasonLabels, Counter> = Family::default(),
        "retries", "Retries by reason";
    budget_exhausted: Family<RouteLabel, Counter> = Family::default(),
        "retry_budget_exhausted", "Retries the budget refused";
    rate_limited: Family<RouteLabel, Counter> = Family::default(),
        "rate_limited", "Requests refused by a rate limit or in-flight cap";
    in_flight: Family<RouteLabel, Gauge> = Family::default(),
        "in_flight_requests", "Requests in flight, streams until they end";
    stream_aborts: Family<ReasonLabels, Counter> = Family::default(),
        "stream_aborts", "Responses cut after their headers, by reason";
    reloads: Family<ResultLabel, Counter> = Family::default(),
        "config_reloads", "Config reloads by result";
    model_requests: Family<ModelLabels, Counter> = Family::default(),
        "model_requests", "Requests on model-routed routes, by model and what became of them";
    fallbacks: Family<FallbackLabels, Counter> = Family::default(),
        "fallbacks", "Moves down a fallback chain, by the outcome that caused them";
    deployment_in_flight: Family<DeploymentLabels, Gauge> = Family::default(),
        "deployment_in_flight", "Requests in flight at each deployment, streams until they end";
    deployment_state: Family<DeploymentStateLabels, Gauge> = Family::default(),
        "deployment_state", "1 for the state each deployment is in (healthy, ejected, half_open, saturated)";
    deployment_ejections: Family<EjectionLabels, Counter> = Family::default(),
        "deployment_ejections", "Deployments taken out of rotation, by reason";
    ttft: Family<TtftLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency),
        "upstream_ttft_seconds", "A deployment's event streams: attempt sent to the first body bytes";
    tokens: Family<TokenLabels, Counter> = Family::default(),
        "tokens", "Tokens the upstreams reported, by type: input, output, cached_input, reasoning";
    usage_missing: Family<MissingLabels, Counter> = Family::default(),
        "usage_missing", "Successful responses that reported no usage, by reason";
    estimate_ratio: Family<RouteLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(ratio),
        "token_estimate_ratio", "Reported input tokens over sluice's estimate, on token-limited routes";
    usage_injected: Family<UpstreamLabels, Counter> = Family::default(),
        "usage_injected", "Streamed requests sent with stream_options.include_usage added by sluice";
    store_requests: Family<StoreLabels, Counter> = Family::default(),
        "rate_limit_store_requests", "Calls to the shared limit store, by op and result (ok, refused, timeout, unavailable, error)";
    store_duration: Family<OpLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(store_latency),
        "rate_limit_store_duration_seconds", "Calls to the shared limit store that reached Redis, by op (charge, settle)";
    store_degraded: Gauge = Gauge::default(),
        "rate_limit_degraded", "1 while the shared limit store gives no verdict (on_error decides meanwhile)";
    held_bytes: Gauge = Gauge::default(),
        "request_body_held_bytes", "Request body bytes held in memory across all requests";
    trace_exports: Family<ResultLabel, Counter> = Family::default(),
        "trace_exports", "Span batches posted to the OTLP collector, by result (ok, error)";
}

impl Metrics {
    /// The Prometheus (OpenMetrics) text.
    pub fn encode(&self) -> String {
        if let Some(held) = self.held.get() {
            self.held_bytes
                .set(i64::try_from(held.now()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Shows `held` as `sluice_request_body_held_bytes`, read at each
    /// scrape (the requests that hold bytes never touch the gauge).
    pub fn watch_held(&self, held: Arc<crate::body::HeldBytes>) {
        let _ = self.held.set(held);
    }

    /// Counts a reload: `ok` or `error`.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Handles for one route (or for requests no route matched, as `-`).
    pub fn route(self: &Arc<Self>, route: &str) -> RouteMetrics {
        let route = Arc::new(route.to_owned());
        let label = RouteLabel {
            route: route.clone(),
        };
        RouteMetrics {
            ok_request: OnceLock::new(),
            duration: self.duration.get_or_create(&label).clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&label).clone(),
            rate_limited: self.rate_limited.get_or_create(&label).clone(),
            estimate_ratio: OnceLock::new(),
            route,
            all: self.clone(),
        }
    }

    /// Traces are exported: both results show, at 0, from the start.
    pub fn trace_exports_start(&self) {
        for result in ["ok", "error"] {
            let _ = self.trace_exports.get_or_create(&ResultLabel { result });
        }
    }

    /// Counts a span batch posted to the collector: `ok` or `error`.
    pub fn trace_export(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.trace_exports
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The shared store's handles.
    pub fn store(self: &Arc<Self>) -> StoreMeters {
        StoreMeters { all: self.clone() }
    }

    /// A deployment's in-flight gauge.
    pub fn deployment_in_flight(&self, upstream: &str, model: Option<&str>) -> Gauge {
        let labels = DeploymentLabels {
            upstream: upstream.into(),
            model: model.unwrap_or("-").into(),
        };
        self.deployment_in_flight.get_or_create(&labels).clone()
    }

    /// A deployment's state gauges and ejection counter.
    pub fn deployment(self: &Arc<Self>, upstream: &str, model: Option<&str>) -> DeploymentMeters {
        DeploymentMeters {
            upstream: upstream.into(),
            model: model.unwrap_or("-").into(),
            all: self.clone(),
        }
    }

    /// Handles for one of a route's backends.
    pub fn backend(self: &Arc<Self>, route: &str, upstream: &str) -> BackendMetrics {
        let labels = UpstreamLabels {
            route: Arc::new(route.to_owned()),
            upstream: Arc::new(upstream.to_owned()),
        };
        BackendMetrics {
            ok_attempt: OnceLock::new(),
            ttfb: self.ttfb.get_or_create(&labels).clone(),
            ttft: None,
            model: Arc::from("-"),
            tokens: OnceLock::new(),
            labels,
            all: self.clone(),
        }
    }
}

/// One route's metric handles.
#[derive(Debug)]
pub struct RouteMetrics {
    route: Arc<String>,
    all: Arc<Metrics>,
    /// The series of the common status (200), kept once looked up: a Family
    /// lookup takes a lock and hashes the labels. Not made up front, so a
    /// series appears only once it has counted.
    ok_request: OnceLock<Counter>,
    pub duration: Histogram,
    pub in_flight: Gauge,
    pub budget_exhausted: Counter,
    pub rate_limited: Counter,
    estimate_ratio: OnceLock<Histogram>,
}

impl RouteMetrics {
    pub fn request(&self, status: u16) {
        let series = || {
            let labels = StatusLabels {
                route: self.route.clone(),
                status,
            };
            self.all.requests.get_or_create(&labels).clone()
        };
        if status == 200 {
            self.ok_request.get_or_init(series).inc();
        } else {
            series().inc();
        }
    }

    pub fn retry(&self, reason: &'static str) {
        let labels = ReasonLabels {
            route: self.route.clone(),
            reason,
        };
        self.all.retries.get_or_create(&labels).inc();
    }

    /// A model-routed request: `routed`, `passthrough`, `unknown` or
    /// `rejected`; `model` is a config name or "-".
    pub fn model_request(&self, model: &Arc<str>, result: &'static str) {
        self.model_counter(model, result).inc();
    }

    /// The series of [`RouteMetrics::model_request`], to keep.
    pub fn model_counter(&self, model: &Arc<str>, result: &'static str) -> Counter {
        let labels = ModelLabels {
            route: self.route.clone(),
            model: model.clone(),
            result,
        };
        self.all.model_requests.get_or_create(&labels).clone()
    }

    pub fn fallback(&self, from: &Arc<str>, to: &Arc<str>, reason: &'static str) {
        let labels = FallbackLabels {
            route: self.route.clone(),
            from_model: from.clone(),
            to_model: to.clone(),
            reason,
        };
        self.all.fallbacks.get_or_create(&labels).inc();
    }

    /// Reported input tokens over the estimate.
    pub fn estimate_ratio(&self, ratio: f64) {
        let series = || {
            let label = RouteLabel {
                route: self.route.clone(),
            };
            self.all.estimate_ratio.get_or_create(&label).clone()
        };
        self.estimate_ratio.get_or_init(series).observe(ratio);
    }

    pub fn stream_abort(&self, reason: &'static str) {
        let labels = ReasonLabels {
            route: self.route.clone(),
            reason,
        };
        self.all.stream_aborts.get_or_create(&labels).inc();
    }
}

/// One backend's metric handles, labelled `{route, upstream}`.
#[derive(Debug)]
pub struct BackendMetrics {
    labels: UpstreamLabels,
    all: Arc<Metrics>,
    /// The series of the common outcome (2xx), kept once looked up.
    ok_attempt: OnceLock<Counter>,
    pub ttfb: Histogram,
    /// Time to the first token, kept for deployments (not a route's own upstream).
    pub ttft: Option<Histogram>,
    /// The deployment's model as labels name it ("-": the body's).
    model: Arc<str>,
    /// `sluice_tokens_total` by type, once something was counted.
    tokens: OnceLock<[Counter; 4]>,
}

impl BackendMetrics {
    /// Times this backend's event streams to their first bytes, labelled
    /// with `model` (the deployment's, or "-").
    pub fn time_first_token(mut self, model: &str) -> Self {
        let labels = TtftLabels {
            route: self.labels.route.clone(),
            upstream: self.labels.upstream.clone(),
            model: model.into(),
        };
        self.ttft = Some(self.all.ttft.get_or_create(&labels).clone());
        self.model = labels.model;
        self
    }

    /// Counts one response's tokens.
    pub fn tokens(&self, u: &crate::usage::Usage) {
        let series = || {
            ["input", "output", "cached_input", "reasoning"].map(|r#type| {
                let labels = TokenLabels {
                    route: self.labels.route.clone(),
                    upstream: self.labels.upstream.clone(),
                    model: self.model.clone(),
                    r#type,
                };
                self.all.tokens.get_or_create(&labels).clone()
            })
        };
        let [input, output, cached, reasoning] = self.tokens.get_or_init(series);
        input.inc_by(u.input);
        output.inc_by(u.output);
        if u.cached > 0 {
            cached.inc_by(u.cached);
        }
        if u.reasoning > 0 {
            reasoning.inc_by(u.reasoning);
        }
    }

    /// A successful response without usage: `not_reported`, `cut` or `compressed`.
    pub fn usage_missing(&self, reason: &'static str) {
        let labels = MissingLabels {
            route: self.labels.route.clone(),
            upstream: self.labels.upstream.clone(),
            reason,
        };
        self.all.usage_missing.get_or_create(&labels).inc();
    }

    /// A request sent with `include_usage` sluice added.
    pub fn usage_injected(&self) {
        self.all.usage_injected.get_or_create(&self.labels).inc();
    }

    /// `outcome`: "2xx".."5xx" or a failure word.
    pub fn attempt(&self, outcome: &'static str) {
        let series = || {
            let labels = OutcomeLabels {
                route: self.labels.route.clone(),
                upstream: self.labels.upstream.clone(),
                outcome,
            };
            self.all.attempts.get_or_create(&labels).clone()
        };
        if outcome == "2xx" {
            self.ok_attempt.get_or_init(series).inc();
        } else {
            series().inc();
        }
    }
}

/// One deployment's health metrics.
#[derive(Debug)]
pub struct DeploymentMeters {
    upstream: Arc<str>,
    model: Arc<str>,
    all: Arc<Metrics>,
}

impl DeploymentMeters {
    /// Sets the state gauges: 1 for `state`, 0 for the others.
    pub fn show(&self, state: crate::backend::DeploymentState) {
        for s in ["healthy", "ejected", "half_open", "saturated"] {
            let labels = DeploymentStateLabels {
                upstream: self.upstream.clone(),
                model: self.model.clone(),
                state: s,
            };
            let on = i64::from(s == state.as_str());
            self.all.deployment_state.get_or_create(&labels).set(on);
        }
    }

    pub fn ejected(&self, reason: &'static str) {
        let labels = EjectionLabels {
            upstream: self.upstream.clone(),
            model: self.model.clone(),
            reason,
        };
        self.all.deployment_ejections.get_or_create(&labels).inc();
    }
}

/// The shared limit store's metrics.
#[derive(Debug, Clone)]
pub struct StoreMeters {
    all: Arc<Metrics>,
}

impl StoreMeters {
    /// Counts one call by its result (ok, refused, timeout, unavailable, error).
    pub fn count(&self, op: &'static str, result: &'static str) {
        let labels = StoreLabels { op, result };
        self.all.store_requests.get_or_create(&labels).inc();
    }

    /// Times one call that reached the connection.
    pub fn time(&self, op: &'static str, took: std::time::Duration) {
        let labels = OpLabel { op };
        let h = self.all.store_duration.get_or_create(&labels);
        h.observe(took.as_secs_f64());
    }

    /// 1 while the store gives no verdict (and `on_error` decides).
    pub fn degraded(&self, degraded: bool) {
        self.all.store_degraded.set(i64::from(degraded));
    }
}
