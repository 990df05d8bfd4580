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

pub use error::{ConfigErrors, Problem};
pub use raw::{AuthScheme, LogFormat, RateLimitPer, RetryOn};

/// A checked configuration.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub log: Log,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// In file order; the first match wins.
    pub routes: Vec<Arc<Route>>,
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
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    /// Base path without a trailing slash ("" for none).
    pub base_path: String,
    /// The key header, marked sensitive so it never prints.
    pub key: Option<(HeaderName, HeaderValue)>,
    /// Extra headers set on every request.
    pub headers: HeaderMap,
    pub connect_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
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
    pub upstream: Arc<Upstream>,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub rate_limit: Option<RateLimitConfig>,
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
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    /// Status codes that are retried.
    pub on_status: Vec<u16>,
    pub honor_retry_after: bool,
    pub max_retry_after: Duration,
    pub budget: BudgetConfig,
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
        let raw = raw_from_toml(text).map_err(|p| ConfigErrors::locate(name, text, vec![p]))?;
        resolve::resolve(raw, base_dir, env).map_err(|ps| ConfigErrors::locate(name, text, ps))
    }
}

/// Deserializes with the key path of the failing value kept.
fn raw_from_toml(text: &str) -> Result<raw::RawConfig, Problem> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| Problem {
        path: String::new(),
        message: e.message().trim_end().to_owned(),
        span: e.span(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Problem {
            path: if path == "." { String::new() } else { path },
            message: inner.message().trim_end().to_owned(),
            span: inner.span(),
        }
    })
}
