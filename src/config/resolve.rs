//! Checks a `RawConfig` and builds the resolved `Config`. Every problem is
//! collected (not just the first) so `sluice check` lists them all.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use super::raw::{
    AuthScheme, RawConfig, RawRateLimit, RawRetry, RawRoute, RawServer, RawTimeouts, RawUpstream,
    RetryOn,
};
use super::{
    tls, BudgetConfig, Config, Log, Problem, RateLimitConfig, RetryPolicy, Route, Server, Timeouts,
    Upstream,
};

/// Headers a config may not set: they are the connection's, or sluice's own.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
    "x-request-id",
];

/// Key headers: set through `api_key_env`/`api_key_file` and `auth`, never as plain config.
const KEY_HEADERS: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "proxy-authorization",
];

/// Methods a route may list (CONNECT is refused anyway).
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
];

/// A name as a key-path segment: quoted when it holds a dot, as TOML would.
fn seg(name: &str) -> String {
    if name.contains(['.', '"', ' ']) {
        format!("{name:?}")
    } else {
        name.to_owned()
    }
}

pub fn resolve(
    raw: RawConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let server = server(&raw.server, base, &mut problems);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        problems.push(Problem::at("log.level", format!("invalid log level: {e}")));
    }
    let mut upstreams = BTreeMap::new();
    for (name, u) in &raw.upstreams {
        if let Some(u) = upstream(name, u, base, env, &mut problems) {
            upstreams.insert(name.clone(), Arc::new(u));
        }
    }
    if raw.upstreams.is_empty() {
        problems.push(Problem::at(
            "upstreams",
            "no [upstreams.NAME] table is defined",
        ));
    }
    let routes = routes(&raw.routes, &raw.upstreams, &upstreams, &mut problems);
    match (server, problems.is_empty()) {
        (Some(server), true) => Ok(Config {
            server,
            log: Log {
                level: raw.log.level,
                format: raw.log.format,
            },
            upstreams,
            routes,
        }),
        _ => Err(problems),
    }
}

fn server(raw: &RawServer, base: &Path, problems: &mut Vec<Problem>) -> Option<Server> {
    let listen = socket_addr("server.listen", &raw.listen, problems);
    let admin_listen = match raw.admin_listen.trim() {
        "" => Some(None),
        a => socket_addr("server.admin_listen", a, problems).map(Some),
    };
    if raw.max_request_body.0 == 0 {
        problems.push(Problem::at(
            "server.max_request_body",
            "must be greater than 0",
        ));
    }
    if raw.max_connections == Some(0) {
        problems.push(Problem::at(
            "server.max_connections",
            "must be greater than 0 (leave it out to size it from the open-file limit)",
        ));
    }
    if raw.send_timeout.0.is_zero() {
        problems.push(Problem::at("server.send_timeout", "must be greater than 0"));
    }
    if raw.header_read_timeout.0.is_zero() {
        problems.push(Problem::at(
            "server.header_read_timeout",
            "must be greater than 0",
        ));
    }
    let tls = match &raw.tls {
        None => Some(None),
        Some(t) => match tls::server_config(&file(base, &t.cert), &file(base, &t.key)) {
            Ok(c) => Some(Some(c)),
            Err(tls::ServerTlsError::Cert(m)) => {
                problems.push(Problem::at("server.tls.cert", m));
                None
            }
            Err(tls::ServerTlsError::Key(m)) => {
                problems.push(Problem::at("server.tls.key", m));
                None
            }
        },
    };
    Some(Server {
        listen: listen?,
        admin_listen: admin_listen?,
        max_request_body: raw.max_request_body.0,
        // A replay copy larger than the largest accepted body is never needed.
        retry_buffer: raw.retry_buffer.0.min(raw.max_request_body.0),
        header_read_timeout: raw.header_read_timeout.0,
        shutdown_grace: raw.shutdown_grace.0,
        send_timeout: raw.send_timeout.0,
        tls: tls?,
        max_connections: raw.max_connections,
    })
}

fn socket_addr(path: &str, value: &str, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
    match value.trim().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(Problem::at(
                path,
                format!(r#"invalid address "{value}": expected IP:PORT such as "127.0.0.1:8080""#),
            ));
            None
        }
    }
}

fn file(base: &Path, p: &str) -> PathBuf {
    base.join(p)
}

fn upstream(
    name: &str,
    raw: &RawUpstream,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<Upstream> {
    let at = |key: &str| format!("upstreams.{}.{key}", seg(name));
    let before = problems.len();
    let url = parse_url(&raw.url).map_err(|m| problems.push(Problem::at(at("url"), m)));
    let key = api_key(name, raw, base, env, problems);
    let mut headers = HeaderMap::new();
    for (k, v) in &raw.headers {
        match extra_header(k, v) {
            Ok((k, v)) => {
                headers.insert(k, v);
            }
            Err(m) => problems.push(Problem::at(format!("{}.{}", at("headers"), seg(k)), m)),
        }
    }
    if raw.connect_timeout.0.is_zero() {
        problems.push(Problem::at(at("connect_timeout"), "must be greater than 0"));
    }
    let ca = (!raw.ca_file.is_empty()).then(|| file(base, &raw.ca_file));
    let tls =
        tls::client_config(ca.as_deref()).map_err(|m| problems.push(Problem::at(at("ca_file"), m)));
    let (scheme, authority, base_path) = url.ok()?;
    if problems.len() > before {
        return None;
    }
    Some(Upstream {
        name: name.to_owned(),
        host: HeaderValue::from_str(authority.as_str()).ok()?,
        scheme,
        authority,
        base_path,
        key: key.flatten(),
        headers,
        connect_timeout: raw.connect_timeout.0,
        tls: tls.ok()?,
    })
}

/// `scheme://host[:port][/base-path]` -> its parts; the base path loses a trailing slash.
fn parse_url(url: &str) -> Result<(Scheme, Authority, String), String> {
    let bad = |why: &str| format!(r#"invalid url "{url}": {why}"#);
    let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(bad("the scheme must be http:// or https://")),
    };
    let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    // http accepts "host:80800" and then reports no port at all.
    let after_host = &authority.as_str()[authority.host().len()..];
    if after_host.starts_with(':') && authority.port_u16().is_none() {
        return Err(bad("the port must be a number from 1 to 65535"));
    }
    if authority.as_str().contains('@') {
        return Err(bad(
            "credentials in the url are not supported; use api_key_env",
        ));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed in an upstream url"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

/// Reads the key named by `api_key_env` or `api_key_file`. Its value never
/// enters a message. `Some(None)` is "no key"; `None` is "an error was recorded".
fn api_key(
    name: &str,
    raw: &RawUpstream,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<Option<(HeaderName, HeaderValue)>> {
    let at = |key: &str| format!("upstreams.{}.{key}", seg(name));
    let (secret, source_path, source) = match (&raw.api_key_env, &raw.api_key_file) {
        (Some(_), Some(_)) => {
            let m = "set api_key_env or api_key_file, not both";
            problems.push(Problem::at(at("api_key_file"), m));
            return None;
        }
        (None, None) => return Some(None),
        (Some(var), None) => match env(var) {
            Some(v) => (v, at("api_key_env"), format!("environment variable {var}")),
            None => {
                let m = format!("environment variable {var} is not set");
                problems.push(Problem::at(at("api_key_env"), m));
                return None;
            }
        },
        (None, Some(f)) => match std::fs::read_to_string(file(base, f)) {
            Ok(v) => (v, at("api_key_file"), format!("file {f}")),
            Err(e) => {
                let m = format!("cannot read key file {f}: {e}");
                problems.push(Problem::at(at("api_key_file"), m));
                return None;
            }
        },
    };
    let secret = secret.trim();
    let fail = |problems: &mut Vec<Problem>, why: String| {
        problems.push(Problem::at(source_path.clone(), why));
        None
    };
    if secret.is_empty() {
        return fail(problems, format!("the key in {source} is empty"));
    }
    let has_scheme = secret
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
    if raw.auth == AuthScheme::Bearer && has_scheme {
        let m = format!("the key in {source} starts with \"Bearer \": store the bare key, sluice adds the scheme");
        return fail(problems, m);
    }
    let Some((header, value)) = raw.auth.key_header(secret) else {
        let m =
            format!("auth = \"none\" sends no key, but {source} names one; remove it or set auth");
        return fail(problems, m);
    };
    match HeaderValue::from_str(&value) {
        Ok(mut v) => {
            v.set_sensitive(true);
            Some(Some((header, v)))
        }
        Err(_) => fail(
            problems,
            format!("the key in {source} has characters not allowed in an HTTP header"),
        ),
    }
}

fn extra_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!(r#""{name}" is not a valid header name"#))?;
    if RESERVED_HEADERS.contains(&n.as_str()) {
        return Err(format!(
            r#""{name}" is set by sluice or the connection; it cannot be configured"#
        ));
    }
    if KEY_HEADERS.contains(&n.as_str()) {
        return Err(format!(
            r#""{name}" carries a key: use api_key_env or api_key_file with auth"#
        ));
    }
    let v = HeaderValue::from_str(value)
        .map_err(|_| format!(r#"the value of "{name}" is not a valid header value"#))?;
    Ok((n, v))
}

fn routes(
    raw: &[RawRoute],
    raw_upstreams: &BTreeMap<String, RawUpstream>,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    problems: &mut Vec<Problem>,
) -> Vec<Arc<Route>> {
    if raw.is_empty() {
        problems.push(Problem::at("routes", "no [[routes]] entry is defined"));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = |key: &str| format!("routes[{i}].{key}");
        if r.name.trim().is_empty() {
            problems.push(Problem::at(at("name"), "must not be empty"));
        } else if !names.insert(r.name.as_str()) {
            problems.push(Problem::at(
                at("name"),
                format!(r#"duplicate route name "{}""#, r.name),
            ));
        }
        if !r.path_prefix.starts_with('/') {
            problems.push(Problem::at(at("path_prefix"), r#"must start with "/""#));
        } else if r.path_prefix.contains(['?', '#'])
            || http::uri::PathAndQuery::try_from(r.path_prefix.as_str()).is_err()
        {
            let m = "must be a plain path: no query, fragment, spaces or control characters";
            problems.push(Problem::at(at("path_prefix"), m));
        }
        let mut methods = Vec::new();
        for (j, m) in r.methods.iter().enumerate() {
            let upper = m.to_ascii_uppercase();
            if METHODS.contains(&upper.as_str()) {
                methods.push(Method::from_bytes(upper.as_bytes()).expect("a standard method"));
            } else {
                problems.push(Problem::at(
                    format!("routes[{i}].methods[{j}]"),
                    format!(r#""{m}" is not one of {}"#, METHODS.join(", ")),
                ));
            }
        }
        let timeouts = timeouts(&r.timeouts, &at("timeouts"), problems);
        let retry = retry(&r.retry, &at("retry"), problems);
        let rate_limit = r
            .rate_limit
            .as_ref()
            .map(|l| rate_limit(l, &at("rate_limit"), problems));
        let upstream = match upstreams.get(&r.upstream) {
            Some(u) => u.clone(),
            None => {
                if !raw_upstreams.contains_key(&r.upstream) {
                    let known: Vec<&str> = raw_upstreams.keys().map(String::as_str).collect();
                    problems.push(Problem::at(
                        at("upstream"),
                        format!(
                            r#"unknown upstream "{}" (defined: {})"#,
                            r.upstream,
                            known.join(", ")
                        ),
                    ));
                }
                continue;
            }
        };
        out.push(Arc::new(Route {
            name: r.name.clone(),
            path_prefix: r.path_prefix.trim_end_matches('/').to_owned(),
            methods,
            strip_prefix: r.strip_prefix,
            upstream,
            timeouts,
            retry,
            rate_limit,
        }));
    }
    out
}

fn timeouts(raw: &RawTimeouts, at: &str, problems: &mut Vec<Problem>) -> Timeouts {
    for (key, d) in [("first_byte", raw.first_byte), ("idle", raw.idle)] {
        if d.0.is_zero() {
            problems.push(Problem::at(format!("{at}.{key}"), "must be greater than 0"));
        }
    }
    Timeouts {
        first_byte: raw.first_byte.0,
        idle: raw.idle.0,
        total: (!raw.total.0.is_zero()).then_some(raw.total.0),
    }
}

fn retry(raw: &RawRetry, at: &str, problems: &mut Vec<Problem>) -> RetryPolicy {
    let mut p = |key: &str, m: String| problems.push(Problem::at(format!("{at}.{key}"), m));
    if !(1..=10).contains(&raw.attempts) {
        p("attempts", "must be from 1 (no retries) to 10".into());
    }
    if raw.backoff_max.0 < raw.backoff_base.0 {
        p("backoff_max", "must not be less than backoff_base".into());
    }
    if !(0.001..=1000.0).contains(&raw.budget_ratio) {
        p("budget_ratio", "must be from 0.001 to 1000".into());
    }
    if raw.budget_min_per_second > 100_000 {
        p("budget_min_per_second", "must be at most 100000".into());
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&raw.budget_ttl.0) {
        p("budget_ttl", "must be from 1s to 60s".into());
    }
    let mut policy = RetryPolicy {
        attempts: raw.attempts,
        backoff_base: raw.backoff_base.0,
        backoff_max: raw.backoff_max.0,
        on_connect_failure: false,
        on_reset: false,
        on_timeout: false,
        on_status: Vec::new(),
        honor_retry_after: raw.honor_retry_after,
        max_retry_after: raw.max_retry_after.0,
        budget: BudgetConfig {
            ratio: raw.budget_ratio,
            min_per_second: raw.budget_min_per_second,
            ttl: raw.budget_ttl.0,
        },
    };
    for (i, on) in raw.retry_on.iter().enumerate() {
        let key = format!("retry_on[{i}]");
        match on {
            RetryOn::Word(w) => match w.as_str() {
                "connect-failure" => policy.on_connect_failure = true,
                "reset" => policy.on_reset = true,
                "timeout" => policy.on_timeout = true,
                _ => p(
                    &key,
                    format!(
                        r#"unknown condition "{w}": use "connect-failure", "reset", "timeout" or a status code"#
                    ),
                ),
            },
            RetryOn::Status(s) if (400..=599).contains(s) => policy.on_status.push(*s as u16),
            RetryOn::Status(s) => p(&key, format!("{s} is not a 4xx or 5xx status code")),
        }
    }
    policy
}

fn rate_limit(raw: &RawRateLimit, at: &str, problems: &mut Vec<Problem>) -> RateLimitConfig {
    let mut p = |key: &str, m: &str| problems.push(Problem::at(format!("{at}.{key}"), m));
    if raw.requests_per_minute > 0 && raw.burst == 0 {
        p(
            "burst",
            "must be at least 1 when requests_per_minute is set",
        );
    }
    if raw.requests_per_minute == 0 && raw.max_concurrent == 0 {
        p(
            "requests_per_minute",
            "with max_concurrent = 0 too, this table limits nothing",
        );
    }
    let header = HeaderName::from_bytes(raw.client_key_header.as_bytes());
    if header.is_err() {
        p("client_key_header", "not a valid header name");
    }
    RateLimitConfig {
        requests_per_minute: raw.requests_per_minute,
        burst: raw.burst,
        per: raw.per,
        client_key_header: header.unwrap_or(http::header::AUTHORIZATION),
        max_wait: raw.max_wait.0,
        max_concurrent: raw.max_concurrent,
    }
}
