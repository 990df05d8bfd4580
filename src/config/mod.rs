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
    pub send_timeout: Duration,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `None`: sized from the open-file limit at start.
    pub max_connections: Option<u32>,
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
        let text = "[upstreams.up]\napi_key_env = \"K\"\n\n[upstreams.other]\nurl = 5\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found.iter().any(|p| p.contains("missing field `url`")),
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
