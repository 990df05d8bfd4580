//! Traces (SPEC §12): one SERVER span per request, one CLIENT span per
//! attempt, with the GenAI semantic conventions, exported over OTLP/HTTP
//! (protobuf) in batches by a task on the runtime.
//!
//! The request path holds an `Option<Box<Trace>>`: `None` when
//! `[telemetry.otlp]` has no endpoint (or the binary was built without the
//! `otel` feature), and then every hook is one branch. With traces on, the
//! server span begins when the request arrives (its parent the client's
//! `traceparent`, read by the SDK's propagator; sampled by its sampler),
//! each attempt's span when it is sent (its `traceparent` goes upstream
//! with `propagate_upstream`), and what is known only at the end (status,
//! usage, the attempt's result) is written when the request finishes,
//! which for a stream is when it ends (`otel.rs`, `encode.rs`); the
//! batcher posts the spans (`export.rs`).
//!
//! Attributes come from config names, fixed words and numbers: never a
//! body, a prompt, a completion or a key.

#[cfg(feature = "otel")]
mod encode;
#[cfg(feature = "otel")]
mod export;
#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "otel")]
pub use otel::{Telemetry, Trace};

/// Built without the `otel` feature: nothing can be made, every hook is
/// unreachable (the config refuses an endpoint).
#[cfg(not(feature = "otel"))]
mod off {
    use std::sync::Arc;

    #[derive(Debug)]
    pub enum Telemetry {}

    #[derive(Debug)]
    pub enum Trace {}

    impl Telemetry {
        pub fn start(
            s: &crate::config::TelemetrySettings,
            _: Arc<crate::metrics::Metrics>,
        ) -> Option<Arc<Self>> {
            let _ = s;
            None
        }

        pub fn settings(&self) -> &crate::config::TelemetrySettings {
            match *self {}
        }

        pub fn begin(&self, _: &http::Method, _: &str, _: &http::HeaderMap) -> Box<Trace> {
            match *self {}
        }

        pub async fn close(&self) {
            match *self {}
        }
    }

    impl Trace {
        pub fn attempt(&mut self, _: super::AttemptInfo<'_>, _: &mut http::HeaderMap) {
            match *self {}
        }
        pub fn answered(&mut self) {
            match *self {}
        }
        pub fn first_chunk(&mut self, _: &[u8]) {
            match *self {}
        }
        pub fn finish(self, _: &super::Finish<'_>) {
            match self {}
        }
    }
}
#[cfg(not(feature = "otel"))]
pub use off::{Telemetry, Trace};

use std::sync::Arc;

use crate::usage::Usage;

/// What an attempt's span says of where it went, known when it is sent.
#[derive(Debug)]
pub struct AttemptInfo<'a> {
    /// From 1.
    pub n: u32,
    pub upstream: &'a crate::config::Upstream,
    /// `upstream/model`, for a model-routed request.
    pub deployment: Option<&'a str>,
    /// The model sent upstream, when sluice knows it.
    pub model: Option<&'a Arc<str>>,
    /// The model the chain moved on from, on the first attempt after a fallback.
    pub fallback_from: Option<Arc<str>>,
}

/// What is known once the request is over.
#[derive(Debug)]
pub struct Finish<'a> {
    pub route: &'a str,
    /// 499: no response went out.
    pub status: u16,
    /// sluice's own error code, or how the body was cut.
    pub error: Option<&'static str>,
    pub request_id: &'a str,
    /// Each attempt's status or outcome word, in order.
    pub results: &'a [Result<http::StatusCode, &'static str>],
    pub fallbacks: u32,
    /// The name the client sent, on a model-routed route.
    pub requested_model: Option<&'a Arc<str>>,
    /// What the answering attempt's response reported.
    pub usage: Option<Usage>,
}

/// `gen_ai.operation.name` from the path a client called.
pub fn operation(path: &str) -> Option<&'static str> {
    let path = path.trim_end_matches('/');
    if path.ends_with("/chat/completions")
        || path.ends_with("/messages")
        || path.ends_with("/responses")
    {
        Some("chat")
    } else if path.ends_with("/completions") {
        Some("text_completion")
    } else if path.ends_with("/embeddings") {
        Some("embeddings")
    } else {
        None
    }
}

/// `gen_ai.provider.name`: the semantic conventions' names where they
/// have one, else the preset's word.
pub fn provider_name(p: crate::config::Preset) -> &'static str {
    use crate::config::Preset;
    match p {
        Preset::Openai => "openai",
        Preset::Azure => "azure.ai.openai",
        Preset::Anthropic => "anthropic",
        Preset::Gemini => "gcp.gemini",
        Preset::Vllm => "vllm",
        Preset::Ollama => "ollama",
        Preset::Custom => "custom",
    }
}

/// The longest model name read from a response.
const MODEL_NAME_MAX: usize = 200;

/// `gen_ai.response.model`: the first `"model":"…"` in a response's first
/// chunk, where every dialect names it (OpenAI's JSON and each chunk,
/// Anthropic's `message_start`, the Responses API's `response.created`).
/// A quote inside a JSON string is escaped, so content never matches. Only
/// a plain name counts: one with an escape, a control byte or over 200
/// bytes is left out rather than decoded.
pub fn response_model(chunk: &[u8]) -> Option<String> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    let finder = FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\"model\""));
    let mut from = 0;
    while let Some(i) = finder.find(&chunk[from..]) {
        let mut rest = &chunk[from + i + 7..];
        from += i + 7;
        rest = trim_json_space(rest);
        let Some(after_colon) = rest.strip_prefix(b":") else {
            continue;
        };
        let Some(value) = trim_json_space(after_colon).strip_prefix(b"\"") else {
            continue;
        };
        let end = memchr::memchr(b'"', &value[..value.len().min(MODEL_NAME_MAX + 1)])?;
        let name = &value[..end];
        if name.is_empty() || name.iter().any(|&b| b == b'\\' || b < 0x20) {
            return None;
        }
        return std::str::from_utf8(name).ok().map(str::to_owned);
    }
    None
}

fn trim_json_space(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_model_is_the_first_model_field_of_any_dialect() {
        let openai = br#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4.1-2025-04-14","choices":[]}"#;
        assert_eq!(
            response_model(openai).as_deref(),
            Some("gpt-4.1-2025-04-14")
        );
        let chunk = b"data: {\"id\":\"c\",\"model\": \"gpt-4o\",\"choices\":[]}\n\n";
        assert_eq!(response_model(chunk).as_deref(), Some("gpt-4o"));
        let anthropic = br#"event: message_start
data: {"type":"message_start","message":{"id":"m","model":"claude-sonnet-4-5","usage":{}}}"#;
        assert_eq!(
            response_model(anthropic).as_deref(),
            Some("claude-sonnet-4-5")
        );
        // In content a quote is escaped: never a match.
        let content = br#"{"choices":[{"message":{"content":"say \"model\":\"x\""}}]}"#;
        assert_eq!(response_model(content), None);
        // A key named model whose value is not a string is passed over.
        let nested = br#"{"model":{"a":1},"x":{"model":"m2"}}"#;
        assert_eq!(response_model(nested).as_deref(), Some("m2"));
        // Cut short, escaped or too long: nothing rather than a guess.
        assert_eq!(response_model(br#"{"model":"gpt-4"#), None);
        assert_eq!(response_model(br#"{"model":"a\u0041"}"#), None);
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(201));
        assert_eq!(response_model(long.as_bytes()), None);
        let max = format!(r#"{{"model":"{}"}}"#, "m".repeat(200));
        assert_eq!(response_model(max.as_bytes()).map(|m| m.len()), Some(200));
    }

    #[test]
    fn operations_by_path() {
        assert_eq!(operation("/v1/chat/completions"), Some("chat"));
        assert_eq!(operation("/openai/v1/chat/completions/"), Some("chat"));
        assert_eq!(operation("/v1/messages"), Some("chat"));
        assert_eq!(operation("/v1/responses"), Some("chat"));
        assert_eq!(operation("/v1/completions"), Some("text_completion"));
        assert_eq!(operation("/v1/embeddings"), Some("embeddings"));
        assert_eq!(operation("/v1/models"), None);
    }
}
