//! A backend: where a route's attempt goes. It owns the upstream's
//! connection pool ([`crate::client`], shared with the other routes that use
//! the upstream), the provider (dialect) the upstream speaks, and metric
//! handles labelled `{route, upstream}`. Here too: the rewrite of a client
//! request into an upstream one (URI, Host, hop-by-hop headers, key
//! injection), and what a failed exchange tells the client.
//!
//! A route holds a list of backends (today: one); the proxy asks it for a
//! backend on every attempt (`pick.rs`).

mod balance;
mod health;
mod pick;

use std::error::Error as StdError;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Scheme};
use http::Response;
use http::{HeaderMap, Uri, Version};

use crate::access::RequestSpan;
use crate::body::RequestBody;
use crate::client::{self, Client, UpstreamBody};
use crate::config::{self, PathMap, Route};
use crate::error::ProxyError;
use crate::metrics::BackendMetrics;
use crate::provider::Provider;
use crate::route::forwarded_path;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus `expect`, which sluice answers itself.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

pub use balance::{Capacity, InFlight, Load, Taken};
pub use health::{Access, Health, Report, State as DeploymentState};
pub use pick::{Backends, ModelEntry, Picked, Plan, Step, Trail};

/// A response body from an upstream.
pub type Upstream = UpstreamBody<RequestBody>;

/// One upstream as one route sees it; for a model-routed route, one
/// deployment (an upstream and the model name it knows).
#[derive(Debug)]
pub struct Backend {
    pub upstream: Arc<config::Upstream>,
    pool: Client<RequestBody>,
    pub provider: &'static dyn Provider,
    pub metrics: BackendMetrics,
    /// The model a request is sent upstream with; `None`: the body's as sent.
    pub model: Option<Arc<str>>,
    /// What is said of it once per request, made once: the model as a JSON
    /// string (spliced into bodies), and the `x-sluice-upstream` and
    /// `x-sluice-model` values.
    pub model_json: Option<bytes::Bytes>,
    pub upstream_header: Option<HeaderValue>,
    pub model_header: Option<HeaderValue>,
    /// `upstream/model` (`-` for the body's model), as the access line
    /// names a deployment.
    pub label: Box<str>,
    /// Balancing weight (1 for a route's plain upstream).
    pub weight: u32,
    pub priority: u32,
    /// Shared by every route that reaches this deployment.
    pub load: Arc<balance::Load>,
    /// The upstream answered 400 to `stream_options`: sluice no longer
    /// asks it for usage (shared by the upstream's backends until reload).
    pub refuses_usage: Arc<std::sync::atomic::AtomicBool>,
}

impl Backend {
    pub fn new(
        upstream: Arc<config::Upstream>,
        pool: Client<RequestBody>,
        refuses_usage: &Arc<std::sync::atomic::AtomicBool>,
        provider: &'static dyn Provider,
        metrics: BackendMetrics,
    ) -> Self {
        Self {
            label: format!("{}/-", upstream.name).into(),
            upstream,
            pool,
            provider,
            metrics,
            model: None,
            model_json: None,
            upstream_header: None,
            model_header: None,
            weight: 1,
            priority: 0,
            load: Arc::default(),
            refuses_usage: refuses_usage.clone(),
        }
    }

    /// A deployment of a model; `load` is the deployment's, shared by routes.
    pub fn deployment(self, d: &config::Deployment, load: Arc<balance::Load>) -> Self {
        let json = |m: &str| bytes::Bytes::from(serde_json::to_string(m).expect("a string"));
        Self {
            model: d.model.as_deref().map(Arc::from),
            model_json: d.model.as_deref().map(json),
            upstream_header: HeaderValue::from_str(&d.upstream.name).ok(),
            label: format!("{}/{}", d.upstream.name, d.model.as_deref().unwrap_or("-")).into(),
            model_header: d
                .model
                .as_deref()
                .and_then(|m| HeaderValue::from_str(m).ok()),
            weight: d.weight,
            priority: d.priority,
            load,
            ..self
        }
    }

    /// A new connection pool for `upstream`.
    pub fn pool(upstream: &config::Upstream) -> Client<RequestBody> {
        Client::new(client::Target {
            authority: &upstream.authority,
            https: upstream.scheme == Scheme::HTTPS,
            tls: &upstream.tls,
            connect_timeout: upstream.connect_timeout,
        })
    }

    /// Sends a request aimed at this backend (see [`Backend::aim`]); a
    /// failure is logged with its cause and told as the client will see it.
    pub async fn send(
        &self,
        parts: &Parts,
        body: RequestBody,
        span: &RequestSpan,
    ) -> Result<Response<Upstream>, ProxyError> {
        let res = self.pool.send(parts, body).await;
        res.map_err(|e| classify(&e, &self.upstream.name, span))
    }

    /// Points a prepared request head (see [`prepare`]) at this backend:
    /// URI, `Host`, the key, the upstream's extra headers.
    pub fn aim(&self, parts: &mut Parts, route: &Route) {
        let up = &self.upstream;
        parts.uri = match &up.paths {
            PathMap::Append => upstream_uri(&parts.uri, route, up),
            map => mapped_uri(&parts.uri, route, up, map, self.model.as_deref()),
        };
        let h = &mut parts.headers;
        h.insert(header::HOST, up.host.clone());
        if let Some((name, value)) = &up.key {
            for name in self.provider.client_key_headers() {
                h.remove(name);
            }
            h.insert(name.clone(), value.clone());
        }
        for (name, value) in &up.headers {
            h.insert(name.clone(), value.clone());
        }
    }
}

/// What every attempt's request head shares, whichever backend it goes to:
/// HTTP/1.1, no hop-by-hop headers, the request id.
pub fn prepare(parts: &mut Parts, request_id: &HeaderValue) {
    parts.version = Version::HTTP_11;
    // Before any key is set, so `Connection: authorization` cannot remove it.
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The upstream's base path joined with the (maybe stripped) path and the query.
fn upstream_uri(uri: &Uri, route: &Route, up: &config::Upstream) -> Uri {
    let path = forwarded_path(route, uri.path());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(up.scheme.clone());
    parts.authority = Some(up.authority.clone());
    let unchanged = up.base_path.is_empty() && path.len() == uri.path().len();
    // An absolute URI with an empty path has "?q" as its path-and-query:
    // that one needs the "/" the slow path adds.
    if unchanged
        && uri
            .path_and_query()
            .is_some_and(|pq| pq.as_str().starts_with('/'))
    {
        // Forwarded as is: share the client's bytes instead of rebuilding them.
        parts.path_and_query = uri.path_and_query().cloned();
        return Uri::from_parts(parts).expect("complete upstream URI");
    }
    let query = uri.query();
    let mut pq =
        String::with_capacity(up.base_path.len() + path.len() + 2 + query.map_or(0, str::len));
    pq.push_str(&up.base_path);
    pq.push_str(path);
    if pq.is_empty() {
        pq.push('/');
    }
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    // The pieces come from a valid URI and a checked base path.
    parts.path_and_query = Some(PathAndQuery::try_from(pq).expect("valid path and query"));
    Uri::from_parts(parts).expect("complete upstream URI")
}

/// A URI for an upstream whose paths differ from OpenAI's: the client's
/// path after its `/v1` goes under the base path (Gemini's and Azure's
/// OpenAI endpoints), or under Azure's deployment with exactly one
/// `api-version`, the configured one.
fn mapped_uri(
    uri: &Uri,
    route: &Route,
    up: &config::Upstream,
    map: &PathMap,
    model: Option<&str>,
) -> Uri {
    let path = forwarded_path(route, uri.path());
    let rest = match path.strip_prefix("/v1") {
        Some(r) if r.is_empty() || r.starts_with('/') => r,
        _ => path,
    };
    let mut pq = up.base_path.clone();
    let mut query: Vec<&str> = uri.query().map_or(Vec::new(), |q| q.split('&').collect());
    let version;
    if let PathMap::AzureDeployments { api_version } = map {
        pq.push('/');
        pq.push_str(&percent_encode_segment(model.unwrap_or("")));
        query.retain(|kv| kv.split('=').next() != Some("api-version"));
        version = format!("api-version={api_version}");
        query.push(&version);
    }
    pq.push_str(rest);
    if pq.is_empty() {
        pq.push('/');
    }
    if !query.is_empty() {
        pq.push('?');
        pq.push_str(&query.join("&"));
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(up.scheme.clone());
    parts.authority = Some(up.authority.clone());
    parts.path_and_query = Some(PathAndQuery::try_from(pq).expect("valid path and query"));
    Uri::from_parts(parts).expect("complete upstream URI")
}

/// A model name as one path segment.
fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Removes hop-by-hop headers and every header that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each name, by length first,
    // before any hashed removal.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether `name` is one of `HOP_BY_HOP`; the lengths of those names filter
/// out nearly every other header without a comparison.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(name.as_str().len(), 2 | 6 | 7 | 10 | 16 | 17) && HOP_BY_HOP.contains(name)
}

/// Maps a failed upstream exchange to what the client is told, and logs the
/// cause (the chain of errors never holds a header value, so no key).
fn classify(err: &client::Error, upstream: &str, span: &RequestSpan) -> ProxyError {
    let chain = ErrorChain(err);
    if let Some(rustls::Error::InvalidCertificate(why)) = find_cause::<rustls::Error>(err) {
        tracing::warn!(
            parent: span.get(),
            upstream,
            "upstream TLS certificate not trusted ({why:?}): add its CA with ca_file; {chain}"
        );
        return ProxyError::UntrustedCertificate;
    }
    if err.is_connect() {
        tracing::warn!(parent: span.get(), upstream, "upstream connect failed: {chain}");
        ProxyError::ConnectFailed
    } else if let client::Error::Invalid(why) = err {
        tracing::warn!(parent: span.get(), upstream, "upstream sent an invalid response: {why}");
        ProxyError::UpstreamReset
    } else {
        tracing::warn!(
            parent: span.get(),
            upstream,
            "upstream closed the connection before a response: {chain}"
        );
        ProxyError::UpstreamReset
    }
}

/// The first error of type `T` in the source chain, looking inside
/// `io::Error`s too (their `source()` skips the error they wrap).
fn find_cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        // hyper-rustls nests io::Errors two deep around the rustls error,
        // and io::Error::source() skips the error it wraps.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

/// Displays an error and its causes as `a: b: c`.
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["content-type", "x-request-id", "authorization", "te-x"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn connection_and_the_names_it_lists_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
