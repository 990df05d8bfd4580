//! The metric families (prometheus-client), registered once per process.
//! Labels stay bounded: route and upstream names from the config, status
//! codes, and fixed reason words; never a path, a model or a client key.
//! Per-route handles are built at config load, so a request records its
//! metrics without building label sets for the fixed labels.

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
struct ResultLabel {
    result: &'static str,
}

/// Every family SPEC §6 names.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabels, Counter>,
    duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    ttfb: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    attempts: Family<OutcomeLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Family<RouteLabel, Counter>,
    rate_limited: Family<RouteLabel, Counter>,
    in_flight: Family<RouteLabel, Gauge>,
    stream_aborts: Family<ReasonLabels, Counter>,
    reloads: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("sluice"),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            ttfb: Family::new_with_constructor(latency),
            attempts: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            rate_limited: Family::default(),
            in_flight: Family::default(),
            stream_aborts: Family::default(),
            reloads: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests answered, by route and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Whole request, until the body ended",
            m.duration.clone(),
        );
        r.register(
            "upstream_ttfb_seconds",
            "Attempt sent to response headers",
            m.ttfb.clone(),
        );
        r.register(
            "upstream_attempts",
            "Upstream attempts by outcome",
            m.attempts.clone(),
        );
        r.register("retries", "Retries by reason", m.retries.clone());
        r.register(
            "retry_budget_exhausted",
            "Retries the budget refused",
            m.budget_exhausted.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a rate limit or in-flight cap",
            m.rate_limited.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests in flight, streams until they end",
            m.in_flight.clone(),
        );
        r.register(
            "stream_aborts",
            "Responses cut after their headers, by reason",
            m.stream_aborts.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        m
    }
}

impl Metrics {
    /// The Prometheus (OpenMetrics) text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a reload: `ok` or `error`.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Handles for one route (or for requests no route matched, as `-`).
    pub fn route(self: &Arc<Self>, route: &str, upstream: &str) -> Arc<RouteMetrics> {
        let (route, upstream) = (Arc::new(route.to_owned()), Arc::new(upstream.to_owned()));
        let label = RouteLabel {
            route: route.clone(),
        };
        Arc::new(RouteMetrics {
            ok_request: OnceLock::new(),
            ok_attempt: OnceLock::new(),
            duration: self.duration.get_or_create(&label).clone(),
            ttfb: self
                .ttfb
                .get_or_create(&UpstreamLabels {
                    route: route.clone(),
                    upstream: upstream.clone(),
                })
                .clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&label).clone(),
            rate_limited: self.rate_limited.get_or_create(&label).clone(),
            route,
            upstream,
            all: self.clone(),
        })
    }
}

/// One route's metric handles.
#[derive(Debug)]
pub struct RouteMetrics {
    route: Arc<String>,
    upstream: Arc<String>,
    all: Arc<Metrics>,
    /// The series of the common outcome (status 200, attempt 2xx), kept
    /// once looked up: a Family lookup takes a lock and hashes the labels.
    /// Not made up front, so a series appears only once it has counted.
    ok_request: OnceLock<Counter>,
    ok_attempt: OnceLock<Counter>,
    pub duration: Histogram,
    pub ttfb: Histogram,
    pub in_flight: Gauge,
    pub budget_exhausted: Counter,
    pub rate_limited: Counter,
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

    /// `outcome`: "2xx".."5xx" or a failure code.
    pub fn attempt(&self, outcome: &'static str) {
        let series = || {
            let labels = OutcomeLabels {
                route: self.route.clone(),
                upstream: self.upstream.clone(),
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

    pub fn retry(&self, reason: &'static str) {
        let labels = ReasonLabels {
            route: self.route.clone(),
            reason,
        };
        self.all.retries.get_or_create(&labels).inc();
    }

    pub fn stream_abort(&self, reason: &'static str) {
        let labels = ReasonLabels {
            route: self.route.clone(),
            reason,
        };
        self.all.stream_aborts.get_or_create(&labels).inc();
    }
}

/// A status code's class as a fixed word.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
