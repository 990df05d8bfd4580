//! A request's spans: their ids, parent and sampling from the
//! OpenTelemetry SDK (its W3C propagator, its `ParentBased(TraceIdRatio)`
//! sampler and its id generator), their bytes written as the request goes
//! ([`super::encode`]) and handed to the batcher when it ends.
//!
//! A span here is not a live SDK `Span`: what it holds is known in a few
//! places (its ids and start when it begins, the attempt's target when it
//! is sent, the results when the request ends), so [`Trace`] writes each
//! part as it comes. Measured (callgrind, `bench/instructions.sh
//! --trace`), the SDK's spans with `opentelemetry-otlp`'s encoder cost a
//! request 40,000 instructions, as much as proxying it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};

use super::encode::{self, Ids, SpanBody};
use super::export::Batcher;
use super::{operation, provider_name, AttemptInfo, Finish};
use crate::config::TelemetrySettings;
use crate::metrics::Metrics;

/// The longest `url.path` kept: a client's path is its own to make long.
const MAX_PATH: usize = 512;

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// How long the spans still waiting get to reach the collector at exit.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One config's sampler and batcher.
pub struct Telemetry {
    settings: TelemetrySettings,
    sampler: Sampler,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    batcher: Arc<Batcher>,
    /// The batcher's task.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The batcher and its task. Called on the runtime; `None` outside one.
    pub fn start(settings: &TelemetrySettings, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let version = env!("CARGO_PKG_VERSION");
        let resource = encode::resource(&[
            ("service.name", &settings.service_name),
            ("service.version", version),
        ]);
        let batcher = Batcher::new(
            settings,
            metrics,
            resource,
            encode::scope("sluice", version),
        );
        let task = handle.spawn(batcher.clone().run());
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
        tracing::info!(endpoint = %settings.endpoint, ratio = settings.sample_ratio, "exporting traces");
        Some(Arc::new(Self {
            settings: settings.clone(),
            sampler,
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            batcher,
            task: Mutex::new(Some(task)),
        }))
    }

    pub fn settings(&self) -> &TelemetrySettings {
        &self.settings
    }

    /// A request arrived: its server span's ids, the client's trace its
    /// parent, and whether it is sampled.
    // Out of line: the request path's functions stay as small as they
    // are without traces (measured: inlined hooks cost a plain stream 2%).
    #[inline(never)]
    pub fn begin(self: &Arc<Self>, method: &Method, path: &str, headers: &HeaderMap) -> Box<Trace> {
        let start = SystemTime::now();
        // Most requests come without one: no lookups then.
        let parent = if headers.contains_key(TRACEPARENT) {
            self.propagator.extract(&Headers(headers))
        } else {
            opentelemetry::Context::new()
        };
        let remote = parent.span().span_context().clone();
        let trace_id = if remote.is_valid() {
            remote.trace_id()
        } else {
            self.ids.new_trace_id()
        };
        let decision = self.sampler.should_sample(
            Some(&parent),
            trace_id,
            method.as_str(),
            &SpanKind::Server,
            &[],
            &[],
        );
        let sampled = decision.decision == SamplingDecision::RecordAndSample;
        let mut server = SpanBody::default();
        let mut state = String::new();
        if sampled {
            server = SpanBody::with_capacity(512);
            server.str("http.request.method", method.as_str());
            server.str("url.path", cut(path, MAX_PATH));
            state = decision.trace_state.header();
        }
        Box::new(Trace {
            tel: self.clone(),
            trace_id,
            span_id: self.ids.new_span_id(),
            parent: remote.is_valid().then(|| remote.span_id()),
            flags: if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            state,
            start,
            server,
            operation: operation(path),
            method: method.clone(),
            attempts: Vec::with_capacity(if sampled { 2 } else { 0 }),
            first_chunk: None,
            response_model: None,
        })
    }

    /// Sends what waits, within a few seconds: at exit.
    pub async fn close(&self) {
        self.batcher.close();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        let sent = async {
            if let Some(task) = task {
                let _ = task.await;
            }
            // Streams cut at the end of the drain may finish after the
            // batcher's last turn: theirs go too.
            self.batcher.flush().await;
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, sent).await;
    }
}

impl Drop for Telemetry {
    /// A reload replaced it and its last request ended: the batcher sends
    /// what it holds and its task ends.
    fn drop(&mut self) {
        self.batcher.close();
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
fn traceparent(trace: TraceId, span: SpanId, flags: TraceFlags) -> HeaderValue {
    fn hex(out: &mut [u8], bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
    }
    let mut out = *b"00-................................-................-..";
    hex(&mut out[3..35], &trace.to_bytes());
    hex(&mut out[36..52], &span.to_bytes());
    hex(&mut out[53..55], &[flags.to_u8()]);
    HeaderValue::from_bytes(&out).expect("hex and dashes")
}

/// One request's spans, written as they become known.
pub struct Trace {
    tel: Arc<Telemetry>,
    trace_id: TraceId,
    /// The server span's.
    span_id: SpanId,
    /// The client's span, from its `traceparent`.
    parent: Option<SpanId>,
    flags: TraceFlags,
    /// The `tracestate` every span carries (usually empty).
    state: String,
    start: SystemTime,
    server: SpanBody,
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
    span_id: SpanId,
    /// `{operation} {model}`: the model part.
    model: Option<Arc<str>>,
    started: SystemTime,
    /// Its response headers came, or it failed.
    answered: Option<SystemTime>,
    body: SpanBody,
}

impl Trace {
    fn sampled(&self) -> bool {
        self.flags.is_sampled()
    }

    /// Attempt `a.n` is being sent: its span, and with `propagate_upstream`
    /// its `traceparent` on `headers` (the client's `tracestate` is there
    /// already, forwarded).
    // Out of line: the request path's functions stay as small as they
    // are without traces (measured: inlined hooks cost a plain stream 2%).
    #[inline(never)]
    pub fn attempt(&mut self, a: AttemptInfo<'_>, headers: &mut HeaderMap) {
        let span_id = self.tel.ids.new_span_id();
        if self.tel.settings.propagate_upstream {
            headers.insert(TRACEPARENT, traceparent(self.trace_id, span_id, self.flags));
        }
        if !self.sampled() {
            return;
        }
        let up = a.upstream;
        let mut body = SpanBody::with_capacity(512);
        if let Some(op) = self.operation {
            body.str("gen_ai.operation.name", op);
        }
        body.str("gen_ai.provider.name", provider_name(up.preset));
        if let Some(m) = a.model {
            body.str("gen_ai.request.model", m);
        }
        body.str("server.address", &up.server.0);
        body.int("server.port", i64::from(up.server.1));
        body.str("sluice.upstream", &up.name);
        body.int("sluice.attempt", i64::from(a.n));
        if let Some(d) = a.deployment {
            body.str("sluice.deployment", d);
        }
        if let Some(from) = a.fallback_from {
            body.str("sluice.fallback_from", &from);
        }
        self.attempts.push(AttemptSpan {
            span_id,
            model: a.model.cloned(),
            started: SystemTime::now(),
            answered: None,
            body,
        });
    }

    /// The last attempt has its response headers, or failed.
    // Out of line: the request path's functions stay as small as they
    // are without traces (measured: inlined hooks cost a plain stream 2%).
    #[inline(never)]
    pub fn answered(&mut self) {
        if let Some(a) = self.attempts.last_mut() {
            a.answered = Some(SystemTime::now());
        }
    }

    /// The response's first body bytes went to the client: when, and
    /// the model it names.
    // Out of line: the request path's functions stay as small as they
    // are without traces (measured: inlined hooks cost a plain stream 2%).
    #[inline(never)]
    pub fn first_chunk(&mut self, chunk: &[u8]) {
        if self.first_chunk.is_none() && self.sampled() {
            self.first_chunk = Some(SystemTime::now());
            self.response_model = super::response_model(chunk);
        }
    }

    fn ids(
        &self,
        span: SpanId,
        parent: Option<SpanId>,
        parent_is_remote: bool,
        kind: u64,
    ) -> Ids<'_> {
        Ids {
            trace: self.trace_id,
            span,
            parent,
            parent_is_remote,
            flags: self.flags,
            state: &self.state,
            kind,
        }
    }

    /// The request is over: every span gets its results and goes to the
    /// batcher.
    // Out of line: the request path's functions stay as small as they
    // are without traces (measured: inlined hooks cost a plain stream 2%).
    #[inline(never)]
    pub fn finish(mut self, f: &Finish<'_>) {
        if !self.sampled() {
            return;
        }
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(640 * (self.attempts.len() + 1));
        let mut spans = 0;
        let last = self.attempts.len().saturating_sub(1);
        let attempts = std::mem::take(&mut self.attempts);
        let tried = attempts.len().max(f.results.len());
        for (i, mut a) in attempts.into_iter().enumerate() {
            // No result: the request ended (the client left, the drain
            // cut it) while this attempt waited for its answer.
            let result = f.results.get(i).copied().unwrap_or(Err("cancelled"));
            // SPEC §12: each attempt names the model the client asked for.
            if let Some(m) = f.requested_model {
                a.body.str("sluice.requested_model", m);
            }
            match result {
                Ok(code) => {
                    let n = code.as_u16();
                    a.body.int("http.response.status_code", i64::from(n));
                    if n >= 400 {
                        a.body.str("error.type", code.as_str());
                        a.body.error();
                    }
                }
                Err(word) => {
                    a.body.str("error.type", word);
                    a.body.error();
                }
            }
            // The answering attempt lasts as long as its body.
            let end = if i == last && result.is_ok() {
                self.answering(&mut a.body, a.started, f, now);
                now
            } else {
                a.answered.unwrap_or(now)
            };
            let ids = self.ids(a.span_id, Some(self.span_id), false, encode::CLIENT);
            match (self.operation, &a.model) {
                (Some(op), Some(m)) => a.body.finish(&ids, &[op, " ", m], a.started, end, &mut out),
                (Some(op), None) => a.body.finish(&ids, &[op], a.started, end, &mut out),
                _ => a
                    .body
                    .finish(&ids, &[self.method.as_str()], a.started, end, &mut out),
            }
            spans += 1;
        }
        let mut s = std::mem::take(&mut self.server);
        s.str("sluice.route", f.route);
        s.int("http.response.status_code", i64::from(f.status));
        s.str("sluice.request_id", f.request_id);
        s.int("sluice.attempts", tried as i64);
        if f.fallbacks > 0 {
            s.int("sluice.fallbacks", i64::from(f.fallbacks));
        }
        if let Some(m) = f.requested_model {
            s.str("sluice.requested_model", m);
        }
        match f.error {
            Some(code) => {
                s.str("error.type", code);
                s.error();
            }
            None if f.status >= 500 => {
                s.str("error.type", itoa::Buffer::new().format(f.status));
                s.error();
            }
            None => {}
        }
        let ids = self.ids(
            self.span_id,
            self.parent,
            self.parent.is_some(),
            encode::SERVER,
        );
        s.finish(
            &ids,
            &[self.method.as_str(), " ", f.route],
            self.start,
            now,
            &mut out,
        );
        spans += 1;
        self.tel.batcher.push(&out, spans);
    }

    /// The attempt whose response went to the client: its usage, its
    /// time to first chunk and the model it answered with.
    fn answering(&self, body: &mut SpanBody, started: SystemTime, f: &Finish<'_>, now: SystemTime) {
        if let Some(u) = f.usage {
            body.int("gen_ai.usage.input_tokens", u.input as i64);
            body.int("gen_ai.usage.output_tokens", u.output as i64);
        }
        if let Some(m) = &self.response_model {
            body.str("gen_ai.response.model", m);
        }
        if let Some(first) = self.first_chunk {
            if let Ok(d) = first.duration_since(started) {
                body.f64("sluice.time_to_first_chunk", d.as_secs_f64());
                body.event("first_chunk", first.min(now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_path_is_cut_at_a_character_boundary() {
        assert_eq!(cut("/v1/chat", 512), "/v1/chat");
        let long = format!("/{}", "é".repeat(400));
        let kept = cut(&long, MAX_PATH);
        assert!(kept.len() <= MAX_PATH && kept.len() >= MAX_PATH - 1);
        assert!(long.starts_with(kept));
    }

    #[test]
    fn traceparent_is_the_w3c_form() {
        let v = traceparent(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            TraceFlags::SAMPLED,
        );
        assert_eq!(v, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }
}
