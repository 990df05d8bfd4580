//! Configuration in two stages, as ripgrep parses flags: `raw` is the TOML as
//! written (serde, defaults, unknown keys rejected), `resolve` checks it and
//! produces these types, ready for the data path (socket addresses, URIs,
//! precomputed header values, loaded TLS material).

mod error;
mod raw;
mod resolve;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_path_to_error::Segment;
use toml::de::{DeTable, DeValue};

pub use error::{ConfigErrors, Problem};
pub use raw::{
    AuthScheme, AzureApi, Balance, Commit, Inject, LogFormat, OnAllEjected, OnStoreError, Preset,
    RateLimitPer, RetryOn, TokenCount, UnknownModel,
};
pub use tls::provider as tls_provider;

/// A checked configuration.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub log: Log,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// In file order; the first match wins.
    pub routes: Vec<Arc<Route>>,
    /// `[models]`: the names clients send, by name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// `[rate_limit_store]`, when limits are shared across replicas.
    pub rate_limit_store: Option<StoreSettings>,
    /// `[telemetry.otlp]`, when traces are exported.
    pub telemetry: Option<TelemetrySettings>,
}

/// `[telemetry.otlp]` with an endpoint, resolved.
#[derive(Clone)]
pub struct TelemetrySettings {
    /// Where spans are posted: the collector's `/v1/traces`.
    pub endpoint: http::Uri,
    pub service_name: String,
    pub sample_ratio: f64,
    /// May hold a credential: never printed.
    pub headers: Vec<(String, String)>,
    pub propagate_upstream: bool,
    pub timeout: Duration,
    /// `ca_file` as written: what `tls` was built from, compared on reload.
    pub ca_file: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Equal when a reload may keep the running exporter: everything but the
/// built TLS config, which `ca_file` stands for.
impl PartialEq for TelemetrySettings {
    fn eq(&self, o: &Self) -> bool {
        self.endpoint == o.endpoint
            && self.service_name == o.service_name
            && self.sample_ratio == o.sample_ratio
            && self.headers == o.headers
            && self.propagate_upstream == o.propagate_upstream
            && self.timeout == o.timeout
            && self.ca_file == o.ca_file
    }
}

impl std::fmt::Debug for TelemetrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetrySettings")
            .field("endpoint", &self.endpoint)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field("propagate_upstream", &self.propagate_upstream)
            .finish_non_exhaustive()
    }
}

/// `[rate_limit_store]`, resolved.
#[derive(Clone, PartialEq)]
pub struct StoreSettings {
    pub url: String,
    /// Read from `password_env` or `password_file`; never printed.
    pub password: Option<String>,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: OnStoreError,
    pub replicas: u32,
    /// A Redis Cluster, `url` and `nodes` its seeds.
    pub cluster: bool,
    pub nodes: Vec<String>,
    /// `ca_file`'s PEM roots for `rediss://`.
    pub ca: Option<Vec<u8>>,
}

impl StoreSettings {
    /// What the store connects with.
    pub fn store_config(&self) -> crate::store::StoreConfig {
        crate::store::StoreConfig {
            url: self.url.clone(),
            password: self.password.clone(),
            key_prefix: self.key_prefix.clone(),
            timeout: self.timeout,
            cluster: self.cluster,
            nodes: self.nodes.clone(),
            ca: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("replicas", &self.replicas)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// `[server]`, resolved.
#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub max_request_body: u64,
    pub retry_buffer: u64,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub send_timeout: Duration,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `None`: sized from the open-file limit at start.
    pub max_connections: Option<u32>,
    /// Request body bytes held across all requests (peeking and replay).
    pub max_held_body: u64,
}

/// `[log]`, resolved.
#[derive(Debug, Clone)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

/// One provider endpoint with everything the data path needs precomputed.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` header value: the authority as written in `url`.
    pub host: HeaderValue,
    /// The authority's host and port (the scheme's default when left
    /// out): `server.address` and `server.port` in traces.
    pub server: (String, u16),
    /// Base path without a trailing slash ("" for none).
    pub base_path: String,
    /// The key header, marked sensitive so it never prints.
    pub key: Option<(HeaderName, HeaderValue)>,
    /// Extra headers set on every request.
    pub headers: HeaderMap,
    pub connect_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
    pub preset: Preset,
    /// The API dialect it speaks (the preset's; custom: OpenAI's).
    pub dialect: Dialect,
    /// Whether sluice may add `stream_options.include_usage`.
    pub inject_usage: bool,
    /// How the client's path maps onto the upstream's.
    pub paths: PathMap,
    pub health: HealthConfig,
}

/// The API dialect an upstream speaks. There is no translation between
/// dialects: a route or a fallback chain keeps to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "OpenAI",
            Self::Anthropic => "Anthropic",
        }
    }
}

/// How a client path reaches the upstream, after the route's `strip_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMap {
    /// Appended to the url's base path as is.
    Append,
    /// The client's leading `/v1` is replaced by the base path (Gemini's
    /// OpenAI endpoint, Azure's `/openai/v1`).
    ReplaceV1,
    /// Azure's `/openai/deployments/{model}` plus the path after `/v1`,
    /// with exactly one `api-version`.
    AzureDeployments { api_version: String },
}

/// `[upstreams.NAME.health]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub consecutive_failures: u32,
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub auth_ejection: Duration,
    pub honor_rate_limit_headers: bool,
}

/// `[models.NAME]`, resolved.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    /// Never empty.
    pub deployments: Vec<Deployment>,
    pub balance: Balance,
    /// `balance = "hash"`.
    pub hash_header: Option<HeaderName>,
    /// Attempts on this model before the chain moves on; `None`: the route's.
    pub attempts: Option<u32>,
    /// Other models, tried in order.
    pub fallbacks: Vec<String>,
    pub on_all_ejected: OnAllEjected,
    /// The dialect of every deployment.
    pub dialect: Dialect,
}

/// One deployment of a model: an upstream and the model name it knows.
#[derive(Debug)]
pub struct Deployment {
    pub upstream: Arc<Upstream>,
    /// The model sent upstream; `None`: the body's model as sent.
    pub model: Option<String>,
    pub weight: u32,
    pub priority: u32,
    pub rpm: u32,
    pub tpm: u64,
    pub max_concurrent: u32,
}

/// One `[[routes]]` entry.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Without a trailing slash; "" matches every path.
    pub path_prefix: String,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub strip_prefix: bool,
    /// Where requests go; with `model_routing`, where passthrough and
    /// non-JSON requests go (none: they are refused).
    pub upstream: Option<Arc<Upstream>>,
    /// `Some` when the route routes by the body's `model`.
    pub model_routing: Option<ModelRouting>,
    /// The dialect of sluice's own errors on this route.
    pub dialect: Dialect,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub rate_limit: Option<RateLimitConfig>,
    /// `[routes.usage]`, resolved.
    pub usage: UsageConfig,
    pub token_limit: Option<TokenLimitConfig>,
    /// `[routes.sse] keepalive`; `None` = off.
    pub sse_keepalive: Option<Duration>,
}

/// What a route does with token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageConfig {
    /// Add `stream_options.include_usage` to streamed chats (and strip
    /// the chunk it causes).
    pub inject: bool,
    /// Read usage from responses.
    pub observe: bool,
}

/// `[routes.token_limit]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLimitConfig {
    pub tokens_per_minute: u64,
    /// Resolved: never 0.
    pub burst: u64,
    pub per: RateLimitPer,
    pub client_key_header: HeaderName,
    pub max_wait: Duration,
    pub estimate: Estimate,
    /// The bucket lives in `[rate_limit_store]`.
    pub shared: bool,
}

/// How a request's tokens are estimated at admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub count: TokenCount,
    pub chars_per_token: f64,
    pub image_tokens: u64,
    pub default_output_tokens: u64,
}

impl Default for Estimate {
    /// `[routes.token_limit]`'s defaults (a deployment's `tpm` uses them).
    fn default() -> Self {
        Self {
            count: TokenCount::Total,
            chars_per_token: 4.0,
            image_tokens: 1000,
            default_output_tokens: 1024,
        }
    }
}

/// A route's model routing.
#[derive(Debug, Clone)]
pub struct ModelRouting {
    /// The `[models]` names this route allows, in config order.
    pub models: Vec<String>,
    pub unknown_model: UnknownModel,
    pub peek_limit: u64,
    pub list_models: bool,
}

/// `[routes.rate_limit]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// 0: no rate limit, only the in-flight cap.
    pub requests_per_minute: u32,
    pub burst: u32,
    pub per: RateLimitPer,
    pub client_key_header: HeaderName,
    pub max_wait: Duration,
    /// 0: no cap.
    pub max_concurrent: u32,
    /// The bucket lives in `[rate_limit_store]`.
    pub shared: bool,
}

/// `[routes.timeouts]`, resolved.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Per attempt: request sent to response headers.
    pub first_byte: Duration,
    /// Longest silence between response body frames.
    pub idle: Duration,
    /// The whole exchange; `None` when "0s".
    pub total: Option<Duration>,
}

/// `[routes.retry]`, resolved.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total tries including the first; 1 disables retries.
    pub attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Outcomes retried on the same model.
    pub retry_on: Conditions,
    pub honor_retry_after: bool,
    pub max_retry_after: Duration,
    pub budget: BudgetConfig,
    /// Outcomes that move a request down its fallback chain.
    pub fallback_on: Conditions,
    pub commit: Commit,
    pub commit_buffer: u64,
}

/// A set of attempt outcomes (`retry_on`, `fallback_on`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    pub stream_error: bool,
    pub insufficient_quota: bool,
    pub upstream_auth: bool,
    pub context_length_exceeded: bool,
    pub content_filter: bool,
    pub statuses: Vec<u16>,
}

/// Retry budget parameters (Finagle/Linkerd style).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries may be this fraction of requests ...
    pub ratio: f64,
    /// ... plus this many per second, always.
    pub min_per_second: u32,
    /// How long a request's deposit counts.
    pub ttl: Duration,
}

impl Config {
    /// Reads and checks the file at `path`. `env` looks up environment
    /// variables (tests pass their own). Relative paths in the file are
    /// taken from the file's directory.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::whole_file(&name, format!("cannot read config: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &name, base, env)
    }

    /// Checks config `text`; `name` is used in messages, `base_dir` resolves
    /// relative file paths.
    pub fn parse(
        text: &str,
        name: &str,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        let raw = raw_from_toml(text).map_err(|ps| ConfigErrors::locate(name, text, ps))?;
        resolve::resolve(raw, base_dir, env).map_err(|ps| ConfigErrors::locate(name, text, ps))
    }
}

/// Most problems one file reports; past this, the rest are not looked for.
const MAX_PROBLEMS: usize = 50;

/// Deserializes with the key path of each failing value kept. serde stops
/// at the first error, so after one the offending key is taken out of the
/// parsed document and the rest is read again: every unknown key and every
/// value of the wrong type is reported, not just the first.
fn raw_from_toml(text: &str) -> Result<raw::RawConfig, Vec<Problem>> {
    let mut doc = DeTable::parse(text).map_err(|e| {
        vec![Problem {
            path: String::new(),
            message: e.message().trim_end().to_owned(),
            span: e.span(),
        }]
    })?;
    let mut problems = Vec::new();
    // The keys taken out so far: a required one then reads as missing,
    // which is not a problem of its own.
    let mut removed = Vec::new();
    loop {
        let de = toml::de::Deserializer::from(doc.clone());
        let e = match serde_path_to_error::deserialize(de) {
            Ok(raw) if problems.is_empty() => return Ok(raw),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let path = e.path().clone();
        let inner = e.into_inner();
        let text_path = match path.to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let message = inner.message().trim_end().to_owned();
        let follow_on = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
            .is_some_and(|field| removed.contains(&format!("{text_path}.{field}")));
        if !follow_on {
            problems.push(Problem {
                path: text_path.clone(),
                message,
                span: inner.span(),
            });
        }
        if problems.len() >= MAX_PROBLEMS || !remove_at(doc.get_mut(), &path) {
            return Err(problems);
        }
        removed.push(text_path);
    }
}

/// Takes the value at `path` out of the document; false when it cannot be
/// taken out without changing what the other problems' paths point at (an
/// array item, or the document itself).
fn remove_at(root: &mut DeTable<'_>, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<&Segment> = path.iter().collect();
    remove_in_table(root, &segments)
}

fn remove_in_table(table: &mut DeTable<'_>, path: &[&Segment]) -> bool {
    match path {
        [Segment::Map { key }] => table.remove(key.as_str()).is_some(),
        [Segment::Map { key }, rest @ ..] => table
            .get_mut(key.as_str())
            .is_some_and(|v| remove_in_value(v.get_mut(), rest)),
        _ => false,
    }
}

fn remove_in_value(value: &mut DeValue<'_>, path: &[&Segment]) -> bool {
    match (value, path) {
        (DeValue::Table(t), _) => remove_in_table(t, path),
        // Into an array item, never the item itself: the items after it
        // would move, and the paths reported with them.
        (DeValue::Array(items), [Segment::Seq { index }, rest @ ..]) if !rest.is_empty() => items
            .get_mut(*index)
            .is_some_and(|v| remove_in_value(v.get_mut(), rest)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match raw_from_toml(text) {
            Ok(_) => Vec::new(),
            Err(ps) => ps
                .into_iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect(),
        }
    }

    /// serde stops at the first error; the check goes on past each.
    #[test]
    fn a_type_error_does_not_hide_an_unknown_key() {
        let text = "[server]\nlistn = \"x\"\n\n[upstreams.up]\nurl = \"http://h\"\n\n[[routes]]\nname = \"a\"\nupstream = \"up\"\n[routes.retry]\nattempts = \"three\"\nbackoff = 1\n";
        let found = problems(text);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(
            found[0].starts_with("routes[0].retry.attempts: invalid type"),
            "{found:#?}"
        );
        assert!(found
            .iter()
            .any(|p| p.starts_with("server.listn: unknown field")));
        assert!(found
            .iter()
            .any(|p| p.starts_with("routes[0].retry.backoff: unknown field")));
    }

    #[test]
    fn a_missing_key_in_a_table_of_its_own_is_reported_with_the_rest() {
        let text = "[models.m]\nbalance = \"weighted\"\n\n[upstreams.other]\nurl = 5\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found
                .iter()
                .any(|p| p.contains("missing field `deployments`")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("upstreams.other.url: invalid type")),
            "{found:#?}"
        );
    }
}
