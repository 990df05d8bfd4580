//! The spans themselves, on the OpenTelemetry SDK.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span,
};
use opentelemetry_sdk::Resource;

use super::export::Export;
use super::{operation, provider_name, AttemptInfo, Finish};
use crate::config::TelemetrySettings;
use crate::metrics::Metrics;

/// How long the spans still queued get to reach the collector at exit.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One config's tracer and exporter.
pub struct Telemetry {
    settings: TelemetrySettings,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The exporter and its batch thread. Called on the runtime (its
    /// handle carries the exports); `None`, logged, if it cannot be made.
    pub fn start(settings: &TelemetrySettings, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let exporter = Export::new(settings, handle, metrics);
        // Bigger than the SDK's 2048: a burst of streams ending at once
        // would otherwise drop spans between two batches.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(queue_size())
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let resource = Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .with_sampler(sampler)
            .build();
        let tracer = provider.tracer("sluice");
        tracing::info!(endpoint = %settings.endpoint, ratio = settings.sample_ratio, "exporting traces");
        Some(Arc::new(Self {
            settings: settings.clone(),
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        }))
    }

    pub fn settings(&self) -> &TelemetrySettings {
        &self.settings
    }

    /// A request arrived: its server span, the client's trace its parent.
    pub fn begin(self: &Arc<Self>, method: &Method, path: &str, headers: &HeaderMap) -> Box<Trace> {
        let parent = self.propagator.extract(&Headers(headers));
        let now = SystemTime::now();
        let mut attrs = Vec::with_capacity(8);
        attrs.push(KeyValue::new(
            "http.request.method",
            method.as_str().to_owned(),
        ));
        attrs.push(KeyValue::new("url.path", path.to_owned()));
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Server)
            .with_start_time(now)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        let recording = span.is_recording();
        Box::new(Trace {
            tel: self.clone(),
            server: parent.with_span(span),
            recording,
            operation: operation(path),
            method: method.clone(),
            attempts: Vec::new(),
            first_chunk: None,
            response_model: None,
        })
    }

    /// Sends what is queued, within a few seconds: at exit, off the
    /// runtime's threads (the export itself runs on the runtime).
    pub async fn close(&self) {
        let provider = self.provider.clone();
        let _ =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(CLOSE_WAIT)).await;
    }
}

impl Drop for Telemetry {
    /// A reload replaced it and its last span ended: the batch thread
    /// sends what it holds and stops, never on the runtime's thread (the
    /// export needs the runtime, which may have that one thread only).
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("sluice-otel-close".into())
            .spawn(move || provider.shutdown_with_timeout(CLOSE_WAIT));
    }
}

/// The request's headers, as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `00-{trace id}-{span id}-{flags}` (W3C Trace Context), written
/// straight into its 55 bytes.
fn traceparent(cx: &opentelemetry::trace::SpanContext) -> HeaderValue {
    fn hex(out: &mut [u8], bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
    }
    let mut out = *b"00-................................-................-..";
    hex(&mut out[3..35], &cx.trace_id().to_bytes());
    hex(&mut out[36..52], &cx.span_id().to_bytes());
    hex(&mut out[53..55], &[cx.trace_flags().to_u8()]);
    HeaderValue::from_bytes(&out).expect("hex and dashes")
}

/// `OTEL_BSP_MAX_QUEUE_SIZE` when set, else 16384 spans.
fn queue_size() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16_384)
}

/// One request's spans.
pub struct Trace {
    tel: Arc<Telemetry>,
    /// Holds the server span; the attempts' parent.
    server: Context,
    /// Sampled: attributes are worth making.
    recording: bool,
    operation: Option<&'static str>,
    method: Method,
    attempts: Vec<AttemptSpan>,
    first_chunk: Option<SystemTime>,
    /// `gen_ai.response.model`, from the first chunk.
    response_model: Option<String>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("attempts", &self.attempts.len())
            .finish_non_exhaustive()
    }
}

struct AttemptSpan {
    span: Span,
    started: SystemTime,
    /// Its response headers came, or it failed.
    answered: Option<SystemTime>,
}

impl Trace {
    /// Attempt `a.n` is being sent: its span, and with `propagate_upstream`
    /// its `traceparent` (and the client's `tracestate`) on `headers`.
    pub fn attempt(&mut self, a: AttemptInfo<'_>, headers: &mut HeaderMap) {
        let tracer = &self.tel.tracer;
        let started = SystemTime::now();
        let mut builder = tracer
            .span_builder(self.attempt_name(a.model))
            .with_kind(SpanKind::Client)
            .with_start_time(started);
        if self.recording {
            let up = a.upstream;
            let mut attrs = Vec::with_capacity(10);
            if let Some(op) = self.operation {
                attrs.push(KeyValue::new("gen_ai.operation.name", op));
            }
            attrs.push(KeyValue::new(
                "gen_ai.provider.name",
                provider_name(up.preset),
            ));
            if let Some(m) = a.model {
                attrs.push(KeyValue::new(
                    "gen_ai.request.model",
                    Value::from(m.clone()),
                ));
            }
            attrs.push(KeyValue::new(
                "server.address",
                up.authority.host().to_owned(),
            ));
            let port =
                up.authority
                    .port_u16()
                    .unwrap_or(if up.scheme == http::uri::Scheme::HTTPS {
                        443
                    } else {
                        80
                    });
            attrs.push(KeyValue::new("server.port", i64::from(port)));
            attrs.push(KeyValue::new("sluice.upstream", up.name.clone()));
            attrs.push(KeyValue::new("sluice.attempt", i64::from(a.n)));
            if let Some(d) = a.deployment {
                attrs.push(KeyValue::new("sluice.deployment", d.to_owned()));
            }
            if let Some(from) = a.fallback_from {
                attrs.push(KeyValue::new("sluice.fallback_from", Value::from(from)));
            }
            builder = builder.with_attributes(attrs);
        }
        let span = builder.start_with_context(tracer, &self.server);
        if self.tel.settings.propagate_upstream {
            // The client's `tracestate` is on the forwarded head already.
            headers.insert("traceparent", traceparent(span.span_context()));
        }
        self.attempts.push(AttemptSpan {
            span,
            started,
            answered: None,
        });
    }

    /// `{operation} {model}` as the GenAI conventions name a client span,
    /// else the method.
    fn attempt_name(&self, model: Option<&Arc<str>>) -> String {
        match (self.operation, model) {
            (Some(op), Some(m)) => format!("{op} {m}"),
            (Some(op), None) => op.to_owned(),
            _ => self.method.as_str().to_owned(),
        }
    }

    /// The last attempt has its response headers, or failed.
    pub fn answered(&mut self) {
        if let Some(a) = self.attempts.last_mut() {
            a.answered = Some(SystemTime::now());
        }
    }

    /// The response's first body bytes went to the client: when, and
    /// the model it names.
    pub fn first_chunk(&mut self, chunk: &[u8]) {
        if self.first_chunk.is_none() {
            self.first_chunk = Some(SystemTime::now());
            if self.recording {
                self.response_model = super::response_model(chunk);
            }
        }
    }

    /// The request is over: every span gets its results and ends.
    pub fn finish(mut self, f: &Finish<'_>) {
        let now = SystemTime::now();
        let last = self.attempts.len().saturating_sub(1);
        let attempts = std::mem::take(&mut self.attempts);
        for (i, (mut a, result)) in attempts.into_iter().zip(f.results).enumerate() {
            if self.recording {
                match result {
                    Ok(status) => {
                        let code = i64::from(status.as_u16());
                        a.span
                            .set_attribute(KeyValue::new("http.response.status_code", code));
                        if status.as_u16() >= 400 {
                            a.span.set_attribute(KeyValue::new(
                                "error.type",
                                status.as_str().to_owned(),
                            ));
                            a.span.set_status(Status::error(""));
                        }
                    }
                    Err(word) => {
                        a.span.set_attribute(KeyValue::new("error.type", *word));
                        a.span.set_status(Status::error(""));
                    }
                }
            }
            // The answering attempt lasts as long as its body.
            let end = if i == last && result.is_ok() {
                if self.recording {
                    self.answering(&mut a.span, a.started, f, now);
                }
                now
            } else {
                a.answered.unwrap_or(now)
            };
            a.span.end_with_timestamp(end);
        }
        let span = self.server.span();
        span.update_name(format!("{} {}", self.method.as_str(), f.route));
        if self.recording {
            span.set_attribute(KeyValue::new("sluice.route", f.route.to_owned()));
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(f.status),
            ));
            span.set_attribute(KeyValue::new("sluice.request_id", f.request_id.to_owned()));
            span.set_attribute(KeyValue::new("sluice.attempts", f.results.len() as i64));
            if f.fallbacks > 0 {
                span.set_attribute(KeyValue::new("sluice.fallbacks", i64::from(f.fallbacks)));
            }
            if let Some(m) = f.requested_model {
                span.set_attribute(KeyValue::new(
                    "sluice.requested_model",
                    Value::from(m.clone()),
                ));
            }
            if let Some(op) = self.operation {
                span.set_attribute(KeyValue::new("gen_ai.operation.name", op));
            }
            let error = match f.error {
                Some(code) => Some(code.to_owned()),
                None if f.status >= 500 => Some(f.status.to_string()),
                None => None,
            };
            if let Some(e) = error {
                span.set_attribute(KeyValue::new("error.type", e));
                span.set_status(Status::error(""));
            }
        }
        span.end_with_timestamp(now);
    }

    /// The attempt whose response went to the client: its usage, its
    /// time to first chunk and the model the client asked for.
    fn answering(&self, span: &mut Span, started: SystemTime, f: &Finish<'_>, now: SystemTime) {
        if let Some(u) = f.usage {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", u.input as i64));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", u.output as i64));
        }
        if let Some(m) = f.requested_model {
            span.set_attribute(KeyValue::new(
                "sluice.requested_model",
                Value::from(m.clone()),
            ));
        }
        if let Some(m) = &self.response_model {
            span.set_attribute(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        if let Some(first) = self.first_chunk {
            if let Ok(d) = first.duration_since(started) {
                span.set_attribute(KeyValue::new("sluice.time_to_first_chunk", d.as_secs_f64()));
                span.add_event_with_timestamp("first_chunk", first.min(now), Vec::new());
            }
        }
    }
}
