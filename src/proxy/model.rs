//! Model routing (SPEC §7): which model a request names, read from the
//! top-level `model` of its JSON body without building a JSON tree, and
//! where that sends it: a plan down the model's chain, the route's own
//! upstream (passthrough), or a refusal. Also `GET {prefix}/models`.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, Method, Response, StatusCode};

use super::account::Facts;
use crate::backend::{Backends, Plan};
use crate::body::RequestBody;
use crate::config::{ModelRouting, UnknownModel};
use crate::error::ProxyError;
use crate::scan::{self, Field, Fields, ScanError, Scanner};

/// Where a model-routed request goes.
#[derive(Debug)]
pub enum Target {
    /// To the route's own upstream, body untouched: a body not read for a
    /// model (`unknown: false`), or a model not known here.
    Direct { unknown: bool },
    /// Down a model's chain.
    Model(Box<Routed>),
}

/// A request routed by its model.
#[derive(Debug)]
pub struct Routed {
    pub plan: Plan,
    /// The name the client sent (a `[models]` name).
    pub requested: Arc<str>,
    /// Where the `model` value lies in the body, for the rewrite.
    pub span: Range<u64>,
}

/// Whether this request is one whose body is read for its model: a `POST`
/// of JSON in identity encoding. Others go to the route's upstream.
fn readable(parts: &Parts) -> Result<(), ProxyError> {
    let h = &parts.headers;
    let encoded = h
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(ProxyError::UnsupportedContentEncoding);
    }
    if parts.method != Method::POST || !is_json(h) {
        return Err(ProxyError::ModelRoutingUnsupportedBody);
    }
    Ok(())
}

pub(super) fn is_json(h: &HeaderMap) -> bool {
    let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // What SDKs send, without the parsing below.
    if ct.eq_ignore_ascii_case("application/json") {
        return true;
    }
    let essence = ct.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Decides where a request on a model-routed route goes, reading as much
/// of its body as it takes to find the top-level `model` (within
/// `peek_limit`). A body that names a model twice is refused before
/// anything is sent.
/// With `extra` fields, a body held whole is read for them too: what it
/// says of tokens comes back with the target.
pub async fn route(
    parts: &Parts,
    body: &mut RequestBody,
    routing: &ModelRouting,
    backends: &Backends,
    read_timeout: std::time::Duration,
    reserve: &mut (dyn FnMut(u64) -> bool + Send),
    extra: Fields,
) -> Result<(Target, Option<Facts>), ProxyError> {
    if let Err(e) = readable(parts) {
        return match backends.direct() {
            Some(_) => Ok((Target::Direct { unknown: false }, None)),
            None => Err(e),
        };
    }
    let mut scanner = Scanner::new(extra.with(Field::Model));
    let held = body.held();
    let mut offset = 0u64;
    for chunk in &held {
        scanner.feed(chunk).map_err(scan_error)?;
        offset += chunk.len() as u64;
    }
    let whole = matches!(body, RequestBody::Full(_) | RequestBody::Parts(_));
    if whole {
        // All of it is here: read it to the end, so a second `model`
        // anywhere is caught before a byte goes upstream.
        match scanner.finish() {
            Ok(()) => {}
            Err(e @ ScanError::Duplicate(_)) => return Err(scan_error(e)),
            Err(e) if scanner.span(Field::Model).is_none() => return Err(scan_error(e)),
            // Broken after the model: the provider answers for its JSON.
            Err(_) => {}
        }
    } else {
        while scanner.span(Field::Model).is_none() && !scanner.is_done() {
            if offset > routing.peek_limit {
                return Err(ProxyError::RoutingBodyTooLarge);
            }
            match body.hold_more(read_timeout).await? {
                // Held beyond what was taken for the body up front.
                Some(chunk) if !reserve(chunk.len() as u64) => {
                    return Err(ProxyError::Overloaded);
                }
                Some(chunk) => {
                    scanner.feed(&chunk).map_err(scan_error)?;
                    offset += chunk.len() as u64;
                }
                None => {
                    scanner.finish().map_err(scan_error)?;
                    break;
                }
            }
        }
    }
    let span = scanner
        .span(Field::Model)
        .ok_or(ProxyError::ModelRequired)?
        .value
        .clone();
    // The same limit whether the body was held whole or not.
    if span.end > routing.peek_limit {
        return Err(ProxyError::RoutingBodyTooLarge);
    }
    let facts = (whole && !extra.is_empty()).then(|| Facts::read(&scanner, &held));
    if !whole {
        // The rest streams: a second `model` in it still breaks it off.
        body.scan_rest(scanner);
    }
    let held = if whole { held } else { body.held() };
    let raw = scan::slice(&held, span.clone());
    // The value as sent, quotes and all: unescaped only when it has escapes.
    let name: Cow<'_, str> = match raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) {
        // Plain text: no escape, no control byte (which JSON forbids raw).
        Some(inner) if inner.iter().all(|&b| b != b'\\' && b >= 0x20) => {
            Cow::Borrowed(std::str::from_utf8(inner).map_err(|_| ProxyError::ModelRequired)?)
        }
        _ => Cow::Owned(serde_json::from_slice(&raw).map_err(|_| ProxyError::ModelRequired)?),
    };
    let target = match backends.plan(&name) {
        Some(plan) => Target::Model(Box::new(Routed {
            // The config's own name, shared: the lookup is exact.
            requested: backends.current(&plan).name.clone(),
            plan,
            span,
        })),
        None if routing.unknown_model == UnknownModel::Passthrough => {
            Target::Direct { unknown: true }
        }
        None => return Err(ProxyError::ModelNotFound),
    };
    Ok((target, facts))
}

/// What a whole JSON body says of tokens, on a route not routed by model;
/// `None` for any other body (a streaming one, not JSON, broken JSON).
/// A field it reads given twice is refused, as on a model-routed route:
/// sluice and the provider must not read different values.
pub fn facts(
    parts: &Parts,
    body: &RequestBody,
    fields: Fields,
) -> Result<Option<Facts>, ProxyError> {
    let RequestBody::Full(Some(whole)) = body else {
        return Ok(None);
    };
    if readable(parts).is_err() {
        return Ok(None);
    }
    let mut scanner = Scanner::new(fields);
    let read = scanner.feed(whole).and_then(|()| scanner.finish());
    match read {
        Ok(()) => Ok(Some(Facts::read(&scanner, std::slice::from_ref(whole)))),
        Err(e @ ScanError::Duplicate(_)) => Err(scan_error(e)),
        // Not JSON: the upstream answers for it; the estimate goes by length.
        Err(_) => Ok(None),
    }
}

fn scan_error(e: ScanError) -> ProxyError {
    match e {
        ScanError::Duplicate(_) => ProxyError::AmbiguousRequestBody,
        ScanError::Invalid { .. } | ScanError::Truncated => ProxyError::InvalidJsonBody,
    }
}

/// Whether `path` is the route's `{prefix}/models`.
pub fn is_list_models(method: &Method, path: &str, prefix: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest == "/models" || rest == "/models/")
}

/// `GET {prefix}/models` in OpenAI's list shape, from the names the route
/// allows.
pub fn list_models(backends: &Backends) -> Response<Bytes> {
    #[derive(serde::Serialize)]
    struct Item<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Item<'a>>,
    }
    let data = backends
        .allowed()
        .map(|m| Item {
            id: &m.model.name,
            object: "model",
            created: 0,
            owned_by: "sluice",
        })
        .collect();
    let body = serde_json::to_vec(&List {
        object: "list",
        data,
    })
    .expect("serialises");
    let mut res = Response::new(Bytes::from(body));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            h
        };
        assert!(is_json(&h("application/json")));
        assert!(is_json(&h("Application/JSON; charset=utf-8")));
        assert!(is_json(&h("application/vnd.api+json")));
        assert!(!is_json(&h("multipart/form-data; boundary=x")));
        assert!(!is_json(&h("text/json-ish")));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn the_models_path_is_the_prefixs() {
        assert!(is_list_models(&Method::GET, "/v1/models", "/v1"));
        assert!(is_list_models(&Method::GET, "/models", ""));
        assert!(!is_list_models(&Method::POST, "/v1/models", "/v1"));
        assert!(!is_list_models(&Method::GET, "/v1/models/x", "/v1"));
    }
}
