//! Route matching: pure functions over the request's method and path, no I/O.

use std::sync::Arc;

use http::Method;

use crate::config::Route;
use crate::error::ProxyError;

/// Refuses what no route may see: CONNECT, a target that is not a path,
/// and dot segments, which would let "/v1/chat/../files" match one route
/// and reach another path upstream, with the provider key attached.
pub fn check_request(method: &Method, path: &str) -> Result<(), ProxyError> {
    if method == Method::CONNECT || !path.starts_with('/') || has_dot_segment(path) {
        return Err(ProxyError::BadRequest);
    }
    Ok(())
}

/// Whether a path has a "." or ".." segment, literal or percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|seg| {
        let (mut dots, mut rest) = (0, seg.as_bytes());
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && rest[2] | 0x20 == b'e'
            {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// Routes in file order, each with what the proxy attaches to it (`T`);
/// the first that matches wins.
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<(Arc<Route>, T)>,
}

impl<T> RouteTable<T> {
    pub fn new(routes: Vec<(Arc<Route>, T)>) -> Self {
        Self { routes }
    }

    /// The entry of the route called `name`.
    pub fn named(&self, name: &str) -> Option<&T> {
        self.routes
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(_, t)| t)
    }

    /// The first route whose prefix and methods match.
    pub fn find(&self, method: &Method, path: &str) -> Option<(&Arc<Route>, &T)> {
        self.routes
            .iter()
            .find(|(r, _)| {
                prefix_matches(&r.path_prefix, path)
                    && (r.methods.is_empty() || r.methods.contains(method))
            })
            .map(|(r, t)| (r, t))
    }
}

/// `prefix` (no trailing slash) matches `path` on a segment boundary:
/// "/v1" matches "/v1" and "/v1/x", not "/v1x". "" matches everything.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path to forward: with `strip_prefix`, "/groq/v1/x" under "/groq"
/// becomes "/v1/x"; the bare prefix becomes "".
pub fn forwarded_path<'a>(route: &Route, path: &'a str) -> &'a str {
    if route.strip_prefix {
        path.strip_prefix(route.path_prefix.as_str())
            .unwrap_or(path)
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/v1", "/v1"));
        assert!(prefix_matches("/v1", "/v1/chat"));
        assert!(!prefix_matches("/v1", "/v1x"));
        assert!(!prefix_matches("/v1", "/v"));
        assert!(!prefix_matches("/v1", "/"));
        assert!(prefix_matches("", "/anything"));
        assert!(prefix_matches("", "/"));
    }

    #[test]
    fn dot_segments_are_found_raw_and_encoded() {
        for bad in [
            "/v1/../x",
            "/v1/./x",
            "/..",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/a/%2e/b",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/...",
            "/v1/.well-known",
            "/",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }
}
