//! The span exporter: each batch encoded by [`super::encode`] and posted
//! to the collector's `/v1/traces` with our own upstream client (one pool,
//! our rustls), so traces bring no second HTTP or TLS stack. The SDK's
//! batch thread calls it and waits; the post itself runs on the runtime,
//! bounded by the export timeout. A batch the collector does not take is
//! dropped (the next one is tried afresh, so a down collector never
//! backs spans up behind retries). Every post is counted; failures are
//! logged at most once a minute, with how many there were since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use crate::client::{Client, Target};
use crate::config::TelemetrySettings;
use crate::metrics::Metrics;

/// A collector's answer is a few bytes; more is not read.
const MAX_ANSWER: usize = 64 << 10;
/// At most one warning per this long while exports fail.
const LOG_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Export {
    client: Client<Full<Bytes>>,
    /// `POST` to the endpoint with its Host, content type and the
    /// configured headers.
    head: http::request::Parts,
    handle: tokio::runtime::Handle,
    timeout: Duration,
    /// The resource's attributes, encoded once.
    resource: Vec<u8>,
    metrics: Arc<Metrics>,
    gate: LogGate,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").finish_non_exhaustive()
    }
}

impl Export {
    pub(super) fn new(
        s: &TelemetrySettings,
        handle: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        let authority = s
            .endpoint
            .authority()
            .expect("checked: the endpoint has a host");
        let https = s.endpoint.scheme_str() == Some("https");
        let plain;
        let tls = match &s.tls {
            Some(t) => t.as_ref(),
            None => {
                // Never used over http://; the client wants one anyway.
                plain = rustls::ClientConfig::builder_with_provider(crate::config::tls_provider())
                    .with_safe_default_protocol_versions()
                    .expect("the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                &plain
            }
        };
        let client = Client::new(Target {
            authority,
            https,
            tls,
            connect_timeout: s.timeout,
        });
        metrics.trace_exports_start();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::HOST,
            HeaderValue::from_str(authority.as_str()).expect("an authority is a header value"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        for (name, value) in s.headers.iter().cloned().chain(env_headers()) {
            // Checked in the config; from the environment, skipped if not valid.
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                headers.insert(n, v);
            }
        }
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = Method::POST;
        head.uri = s.endpoint.clone();
        head.headers = headers;
        Self {
            client,
            head,
            handle,
            timeout: s.timeout,
            resource: Vec::new(),
            metrics,
            gate: LogGate::default(),
        }
    }

    /// Posts one encoded batch: `Err` with why it was not taken.
    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (client, head, timeout) = (self.client.clone(), self.head.clone(), self.timeout);
        self.handle.spawn(async move {
            let post = async {
                let res = client
                    .send(&head, Full::new(Bytes::from(body)))
                    .await
                    .map_err(|e| e.to_string())?;
                let status = res.status();
                // Read the answer so the connection can be used again.
                let answer = Limited::new(res.into_body(), MAX_ANSWER).collect().await;
                match (status.is_success(), answer) {
                    (true, Ok(_)) => Ok(()),
                    (true, Err(e)) => Err(format!("the collector's answer broke off: {e}")),
                    (false, _) => Err(format!("the collector answered {status}")),
                }
            };
            let res = tokio::time::timeout(timeout, post).await;
            let _ = tx.send(res.unwrap_or_else(|_| Err(format!("timed out after {timeout:?}"))));
        });
        rx.await
            .unwrap_or_else(|_| Err("the runtime stopped".into()))
    }
}

impl SpanExporter for Export {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let body = super::encode::request(&batch, &self.resource);
        drop(batch);
        let res = self.post(body).await;
        self.metrics.trace_export(res.is_ok());
        res.map_err(|why| {
            self.gate.failed(&why);
            OTelSdkError::InternalFailure(why)
        })
    }

    fn set_resource(&mut self, resource: &Resource) {
        let attrs: Vec<KeyValue> = resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        self.resource = super::encode::resource(&attrs);
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`:
/// `name=value,name=value`, values percent-decoded (the OTLP exporter
/// spec), so a collector's credential can stay out of the config file.
fn env_headers() -> Vec<(String, String)> {
    let raw = std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default();
    parse_headers(&raw)
}

fn parse_headers(raw: &str) -> Vec<(String, String)> {
    raw.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_ascii_lowercase(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Logs the first failure, then at most one line per `LOG_EVERY` saying
/// how many there were.
#[derive(Default)]
struct LogGate {
    /// Seconds since `epoch` of the last line, plus one (0: never).
    last: AtomicU64,
    since: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl LogGate {
    fn failed(&self, why: &str) {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = epoch.elapsed().as_secs() + 1;
        let missed = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + LOG_EVERY.as_secs() {
            return;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.since.store(0, Ordering::Relaxed);
            tracing::warn!(failed = missed, "telemetry: spans not exported: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_headers_are_pairs_with_percent_decoded_values() {
        assert_eq!(
            parse_headers("api-key=abc%3D%3D, Authorization=Basic%20x ,bad, =v"),
            vec![
                ("api-key".to_owned(), "abc==".to_owned()),
                ("authorization".to_owned(), "Basic x".to_owned()),
            ]
        );
        assert!(parse_headers("").is_empty());
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn the_gate_opens_once_then_waits() {
        let g = LogGate::default();
        g.failed("x");
        assert_ne!(g.last.load(Ordering::Relaxed), 0);
        let before = g.last.load(Ordering::Relaxed);
        for _ in 0..10 {
            g.failed("x");
        }
        // Still within the minute: no new line, the misses are counted.
        assert_eq!(g.last.load(Ordering::Relaxed), before);
        assert_eq!(g.since.load(Ordering::Relaxed), 10);
    }
}
