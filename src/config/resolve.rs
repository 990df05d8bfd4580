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
    AuthScheme, AzureApi, Balance, Inject, Preset, RawConfig, RawHealth, RawModel, RawOtlp,
    RawRateLimit, RawRetry, RawRoute, RawServer, RawStore, RawTimeouts, RawTokenLimit, RawUpstream,
    RetryOn,
};
use super::{
    tls, BudgetConfig, Conditions, Config, Deployment, Dialect, Estimate, HealthConfig, Log, Model,
    ModelRouting, PathMap, Problem, RateLimitConfig, RetryPolicy, Route, Server, StoreSettings,
    TelemetrySettings, Timeouts, TokenLimitConfig, Upstream, UsageConfig,
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
    let models = models(&raw.models, &raw.upstreams, &upstreams, &mut problems);
    let rate_limit_store = raw
        .rate_limit_store
        .as_ref()
        .and_then(|s| store(s, base, env, &mut problems));
    let telemetry = otlp(&raw.telemetry.otlp, base, &mut problems);
    let routes = routes(
        &raw.routes,
        &raw.upstreams,
        &upstreams,
        &models,
        server.as_ref().map_or(u64::MAX, |s| s.max_request_body),
        raw.rate_limit_store.is_some(),
        &mut problems,
    );
    match (server, problems.is_empty()) {
        (Some(server), true) => Ok(Config {
            server,
            log: Log {
                level: raw.log.level,
                format: raw.log.format,
            },
            upstreams,
            routes,
            models,
            rate_limit_store,
            telemetry,
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
        max_held_body: raw.max_held_body.0,
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
    let preset = PresetDefaults::of(raw.preset);
    let url = match (&raw.url, preset.url) {
        (Some(url), _) => parse_url(url).map_err(|m| problems.push(Problem::at(at("url"), m))),
        (None, Some(url)) => Ok(parse_url(url).expect("a preset's url parses")),
        (None, None) => {
            let m = match raw.preset {
                Preset::Azure => "missing field `url`: an Azure resource's endpoint, such as \"https://NAME.openai.azure.com\"",
                _ => "missing field `url` (or set a preset such as preset = \"openai\")",
            };
            problems.push(Problem::at(format!("upstreams.{}", seg(name)), m));
            Err(())
        }
    };
    let auth = raw.auth.unwrap_or(preset.auth);
    let key = api_key(name, raw, auth, base, env, problems);
    let paths = path_map(raw, &at, problems);
    let health = health(&raw.health, &at("health"), problems);
    let mut headers = HeaderMap::new();
    for (k, v) in preset.headers {
        headers.insert(*k, HeaderValue::from_static(v));
    }
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
    let (scheme, authority, mut base_path) = url.ok()?;
    if problems.len() > before {
        return None;
    }
    match paths {
        Some(PathMap::ReplaceV1) if raw.preset == Preset::Azure => base_path.push_str("/openai/v1"),
        Some(PathMap::AzureDeployments { .. }) => base_path.push_str("/openai/deployments"),
        _ => {}
    }
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
    Some(Upstream {
        name: name.to_owned(),
        host: HeaderValue::from_str(authority.as_str()).ok()?,
        server: (authority.host().to_owned(), port),
        scheme,
        authority,
        base_path,
        key: key.flatten(),
        headers,
        connect_timeout: raw.connect_timeout.0,
        tls: tls.ok()?,
        preset: raw.preset,
        dialect: preset.dialect,
        inject_usage: raw.inject_usage.unwrap_or(preset.inject_usage),
        paths: paths?,
        health: health?,
    })
}

/// What a preset fills in when the upstream leaves it out.
struct PresetDefaults {
    url: Option<&'static str>,
    auth: AuthScheme,
    headers: &'static [(&'static str, &'static str)],
    dialect: Dialect,
    inject_usage: bool,
}

impl PresetDefaults {
    fn of(p: Preset) -> Self {
        let openai = |url| Self {
            url,
            auth: AuthScheme::Bearer,
            headers: &[],
            dialect: Dialect::OpenAi,
            inject_usage: true,
        };
        match p {
            Preset::Custom => Self {
                inject_usage: false,
                ..openai(None)
            },
            Preset::Openai => openai(Some("https://api.openai.com")),
            Preset::Azure => Self {
                auth: AuthScheme::ApiKey,
                ..openai(None)
            },
            Preset::Gemini => openai(Some(
                "https://generativelanguage.googleapis.com/v1beta/openai",
            )),
            Preset::Vllm => openai(Some("http://127.0.0.1:8000")),
            Preset::Ollama => openai(Some("http://127.0.0.1:11434")),
            Preset::Anthropic => Self {
                url: Some("https://api.anthropic.com"),
                auth: AuthScheme::XApiKey,
                headers: &[("anthropic-version", "2023-06-01")],
                dialect: Dialect::Anthropic,
                inject_usage: false,
            },
        }
    }
}

/// How the client's path maps onto the upstream's: Gemini's and Azure's
/// OpenAI endpoints take the path after the client's `/v1`.
fn path_map(
    raw: &RawUpstream,
    at: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) -> Option<PathMap> {
    if raw.preset != Preset::Azure {
        if raw.azure_api.is_some() {
            problems.push(Problem::at(at("azure_api"), "only for preset = \"azure\""));
            return None;
        }
        if !raw.api_version.is_empty() {
            problems.push(Problem::at(
                at("api_version"),
                "only for preset = \"azure\" with azure_api = \"deployments\"",
            ));
            return None;
        }
        return Some(match raw.preset {
            Preset::Gemini if raw.url.is_none() => PathMap::ReplaceV1,
            _ => PathMap::Append,
        });
    }
    match raw.azure_api.unwrap_or(AzureApi::V1) {
        AzureApi::V1 if !raw.api_version.is_empty() => {
            let m =
                "the v1 API takes no api-version: remove it, or set azure_api = \"deployments\"";
            problems.push(Problem::at(at("api_version"), m));
            None
        }
        AzureApi::V1 => Some(PathMap::ReplaceV1),
        AzureApi::Deployments if raw.api_version.trim().is_empty() => {
            let m = "azure_api = \"deployments\" needs api_version, such as \"2024-10-21\"";
            problems.push(Problem::at(at("azure_api"), m));
            None
        }
        AzureApi::Deployments => {
            let v = raw.api_version.trim();
            if !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                problems.push(Problem::at(
                    at("api_version"),
                    "must be a version such as \"2024-10-21\"",
                ));
                return None;
            }
            Some(PathMap::AzureDeployments {
                api_version: v.to_owned(),
            })
        }
    }
}

fn health(raw: &RawHealth, at: &str, problems: &mut Vec<Problem>) -> Option<HealthConfig> {
    let before = problems.len();
    let mut p = |key: &str, m: &str| problems.push(Problem::at(format!("{at}.{key}"), m));
    if raw.consecutive_failures == 0 {
        p("consecutive_failures", "must be at least 1");
    }
    if !(raw.failure_ratio > 0.0 && raw.failure_ratio <= 1.0) {
        p("failure_ratio", "must be above 0 and at most 1");
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&raw.window.0) {
        p("window", "must be from 1s to 10m");
    }
    for (key, d) in [
        ("base_ejection", raw.base_ejection.0),
        ("auth_ejection", raw.auth_ejection.0),
    ] {
        if d.is_zero() {
            p(key, "must be greater than 0");
        }
    }
    if raw.max_ejection.0 < raw.base_ejection.0 {
        p("max_ejection", "must not be less than base_ejection");
    }
    (problems.len() == before).then_some(HealthConfig {
        consecutive_failures: raw.consecutive_failures,
        failure_ratio: raw.failure_ratio,
        min_requests: raw.min_requests,
        window: raw.window.0,
        base_ejection: raw.base_ejection.0,
        max_ejection: raw.max_ejection.0,
        auth_ejection: raw.auth_ejection.0,
        honor_rate_limit_headers: raw.honor_rate_limit_headers,
    })
}

fn models(
    raw: &BTreeMap<String, RawModel>,
    raw_upstreams: &BTreeMap<String, RawUpstream>,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Arc<Model>> {
    let mut out = BTreeMap::new();
    for (name, m) in raw {
        let at = |key: &str| format!("models.{}.{key}", seg(name));
        let before = problems.len();
        if name.is_empty() {
            problems.push(Problem::at("models", "a model name must not be empty"));
        }
        if m.deployments.is_empty() {
            problems.push(Problem::at(
                at("deployments"),
                "must list at least one deployment",
            ));
        }
        let mut deployments = Vec::with_capacity(m.deployments.len());
        for (i, d) in m.deployments.iter().enumerate() {
            let at = |key: &str| format!("models.{}.deployments[{i}].{key}", seg(name));
            if d.weight == 0 {
                problems.push(Problem::at(
                    at("weight"),
                    "must be at least 1 (remove the entry to take it out)",
                ));
            }
            let Some(up) = upstreams.get(&d.upstream) else {
                if !raw_upstreams.contains_key(&d.upstream) {
                    problems.push(unknown_upstream(at("upstream"), &d.upstream, raw_upstreams));
                }
                continue;
            };
            let model = match &d.model {
                None => Some(name.clone()),
                Some(m) if m.is_empty() => None,
                Some(m) => Some(m.clone()),
            };
            if model.is_none() && matches!(up.paths, PathMap::AzureDeployments { .. }) {
                problems.push(Problem::at(
                    at("model"),
                    "an Azure deployment URL needs the deployment name",
                ));
            }
            if deployments
                .iter()
                .any(|o: &Deployment| o.upstream.name == up.name && o.model == model)
            {
                problems.push(Problem::at(
                    at("model"),
                    format!(r#"listed twice: upstream "{}" with this model"#, up.name),
                ));
            }
            deployments.push(Deployment {
                upstream: up.clone(),
                model,
                weight: d.weight,
                priority: d.priority,
                rpm: d.rpm,
                tpm: d.tpm,
                max_concurrent: d.max_concurrent,
            });
        }
        let dialect = deployments
            .first()
            .map_or(Dialect::OpenAi, |d| d.upstream.dialect);
        if let Some(d) = deployments.iter().find(|d| d.upstream.dialect != dialect) {
            problems.push(Problem::at(at("deployments"), format!(
                r#"mixes the {} and {} dialects (upstream "{}"); sluice does not translate between them"#,
                dialect.name(), d.upstream.dialect.name(), d.upstream.name)));
        }
        if let Some(n) = m.attempts {
            if !(1..=10).contains(&n) {
                problems.push(Problem::at(at("attempts"), "must be from 1 to 10"));
            }
        }
        let hash_header = match (m.balance, m.hash_header.trim()) {
            (Balance::Hash, "") => {
                problems.push(Problem::at(
                    at("hash_header"),
                    r#"balance = "hash" needs the header to hash, such as "x-user-id""#,
                ));
                None
            }
            (_, "") => None,
            (_, h) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    problems.push(Problem::at(at("hash_header"), "not a valid header name"));
                    None
                }
            },
        };
        for (i, f) in m.fallbacks.iter().enumerate() {
            let at = format!("models.{}.fallbacks[{i}]", seg(name));
            if f == name {
                problems.push(Problem::at(at, "a model cannot be its own fallback"));
            } else if !raw.contains_key(f) {
                let known: Vec<&str> = raw.keys().map(String::as_str).collect();
                problems.push(Problem::at(
                    at,
                    format!(r#"unknown model "{f}" (defined: {})"#, known.join(", ")),
                ));
            } else if m.fallbacks[..i].contains(f) {
                problems.push(Problem::at(at, format!(r#""{f}" is listed twice"#)));
            }
        }
        if problems.len() > before {
            continue;
        }
        out.insert(
            name.clone(),
            Arc::new(Model {
                name: name.clone(),
                deployments,
                balance: m.balance,
                hash_header,
                attempts: m.attempts.or((!m.fallbacks.is_empty()).then_some(2)),
                fallbacks: m.fallbacks.clone(),
                on_all_ejected: m.on_all_ejected,
                dialect,
            }),
        );
    }
    // A chain keeps to one dialect: a fallback answers the client's request as sent.
    for (name, m) in &out {
        for (i, f) in m.fallbacks.iter().enumerate() {
            if let Some(fm) = out.get(f) {
                if fm.dialect != m.dialect {
                    problems.push(Problem::at(format!("models.{}.fallbacks[{i}]", seg(name)), format!(
                        r#""{f}" speaks the {} dialect and "{name}" the {}: a chain keeps to one"#,
                        fm.dialect.name(), m.dialect.name())));
                }
            }
        }
    }
    out
}

fn unknown_upstream(
    at: String,
    name: &str,
    raw_upstreams: &BTreeMap<String, RawUpstream>,
) -> Problem {
    let known: Vec<&str> = raw_upstreams.keys().map(String::as_str).collect();
    Problem::at(
        at,
        format!(
            r#"unknown upstream "{name}" (defined: {})"#,
            known.join(", ")
        ),
    )
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
    auth: AuthScheme,
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
    if auth == AuthScheme::Bearer && has_scheme {
        let m = format!("the key in {source} starts with \"Bearer \": store the bare key, sluice adds the scheme");
        return fail(problems, m);
    }
    let Some((header, value)) = auth.key_header(secret) else {
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
    models: &BTreeMap<String, Arc<Model>>,
    max_request_body: u64,
    has_store: bool,
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
        if r.rate_limit.as_ref().is_some_and(|l| l.shared) && !has_store {
            problems.push(Problem::at(
                at("rate_limit.shared"),
                "shared = true needs a [rate_limit_store] table",
            ));
        }
        if r.rate_limit
            .as_ref()
            .is_some_and(|l| l.shared && l.requests_per_minute == 0)
        {
            problems.push(Problem::at(
                at("rate_limit.shared"),
                "shared = true needs requests_per_minute (an in-flight cap is always per process)",
            ));
        }
        let token_limit = r
            .token_limit
            .as_ref()
            .map(|l| token_limit(l, &at("token_limit"), problems));
        if r.token_limit.as_ref().is_some_and(|l| l.shared) && !has_store {
            problems.push(Problem::at(
                at("token_limit.shared"),
                "shared = true needs a [rate_limit_store] table",
            ));
        }
        let usage = UsageConfig {
            inject: match r.usage.inject {
                Inject::WhenLimited => token_limit.is_some(),
                Inject::Always => true,
                Inject::Never => false,
            },
            observe: r.usage.observe,
        };
        if token_limit.is_some() && !usage.observe {
            problems.push(Problem::at(
                at("usage.observe"),
                "a route with a token_limit settles its estimates from usage: observe must stay true",
            ));
        }
        let sse_keepalive = Some(r.sse.keepalive.0).filter(|d| !d.is_zero());
        let before = problems.len();
        let upstream = match &r.upstream {
            None if r.model_routing => None,
            None => {
                problems.push(Problem::at(
                    format!("routes[{i}]"),
                    "missing field `upstream` (or set model_routing = true)",
                ));
                continue;
            }
            Some(name) => match upstreams.get(name) {
                Some(u) => Some(u.clone()),
                None => {
                    if !raw_upstreams.contains_key(name) {
                        problems.push(unknown_upstream(at("upstream"), name, raw_upstreams));
                    }
                    continue;
                }
            },
        };
        let model_routing = model_routing(r, i, models, max_request_body, problems);
        if problems.len() > before {
            continue;
        }
        // sluice's own errors take the dialect of what the route reaches.
        let dialects = upstream
            .iter()
            .map(|u| (u.dialect, format!(r#"upstream "{}""#, u.name)))
            .chain(
                model_routing
                    .iter()
                    .flat_map(|m| &m.models)
                    .filter_map(|n| models.get(n))
                    .map(|m| (m.dialect, format!(r#"model "{}""#, m.name))),
            );
        let mut dialect: Option<(Dialect, String)> = None;
        let mut mixed = false;
        for (d, what) in dialects {
            match &dialect {
                None => dialect = Some((d, what)),
                Some((first, first_what)) if *first != d && !mixed => {
                    mixed = true;
                    let key = if r.model_routing {
                        at("models")
                    } else {
                        at("upstream")
                    };
                    problems.push(Problem::at(key, format!(
                        "mixes the {} dialect ({first_what}) with the {} dialect ({what}); give each dialect its own route",
                        first.name(), d.name())));
                }
                Some(_) => {}
            }
        }
        if mixed {
            continue;
        }
        let dialect = dialect.map_or(Dialect::OpenAi, |(d, _)| d);
        out.push(Arc::new(Route {
            name: r.name.clone(),
            path_prefix: r.path_prefix.trim_end_matches('/').to_owned(),
            methods,
            strip_prefix: r.strip_prefix,
            upstream,
            model_routing,
            dialect,
            timeouts,
            retry,
            rate_limit,
            usage,
            token_limit,
            sse_keepalive,
        }));
    }
    out
}

/// A route's model routing: the models it allows (all of `[models]` when it
/// lists none), each of which must exist.
fn model_routing(
    r: &RawRoute,
    i: usize,
    models: &BTreeMap<String, Arc<Model>>,
    max_request_body: u64,
    problems: &mut Vec<Problem>,
) -> Option<ModelRouting> {
    let at = |key: &str| format!("routes[{i}].{key}");
    if !r.model_routing {
        if !r.models.is_empty() {
            problems.push(Problem::at(
                at("models"),
                "has no effect without model_routing = true",
            ));
        }
        return None;
    }
    let mut allowed = Vec::new();
    for (j, name) in r.models.iter().enumerate() {
        if models.contains_key(name) {
            if !allowed.contains(name) {
                allowed.push(name.clone());
            }
        } else {
            let known: Vec<&str> = models.keys().map(String::as_str).collect();
            problems.push(Problem::at(
                format!("routes[{i}].models[{j}]"),
                format!(
                    r#"unknown model "{name}" (defined in [models]: {})"#,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    if r.models.is_empty() {
        if models.is_empty() {
            problems.push(Problem::at(
                at("model_routing"),
                "no [models.NAME] table is defined to route to",
            ));
        }
        allowed = models.keys().cloned().collect();
    }
    if r.unknown_model == super::UnknownModel::Passthrough && r.upstream.is_none() {
        problems.push(Problem::at(
            at("unknown_model"),
            r#""passthrough" needs the route's upstream"#,
        ));
    }
    if r.peek_limit.0 == 0 {
        problems.push(Problem::at(at("peek_limit"), "must be greater than 0"));
    }
    Some(ModelRouting {
        models: allowed,
        unknown_model: r.unknown_model,
        // Nothing larger is accepted anyway.
        peek_limit: r.peek_limit.0.min(max_request_body),
        list_models: r.list_models,
    })
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
        retry_on: Conditions::default(),
        honor_retry_after: raw.honor_retry_after,
        max_retry_after: raw.max_retry_after.0,
        budget: BudgetConfig {
            ratio: raw.budget_ratio,
            min_per_second: raw.budget_min_per_second,
            ttl: raw.budget_ttl.0,
        },
        fallback_on: Conditions::default(),
        commit: raw.commit,
        commit_buffer: raw.commit_buffer.0,
    };
    for (i, on) in raw.retry_on.iter().enumerate() {
        if let Err(m) = condition(on, &mut policy.retry_on) {
            p(&format!("retry_on[{i}]"), m);
        }
    }
    for (i, on) in raw.fallback_on.iter().enumerate() {
        if let Err(m) = condition(on, &mut policy.fallback_on) {
            p(&format!("fallback_on[{i}]"), m);
        }
    }
    if raw.commit_buffer.0 == 0 {
        p("commit_buffer", "must be greater than 0".into());
    }
    policy
}

/// Adds one `retry_on`/`fallback_on` entry to `set`.
fn condition(on: &RetryOn, set: &mut Conditions) -> Result<(), String> {
    match on {
        RetryOn::Word(w) => {
            let flag = match w.as_str() {
                "connect-failure" => &mut set.connect_failure,
                "reset" => &mut set.reset,
                "timeout" => &mut set.timeout,
                "stream-error" => &mut set.stream_error,
                "insufficient-quota" => &mut set.insufficient_quota,
                "upstream-auth" => &mut set.upstream_auth,
                "context-length-exceeded" => &mut set.context_length_exceeded,
                "content-filter" => &mut set.content_filter,
                _ => {
                    return Err(format!(
                        r#"unknown condition "{w}": use a status code or one of {}"#,
                        OUTCOME_WORDS.join(", ")
                    ))
                }
            };
            *flag = true;
        }
        RetryOn::Status(s) if (400..=599).contains(s) => set.statuses.push(*s as u16),
        RetryOn::Status(s) => return Err(format!("{s} is not a 4xx or 5xx status code")),
    }
    Ok(())
}

const OUTCOME_WORDS: &[&str] = &[
    "connect-failure",
    "reset",
    "timeout",
    "stream-error",
    "insufficient-quota",
    "upstream-auth",
    "context-length-exceeded",
    "content-filter",
];

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
        shared: raw.shared,
    }
}

/// `[rate_limit_store]`: a redis URL, a password from the environment or a
/// file (never in a message), a timeout and what to do without the store.
fn store(
    raw: &RawStore,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<StoreSettings> {
    let before = problems.len();
    let mut p =
        |key: &str, m: String| problems.push(Problem::at(format!("rate_limit_store.{key}"), m));
    let urls = std::iter::once(("url", &raw.url)).chain(raw.nodes.iter().map(|n| ("nodes", n)));
    let mut schemes = Vec::new();
    for (key, url) in urls {
        match redis::parse_redis_url(url) {
            _ if url.is_empty() => p(key, "must be set (redis://host:port/db)".into()),
            None => p(key, "not a redis:// or rediss:// URL".into()),
            Some(u) if !matches!(u.scheme(), "redis" | "rediss") => {
                p(
                    key,
                    format!(
                        "{}:// is not supported; use redis:// or rediss://",
                        u.scheme()
                    ),
                );
            }
            Some(u) if !u.password().unwrap_or("").is_empty() => {
                p(
                    key,
                    "a password in the url is not supported; use password_env or password_file"
                        .into(),
                );
            }
            Some(u) => schemes.push(u.scheme().to_owned()),
        }
    }
    if schemes.iter().any(|s| s != &schemes[0]) {
        p(
            "nodes",
            "every node must use the url's scheme (all redis:// or all rediss://)".into(),
        );
    }
    if !raw.nodes.is_empty() && !raw.cluster {
        p(
            "nodes",
            "seed nodes are for a cluster: set cluster = true".into(),
        );
    }
    let ca = match raw.ca_file.as_str() {
        "" => None,
        _ if schemes.first().is_some_and(|s| s != "rediss") => {
            p("ca_file", "a CA is for rediss:// URLs".into());
            None
        }
        f => match std::fs::read(file(base, f)) {
            Ok(pem) if pem_has_certificate(&pem) => Some(pem),
            Ok(_) => {
                p("ca_file", format!("no PEM certificate in {f}"));
                None
            }
            Err(e) => {
                p("ca_file", format!("cannot read CA file {f}: {e}"));
                None
            }
        },
    };
    let password = match (raw.password_env.as_str(), raw.password_file.as_str()) {
        ("", "") => None,
        (var, "") => match env(var) {
            Some(v) => Some(v.trim().to_owned()),
            None => {
                p(
                    "password_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        ("", f) => match std::fs::read_to_string(file(base, f)) {
            Ok(v) => Some(v.trim().to_owned()),
            Err(e) => {
                p(
                    "password_file",
                    format!("cannot read password file {f}: {e}"),
                );
                None
            }
        },
        _ => {
            p(
                "password_file",
                "set password_env or password_file, not both".into(),
            );
            None
        }
    };
    if raw.replicas == 0 {
        p("replicas", "must be at least 1".into());
    }
    if raw.timeout.0.is_zero() {
        p("timeout", "must be above 0".into());
    }
    if problems.len() > before {
        return None;
    }
    Some(StoreSettings {
        url: raw.url.clone(),
        password,
        key_prefix: raw.key_prefix.clone(),
        timeout: raw.timeout.0,
        on_error: raw.on_error,
        replicas: raw.replicas,
        cluster: raw.cluster,
        nodes: raw.nodes.clone(),
        ca,
    })
}

/// `[telemetry.otlp]`: nothing without an endpoint; else a collector URL,
/// a ratio, headers fit to send (their values never in a message).
fn otlp(raw: &RawOtlp, base: &Path, problems: &mut Vec<Problem>) -> Option<TelemetrySettings> {
    let before = problems.len();
    let mut p =
        |key: &str, m: String| problems.push(Problem::at(format!("telemetry.otlp.{key}"), m));
    if raw.endpoint.is_empty() {
        return None;
    }
    if !cfg!(feature = "otel") {
        p(
            "endpoint",
            "this sluice was built without traces (cargo feature otel); set endpoint = \"\" or rebuild with it".into(),
        );
        return None;
    }
    let endpoint = match raw.endpoint.parse::<Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http" | "https"))
                && u.authority().is_some_and(|a| !a.as_str().contains('@'))
                && u.query().is_none() =>
        {
            Some(traces_path(u))
        }
        Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
            p(
                "endpoint",
                "a user or password in the url is not supported (it would show in logs): set headers instead".into(),
            );
            None
        }
        _ => {
            p(
                "endpoint",
                format!(
                    "not an http:// or https:// URL: {:?} (e.g. http://otel-collector:4318)",
                    raw.endpoint
                ),
            );
            None
        }
    };
    if raw.service_name.trim().is_empty() {
        p("service_name", "must not be empty".into());
    }
    if !(0.0..=1.0).contains(&raw.sample_ratio) {
        p("sample_ratio", "must be between 0 and 1".into());
    }
    for (name, value) in &raw.headers {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            p("headers", format!("{name:?} is not a valid header name"));
        } else if HeaderValue::from_str(value).is_err() {
            p(
                "headers",
                format!("the value of {name} is not a valid header value"),
            );
        }
    }
    if raw.timeout.0.is_zero() {
        p("timeout", "must be above 0".into());
    }
    let https = endpoint
        .as_ref()
        .is_some_and(|u| u.scheme_str() == Some("https"));
    let tls = match raw.ca_file.as_str() {
        "" if https => tls::client_config(None).map_err(|m| p("endpoint", m)).ok(),
        "" => None,
        _ if !https => {
            p("ca_file", "a CA is for an https:// endpoint".into());
            None
        }
        f => tls::client_config(Some(&file(base, f)))
            .map_err(|m| p("ca_file", m))
            .ok(),
    };
    if problems.len() > before {
        return None;
    }
    Some(TelemetrySettings {
        endpoint: endpoint?,
        service_name: raw.service_name.clone(),
        sample_ratio: raw.sample_ratio,
        headers: raw.headers.clone().into_iter().collect(),
        propagate_upstream: raw.propagate_upstream,
        timeout: raw.timeout.0,
        ca_file: raw.ca_file.clone(),
        tls,
    })
}

/// The collector's traces URL: `/v1/traces` added unless the path has it.
fn traces_path(u: Uri) -> Uri {
    let path = u.path().trim_end_matches('/');
    if path.ends_with("/v1/traces") {
        return u;
    }
    let full = format!("{path}/v1/traces");
    let mut parts = u.into_parts();
    parts.path_and_query = full.parse().ok();
    Uri::from_parts(parts).expect("a URL with a longer path")
}

/// Whether `pem` holds at least one certificate.
fn pem_has_certificate(pem: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok())
}

fn token_limit(raw: &RawTokenLimit, at: &str, problems: &mut Vec<Problem>) -> TokenLimitConfig {
    let mut p = |key: &str, m: &str| problems.push(Problem::at(format!("{at}.{key}"), m));
    if raw.tokens_per_minute == 0 {
        p("tokens_per_minute", "must be set (at least 1)");
    }
    if !(raw.chars_per_token.is_finite() && raw.chars_per_token > 0.0) {
        p("chars_per_token", "must be a number above 0");
    }
    let header = HeaderName::from_bytes(raw.client_key_header.as_bytes());
    if header.is_err() {
        p("client_key_header", "not a valid header name");
    }
    // Ten seconds' worth by default, and never less than one token.
    let burst = match raw.burst {
        0 => (raw.tokens_per_minute / 6).max(1),
        b => b,
    };
    TokenLimitConfig {
        tokens_per_minute: raw.tokens_per_minute.max(1),
        burst,
        per: raw.per,
        client_key_header: header.unwrap_or(http::header::AUTHORIZATION),
        max_wait: raw.max_wait.0,
        shared: raw.shared,
        estimate: Estimate {
            count: raw.count,
            chars_per_token: raw.chars_per_token,
            image_tokens: raw.image_tokens,
            default_output_tokens: raw.default_output_tokens,
        },
    }
}
