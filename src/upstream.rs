//! Talking to a provider: its connection pool ([`crate::client`]), the
//! rewrite of a client request into an upstream one (URI, Host, hop-by-hop
//! headers, key injection), and what a failed exchange tells the client.

use std::error::Error as StdError;

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::Response;
use http::{HeaderMap, Uri, Version};

use crate::body::RequestBody;
use crate::client::{self, Client, UpstreamBody};
use crate::config::{self, Route};
use crate::error::ProxyError;
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

/// Client key headers, removed when the upstream has a key of its own.
static CLIENT_AUTH: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
];

/// One upstream with its connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub config: std::sync::Arc<config::Upstream>,
    client: Client,
}

impl Upstream {
    pub fn new(config: std::sync::Arc<config::Upstream>) -> Self {
        let client = Client::new(&config);
        Self { config, client }
    }

    pub async fn send(
        &self,
        parts: &Parts,
        body: RequestBody,
    ) -> Result<Response<UpstreamBody>, client::Error> {
        self.client.send(parts, body).await
    }
}

/// Turns the client's request head into the upstream's, in place.
pub fn rewrite_request(parts: &mut Parts, route: &Route, request_id: &HeaderValue) {
    let up = &route.upstream;
    parts.uri = upstream_uri(&parts.uri, route);
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    // Hop-by-hop first, so `Connection: authorization` cannot remove the injected key.
    strip_hop_by_hop(h);
    h.insert(header::HOST, up.host.clone());
    if let Some((name, value)) = &up.key {
        for name in &CLIENT_AUTH {
            h.remove(name);
        }
        h.insert(name.clone(), value.clone());
    }
    for (name, value) in &up.headers {
        h.insert(name.clone(), value.clone());
    }
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The upstream's base path joined with the (maybe stripped) path and the query.
fn upstream_uri(uri: &Uri, route: &Route) -> Uri {
    let up = &route.upstream;
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
pub fn classify(
    err: &client::Error,
    upstream: &str,
    span: &crate::access::RequestSpan,
) -> ProxyError {
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
