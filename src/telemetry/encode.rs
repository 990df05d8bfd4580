//! OTLP's protobuf (`ExportTraceServiceRequest`) for one batch of spans,
//! written in one pass into a buffer of the exact size.
//!
//! Why not `opentelemetry-otlp`: its encoder converts every span into
//! owned protobuf structs (each attribute's key and value copied) and then
//! prost recomputes each nested message's length at every level above it.
//! Measured with callgrind (`bench/instructions.sh --trace`), that was
//! 13,000 instructions per span, two thirds of what tracing cost a
//! request. Here each length is a sum over fields whose sizes are known
//! from the span itself, so a span is measured once and written once:
//! about a tenth of that. The tests decode the bytes with
//! `opentelemetry-proto` and compare them with its own conversion.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::SpanData;

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// `Span.flags`: the context says whether the parent is remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// The resource's attributes, encoded once (a `Resource` message's body).
pub fn resource(attrs: &[KeyValue]) -> Vec<u8> {
    let mut b = Buf(Vec::with_capacity(
        attrs.iter().map(|kv| field(1, kv_len(kv))).sum(),
    ));
    for kv in attrs {
        b.kv(1, kv);
    }
    b.0
}

/// The request body for `spans`, all of one resource (`resource`, from
/// [`resource`]) and one scope.
pub fn request(spans: &[SpanData], resource: &[u8]) -> Vec<u8> {
    let Some(first) = spans.first() else {
        return Vec::new();
    };
    let scope = &first.instrumentation_scope;
    let lens: Vec<usize> = spans.iter().map(span_len).collect();
    let scope_spans = field(1, scope_len(scope)) + lens.iter().map(|&l| field(2, l)).sum::<usize>();
    let resource_spans = field(1, resource.len()) + field(2, scope_spans);
    let total = field(1, resource_spans);
    let mut b = Buf(Vec::with_capacity(total));
    b.head(1, resource_spans);
    b.head(1, resource.len());
    b.0.extend_from_slice(resource);
    b.head(2, scope_spans);
    b.scope(scope);
    for (span, &len) in spans.iter().zip(&lens) {
        b.head(2, len);
        b.span(span);
    }
    debug_assert_eq!(b.0.len(), total);
    b.0
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag_len(field: u32) -> usize {
    varint_len(u64::from(field) << 3)
}

/// A length-delimited field whose body is `len` bytes, whole.
fn field(field: u32, len: usize) -> usize {
    tag_len(field) + varint_len(len as u64) + len
}

/// A value as OTLP's `AnyValue` carries it.
enum Any<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(Cow<'a, str>),
}

fn any(v: &Value) -> Any<'_> {
    match v {
        Value::Bool(b) => Any::Bool(*b),
        Value::I64(i) => Any::Int(*i),
        Value::F64(f) => Any::Double(*f),
        Value::String(s) => Any::Str(Cow::Borrowed(s.as_str())),
        // Arrays (sluice sets none): their text.
        other => Any::Str(Cow::Owned(other.to_string())),
    }
}

/// The `AnyValue` message's body.
fn any_len(a: &Any<'_>) -> usize {
    match a {
        Any::Bool(_) => 2,
        Any::Int(i) => 1 + varint_len(*i as u64),
        Any::Double(_) => 9,
        Any::Str(s) => field(1, s.len()),
    }
}

fn kv_len(kv: &KeyValue) -> usize {
    field(1, kv.key.as_str().len()) + field(2, any_len(&any(&kv.value)))
}

fn scope_len(s: &InstrumentationScope) -> usize {
    let mut n = nonempty(1, s.name());
    n += s.version().map_or(0, |v| nonempty(2, v));
    n + s.attributes().map(|kv| field(3, kv_len(kv))).sum::<usize>()
}

/// A string field, left out when empty (protobuf's default).
fn nonempty(f: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field(f, s.len())
    }
}

fn uint(f: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        tag_len(f) + varint_len(v)
    }
}

fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// `Status`'s body: the message of an error, and the code.
fn status_len(s: &Status) -> usize {
    match s {
        Status::Unset => 0,
        Status::Ok => 2,
        Status::Error { description } => nonempty(2, description) + 2,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn flags(s: &SpanData) -> u32 {
    let remote = if s.parent_span_is_remote {
        IS_REMOTE
    } else {
        0
    };
    u32::from(s.span_context.trace_flags().to_u8()) | HAS_IS_REMOTE | remote
}

fn span_len(s: &SpanData) -> usize {
    let mut n = field(1, 16) + field(2, 8);
    n += nonempty(3, &s.span_context.trace_state().header());
    if s.parent_span_id != SpanId::INVALID {
        n += field(4, 8);
    }
    n += nonempty(5, &s.name);
    n += uint(6, kind(&s.span_kind));
    n += 2 * 9;
    n += s
        .attributes
        .iter()
        .map(|kv| field(9, kv_len(kv)))
        .sum::<usize>();
    n += uint(10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        let mut body = 9 + nonempty(2, &e.name);
        body += e
            .attributes
            .iter()
            .map(|kv| field(3, kv_len(kv)))
            .sum::<usize>();
        body += uint(4, u64::from(e.dropped_attributes_count));
        n += field(11, body);
    }
    n += uint(12, u64::from(s.events.dropped_count));
    // Links (sluice makes none) are counted as dropped rather than sent.
    n += uint(14, u64::from(s.links.dropped_count) + s.links.len() as u64);
    n += field(15, status_len(&s.status));
    n + tag_len(16) + 4
}

struct Buf(Vec<u8>);

impl Buf {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u64) {
        self.varint((u64::from(field) << 3) | wire);
    }

    /// A length-delimited field's tag and length; its body follows.
    fn head(&mut self, field: u32, len: usize) {
        self.tag(field, LEN);
        self.varint(len as u64);
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.head(field, b.len());
        self.0.extend_from_slice(b);
    }

    fn nonempty(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn kv(&mut self, field: u32, kv: &KeyValue) {
        let value = any(&kv.value);
        let vlen = any_len(&value);
        let key = kv.key.as_str();
        self.head(field, self::field(1, key.len()) + self::field(2, vlen));
        self.bytes(1, key.as_bytes());
        self.head(2, vlen);
        match value {
            Any::Bool(b) => {
                self.tag(2, VARINT);
                self.varint(u64::from(b));
            }
            Any::Int(i) => {
                self.tag(3, VARINT);
                self.varint(i as u64);
            }
            Any::Double(f) => self.fixed64(4, f.to_bits()),
            Any::Str(s) => self.bytes(1, s.as_bytes()),
        }
    }

    fn scope(&mut self, s: &InstrumentationScope) {
        self.head(1, scope_len(s));
        self.nonempty(1, s.name());
        if let Some(v) = s.version() {
            self.nonempty(2, v);
        }
        for kv in s.attributes() {
            self.kv(3, kv);
        }
    }

    fn span(&mut self, s: &SpanData) {
        let cx = &s.span_context;
        self.bytes(1, &cx.trace_id().to_bytes());
        self.bytes(2, &cx.span_id().to_bytes());
        self.nonempty(3, &cx.trace_state().header());
        if s.parent_span_id != SpanId::INVALID {
            self.bytes(4, &s.parent_span_id.to_bytes());
        }
        self.nonempty(5, &s.name);
        self.uint(6, kind(&s.span_kind));
        self.fixed64(7, nanos(s.start_time));
        self.fixed64(8, nanos(s.end_time));
        for kv in &s.attributes {
            self.kv(9, kv);
        }
        self.uint(10, u64::from(s.dropped_attributes_count));
        for e in s.events.iter() {
            let mut body = 9 + self::nonempty(2, &e.name);
            body += e
                .attributes
                .iter()
                .map(|kv| field(3, kv_len(kv)))
                .sum::<usize>();
            body += self::uint(4, u64::from(e.dropped_attributes_count));
            self.head(11, body);
            self.fixed64(1, nanos(e.timestamp));
            self.nonempty(2, &e.name);
            for kv in &e.attributes {
                self.kv(3, kv);
            }
            self.uint(4, u64::from(e.dropped_attributes_count));
        }
        self.uint(12, u64::from(s.events.dropped_count));
        self.uint(14, u64::from(s.links.dropped_count) + s.links.len() as u64);
        self.head(15, status_len(&s.status));
        match &s.status {
            Status::Unset => {}
            Status::Ok => self.uint(3, 1),
            Status::Error { description } => {
                self.nonempty(2, description);
                self.uint(3, 2);
            }
        }
        self.tag(16, FIXED32);
        self.0.extend_from_slice(&flags(s).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use opentelemetry_sdk::Resource;
    use prost::Message;
    use std::time::Duration;

    fn span(n: u64, parent: Option<u64>, status: Status, attrs: Vec<KeyValue>) -> SpanData {
        let state = TraceState::from_key_value([("vendor", "opaque")]).unwrap();
        let mut events = SpanEvents::default();
        if n % 2 == 0 {
            events.events.push(opentelemetry::trace::Event::new(
                "first_chunk",
                UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789 + n),
                vec![KeyValue::new("k", n as i64)],
                0,
            ));
        }
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 + u128::from(n)),
                SpanId::from(0x00f0_67aa_0ba9_02b7 + n),
                if n % 3 == 0 {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                false,
                if n % 2 == 1 {
                    state
                } else {
                    TraceState::default()
                },
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: n % 2 == 0,
            span_kind: [SpanKind::Server, SpanKind::Client, SpanKind::Internal][n as usize % 3]
                .clone(),
            name: format!("POST route-{n}").into(),
            start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + n),
            end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_001_000_000_000 + n),
            attributes: attrs,
            dropped_attributes_count: n as u32 % 2,
            events,
            links: SpanLinks::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder("sluice").build(),
        }
    }

    fn attrs() -> Vec<KeyValue> {
        vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("sluice.route", String::from("llm")),
            KeyValue::new("http.response.status_code", 200_i64),
            KeyValue::new("negative", -3_i64),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("sluice.time_to_first_chunk", 0.125_f64),
            KeyValue::new("flag", true),
            KeyValue::new("off", false),
            KeyValue::new("empty", ""),
            KeyValue::new("unicode", "modèle-✓"),
            KeyValue::new("long", "x".repeat(300)),
        ]
    }

    #[test]
    fn a_batch_decodes_to_what_the_otlp_crates_make_of_it() {
        let resource = Resource::builder_empty()
            .with_service_name("sluice")
            .with_attribute(KeyValue::new("service.version", "0.1.0"))
            .build();
        let spans = vec![
            span(0, None, Status::Unset, attrs()),
            span(1, Some(7), Status::error(""), attrs()),
            span(2, Some(8), Status::error("upstream said no"), vec![]),
            span(3, Some(9), Status::Ok, attrs()),
            span(u64::from(u32::MAX) * 7, Some(1), Status::Unset, attrs()),
        ];
        let attrs: Vec<KeyValue> = resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        let ours = request(&spans, &self::resource(&attrs));
        let decoded = ExportTraceServiceRequest::decode(&ours[..]).expect("valid protobuf");
        let with_schema = ResourceAttributesWithSchema::from(&resource);
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &with_schema),
        };
        // Resource attributes may come in any order: compare them as sets.
        let sorted = |mut r: ExportTraceServiceRequest| {
            for rs in &mut r.resource_spans {
                if let Some(res) = &mut rs.resource {
                    res.attributes.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            r
        };
        assert_eq!(sorted(decoded), sorted(theirs));
    }

    #[test]
    fn no_spans_is_no_body() {
        assert!(request(&[], b"").is_empty());
    }

    #[test]
    fn varint_lengths_at_their_edges() {
        for (v, n) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut b = Buf(Vec::new());
            b.varint(v);
            assert_eq!(b.0.len(), n, "{v}");
        }
    }
}
