//! Route matching: pure functions over the request's method and path, no I/O.

use std::sync::Arc;

use http::Method;

use crate::config::Route;
use crate::error::ProxyError;

/// Refuses what no route may see: CONNECT, a target that is not a path,
/// and a path that could name something else upstream than what routing
/// saw. A dot segment lets "/v1/chat/../files" match one route and reach
/// another path upstream, with the provider key attached; so does one
/// hidden by percent-encoding (`%2e%2e`), by a `;parameter` (`..;/`, which
/// some servers strip), or by an encoded or backslash separator (`%2f`,
/// `%5c`, `\`, which some servers turn into `/`). As Envoy does for escaped
/// slashes by default, these are refused with 400, not rewritten.
pub fn check_request(method: &Method, path: &str) -> Result<(), ProxyError> {
    if method == Method::CONNECT || !path.starts_with('/') || !plain_path(path.as_bytes()) {
        return Err(ProxyError::BadRequest);
    }
    Ok(())
}

/// Whether no segment of `path` is a dot segment or hides a separator.
fn plain_path(path: &[u8]) -> bool {
    // The common path has none of the bytes that need a closer look.
    if !path.iter().any(|b| matches!(b, b'.' | b'%' | b';' | b'\\')) {
        return true;
    }
    path.split(|&b| b == b'/').all(plain_segment)
}

fn plain_segment(seg: &[u8]) -> bool {
    // The segment as a server that decodes it would see it, up to a `;`.
    let mut decoded = [0u8; 2];
    let mut len = 0;
    let mut rest = seg;
    while let Some((&b, tail)) = rest.split_first() {
        let (byte, tail) = match (b, tail) {
            (b'%', [h, l, tail @ ..]) => match (hex(*h), hex(*l)) {
                (Some(h), Some(l)) => (h << 4 | l, tail),
                _ => (b, tail),
            },
            _ => (b, tail),
        };
        match byte {
            b'/' | b'\\' => return false,
            b';' => break,
            // Only the first two bytes can make "." or ".."; the rest is
            // still read for hidden separators.
            _ if len < decoded.len() => decoded[len] = byte,
            _ => {}
        }
        len += 1;
        rest = tail;
    }
    let dots = &decoded[..len.min(decoded.len())];
    !(len <= 2 && matches!(dots, b"." | b".."))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
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
    fn dot_segments_and_hidden_separators_are_refused() {
        for bad in [
            "/v1/../x",
            "/v1/./x",
            "/..",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/a/%2e/b",
            "/v1/allowed/..%2fsecret",
            "/v1/allowed/%2e%2e%2fsecret",
            "/v1/allowed/..\\secret",
            "/v1/allowed/..%5csecret",
            "/v1/allowed/..;/secret",
            "/v1/allowed/..%3bx/secret",
            "/v1/a%2Fb",
            "/v1/a%5Cb",
            "/v1/.;x",
        ] {
            assert!(check_request(&Method::GET, bad).is_err(), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/...",
            "/v1/.well-known",
            "/v1/a;b",
            "/v1/a%20b",
            "/v1/%zz",
            "/v1/100%",
            "/",
        ] {
            assert!(check_request(&Method::GET, ok).is_ok(), "{ok}");
        }
        assert!(check_request(&Method::CONNECT, "/").is_err());
        assert!(check_request(&Method::GET, "*").is_err());
    }

    /// Every short path over the bytes the check looks at: no panic, and a
    /// path without a `.`, `%`, `;` or `\\` always passes.
    #[test]
    fn the_check_never_panics_on_short_paths() {
        let alphabet = b"./%2eEfF5c;\\a";
        let mut path = vec![b'/'; 6];
        let n = alphabet.len();
        for mut i in 0..n.pow(5) {
            for slot in &mut path[1..] {
                *slot = alphabet[i % n];
                i /= n;
            }
            let text = std::str::from_utf8(&path).unwrap();
            let ok = check_request(&Method::GET, text).is_ok();
            if !path.iter().any(|b| b".%;\\".contains(b)) {
                assert!(ok, "{text}");
            }
        }
    }
}
