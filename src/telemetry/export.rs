//! The batcher and the exporter. Finished requests append their encoded
//! spans ([`super::encode`]) to one buffer under a lock held for a copy;
//! a task on the runtime takes the buffer every `OTEL_BSP_SCHEDULE_DELAY`
//! (5 s), or as soon as `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512) spans wait,
//! and posts it, at most that many spans per post, to the collector's
//! `/v1/traces` with our own upstream client (one pool, our rustls): no
//! second HTTP or TLS stack, no thread of its own, nothing on a request's
//! path. Past `OTEL_BSP_MAX_QUEUE_SIZE` (16,384) waiting spans, new ones
//! are dropped, so a collector that is down or slow costs memory only up
//! to there. A batch the collector does not take within `timeout` is
//! dropped too (the next is tried afresh: spans never pile up behind
//! retries). Every post is counted; failures are logged at most once a
//! minute, with how many there were since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::{BodyExt, Full, Limited};

use crate::client::{Client, Target};
use crate::config::TelemetrySettings;
use crate::metrics::Metrics;

/// A collector's answer is a few bytes; more is not read.
const MAX_ANSWER: usize = 64 << 10;
/// At most one warning per this long while exports fail.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The OpenTelemetry SDK's batch settings, from its environment variables.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchSettings {
    pub delay: Duration,
    pub max_batch: usize,
    pub max_queue: usize,
}

impl BatchSettings {
    pub fn from_env() -> Self {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        let max_queue = var("OTEL_BSP_MAX_QUEUE_SIZE", 16_384) as usize;
        Self {
            delay: Duration::from_millis(var("OTEL_BSP_SCHEDULE_DELAY", 5_000)),
            max_batch: (var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512) as usize).min(max_queue),
            max_queue,
        }
    }
}

/// Spans waiting for the next post.
#[derive(Default)]
struct Pending {
    /// Framed spans, back to back.
    bytes: Vec<u8>,
    /// Where each span ends in `bytes`.
    ends: Vec<usize>,
}

pub(super) struct Batcher {
    pending: Mutex<Pending>,
    /// A full batch waits, or the batcher is to close.
    wake: tokio::sync::Notify,
    closing: std::sync::atomic::AtomicBool,
    batch: BatchSettings,
    /// Logs spans turned away, apart from failed posts.
    drops: LogGate,
    export: Export,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    pub fn new(
        s: &TelemetrySettings,
        metrics: Arc<Metrics>,
        resource: Vec<u8>,
        scope: Vec<u8>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            closing: Default::default(),
            batch: BatchSettings::from_env(),
            drops: LogGate::default(),
            export: Export::new(s, metrics, resource, scope),
        })
    }

    /// A request's spans, framed (`n` of them in `spans`).
    pub fn push(&self, spans: &[u8], n: usize) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.ends.len() + n > self.batch.max_queue {
            drop(p);
            self.drops.failed(&format!(
                "{} spans wait for the collector already (OTEL_BSP_MAX_QUEUE_SIZE): a request's spans dropped",
                self.batch.max_queue
            ));
            return;
        }
        // One end for the request's spans together: they go in one post.
        p.bytes.extend_from_slice(spans);
        let end = p.bytes.len();
        for _ in 0..n {
            p.ends.push(end);
        }
        let full = p.ends.len() >= self.batch.max_batch;
        drop(p);
        if full {
            self.wake.notify_one();
        }
    }

    /// Posts what waits every `delay`, or when a batch is full, until
    /// [`Batcher::close`]; then once more.
    pub async fn run(self: Arc<Self>) {
        loop {
            let closing = tokio::select! {
                () = tokio::time::sleep(self.batch.delay) => false,
                () = self.wake.notified() => self.closing.load(Ordering::Acquire),
            };
            self.flush().await;
            if closing {
                return;
            }
        }
    }

    /// The run loop sends what waits and ends.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub async fn flush(&self) {
        let taken = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // The next batch starts at this one's size: no regrowth (and
            // no copy of what is there) while requests append.
            // Up to 1 MiB kept: a burst does not keep its size for good.
            let next = Pending {
                bytes: Vec::with_capacity(p.bytes.len().min(1 << 20)),
                ends: Vec::with_capacity(p.ends.len().min(1 << 12)),
            };
            std::mem::replace(&mut *p, next)
        };
        let mut from = 0;
        for to in cuts(&taken.ends, self.batch.max_batch) {
            self.export.send(&taken.bytes[from..to]).await;
            from = to;
        }
    }
}

/// Where posts end: up to `max` spans each, never between two spans of
/// one request (`ends` repeats a request's end for each of its spans).
fn cuts(ends: &[usize], max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut next = 0;
    while next < ends.len() {
        let mut last = (next + max.max(1)).min(ends.len()) - 1;
        while last + 1 < ends.len() && ends[last + 1] == ends[last] {
            last += 1;
        }
        out.push(ends[last]);
        next = last + 1;
    }
    out
}

/// Posts batches to the collector.
struct Export {
    client: Client<Full<Bytes>>,
    /// `POST` to the endpoint with its Host, content type and the
    /// configured headers.
    head: http::request::Parts,
    timeout: Duration,
    /// The `Resource` and `InstrumentationScope` bodies, encoded once.
    resource: Vec<u8>,
    scope: Vec<u8>,
    metrics: Arc<Metrics>,
    gate: LogGate,
}

impl Export {
    fn new(
        s: &TelemetrySettings,
        metrics: Arc<Metrics>,
        resource: Vec<u8>,
        scope: Vec<u8>,
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
            timeout: s.timeout,
            resource,
            scope,
            metrics,
            gate: LogGate::default(),
        }
    }

    /// Posts these framed spans; counts and logs the outcome.
    async fn send(&self, spans: &[u8]) {
        let body = super::encode::request(&self.resource, &self.scope, spans);
        let res = match tokio::time::timeout(self.timeout, self.post(body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        };
        self.metrics.trace_export(res.is_ok());
        if let Err(why) = res {
            self.gate.failed(&why);
        }
    }

    /// `Err` with why the collector did not take it.
    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let res = self
            .client
            .send(&self.head, Full::new(Bytes::from(body)))
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
    fn posts_hold_up_to_the_batch_size_and_keep_a_requests_spans_together() {
        // Three requests of 2, 3 and 1 spans, ending at 20, 50 and 60.
        let ends = [20, 20, 50, 50, 50, 60];
        assert_eq!(cuts(&ends, 512), vec![60]);
        assert_eq!(cuts(&ends, 2), vec![20, 50, 60]);
        assert_eq!(cuts(&ends, 4), vec![50, 60]);
        assert_eq!(cuts(&ends, 1), vec![20, 50, 60]);
        assert!(cuts(&[], 512).is_empty());
    }

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
