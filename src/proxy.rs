//! The request story, one phase per call: identify, route, read the body,
//! rewrite, send, respond. This is the only module that calls the others.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::access::AccessLog;
use crate::body::{BodyLimits, RequestBody, ResponseBody};
use crate::config::Config;
use crate::error::{Fault, ProxyError};
use crate::route::RouteTable;
use crate::upstream::{self, Upstream, X_REQUEST_ID};

/// Everything a request needs, built once per config.
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable<Arc<Upstream>>,
    limits: BodyLimits,
}

impl Proxy {
    pub fn new(config: &Config) -> Self {
        // One pool per upstream, shared by the routes that use it.
        let upstreams: BTreeMap<&str, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|(name, u)| (name.as_str(), Arc::new(Upstream::new(u.clone()))))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let up = upstreams[r.upstream.name.as_str()].clone();
                (r.clone(), up)
            })
            .collect();
        Self {
            routes: RouteTable::new(routes),
            limits: BodyLimits {
                max_request_body: config.server.max_request_body,
                retry_buffer: config.server.retry_buffer,
            },
        }
    }

    /// Serves one client request. Never fails: errors become responses here.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let id = request_id(req.headers());
        let span = tracing::info_span!("request", id = id.to_str().unwrap_or("-"));
        let mut log = AccessLog::new(span.clone(), start, req.method().clone(), req.uri().clone());
        let outcome = self.forward(req, &id, &mut log).instrument(span).await;
        let mut res = match outcome {
            Ok(res) => {
                log.status = Some(res.status());
                res.map(|b| ResponseBody::upstream(b, log))
            }
            Err(e) => {
                if e.fault() == Fault::Client {
                    tracing::debug!(parent: &log.span, code = e.code(), "rejected: {e}");
                }
                log.status = Some(e.status());
                log.error = Some(e.code());
                e.into_response().map(|b| ResponseBody::full(b, log))
            }
        };
        res.headers_mut().insert(X_REQUEST_ID.clone(), id);
        Ok(res)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        id: &HeaderValue,
        log: &mut AccessLog,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::CONNECT || !parts.uri.path().starts_with('/') {
            return Err(ProxyError::BadRequest);
        }
        let (route, upstream) = self
            .routes
            .find(&parts.method, parts.uri.path())
            .ok_or(ProxyError::RouteNotFound)?;
        log.route = Some(route.clone());
        let body = RequestBody::read(body, self.limits).await?;
        upstream::rewrite_request(&mut parts, route, id);
        let sent = Instant::now();
        log.attempts = 1;
        let res = upstream
            .send(Request::from_parts(parts, body))
            .await
            .map_err(|e| upstream::classify(&e, &route.upstream.name))?;
        log.ttfb = Some(sent.elapsed());
        let (mut parts, body) = res.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// The client's `x-request-id` when it is sane, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(s).expect("a UUID is a valid header value")
}
