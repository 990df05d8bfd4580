//! The admin listener: `/healthz` (the process runs), `/readyz` (serving,
//! 503 while draining), `/metrics` (Prometheus text). Plain HTTP/1.1; it
//! keeps answering through the drain so probes see the 503.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain;
use crate::metrics::Metrics;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, drain: drain::Watch, metrics: Arc<Metrics>) {
    // Probes and scrapes are short: one request per connection, headers
    // within 5 s, so idle connections cannot pile up.
    let mut http = http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(5))
        .keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (drain, metrics, http) = (drain.clone(), metrics.clone(), http.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let res = respond(&req, &drain, &metrics);
                async move { Ok::<_, Infallible>(res) }
            });
            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    drain: &drain::Watch,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = status;
        res
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if drain.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut res = Response::new(Full::new(Bytes::from(metrics.encode())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            res
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}
